"""The engine's dependencies inside Slicer's Python: check, ask, then install — on first use, never at import.

torch (with torchvision) goes through the PyTorch extension's ``PyTorchUtils``
logic, which picks the build that fits the machine's GPU; the other packages
through ``slicer.packaging.pip_ensure`` (Slicer >= 5.12: asks, installs with a
progress dialog, offers a restart) or, on older Slicer, a confirmation and
``slicer.util.pip_install``. Installation runs on the main thread only.

Slicer's own packages are never replaced: nnunetv2 (whose dependency list names
SimpleITK, torch and requests) is installed without its dependencies and then its
other dependencies one by one, as SlicerNNUNet does, and every install runs under
a pip constraints file pinning the versions of SimpleITK, numpy, requests, torch
and torchvision that Slicer's Python has. In testing mode (ctest, ``--testing``)
nothing is installed: :func:`ensure` only reports what is missing.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import threading
from pathlib import Path

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH = "torch>=2.5"
TORCHVISION = "torchvision>=0.20"
# what Slicer ships (or the PyTorch extension manages): the engine's installs must not replace them
PROTECTED = ("SimpleITK", "numpy", "requests", "torch", "torchvision")
NO_DEPS = {"nnunetv2": ("SimpleITK", "torch", "requests")}  # installed alone, then its other dependencies


def read_requirements(path: Path = REQUIREMENTS_FILE) -> list[str]:
    """Requirement lines of a requirements file (comments and pip options skipped)."""
    out = []
    for line in path.read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            out.append(line)
    return out


def unmet(requirements: list[str]) -> list[str]:
    """The requirements not satisfied by what is installed (missing, or a version outside the range)."""
    from packaging.requirements import Requirement

    out = []
    for text in requirements:
        req = Requirement(text)
        try:
            version = importlib.metadata.version(req.name)
        except importlib.metadata.PackageNotFoundError:
            out.append(text)
            continue
        if req.specifier and not req.specifier.contains(version, prereleases=True):
            out.append(text)
    return out


def status() -> dict[str, list[str]]:
    """What is missing: ``{"torch": [...], "packages": [...]}`` (empty lists: all there)."""
    return {"torch": unmet([TORCH, TORCHVISION]), "packages": unmet(read_requirements())}


def constraints(protected: tuple[str, ...] = PROTECTED) -> list[str]:
    """pip constraint lines pinning the installed versions of ``protected`` (absent ones are free)."""
    out = []
    for name in protected:
        try:
            out.append(f"{name}=={importlib.metadata.version(name)}")
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def install_steps(missing: list[str], dependencies=None) -> list[list[str]]:
    """The pip argument lists that install ``missing`` without touching Slicer's packages: each
    package of :data:`NO_DEPS` alone with ``--no-deps``, then its own dependencies (less the
    skipped ones and those already satisfied) with the rest. ``dependencies``: a package's
    requirement lines (default: its installed metadata, read after the ``--no-deps`` step)."""
    from packaging.requirements import Requirement

    dependencies = dependencies or (lambda name: importlib.metadata.requires(name) or [])
    steps, rest = [], []
    for text in missing:
        req = Requirement(text)
        if req.name in NO_DEPS:
            steps.append([text, "--no-deps"])
        else:
            rest.append(text)
    for text in missing:
        name = Requirement(text).name
        if name not in NO_DEPS:
            continue
        skip = {s.lower() for s in NO_DEPS[name]} | {p.lower() for p in PROTECTED}
        for dep in dependencies(name):
            dep_req = Requirement(dep)
            if dep_req.marker is not None and not dep_req.marker.evaluate({"extra": ""}):
                continue
            line = f"{dep_req.name}{dep_req.specifier}"
            if dep_req.name.lower() not in skip and unmet([line]) and line not in rest:
                rest.append(line)
    if rest:
        steps.append(rest)
    return steps


def _testing() -> bool:
    import slicer

    app = getattr(slicer, "app", None)
    return bool(app is not None and app.testingEnabled())


def ensure(ask: bool = True) -> bool:
    """Install what is missing into Slicer's Python; True when everything is there afterwards.

    Call it when the user starts work that needs the engine (not at module load). Raises
    ``RuntimeError`` off the main thread or when the PyTorch extension is needed and absent.
    In testing mode it installs nothing and says whether everything is there."""
    import slicer

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("ALSeg installs its dependencies from Slicer's main thread only")
    missing = status()
    if _testing():
        return not missing["torch"] and not missing["packages"]
    if missing["torch"]:
        try:
            import PyTorchUtils
        except ModuleNotFoundError:
            raise RuntimeError("ALSeg needs PyTorch: install the 'PyTorch' extension from the Extensions Manager, "
                               "restart Slicer, and try again") from None
        torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
            askConfirmation=ask, torchVersionRequirement=TORCH[len("torch"):],
            torchvisionVersionRequirement=TORCHVISION[len("torchvision"):])
        if torch is None:
            return False
    if missing["packages"]:
        if ask and not slicer.util.confirmOkCancelDisplay(
                "ALSeg needs these Python packages in Slicer's Python:\n\n" + "\n".join(missing["packages"])
                + "\n\nSlicer's own SimpleITK, numpy, requests and torch are kept. Install them now? (This downloads "
                "them and can take several minutes; Slicer may ask for a restart afterwards.)",
                windowTitle="ALSeg - install Python packages"):
            return False
        _install(missing["packages"])
    after = status()
    return not after["torch"] and not after["packages"]


def _install(missing: list[str]) -> None:
    """Install ``missing`` with Slicer's pip under the constraints of :func:`constraints`: on
    Slicer >= 5.12 through ``slicer.packaging.pip_install`` (its ``skip_packages`` walks nnunetv2's
    dependencies with ``--no-deps`` and scrubs the skipped ones from its metadata), on older Slicer
    through ``slicer.util.pip_install`` and the steps of :func:`install_steps`."""
    import tempfile

    import slicer

    with tempfile.TemporaryDirectory(prefix="alseg-pip-") as tmp:
        pins = Path(tmp) / "constraints.txt"
        pins.write_text("\n".join(constraints()) + "\n")
        try:  # a submodule: slicer/__init__ does not import it
            packaging = importlib.import_module("slicer.packaging")  # Slicer >= 5.12
        except ModuleNotFoundError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_install"):
            for text in missing:
                name = _name(text)
                if name in NO_DEPS:
                    packaging.pip_install([text], constraints=pins, skip_packages=list(NO_DEPS[name] + PROTECTED),
                                          requester="ALSeg")
            rest = [m for m in missing if _name(m) not in NO_DEPS]
            if rest:
                packaging.pip_install(rest, constraints=pins, requester="ALSeg")
            return
        for text in missing:  # the --no-deps installs first: their dependencies are read from what they install
            if _name(text) in NO_DEPS:
                slicer.util.pip_install([text, "--no-deps", "-c", str(pins)])
        for step in install_steps(missing):
            if "--no-deps" not in step:
                slicer.util.pip_install([*step, "-c", str(pins)])


def _name(text: str) -> str:
    from packaging.requirements import Requirement

    return Requirement(text).name
