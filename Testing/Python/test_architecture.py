"""The house rules that keep the engine changeable, read from the sources (no import of the code).

- every path of a project folder comes from the store's :class:`ALSegLib.store.layout.Layout`:
  no module outside ``ALSegLib/store`` joins a path onto a ``.root``;
- no module reaches into another's private names (``_name`` defined in the engine or the Slicer glue);
- the layers and the absence of import cycles are import-linter's contracts (``make lint``).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SOURCES = sorted(p for base in ("ALSegLib", "ALSeg") for p in (REPO / base).rglob("*.py"))


def _trees() -> dict[Path, ast.Module]:
    return {p: ast.parse(p.read_text(encoding="utf-8"), str(p)) for p in SOURCES}


def root_joins(tree: ast.Module) -> list[tuple[int, str]]:
    """``<anything>.root / ...`` expressions: a path built by hand under a project (or other) root."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div)  # the innermost join of a chain
                and isinstance(node.left, ast.Attribute) and node.left.attr == "root"):
            found.append((node.lineno, ast.unparse(node)))
    return found


def test_the_sources_are_there():
    names = {p.relative_to(REPO).as_posix() for p in SOURCES}
    assert {"ALSegLib/project.py", "ALSegLib/store/layout.py", "ALSeg/ALSeg.py", "ALSeg/ALSegSlicer/facade.py"} <= names


def test_no_project_path_is_built_outside_the_store():
    bad = [f"{p.relative_to(REPO)}:{line}: {text}" for p, tree in _trees().items()
           if p.relative_to(REPO).parts[:2] != ("ALSegLib", "store") for line, text in root_joins(tree)]
    assert not bad, "paths built by hand (use project.layout):\n" + "\n".join(bad)


def test_the_check_finds_a_path_built_by_hand():
    assert [line for line, _ in root_joins(ast.parse('x = project.root / "models" / name'))] == [1]
    assert root_joins(ast.parse("x = project.layout.model(name)")) == []


def test_no_module_uses_another_modules_private_names():
    trees = _trees()
    private = {n.name for t in trees.values() for n in ast.walk(t)
               if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef))
               and n.name.startswith("_") and not n.name.startswith("__")}
    assert "_read_config" in private  # the set is the engine's own private functions and methods
    bad = []
    for p, tree in trees.items():
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.level or (node.module or "").startswith("ALSeg")):
                bad += [f"{p.relative_to(REPO)}:{node.lineno}: imports {a.name}" for a in node.names
                        if a.name.startswith("_") and not a.name.startswith("__")]
            elif (isinstance(node, ast.Attribute) and node.attr in private
                  and not (isinstance(node.value, ast.Name) and node.value.id in ("self", "cls"))):
                bad.append(f"{p.relative_to(REPO)}:{node.lineno}: {ast.unparse(node)}")
    assert not bad, "private names used across modules:\n" + "\n".join(bad)


@pytest.mark.parametrize("folder", ["images", "labels", "rounds", "models", "predictions", "features", "cache",
                                    "reports", "nnunet", "prompts"])
def test_the_layout_documents_every_folder_it_builds(folder):
    doc = (REPO / "ALSegLib" / "store" / "layout.py").read_text(encoding="utf-8").split('"""')[1]
    assert f"{folder}/" in doc


def test_a_path_a_record_stores_cannot_lead_out_of_the_project(tmp_path):
    from ALSegLib.errors import InputError
    from ALSegLib.store.layout import Layout

    (tmp_path / "p").mkdir()
    layout = Layout(tmp_path / "p")
    assert layout.resolve("models/a/checkpoint_final.pth") == tmp_path / "p" / "models" / "a" / "checkpoint_final.pth"
    with pytest.raises(InputError, match="outside the project"):
        layout.resolve("../elsewhere/checkpoint_final.pth")
    with pytest.raises(InputError, match="case id"):
        layout.model("../x")


def test_choice_lists_are_defined_once_and_every_interface_offers_them():
    from ALSegLib import settings
    from ALSegLib.cli import build_parser
    from ALSegLib.nnunet.modes import MODES as TRAINING_MODES
    from ALSegLib.selection import features, strategies

    assert set(strategies.STRATEGIES) == set(settings.STRATEGIES)
    from ALSegLib.nnunet.dataset import SPARSE_FILLS
    from ALSegLib.selection.slices import SLICE_STRATEGIES

    assert SLICE_STRATEGIES == settings.SLICE_STRATEGIES and SPARSE_FILLS == settings.SPARSE_FILLS
    assert settings.DEFAULT_STRATEGY in settings.STRATEGIES and settings.RoundSettings().strategy == settings.DEFAULT_STRATEGY
    assert set(features.SOURCES) | {"auto"} == set(settings.FEATURE_SOURCES)
    assert set(settings.MODES) == {m for m, mode in TRAINING_MODES.items() if mode.in_rounds} == {"finetune", "filtermatch"}
    # the command line: each round-shaped command's choices and defaults come from the settings
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("round", "demo", "select"):
        actions = {a.dest: a for a in sub[command]._actions}
        assert tuple(actions["strategy"].choices) == (settings.ROUND_STRATEGIES if command == "round"
                                                      else settings.STRATEGIES), command
        assert actions["strategy"].default == settings.DEFAULT_STRATEGY, command
        if "mode" in actions:
            assert tuple(actions["mode"].choices) == settings.MODES and actions["mode"].default == "finetune", command
    assert sub["round"]._option_string_actions["--pseudo-share"].default == settings.RoundSettings.pseudo_share
    assert tuple(sub["train"]._option_string_actions["--mode"].choices) == tuple(TRAINING_MODES)
    # the Slicer panel's lists (literal in ALSeg.py: the parameter node reads them at class definition)
    panel = {n.targets[0].id: [e.value for e in n.value.elts] for n in ast.parse((REPO / "ALSeg" / "ALSeg.py").read_text()).body
             if isinstance(n, ast.Assign) and isinstance(n.value, ast.List)}
    assert tuple(panel["STRATEGIES"]) == settings.ROUND_STRATEGIES  # either unit's (the round refuses a misfit)
    assert tuple(panel["UNITS"]) == settings.UNITS
    assert tuple(panel["MODES"]) == settings.MODES
    assert tuple(panel["DEVICES"]) == settings.DEVICES


