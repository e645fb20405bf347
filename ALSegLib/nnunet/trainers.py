"""ALSeg's nnU-Net trainers: ``nnUNetTrainer`` subclasses that override only what they need.

- the compute budget (epochs, iterations per epoch, validation iterations), set
  by the engine, or by ``ALSEG_EPOCHS``/``ALSEG_ITERS``/``ALSEG_VAL_ITERS`` when
  nnU-Net's own ``nnUNetv2_train`` runs the class (via ``nnUNet_extTrainer``);
- a checkpoint after every epoch, so a killed training resumes where it stopped;
- one progress event per epoch (epoch, train loss, validation pseudo-Dice, seconds);
- checkpoints loaded with ``torch.load(weights_only=True)``: a checkpoint that
  needs arbitrary pickled objects is refused, never executed.
"""
from __future__ import annotations

import hashlib
import os
import random
import warnings
from pathlib import Path

import numpy as np
import torch
from nnunetv2.training.nnUNetTrainer.nnUNetTrainer import nnUNetTrainer

from .. import atomic
from ..errors import InputError
from ..progress import emit

# Plain data types that nnU-Net's checkpoints hold besides tensors (numpy scalars
# in its training log). Allowing them lets weights_only=True load real checkpoints.
SAFE_GLOBALS = [np._core.multiarray.scalar, np.dtype, np.dtypes.Float32DType, np.dtypes.Float64DType,
                np.dtypes.Int64DType]


EXT_TRAINER_PATH = Path(__file__).parent / "ext"  # for nnUNet_extTrainer


def load_checkpoint_safely(path: str | Path, map_location: str | torch.device = "cpu") -> dict:
    """Load an nnU-Net checkpoint without executing pickled code (``weights_only=True``)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "checkpoint not found")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            checkpoint = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # UnpicklingError for foreign globals, RuntimeError for corrupt files
        reason = str(exc).splitlines()[-1] if str(exc) else type(exc).__name__
        raise InputError(path, f"refused to load checkpoint: it is not a plain weights file ({reason[:300]})") from None
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("network_weights"), dict):
        raise InputError(path, "not an nnU-Net checkpoint (no 'network_weights')")
    return checkpoint


def load_weights_checked(network: torch.nn.Module, weights: dict, path: str | Path) -> None:
    """Load ``weights`` into ``network`` if every tensor is there with its shape; a checkpoint
    of another architecture (other plans, labels or configuration) is an InputError naming it."""
    own = network.state_dict()
    missing = [k for k in own if k not in weights]
    wrong = [k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape)]
    extra = [k for k in weights if k not in own]
    if missing or wrong or extra:
        first = (wrong or missing or extra)[0]
        raise InputError(path, f"weights do not fit this network ({len(wrong)} of another shape, {len(missing)} missing, "
                               f"{len(extra)} unexpected, e.g. {first}): a checkpoint of another architecture "
                               "(were the plans, labels or configuration changed?)")
    network.load_state_dict({k: weights[k] for k in own})


def weights_digest(state_dict: dict) -> str:
    """A checksum of network weights (names, shapes, values), to prove which weights a model started from."""
    h = hashlib.sha256()
    for name in sorted(state_dict):
        tensor = state_dict[name].detach().cpu().contiguous()
        h.update(name.encode() + str(tuple(tensor.shape)).encode() + str(tensor.dtype).encode())
        h.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return h.hexdigest()


FOLDED = -1e4  # the logit a class folded into background gets (exp() of it is 0 in float16 and float32 alike)


def fold_logits(logits: torch.Tensor, folded: torch.Tensor) -> torch.Tensor:
    """Logits whose softmax is the network's, with the classes ``folded`` (B, C bool; never class 0)
    of each sample merged into background: background's logit becomes the log-sum-exp over itself
    and those classes (so its probability is their sum), theirs a constant far below every other."""
    shape = (*folded.shape, *([1] * (logits.ndim - 2)))
    into_background = folded.clone()
    into_background[:, 0] = True
    background = torch.logsumexp(logits.masked_fill(~into_background.view(shape), float("-inf")), dim=1, keepdim=True)
    rest = logits[:, 1:].masked_fill(folded[:, 1:].view(shape[0], -1, *shape[2:]), FOLDED)
    return torch.cat([background.to(logits.dtype), rest], dim=1)


def fold_target(target: torch.Tensor, folded: torch.Tensor) -> torch.Tensor:
    """The target (B, 1, ...) with each sample's ``folded`` classes written as background."""
    out = target.clone()
    for b in torch.nonzero(folded.any(dim=1)).flatten().tolist():
        classes = torch.nonzero(folded[b]).flatten().to(out.device, out.dtype)
        out[b][torch.isin(out[b], classes)] = 0
    return out


