"""Training modes as objects: what each kind of model trains on, where it starts, which trainer runs it.

A mode declares its label policy (which labels its dataset snapshot takes), whether it
starts from another model's weights (and from which by default), whether fine-tuning may
mix pseudo-labels in, its trainer class, its dataset options and the fields it adds to the
model record. :func:`ALSegLib.nnunet.train.train` reads these instead of branching on the
mode's name; a new mode is one more entry in :data:`MODES`.

============  ===========  ===================  ===========  ==============  ============================
mode          labels       starts from          pseudo mix   pool in data    trainer
============  ===========  ===================  ===========  ==============  ============================
pretrain      pseudo       nothing              no           no              ALSegTrainer
finetune      human        ``pretrain`` (def.)  yes          no              ALSegTrainer
supervised    human        nothing              no           no              ALSegTrainer
filtermatch   human        optional ``--init``  no           as "ignore"     ALSegFilterMatchTrainer
============  ===========  ===================  ===========  ==============  ============================
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

from ..errors import InputError

if TYPE_CHECKING:  # kept light: the command line reads the modes without importing torch or nnU-Net
    from .trainers import ALSegTrainer


GPU_BUDGET = (1000, 250)  # nnU-Net's epochs x iterations per epoch
CPU_BUDGET = (20, 50)  # ALSeg's default on a CPU


def default_budget(device) -> tuple[int, int]:
    """(epochs, iterations per epoch): nnU-Net's 1000 x 250 on a GPU, a small CPU budget otherwise."""
    return GPU_BUDGET if getattr(device, "type", device) == "cuda" else CPU_BUDGET


def check_budget(**counts: int | None) -> None:
    """Refuse a training budget that is not a whole number of at least 1 (``None``: not given, the
    default applies), naming the option: ``--epochs 0`` once fell back to the default and trained,
    and ``--epochs -1`` left a model record behind before it was refused."""
    options = {"epochs": "--epochs", "iterations": "--iters", "val_iterations": "--val-iters",
               "pretrain_epochs": "--pretrain-epochs", "pretrain_iterations": "--pretrain-iters",
               "batch_size": "--batch-size"}
    for name, value in counts.items():
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise InputError(options.get(name, name), f"must be a whole number of at least 1, not {value!r}")


def check_minutes(minutes) -> None:
    """``--minutes``: a positive number (``None``: not given)."""
    if minutes is None:
        return
    if (isinstance(minutes, bool) or not isinstance(minutes, (int, float)) or not minutes > 0 or minutes != minutes
            or minutes == float("inf")):
        raise InputError("--minutes", f"must be a positive number of minutes, not {minutes!r}")


@dataclass(frozen=True)
class TrainingMode:
    name: str
    labels: str  # the label policy of its dataset snapshot: "pseudo" or "human"
    default_init: str | None = None  # the model whose weights it starts from unless told otherwise
    takes_init: bool = False  # may start from another model's weights
    mixes_pseudo: bool = False  # fine-tuning may draw pseudo-labeled cases too (pseudo_share)
    pool_as_ignore: bool = False  # the unlabeled pool joins the dataset, its labels all "ignore"
    in_rounds: bool = False  # a round may train with it

    def policy(self, pseudo_share: float) -> str:
        """The dataset's label policy for this model."""
        return "human+pseudo" if pseudo_share and self.mixes_pseudo else self.labels

    def trainer_class(self) -> type[ALSegTrainer]:
        from .trainers import ALSegTrainer

        return ALSegTrainer

    def configure(self, trainer: ALSegTrainer, dataset, options) -> None:
        """Mode-specific trainer settings, after the budget is set (``options``: the mode's own, or None)."""

    def record_fields(self, trainer: ALSegTrainer, dataset) -> dict:
        """Fields the mode adds to the finished model's record."""
        return {}


@dataclass(frozen=True)
class FilterMatchMode(TrainingMode):
    """Semi-supervised: human labels plus the unlabeled pool, filtered by entropy (:mod:`.filtermatch`)."""

    def trainer_class(self) -> type[ALSegTrainer]:
        from .filtermatch import ALSegFilterMatchTrainer  # its own torch-heavy module, loaded when used

        return ALSegFilterMatchTrainer

    def configure(self, trainer, dataset, options) -> None:
        from .filtermatch import FilterMatchConfig

        trainer.configure_filtermatch(options or FilterMatchConfig(), dataset.pool)

    def record_fields(self, trainer, dataset) -> dict:
        return {"filtermatch": {"config": asdict(trainer.filtermatch), "unlabeled_cases": len(dataset.pool),
                                "remaining": len(trainer.pool), "filter_log": trainer.filter_log}}


MODES: dict[str, TrainingMode] = {m.name: m for m in (
    TrainingMode("pretrain", "pseudo"),
    TrainingMode("finetune", "human", default_init="pretrain", takes_init=True, mixes_pseudo=True, in_rounds=True),
    TrainingMode("supervised", "human"),
    FilterMatchMode("filtermatch", "human", takes_init=True, pool_as_ignore=True, in_rounds=True),
)}
ROUND_MODES = tuple(name for name, m in MODES.items() if m.in_rounds)  # ("finetune", "filtermatch")
