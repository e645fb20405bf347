"""One device rule for every model the engine runs (nnU-Net, SAM, LiteMedSAM).

``auto`` picks CUDA, then Apple's MPS, then the CPU; ``cpu``, ``cuda``, ``cuda:N`` and
``mps`` are taken as given and must be available here. :func:`device_name` checks the
spelling without importing torch (the command line's ``--device``).
"""
from __future__ import annotations

import re
from typing import TYPE_CHECKING

from .errors import InputError

if TYPE_CHECKING:
    import torch

DEVICE_HELP = "auto, cpu, cuda, cuda:N or mps"
_NAME = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


def device_name(name: str) -> str:
    """``name`` lower-cased if it is a device ALSeg knows how to use, else a clear error."""
    value = (name or "auto").strip().lower()
    if not _NAME.match(value):
        raise InputError("--device", f"must be {DEVICE_HELP}, not {name!r}")
    return value


def resolve_device(name: str = "auto") -> torch.device:
    """The torch device for ``name`` (see the module); an explicit device must be available."""
    import torch

    value = device_name(name)
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if value == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if value.startswith("cuda"):
        if not torch.cuda.is_available():
            raise InputError(f"--device {value}", "no CUDA device is available here")
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= torch.cuda.device_count():
            raise InputError(f"--device {value}", f"this machine has {torch.cuda.device_count()} CUDA device(s)")
    if value == "mps" and not mps:
        raise InputError("--device mps", "no Apple MPS device is available here")
    return torch.device(value)
