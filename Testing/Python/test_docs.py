"""The documentation a newcomer reads: short README, links that resolve, the CLI reference current."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


def test_readme_is_short_and_its_links_resolve():
    text = (REPO / "README.md").read_text(encoding="utf-8")
    assert len(text.encode()) <= 15 * 1024
    links = re.findall(r"\]\(([^)#\s]+)", text)
    local = [link for link in links if not re.match(r"[a-z]+://", link)]
    assert "docs/architecture.md" in local and "docs/cli.md" in local
    missing = [link for link in local if not (REPO / link).exists()]
    assert not missing, f"README links to files that do not exist: {missing}"


def test_every_docs_page_links_back_and_its_local_links_resolve():
    for page in sorted((REPO / "docs").glob("*.md")):
        text = page.read_text(encoding="utf-8")
        assert "../README.md" in text, page.name
        for link in re.findall(r"\]\(([^)#\s]+)", text):
            if not re.match(r"[a-z]+://", link):
                assert (page.parent / link).exists(), f"{page.name} links to {link}, which does not exist"


def test_the_cli_reference_is_generated_from_the_current_parser():
    done = subprocess.run([sys.executable, str(REPO / "docs" / "make_cli_reference.py"), "--check"],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


def documented_command_lines() -> list[tuple[str, str]]:
    """Every ``alseg ...`` line of the fenced code blocks in README.md and docs/ (docs/cli.md is the
    parser's own help), line continuations joined, comments cut; an optional ``[...]`` group taken
    as written inside, ``a|b`` as its first choice, ``…`` dropped: the fullest form a reader types."""
    import re

    found = []
    for path in [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        if path.name == "cli.md":
            continue
        for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), re.S):
            for line in block.replace("\\\n", " ").splitlines():
                line = re.sub(r"\s#\s.*$", "", line.strip())
                match = re.search(r"(?:^|\s)(alseg\s.*)$", line)
                if line.startswith("#") or not match:
                    continue
                command = match.group(1).replace("[", " ").replace("]", " ").replace("…", " ")
                command = re.sub(r"(\S+?)\|\S+", r"\1", command)
                found.append((path.name, command))
    return found


def test_every_command_line_in_the_readme_and_docs_parses():
    """A line a reader copies must be accepted by the parser as written (a --help would not catch a
    misspelt option, an option that takes the project as its value, or a wrong repeat form)."""
    import shlex

    from ALSegLib.cli import build_parser

    lines = documented_command_lines()
    assert len(lines) > 30 and {name for name, _ in lines} >= {"README.md", "distributed.md", "pseudolabels.md"}
    for name, command in lines:
        args = build_parser().parse_args(shlex.split(command)[1:])  # a _UsageError names the problem
        assert args.command, (name, command)
    # the Ray cluster's address has its own option: a project is never read as an address
    args = build_parser().parse_args(["round", "proj", "--ray", "--budget", "5"])
    assert args.project == "proj" and args.ray and args.ray_address is None


def test_no_user_page_speaks_of_issues_or_design_sketches():
    """The pages are for users: no "issue 22", "since this issue", "the design sketch said"."""
    import re

    for path in [REPO / "README.md", REPO / "ALSeg" / "README.md", *sorted((REPO / "docs").glob("*.md"))]:
        text = path.read_text()
        found = re.findall(r"(?i)\bissue \d+|\bthis issue\b|\bthe issue\b|design sketch", text)
        assert not found, f"{path.name}: {found}"


def test_the_prompt_file_schema_matches_the_parser_and_the_documented_example(tmp_path):
    """docs/prompt-file.schema.json names exactly the keys the engine's parser takes, and the
    example of docs/api.md is valid by the schema and read by the engine."""
    import json
    import re

    jsonschema = pytest.importorskip("jsonschema")
    from ALSegLib.pseudolabels import prompts

    schema = json.loads((REPO / "docs" / "prompt-file.schema.json").read_text())
    jsonschema.Draft202012Validator.check_schema(schema)
    assert set(schema["$defs"]["labelSettings"]["properties"]) == prompts._LABEL_KEYS
    assert set(schema["$defs"]["prompt"]["properties"]) == {"box", "points", "negative"}
    assert set(schema["properties"]["space"]["enum"]) == set(prompts.SPACES)
    example = json.loads(re.search(r"```json\n(.*?)```", (REPO / "docs" / "api.md").read_text(), re.S).group(1))
    jsonschema.validate(example, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"cases": {"c": {"organ": [{"negative": [[1, 2, 3]]}]}}}, schema)  # no box, no point
    written = tmp_path / "prompts.json"
    written.write_text(json.dumps(example))
    pf = prompts.read_prompt_file(written, ["kidney", "tumor"], ["case_001"])
    assert pf.labels["kidney"].post.keep_components == 2 and pf.labels["tumor"].inside == "kidney"
