"""The child process that traces LiteMedSAM's image encoder to ONNX (started by
:class:`.litemedsam.OnnxEncoder`; a separate process so the export's memory is returned
when it ends). Its own module: it loads the checkpoint through :mod:`.sam`, which builds
on :mod:`.litemedsam`."""
from __future__ import annotations

import argparse
import warnings
from pathlib import Path

import torch

from .litemedsam import IMAGE_SIZE
from .sam import load_checkpoint


def export_encoder(checkpoint: str | None, batch: int, out: Path, sha256: str) -> None:
    """Trace the image encoder of ``checkpoint`` (None: the built-in one) to ONNX at ``out`` (the child's work)."""
    loaded = load_checkpoint(checkpoint, "litemedsam" if checkpoint is None else None, "cpu")
    if loaded.sha256 and loaded.sha256 != sha256:
        raise SystemExit(f"{checkpoint}: changed since it was loaded (sha256 {loaded.sha256[:12]}…)")
    x = torch.zeros(batch, 3, IMAGE_SIZE, IMAGE_SIZE)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(loaded.model.image_encoder, (x,), str(out), input_names=["image"],
                          output_names=["embedding"], opset_version=17, dynamo=False)


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description="Export LiteMedSAM's image encoder to ONNX (run by OnnxEncoder).")
    ap.add_argument("--out", required=True)
    ap.add_argument("--batch", type=int, required=True)
    ap.add_argument("--sha256", required=True)
    ap.add_argument("--checkpoint")
    a = ap.parse_args()
    export_encoder(a.checkpoint, a.batch, Path(a.out), a.sha256)
