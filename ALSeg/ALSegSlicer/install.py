"""The engine's dependencies inside Slicer's Python: check, ask, then install — on first use, never at import.

torch (with torchvision) goes through the PyTorch extension's ``PyTorchUtils``
logic, which picks the build that fits the machine's GPU; the other packages
through ``slicer.packaging.pip_ensure`` (Slicer >= 5.12: asks, installs with a
progress dialog, offers a restart) or, on older Slicer, a confirmation and
``slicer.util.pip_install``. Installation runs on the main thread only.
"""
from __future__ import annotations

import importlib
import importlib.metadata
import threading
from pathlib import Path

REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH = "torch>=2.5"
TORCHVISION = "torchvision>=0.20"


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


def ensure(ask: bool = True) -> bool:
    """Install what is missing into Slicer's Python; True when everything is there afterwards.

    Call it when the user starts work that needs the engine (not at module load). Raises
    ``RuntimeError`` off the main thread or when the PyTorch extension is needed and absent."""
    import slicer

    if threading.current_thread() is not threading.main_thread():
        raise RuntimeError("ALSeg installs its dependencies from Slicer's main thread only")
    missing = status()
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
        try:
            packaging = importlib.import_module("slicer.packaging")  # Slicer >= 5.12
        except ModuleNotFoundError:
            packaging = None
        if packaging is not None and hasattr(packaging, "pip_ensure"):
            try:
                packaging.pip_ensure(missing["packages"], prompt_install=ask, requester="ALSeg")
            except RuntimeError:  # the user declined
                return False
        else:
            if ask and not slicer.util.confirmOkCancelDisplay(
                    "ALSeg needs these Python packages in Slicer's Python:\n\n" + "\n".join(missing["packages"])
                    + "\n\nInstall them now? (This downloads them and can take several minutes.)",
                    windowTitle="ALSeg - install Python packages"):
                return False
            slicer.util.pip_install(missing["packages"])
    after = status()
    return not after["torch"] and not after["packages"]
