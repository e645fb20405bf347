"""FilterMatch's settings, defined once: the trainer, the round settings and the command
line's options all read them from here. Light on purpose (no torch): the command line
builds its parser from these defaults without importing nnU-Net."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields


@dataclass(frozen=True)
class StrongAugmentation:
    """Probabilities and strengths of the strong view (each applied per sample)."""

    p_rotate: float = 0.5
    p_flip: float = 0.5
    p_brightness: float = 0.5
    brightness: float = 0.25  # multiplicative factor in [1 - b, 1 + b]
    p_contrast: float = 0.5
    contrast: float = 0.25
    p_gamma: float = 0.3
    gamma: tuple[float, float] = (0.7, 1.5)
    p_noise: float = 0.3
    noise_std: float = 0.1  # relative to the sample's intensity std
    p_blur: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)


@dataclass
class FilterMatchConfig:
    """FilterMatch's settings. Defaults follow the reference (nnFilterMatch) where it
    gave them: warm-up 20 epochs, filter every 100 epochs from epoch 100, drop 15 %,
    unlabeled weight 1 with a hard switch, no teacher."""

    warmup_epochs: int = 20  # E_start: supervised only before this epoch
    filter_start: int = 100  # E_f
    filter_every: int = 100  # K
    drop_fraction: float = 0.15  # q
    unlabeled_weight: float = 1.0  # λ_u
    ramp_epochs: int = 0  # 0 = hard switch after warm-up
    teacher: str = "none"  # "none": the network labels its own batches (reference); "ema": a mean teacher
    ema_decay: float = 0.99
    confidence: float = 0.0  # pseudo-label voxels below this top-class probability are ignored (0: none, as the reference)
    unlabeled_batch: int | None = None  # unlabeled samples per step (None: the labeled batch size, as the reference)
    strong: StrongAugmentation = field(default_factory=StrongAugmentation)

    def __post_init__(self):
        if self.teacher not in ("none", "ema"):
            raise ValueError(f"teacher must be 'none' or 'ema', not {self.teacher!r}")
        if not 0 <= self.drop_fraction < 1:
            raise ValueError(f"drop fraction must be in [0, 1), not {self.drop_fraction}")
        if not 0 < self.ema_decay < 1:
            raise ValueError(f"EMA decay must be in (0, 1), not {self.ema_decay}")
        if not 0 <= self.confidence < 1:
            raise ValueError(f"confidence threshold must be in [0, 1), not {self.confidence}")
        if self.unlabeled_batch is not None and self.unlabeled_batch < 1:
            raise ValueError(f"unlabeled batch must be at least 1, not {self.unlabeled_batch}")

    @classmethod
    def from_json(cls, data: dict) -> FilterMatchConfig:
        data = dict(data)
        strong = StrongAugmentation(**{k: tuple(v) if isinstance(v, list) else v for k, v in data.pop("strong", {}).items()})
        return cls(strong=strong, **data)

    def to_json(self) -> dict:
        return asdict(self)


# the command line's option for each field (alseg train / round / simulate), with its help
OPTIONS = {
    "warmup_epochs": ("--warmup", "E_start: supervised-only epochs"),
    "filter_start": ("--filter-start", "E_f: first filter after this epoch"),
    "filter_every": ("--filter-every", "K: filter interval in epochs"),
    "drop_fraction": ("--drop-fraction", "q: fraction of the pool dropped per filter"),
    "unlabeled_weight": ("--unlabeled-weight", "lambda_u"),
    "ramp_epochs": ("--ramp", "epochs of sigmoid ramp-up of lambda_u (0: hard switch)"),
    "teacher": ("--teacher", "who makes the pseudo-labels: the network itself (none, as the reference) or an EMA teacher"),
    "ema_decay": ("--ema-decay", "EMA teacher decay"),
    "confidence": ("--confidence", "ignore pseudo-label voxels whose top class probability is below this (0: keep all)"),
    "unlabeled_batch": ("--unlabeled-batch", "unlabeled samples per step (default: the labeled batch size; smaller is faster)"),
}
TEACHERS = ("none", "ema")


def option_fields() -> list[tuple[str, str, str, object, type]]:
    """(field, option, help, default, type) for each option of :data:`OPTIONS`."""
    defaults = FilterMatchConfig()
    types = {f.name: f.type for f in fields(FilterMatchConfig)}
    kinds = {"int": int, "float": float, "str": str, "int | None": int}
    return [(name, opt, text, getattr(defaults, name), kinds[types[name]]) for name, (opt, text) in OPTIONS.items()]