def test_every_engine_module_sits_in_a_layer_of_the_import_contract():
    import tomllib

    contracts = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["importlinter"]["contracts"]
    engine = next(c for c in contracts if c["type"] == "layers" and "containers" not in c)
    listed = {name.strip() for layer in engine["layers"] for name in layer.replace("|", ":").split(":")}
    modules = {f"ALSegLib.{p.stem}" for p in (REPO / "ALSegLib").glob("*.py") if p.stem != "__init__"}
    modules |= {f"ALSegLib.{p.parent.name}" for p in (REPO / "ALSegLib").glob("*/__init__.py")}
    assert modules - listed == set(), "modules outside every layer escape the contract"


def test_every_test_named_slow_exists():
    from conftest import SLOW_MODULES, SLOW_TESTS

    here = Path(__file__).parent
    for module, names in {**SLOW_TESTS, **{m: set() for m in SLOW_MODULES}}.items():
        defined = {n.name for n in ast.parse((here / module).read_text(encoding="utf-8")).body
                   if isinstance(n, ast.FunctionDef)}
        assert names <= defined, f"{module}: {sorted(names - defined)} listed as slow but not defined"


def test_light_entry_points_do_not_import_torch_or_nnunet():
    """Why the engine has imports inside functions: the command line, the package and the Slicer glue's
    settings start without torch, nnU-Net, segment-anything or scipy (a fresh interpreter checks it)."""
    import subprocess
    import sys

    code = ("import sys; import ALSegLib, ALSegLib.cli, ALSegLib.settings, ALSegLib.store.models, "
            "ALSegLib.store.predictions; ALSegLib.cli.build_parser(); "
            "heavy = [m for m in ('torch', 'nnunetv2', 'segment_anything', 'scipy') if m in sys.modules]; "
            "print(','.join(heavy))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported at start: {done.stdout.strip()}"


def test_filtermatch_settings_are_defined_once_and_every_command_offers_them():
    """FilterMatch's defaults were written in three places (the config, alseg train's options, the
    round/simulate options); the commands now build their options from FilterMatchConfig."""
    from dataclasses import fields

    from ALSegLib.cli import build_parser
    from ALSegLib.nnunet.filtermatch_settings import OPTIONS, FilterMatchConfig
    from ALSegLib.settings import RoundSettings

    defaults = FilterMatchConfig()
    assert set(OPTIONS) == {f.name for f in fields(FilterMatchConfig)} - {"strong"}
    sub = next(a for a in build_parser()._actions if a.dest == "command").choices
    for command in ("train", "round", "simulate"):
        actions = {a.option_strings[0]: a for a in sub[command]._actions if a.option_strings}
        for name, (option, _) in OPTIONS.items():
            assert actions[option].default == getattr(defaults, name), (command, option)
    # a round stores them nested, and reads them back as the same settings
    settings = RoundSettings(mode="filtermatch", filtermatch={"warmup_epochs": 3})
    assert isinstance(settings.filtermatch, FilterMatchConfig) and settings.filtermatch.warmup_epochs == 3
    assert RoundSettings.from_json(settings.to_json(), "test") == settings


def test_a_pseudo_label_source_is_typed_and_stored_as_round_records_always_had_it():
    from ALSegLib.errors import InputError
    from ALSegLib.settings import PseudoSource, RoundSettings

    stored = [{"source": "sam", "prompts_from_reference": 3, "axis": "sagittal", "exclude": ["t1"]},
              {"source": "sam", "prompts": "/p/boxes.json", "checkpoint": "/w/sam.pth", "device": "cuda:1"},
              {"source": "import", "from": "/data/totalseg", "map": "5=1"},
              {"source": "degraded-reference", "target_dice": 0.75, "seed": 2}]
    for data in stored:
        source = PseudoSource.from_json(data)
        assert source.to_json() == data  # the shape older round records hold
        assert RoundSettings.from_json({"budget": "2", "pseudo": data}, "test").pseudo == source
    assert PseudoSource.from_json(stored[2]).options() == {"from_dir": "/data/totalseg", "map": "5=1"}
    with pytest.raises(InputError, match="unknown pseudo-label option"):
        PseudoSource.from_json({"source": "sam", "promts": "x.json"})
    with pytest.raises(InputError, match="takes no target_dice"):
        PseudoSource.from_json({"source": "sam", "target_dice": 0.7})
    with pytest.raises(InputError, match="needs 'from'"):
        PseudoSource.from_json({"source": "import"})
