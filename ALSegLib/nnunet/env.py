"""nnU-Net's folders and settings, set for the duration of one call only.

nnU-Net reads ``nnUNet_raw``/``nnUNet_preprocessed``/``nnUNet_results`` from the
environment when it needs them. :func:`nnunet_environment` points them at the
project's ``nnunet/`` folder, and restores the caller's environment afterwards,
so the parent process (Slicer's Python, a notebook) is left as it was.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from ..devices import resolve_device  # noqa: F401 (nnU-Net callers import it from here)
from ..store.layout import Layout, NnunetFolders


def folders(project_root: Path) -> NnunetFolders:
    return Layout(project_root).nnunet


@contextlib.contextmanager
def nnunet_environment(project_root: Path, *, training_on_cpu: bool = False, log: Path | None = None) -> Iterator[NnunetFolders]:
    """Set nnU-Net's variables for one call; restore the caller's environment after.

    ``training_on_cpu`` runs data augmentation in the main process
    (``nnUNet_n_proc_DA=0``, unless the caller set it): on a few CPU cores, worker
    processes only compete with the network for the same cores. nnU-Net's
    console output goes to ``log`` when given, so that ``--json`` output stays clean.
    """
    f = folders(project_root)
    for p in (f.raw, f.preprocessed, f.results):
        p.mkdir(parents=True, exist_ok=True)
    wanted = {
        "nnUNet_raw": str(f.raw),
        "nnUNet_preprocessed": str(f.preprocessed),
        "nnUNet_results": str(f.results),
        "nnUNet_compile": os.environ.get("nnUNet_compile", "f"),
    }
    if training_on_cpu and "nnUNet_n_proc_DA" not in os.environ:
        wanted["nnUNet_n_proc_DA"] = "0"
    saved = {k: os.environ.get(k) for k in wanted}
    threads = torch.get_num_threads()
    os.environ.update(wanted)
    try:
        if log is None:
            yield f
        else:
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a", encoding="utf-8") as fh, contextlib.redirect_stdout(fh):
                yield f
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        torch.set_num_threads(threads)




@contextlib.contextmanager
def scratch_environment(project_root: Path, device: torch.device) -> Iterator[Path]:
    """nnU-Net's environment with its results folder in a throw-away folder: a trainer built
    here (to probe time and memory) leaves nothing in the project."""
    with tempfile.TemporaryDirectory(prefix="alseg-probe-") as tmp, \
            nnunet_environment(project_root, training_on_cpu=device.type == "cpu", log=Path(tmp) / "nnunet.log"):
        os.environ["nnUNet_results"] = tmp  # restored with the rest of nnU-Net's variables
        yield Path(tmp)