class PartialLabelLoss(torch.nn.Module):
    """nnU-Net's loss (deep supervision, batch Dice and the ignore label as they are) on partially
    labeled samples: a sample's unknown classes are merged with background (the marginal loss of
    Shi et al., MedIA 2021), so its label neither teaches them as background nor as themselves,
    and moving probability between background and them changes nothing; the other classes and
    other samples are learned as before. ``folded``: (B, C) bool for the batch about to be scored,
    set by the trainer from the batch's case keys; None (or all False): the wrapped loss itself."""

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss
        self.folded: torch.Tensor | None = None

    def forward(self, output, target):
        folded = self.folded
        if folded is None or not bool(folded.any()):
            return self.loss(output, target)
        if isinstance(output, (list, tuple)):  # deep supervision: every scale alike
            return self.loss([fold_logits(o, folded.to(o.device)) for o in output],
                             [fold_target(t, folded) for t in target])
        return self.loss(fold_logits(output, folded.to(output.device)), fold_target(target, folded))


class ALSegTrainer(nnUNetTrainer):
    """nnU-Net's default trainer with ALSeg's budget, per-epoch checkpoints and progress events."""

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - mirrors nnUNetTrainer.__init__
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.save_every = 1
        self.case_repeats: dict[str, int] = {}  # case -> times it is listed for sampling (see sample_weights)
        self.seed: int | None = None  # seeds the weights' initialisation, sampling and augmentation (see on_train_start)
        self.final_phase_s = 0.0  # the estimate of what follows the last epoch (final checkpoint, validation)
        self.deadline: float | None = None  # --minutes: the wall-clock time (time.time()) the training should end by
        self.max_epochs = 1000  # what a deadline may grow the epochs to
        self.refits: list[dict] = []  # the epochs a deadline chose after each epoch
        # case -> nnU-Net class indices its label says nothing about (pseudo-labels of untrusted classes):
        # merged with background in its loss (PartialLabelLoss)
        self.unknown_classes: dict[str, list[int]] = {}
        for attr, var in (("num_epochs", "ALSEG_EPOCHS"), ("num_iterations_per_epoch", "ALSEG_ITERS"),
                          ("num_val_iterations_per_epoch", "ALSEG_VAL_ITERS")):
            if os.environ.get(var):
                setattr(self, attr, int(os.environ[var]))

    def set_budget(self, epochs: int, iterations: int, val_iterations: int | None = None) -> None:
        if epochs < 1 or iterations < 1:
            raise InputError("budget", f"epochs and iterations must be at least 1 (got {epochs}, {iterations})")
        self.num_epochs = int(epochs)
        self.num_iterations_per_epoch = int(iterations)
        self.num_val_iterations_per_epoch = int(val_iterations if val_iterations is not None else max(1, iterations // 5))

    def on_train_start(self) -> None:
        """With a ``seed``, the same data, budget and seed give the same model on the same machine
        (nnU-Net seeds nothing: the demo's rounds differed from run to run). It seeds the process's
        global generators, which nnU-Net's sampling and augmentation draw from in the main process
        (``nnUNet_n_proc_DA=0``); worker processes and a resumed run are not reproduced."""
        if self.seed is not None:
            random.seed(self.seed)
            np.random.seed(self.seed % 2**32)
            torch.manual_seed(self.seed)
        super().on_train_start()

    def get_tr_and_val_datasets(self):
        """nnU-Net's split, with a case listed ``case_repeats[case]`` times in the training
        set: nnU-Net draws training cases uniformly from that list, so a case listed k
        times is drawn k times as often (the few human labels among many pseudo-labels)."""
        train, val = super().get_tr_and_val_datasets()
        if any(n > 1 for n in self.case_repeats.values()):
            listed = [key for key in train.identifiers for _ in range(self.case_repeats.get(key, 1))]
            train = self.dataset_class(self.preprocessed_dataset_folder, listed,
                                       folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        return train, val

    def initialize(self) -> None:
        """nnU-Net's set-up, its loss then wrapped in :class:`PartialLabelLoss` (transparent for a fully
        labeled batch)."""
        super().initialize()
        if self.loss is not None and not isinstance(self.loss, PartialLabelLoss):
            self.loss = PartialLabelLoss(self.loss)

    def _set_folded(self, batch: dict) -> None:
        if isinstance(self.loss, PartialLabelLoss):
            self.loss.folded = self.folded_classes(batch.get("keys", ()))

    def folded_classes(self, keys) -> torch.Tensor | None:
        """(B, C) bool: the classes of each of the batch's cases (``keys``) merged with background; None if none."""
        if not self.unknown_classes:
            return None
        folded = torch.zeros((len(keys), self.label_manager.num_segmentation_heads), dtype=torch.bool)
        for b, key in enumerate(keys):
            for c in self.unknown_classes.get(str(key), ()):
                folded[b, c] = True
        return folded if bool(folded.any()) else None

    def train_step(self, batch: dict) -> dict:
        self._set_folded(batch)
        return super().train_step(batch)

    def validation_step(self, batch: dict) -> dict:
        self._set_folded(batch)
        return super().validation_step(batch)

    def on_validation_epoch_end(self, val_outputs) -> None:
        """nnU-Net's, without its divide-by-zero warning for a class no validation patch held (its
        Dice is NaN then and left out of the mean, as nnU-Net intends)."""
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="invalid value encountered", category=RuntimeWarning)
            warnings.filterwarnings("ignore", message="Mean of empty slice", category=RuntimeWarning)
            super().on_validation_epoch_end(val_outputs)

    def save_checkpoint(self, filename: str) -> None:
        """nnU-Net's checkpoint, written atomically: a kill mid-write never leaves a torn file."""
        if self.local_rank != 0 or self.disable_checkpointing:
            return super().save_checkpoint(filename)
        atomic.write_with(Path(filename), lambda tmp: super(ALSegTrainer, self).save_checkpoint(str(tmp)))

    def on_epoch_end(self) -> None:
        value = self.logger.get_value
        event = {
            "epoch": self.current_epoch + 1,
            "epochs": self.num_epochs,
            "train_loss": float(value("train_losses", -1)),
            "val_loss": float(value("val_losses", -1)),
            "pseudo_dice": float(value("mean_fg_dice", -1)),
        }
        # nnU-Net redraws progress.png after every epoch: 1.3 s with matplotlib on these 2 cores, a quarter of
        # an epoch of the demo's 25 steps; ALSeg reports its own curves, so it is drawn after the last epoch only
        self._refit_to_deadline()
        last = self.current_epoch + 1 >= self.num_epochs
        if not last:
            self.logger.plot_progress_png = lambda output_folder: None
        try:
            super().on_epoch_end()  # logs the end time, writes checkpoints, advances current_epoch
        finally:
            if not last:
                del self.logger.plot_progress_png  # the logger's own method again
        event["seconds"] = float(value("epoch_end_timestamps", -1) - value("epoch_start_timestamps", -1))
        event["seconds_left"] = round(self.seconds_left(), 1)
        if self.local_rank == 0:  # one event per epoch, however many GPUs train the model
            emit("epoch", **event)

    def run_training(self) -> None:
        """nnU-Net's epoch loop, reading the number of epochs after every epoch: with a ``deadline``
        (``--minutes``) the epochs are fitted again from the epochs' own times, so a probe that
        misjudged the step (a busy moment, a first-touch cost) does not miss the budget."""
        self.on_train_start()
        while self.current_epoch < self.num_epochs:
            self.on_epoch_start()
            self.on_train_epoch_start()
            train_outputs = [self.train_step(next(self.dataloader_train)) for _ in range(self.num_iterations_per_epoch)]
            self.on_train_epoch_end(train_outputs)
            with torch.no_grad():
                self.on_validation_epoch_start()
                val_outputs = [self.validation_step(next(self.dataloader_val))
                               for _ in range(self.num_val_iterations_per_epoch)]
                self.on_validation_epoch_end(val_outputs)
            self.on_epoch_end()
        self.on_train_end()

    def _refit_to_deadline(self) -> None:
        """Epochs that end the training (and what follows it) by the deadline, at the epochs' own pace."""
        if self.deadline is None:
            return
        import time

        starts = self.logger.get_value("epoch_start_timestamps", None)
        if not starts:
            return
        now = time.time()  # called as the epoch ends, before its checkpoints: its time so far counts
        recent = ([b - a for a, b in zip(starts, starts[1:])] + [now - starts[-1]])[-5:]
        per_epoch = sum(recent) / len(recent)
        left = self.deadline - now - self.final_phase_s
        # the epoch just ended has not written its checkpoints yet: a quarter of an epoch kept for them
        fit = self.current_epoch + 1 + max(0, int((left - 0.25 * per_epoch) // per_epoch))
        epochs = max(self.current_epoch + 1, min(self.max_epochs, fit))
        if epochs != self.num_epochs:
            self.refits.append({"after_epoch": self.current_epoch + 1, "epochs": epochs, "epoch_s": round(per_epoch, 2)})
            self.num_epochs = epochs
            if hasattr(self.lr_scheduler, "max_steps"):  # nnU-Net's poly schedule decays over the (new) epochs
                self.lr_scheduler.max_steps = epochs

    def seconds_left(self) -> float:
        """The epochs still to run at the mean of the last five epochs' times, plus what follows them.
        An epoch's time is start to next start (its checkpoints are written after its end stamp);
        for the first epoch, end minus start."""
        starts = self.logger.get_value("epoch_start_timestamps", None)
        ends = self.logger.get_value("epoch_end_timestamps", None)
        recent = [b - a for a, b in zip(starts, starts[1:])][-5:] or [e - s for s, e in zip(starts, ends)][-1:]
        per_epoch = sum(recent) / len(recent) if recent else 0.0
        return max(0, self.num_epochs - self.current_epoch) * per_epoch + self.final_phase_s

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        """Restore a training state for resuming, loading the file with ``weights_only=True``.

        (nnU-Net's own version unpickles with ``weights_only=False``, and in 2.8
        fails when handed an already loaded dict, so the restore is done here.)
        """
        if not self.was_initialized:
            self.initialize()
        checkpoint = filename_or_checkpoint
        if isinstance(checkpoint, (str, Path)):
            checkpoint = load_checkpoint_safely(checkpoint, map_location=self.device)
        network = self.bare_network()
        weights = {k[7:] if k.startswith("module.") and k not in network.state_dict() else k: v
                   for k, v in checkpoint["network_weights"].items()}
        load_weights_checked(network, weights, filename_or_checkpoint if isinstance(filename_or_checkpoint, (str, Path))
                             else "checkpoint")
        self.my_init_kwargs = checkpoint["init_args"]
        self.current_epoch = checkpoint["current_epoch"]
        self.logger.load_checkpoint(checkpoint["logging"])
        self._best_ema = checkpoint["_best_ema"]
        self.inference_allowed_mirroring_axes = checkpoint.get("inference_allowed_mirroring_axes",
                                                               self.inference_allowed_mirroring_axes)
        self.optimizer.load_state_dict(checkpoint["optimizer_state"])
        if self.grad_scaler is not None and checkpoint.get("grad_scaler_state") is not None:
            self.grad_scaler.load_state_dict(checkpoint["grad_scaler_state"])

    def load_pretrained_weights(self, checkpoint_file: str | Path) -> str:
        """Start from another model's weights (same plans, so same shapes); returns their digest."""
        if not self.was_initialized:
            self.initialize()
        weights = load_checkpoint_safely(checkpoint_file)["network_weights"]
        network = self.bare_network()
        own = network.state_dict()
        # the pretrained model may carry extra heads (e.g. deep supervision): only ours are needed
        load_weights_checked(network, {k: v for k, v in weights.items() if k in own}, checkpoint_file)
        return weights_digest(network.state_dict())

    def bare_network(self) -> torch.nn.Module:
        """The network itself: not the DistributedDataParallel wrapper of a multi-GPU training (whose
        keys carry ``module.``), nor torch.compile's (``_orig_mod``); checkpoints hold its keys."""
        network = self.network.module if self.is_ddp else self.network
        return network._orig_mod if hasattr(network, "_orig_mod") else network
