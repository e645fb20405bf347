"""Every setting of a round, and every choice list the interfaces offer, defined once.

:class:`RoundSettings` is what a round does (stored in its record; a resumed round keeps
its own). The command line builds its round options' choices and defaults from here and
from the registries they name (training modes: :mod:`ALSegLib.nnunet.modes`; strategies:
:mod:`ALSegLib.selection.strategies`, whose names must be :data:`STRATEGIES`, checked by a
test); the Slicer panel offers the same lists. Light on purpose: no numpy, torch or nnU-Net.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace

from .errors import InputError
from .nnunet.filtermatch_settings import FilterMatchConfig
from .nnunet.modes import ROUND_MODES, check_budget, check_minutes

STRATEGIES = ("hybrid", "hybrid-weighted", "uncertainty", "coreset", "random")  # selection.strategies.STRATEGIES
SLICE_STRATEGIES = ("random", "random-fg", "uncertainty", "hybrid")  # selection.slices.SLICE_STRATEGIES
ROUND_STRATEGIES = STRATEGIES + tuple(s for s in SLICE_STRATEGIES if s not in STRATEGIES)  # either unit's
UNITS = ("case", "slice")  # what a round queries: whole cases, or slabs of slices along the acquisition axis
SPARSE_FILLS = ("ignore", "pseudo")  # nnunet.dataset.SPARSE_FILLS
DEFAULT_STRATEGY = "hybrid"
MODES = ROUND_MODES  # the training modes a round may use
PSEUDO_SOURCES = ("sam", "import", "degraded-reference")
FEATURE_SOURCES = ("auto", "nnunet", "sam", "histogram")  # selection.features.SOURCES and "auto"
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
DEVICES = ("auto", "cpu", "cuda", "mps")  # what the Slicer panel offers; the CLI takes cuda:N too


TRUST_DICE = 0.2  # trust.TRUST_DICE (checked by a test): kept here so that the settings stay light


FINETUNE_STARTS = ("pretrain", "previous")
# how the cases nobody prompted get a pseudo-label (ALSegLib.bootstrap): a first nnU-Net trained on the prompted
# cases' pseudo-labels predicts them, and its prediction is the pseudo-label ("predict") or gives the per-slice boxes
# the foundation model segments from ("sam"); "off": they get none (learned only once a human labels them)
BOOTSTRAPS = ("predict", "sam", "off")
DEFAULT_BOOTSTRAP = "predict"


def check_learning_rate(value) -> None:
    """``--lr``: a positive number below 1, or None (nnU-Net's)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 < value < 1.0:
        raise InputError("--lr", f"must be a learning rate in (0, 1), not {value!r}")


def check_trust_dice(value) -> None:
    """``--trust-dice``: a Dice in [0, 1], or None (off)."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value <= 1.0:
        raise InputError("--trust-dice", f"must be a Dice between 0 and 1, or off, not {value!r}")


@dataclass(frozen=True)
class PseudoSource:
    """Where a round's (or the experiment's) pseudo-labels come from, with that source's options.

    Stored in the round record as :meth:`to_json` gives it (the options set, ``"from"`` for
    ``from_dir``), the shape round records have always had.
    """

    source: str  # one of PSEUDO_SOURCES
    # sam: LiteMedSAM built in, or a SAM/MedSAM checkpoint; the prompts are one of the next three
    prompts: str | None = None  # a prompt file (boxes a radiologist drew)
    from_labels: str | None = None  # boxes from an earlier model's labels
    prompts_from_reference: int | None = None  # experiments only: N boxes per structure from the references
    checkpoint: str | None = None  # None: the built-in LiteMedSAM
    model_type: str | None = None
    axis: str | None = None
    exclude: tuple[str, ...] = ()  # cases never given prompts (the held-out cases)
    window: str | None = None  # the rest: pseudolabel_with_sam's own options, as `alseg pseudolabel` takes them
    device: str | None = None
    batch: int | None = None
    memory_gib: float | None = None
    backend: str | None = None
    box_margin: float | None = None
    settings_file: str | None = None
    auto: bool | None = None
    auto_settings: str | None = None
    # import: another model's label files
    from_dir: str | None = None
    map: str | None = None
    # degraded-reference: references corrupted to a target Dice (the oracle experiment only)
    target_dice: float | None = None
    seed: int | None = None

    OPTIONS = {  # the options each source takes
        "sam": ("prompts", "from_labels", "prompts_from_reference", "checkpoint", "model_type", "axis", "exclude", "window",
                "device", "batch", "memory_gib", "backend", "box_margin", "settings_file", "auto", "auto_settings"),
        "import": ("from_dir", "map"),
        "degraded-reference": ("target_dice", "seed"),
    }

    def __post_init__(self):
        if self.source not in PSEUDO_SOURCES:
            raise InputError("pseudo-label source", f"needs 'source' one of {', '.join(PSEUDO_SOURCES)}, "
                                                    f"not {self.source!r}")
        wrong = [f.name for f in fields(self) if f.name != "source" and getattr(self, f.name) not in (None, ())
                 and f.name not in self.OPTIONS[self.source]]
        if wrong:
            raise InputError(f"pseudo-label source {self.source}", f"takes no {', '.join(wrong)} "
                                                                   f"(it takes {', '.join(self.OPTIONS[self.source])})")
        object.__setattr__(self, "exclude", tuple(sorted(set(self.exclude))))
        if self.source == "import" and not self.from_dir:
            raise InputError("pseudo-label source import", "needs 'from': the folder of the other model's labels")

    @classmethod
    def from_json(cls, data: Mapping | PseudoSource, where: str = "pseudo-label source") -> PseudoSource:
        if isinstance(data, PseudoSource):
            return data
        if not isinstance(data, Mapping) or "source" not in data:
            raise InputError(where, f"needs 'source' one of {', '.join(PSEUDO_SOURCES)}, got {data!r}")
        items = {("from_dir" if k == "from" else k): v for k, v in data.items()}
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(items) - known)
        if unknown:
            raise InputError(where, f"unknown pseudo-label option(s): {', '.join(unknown)}")
        if "exclude" in items:
            items["exclude"] = tuple(items["exclude"] or ())
        return cls(**items)

    def to_json(self) -> dict:
        out: dict = {"source": self.source}
        for name in self.OPTIONS[self.source]:
            value = getattr(self, name)
            if value not in (None, ()):
                out["from" if name == "from_dir" else name] = list(value) if name == "exclude" else value
        return out

    def options(self) -> dict:
        """The source's options as keywords (of the source's function)."""
        return {name: getattr(self, name) for name in self.OPTIONS[self.source]
                if getattr(self, name) not in (None, ())}

    def with_options(self, **changes) -> PseudoSource:
        return replace(self, **changes)


@dataclass
class RoundSettings:
    """What a round does. Stored in the round record; a resumed round keeps its settings."""

    budget: str = "5%"  # cases to label this round: a count or a percentage of the project (less held-out cases)
    strategy: str = DEFAULT_STRATEGY
    mode: str = "finetune"  # finetune | filtermatch
    seed: int = 0
    exclude: list[str] = field(default_factory=list)  # held-out cases: never selected nor trained on; evaluated
    device: str = "auto"
    configuration: str | None = None  # nnU-Net configuration planned in the first round (default 3d_fullres)
    batch_size: int | None = None
    pretrain_epochs: int | None = None  # None: nnU-Net's defaults for the device
    pretrain_iterations: int | None = None
    epochs: int | None = None
    iterations: int | None = None
    val_iterations: int | None = None
    # each training of the round (pretraining too) fits this many minutes on this machine, from a measured
    # probe; explicit epochs and iterations win (ALSegLib.nnunet.estimate)
    minutes: float | None = None
    features: str = "auto"
    pseudo: PseudoSource | None = None  # where missing pseudo-labels come from (a mapping is read as one)
    filtermatch: FilterMatchConfig | None = None  # mode filtermatch (a mapping of its fields is read as one)
    # finetune: share of training draws from cases with only a pseudo-label (0: the human labels alone)
    pseudo_share: float = 0.5
    # pseudo-labels are learned only for the classes the human labels show them trustworthy (mean Dice at least
    # this: ALSegLib.trust; the others merged with background on pseudo-labeled cases); None: every pseudo-label whole
    trust_dice: float | None = TRUST_DICE
    # each round's fine-tuning starts from the pretrained weights, or ("previous") from the last round's model
    finetune_from: str = "pretrain"
    learning_rate: float | None = None  # each round's training: None: nnU-Net's (1e-2, poly decay)
    # what is queried: whole cases, or (``slice``) slabs of ``slab`` slices, the budget then counted in slices;
    # a sparse case's unannotated voxels train as nnU-Net's ignore label, or (sparse_fill "pseudo") as its pseudo-label
    unit: str = "case"
    slab: int = 1
    sparse_fill: str = "ignore"
    bootstrap: str = DEFAULT_BOOTSTRAP  # the unprompted cases' pseudo-labels (BOOTSTRAPS)

    def __post_init__(self):
        if self.unit not in UNITS:
            raise InputError("--unit", f"one of {', '.join(UNITS)}, not {self.unit!r}")
        allowed = SLICE_STRATEGIES if self.unit == "slice" else STRATEGIES
        if self.strategy not in allowed:
            raise InputError("--strategy", f"for --unit {self.unit}: one of {', '.join(allowed)}, not {self.strategy!r}")
        if not isinstance(self.slab, int) or isinstance(self.slab, bool) or self.slab < 1:
            raise InputError("--slab", f"must be a whole number of slices, at least 1, not {self.slab!r}")
        if self.sparse_fill not in SPARSE_FILLS:
            raise InputError("--sparse-fill", f"one of {', '.join(SPARSE_FILLS)}, not {self.sparse_fill!r}")
        if self.bootstrap not in BOOTSTRAPS:
            raise InputError("--bootstrap", f"one of {', '.join(BOOTSTRAPS)}, not {self.bootstrap!r}")
        if self.mode not in MODES:
            raise InputError("--mode", f"a round trains with one of {', '.join(MODES)}, not {self.mode!r}")
        check_budget(epochs=self.epochs, iterations=self.iterations, val_iterations=self.val_iterations,
                     pretrain_epochs=self.pretrain_epochs, pretrain_iterations=self.pretrain_iterations,
                     batch_size=self.batch_size)
        check_minutes(self.minutes)
        check_trust_dice(self.trust_dice)
        if self.finetune_from not in FINETUNE_STARTS:
            raise InputError("--finetune-from", f"one of {', '.join(FINETUNE_STARTS)}, not {self.finetune_from!r}")
        check_learning_rate(self.learning_rate)
        if not isinstance(self.pseudo_share, (int, float)) or not 0.0 <= self.pseudo_share < 1.0:
            raise InputError("--pseudo-share", f"must be a number in [0, 1), not {self.pseudo_share!r}")
        self.exclude = sorted(set(self.exclude))
        self.budget = str(self.budget)
        if self.pseudo is not None:
            self.pseudo = PseudoSource.from_json(self.pseudo)
        if self.filtermatch is not None and not isinstance(self.filtermatch, FilterMatchConfig):
            if not isinstance(self.filtermatch, Mapping):
                raise InputError("filtermatch settings", f"must be an object of FilterMatch's settings, not {self.filtermatch!r}")
            try:
                self.filtermatch = FilterMatchConfig.from_json(self.filtermatch)
            except (TypeError, ValueError) as exc:
                raise InputError("filtermatch settings", str(exc)) from None

    def to_json(self) -> dict:
        """The settings as stored in the round record (plain JSON types)."""
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        out["exclude"] = list(self.exclude)
        out["pseudo"] = self.pseudo.to_json() if self.pseudo is not None else None
        out["filtermatch"] = self.filtermatch.to_json() if self.filtermatch is not None else None
        return out

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> RoundSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(where, f"unknown round settings: {', '.join(unknown)}")
        return cls(**dict(data))

    def with_changes(self, **changes) -> RoundSettings:
        return replace(self, **changes)
