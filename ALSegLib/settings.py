"""Every setting of a round, and every choice list the interfaces offer, defined once.

:class:`RoundSettings` is what a round does (stored in its record; a resumed round keeps
its own). The command line builds its round options' choices and defaults from here and
from the registries they name (training modes: :mod:`ALSegLib.nnunet.modes`; strategies:
:mod:`ALSegLib.selection.strategies`, whose names must be :data:`STRATEGIES`, checked by a
test); the Slicer panel offers the same lists. Light on purpose: no numpy, torch or nnU-Net.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields

from .errors import InputError
from .nnunet.modes import ROUND_MODES

STRATEGIES = ("hybrid", "hybrid-weighted", "uncertainty", "coreset", "random")  # selection.strategies.STRATEGIES
DEFAULT_STRATEGY = "hybrid"
MODES = ROUND_MODES  # the training modes a round may use
PSEUDO_SOURCES = ("sam", "import", "degraded-reference")
FEATURE_SOURCES = ("auto", "nnunet", "sam", "histogram")  # selection.features.SOURCES and "auto"
CONFIGURATIONS = ("2d", "3d_fullres", "3d_lowres")
DEVICES = ("auto", "cpu", "cuda", "mps")  # what the Slicer panel offers; the CLI takes cuda:N too


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
    features: str = "auto"
    pseudo: dict | None = None  # {"source": "sam"|"import"|"degraded-reference", ...options}
    filtermatch: dict | None = None  # FilterMatchConfig fields (mode filtermatch)
    # finetune: share of training draws from cases with only a pseudo-label (0: the human labels alone)
    pseudo_share: float = 0.5

    def __post_init__(self):
        if self.strategy not in STRATEGIES:
            raise InputError("--strategy", f"one of {', '.join(STRATEGIES)}, not {self.strategy!r}")
        if self.mode not in MODES:
            raise InputError("--mode", f"a round trains with one of {', '.join(MODES)}, not {self.mode!r}")
        if not isinstance(self.pseudo_share, (int, float)) or not 0.0 <= self.pseudo_share < 1.0:
            raise InputError("--pseudo-share", f"must be a number in [0, 1), not {self.pseudo_share!r}")
        self.exclude = sorted(set(self.exclude))
        self.budget = str(self.budget)
        if self.pseudo is not None:
            if not isinstance(self.pseudo, Mapping) or self.pseudo.get("source") not in PSEUDO_SOURCES:
                raise InputError("pseudo-label source", f"needs 'source' one of {', '.join(PSEUDO_SOURCES)}, got {self.pseudo!r}")
            self.pseudo = dict(self.pseudo)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping, where: str) -> RoundSettings:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InputError(where, f"unknown round settings: {', '.join(unknown)}")
        return cls(**dict(data))
