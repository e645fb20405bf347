"""The documentation a newcomer reads: short README, links that resolve, the CLI reference current."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

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
