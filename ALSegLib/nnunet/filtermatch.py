"""Building blocks of FilterMatch (semi-supervised single-pass nnU-Net training).

Pure tensor functions, tested on their own, and the trainer built from them:

- :func:`strong_view`: the strong transform T of an unlabeled batch. Geometry
  (in-plane rot90 only where the two in-plane sides are equal, otherwise 180°;
  in-plane flips) is applied to image and pseudo-label alike; intensity
  perturbations (brightness, contrast, gamma, noise, blur) to the image only.
- :func:`mean_entropy`: a case's score for the filter, the **mean** voxel
  entropy (the reference summed it, which favours large images).
- :func:`cases_to_drop`: the fraction q of remaining cases with the lowest
  entropy (the most confident, least informative), ties broken by case id.
- :func:`filter_epochs` and :func:`unlabeled_weight`: the filter schedule (never
  after the last epoch) and the ramped unlabeled-loss weight λ_u.
"""
from __future__ import annotations

import contextlib
import copy
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from nnunetv2.training.dataloading.data_loader import nnUNetDataLoader
from nnunetv2.utilities.default_n_proc_DA import get_allowed_n_proc_DA

from .. import atomic
from ..progress import emit
from .filtermatch_settings import FilterMatchConfig, StrongAugmentation  # noqa: F401 (importable from here too)
from .trainers import ALSegTrainer


def _in_plane_axes(x: torch.Tensor) -> tuple[int, int]:
    """The last two spatial axes of a (B, C, [Z,] Y, X) tensor."""
    if x.ndim not in (4, 5):
        raise ValueError(f"expected a (B, C, Y, X) or (B, C, Z, Y, X) batch, got shape {tuple(x.shape)}")
    return x.ndim - 2, x.ndim - 1


def strong_view(
    images: torch.Tensor, labels: torch.Tensor, config: StrongAugmentation | None = None,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The strong view of a batch: ``images`` (B, C, ...) float, ``labels`` (B, 1, ...) integer.

    Shapes are preserved: a quarter turn is only drawn when the in-plane sides
    are equal, so non-square patches only get 180° turns and flips.
    """
    config = config or StrongAugmentation()
    if images.shape[0] != labels.shape[0] or images.shape[2:] != labels.shape[2:]:
        raise ValueError(f"image batch {tuple(images.shape)} and label batch {tuple(labels.shape)} do not match")
    a, b = _in_plane_axes(images)
    square = images.shape[a] == images.shape[b]
    out_x, out_y = [], []

    def draw() -> float:
        return float(torch.rand((), generator=generator))

    for x, y in zip(images, labels):
        dims = (a - 1, b - 1)  # per-sample tensors have no batch axis
        if draw() < config.p_rotate:
            k = int(torch.randint(1, 4, (), generator=generator)) if square else 2
            x, y = torch.rot90(x, k, dims), torch.rot90(y, k, dims)
        for axis in dims:
            if draw() < config.p_flip:
                x, y = torch.flip(x, (axis,)), torch.flip(y, (axis,))
        out_x.append(_intensity(x, config, draw, generator))
        out_y.append(y)
    return torch.stack(out_x), torch.stack(out_y)


def _intensity(x: torch.Tensor, c: StrongAugmentation, draw, generator) -> torch.Tensor:
    def uniform(lo: float, hi: float) -> float:
        return lo + (hi - lo) * draw()

    x = x.clone()
    if draw() < c.p_brightness:
        x = x * uniform(1 - c.brightness, 1 + c.brightness)
    if draw() < c.p_contrast:
        mean = x.mean()
        x = (x - mean) * uniform(1 - c.contrast, 1 + c.contrast) + mean
    if draw() < c.p_gamma:
        lo, hi = x.min(), x.max()
        span = (hi - lo).clamp_min(1e-8)
        x = ((x - lo) / span) ** uniform(*c.gamma) * span + lo
    if draw() < c.p_noise:
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        x = x + noise * c.noise_std * x.std().clamp_min(1e-8)
    if draw() < c.p_blur:
        x = _gaussian_blur(x, uniform(*c.blur_sigma))
    return x


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur over the spatial axes of a (C, ...) tensor."""
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype, device=x.device)
    kernel = torch.exp(-0.5 * (t / sigma) ** 2)
    kernel = kernel / kernel.sum()
    spatial = x.ndim - 1
    conv = F.conv3d if spatial == 3 else F.conv2d
    y = x.unsqueeze(0)  # (1, C, ...)
    channels = x.shape[0]
    for axis in range(spatial):
        shape = [1] * spatial
        shape[axis] = kernel.numel()
        weight = kernel.reshape(1, 1, *shape).repeat(channels, 1, *([1] * spatial))
        padding = [0] * spatial
        padding[axis] = radius
        y = conv(y, weight, padding=tuple(padding), groups=channels)
    return y.squeeze(0)


def mean_entropy(probabilities: torch.Tensor, normalise: bool = True) -> float:
    """Mean voxel entropy of class probabilities (C, ...); divided by log C when ``normalise``."""
    p = probabilities.clamp_min(1e-12)
    entropy = -(p * p.log()).sum(dim=0)
    value = float(entropy.mean())
    return value / math.log(probabilities.shape[0]) if normalise else value


def cases_to_drop(scores: Mapping[str, float], fraction: float) -> list[str]:
    """The ``floor(fraction * n)`` cases with the lowest entropy (ties: by case id)."""
    if not 0 <= fraction <= 1:
        raise ValueError(f"fraction must be in [0, 1], not {fraction}")
    n = int(math.floor(fraction * len(scores) + 1e-9))
    return [case for case, _ in sorted(scores.items(), key=lambda kv: (kv[1], kv[0]))[:n]]


def filter_epochs(start: int, every: int, num_epochs: int) -> list[int]:
    """Epochs (0-based) after which the filter runs: from ``start``, every ``every``
    epochs, never after the last epoch (nothing would use its result)."""
    if every < 1:
        raise ValueError("the filter interval must be at least 1 epoch")
    return [e for e in range(start, num_epochs - 1) if (e - start) % every == 0]


def unlabeled_weight(epoch: int, start: int, weight: float = 1.0, ramp_epochs: int = 0) -> float:
    """λ_u at ``epoch``: 0 during warm-up (before ``start``), then ``weight`` reached
    along a sigmoid ramp (exp(-5 (1 - t)^2)) over ``ramp_epochs`` (0 = hard switch, as the reference)."""
    if epoch < start:
        return 0.0
    if ramp_epochs <= 0:
        return float(weight)
    t = min(1.0, (epoch - start + 1) / ramp_epochs)
    return float(weight * math.exp(-5.0 * (1.0 - t) ** 2))


def pseudo_labels(logits: torch.Tensor, confidence: float = 0.0, ignore_label: int | None = None) -> torch.Tensor:
    """ŷ = argmax softmax f(x_u), as a (B, 1, ...) label batch; call under ``torch.no_grad()``.

    With ``confidence`` > 0, voxels whose top class probability is below it get
    ``ignore_label`` (they add nothing to the loss); 0 keeps every voxel (the reference).
    """
    if confidence <= 0:
        return logits.argmax(dim=1, keepdim=True)
    if ignore_label is None:
        raise ValueError("a confidence threshold needs the dataset's ignore label")
    top, labels = torch.softmax(logits.float(), dim=1).max(dim=1, keepdim=True)
    return labels.masked_fill(top < confidence, ignore_label)


def downsample_labels(labels: torch.Tensor, shapes: Sequence[Sequence[int]]) -> list[torch.Tensor]:
    """Nearest-neighbour label targets for each deep-supervision output shape."""
    return [labels if tuple(labels.shape[2:]) == tuple(s) else
            F.interpolate(labels.float(), size=tuple(s), mode="nearest").to(labels.dtype) for s in shapes]


# --- the trainer ---------------------------------------------------------------------------


class ALSegFilterMatchTrainer(ALSegTrainer):
    """Semi-supervised single-pass training: each step a labeled batch and a strong view
    of an unlabeled batch pseudo-labeled by the network itself (no gradient); a periodic
    filter drops the most confident unlabeled cases for good.

    Overrides only: ``get_dataloaders`` (adds the unlabeled loader), ``train_step``,
    ``on_epoch_end`` (the filter), and checkpoint save/load (the pool and the filter's
    decisions go into a ``.filtermatch.json`` beside each checkpoint).
    """

    def __init__(self, plans: dict, configuration: str, fold: int, dataset_json: dict,
                 device: torch.device = torch.device("cuda")):  # noqa: B008 - mirrors nnUNetTrainer.__init__
        super().__init__(plans, configuration, fold, dataset_json, device)
        self.filtermatch = FilterMatchConfig()
        self.pool: list[str] = []
        self.filter_log: list[dict] = []
        self.dataloader_unlabeled = None
        self.teacher: torch.nn.Module | None = None  # the EMA teacher, with --teacher ema
        self._teacher_state: dict | None = None  # restored from a checkpoint before training starts

    def configure_filtermatch(self, config: FilterMatchConfig, pool: Sequence[str]) -> None:
        self.filtermatch = config
        self.pool = sorted(pool)

    def probe_epochs(self) -> list[int]:
        """Epochs from which an iteration costs more (the unlabeled batch after warm-up), for the time probe."""
        cfg = self.filtermatch
        return [cfg.warmup_epochs] if self.pool and cfg.unlabeled_weight > 0 else []

    # the teacher --------------------------------------------------------------------------------

    def on_train_start(self) -> None:
        super().on_train_start()
        if self.filtermatch.teacher == "ema" and self.teacher is None:
            self.teacher = copy.deepcopy(self.network)
            if self._teacher_state is not None:
                self.teacher.load_state_dict(self._teacher_state)
            self.teacher.requires_grad_(False)

    @torch.no_grad()
    def _update_teacher(self) -> None:
        decay = self.filtermatch.ema_decay
        for t, s in zip(self.teacher.parameters(), self.network.parameters()):
            t.mul_(decay).add_(s.detach(), alpha=1 - decay)
        for t, s in zip(self.teacher.buffers(), self.network.buffers()):
            t.copy_(s)

    def _labeller(self) -> torch.nn.Module:
        return self.teacher if self.teacher is not None else self.network

    # data ------------------------------------------------------------------------------------

    def get_dataloaders(self):
        loaders = super().get_dataloaders()
        self.dataloader_unlabeled = self._unlabeled_loader()
        return loaders

    def _unlabeled_loader(self):
        """The pool through nnU-Net's own training augmentation (the weak view)."""
        if not self.pool:
            return None
        from batchgenerators.dataloading.nondet_multi_threaded_augmenter import NonDetMultiThreadedAugmenter
        from batchgenerators.dataloading.single_threaded_augmenter import SingleThreadedAugmenter

        patch_size = self.configuration_manager.patch_size
        rotation, dummy_2d, initial_patch_size, mirror_axes = self.configure_rotation_dummyDA_mirroring_and_inital_patch_size()
        transforms = self.get_training_transforms(
            patch_size, rotation, self._get_deep_supervision_scales(), mirror_axes, dummy_2d,
            use_mask_for_norm=self.configuration_manager.use_mask_for_norm, is_cascaded=self.is_cascaded,
            foreground_labels=self.label_manager.foreground_labels,
            regions=self.label_manager.foreground_regions if self.label_manager.has_regions else None,
            ignore_label=self.label_manager.ignore_label)
        dataset = self.dataset_class(self.preprocessed_dataset_folder, self.pool,
                                     folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        batch = self.filtermatch.unlabeled_batch or self.batch_size
        loader = nnUNetDataLoader(dataset, batch, initial_patch_size, patch_size, self.label_manager,
                                  oversample_foreground_percent=0.0, transforms=transforms)
        workers = get_allowed_n_proc_DA()
        if workers == 0:
            return SingleThreadedAugmenter(loader, None)
        return NonDetMultiThreadedAugmenter(loader, None, num_processes=max(1, workers // 2), num_cached=3,
                                            seeds=None, pin_memory=self.device.type == "cuda", wait_time=0.002)

    # one step ----------------------------------------------------------------------------------

    def train_step(self, batch: dict) -> dict:
        cfg = self.filtermatch
        weight = unlabeled_weight(self.current_epoch, cfg.warmup_epochs, cfg.unlabeled_weight, cfg.ramp_epochs)
        if weight == 0.0 or self.dataloader_unlabeled is None:
            out = super().train_step(batch)
            if self.teacher is not None:  # the teacher follows the student from the first step, warm-up included
                self._update_teacher()
            return out
        self._set_folded({})  # its own step scores two batches: no partial labels (its dataset has no pseudo-labels)
        x_l = batch["data"].to(self.device, non_blocking=True)
        y_l = batch["target"]
        y_l = [t.to(self.device, non_blocking=True) for t in y_l] if isinstance(y_l, list) else y_l.to(self.device)
        with warnings.catch_warnings():  # unlabeled cases have no annotated voxels, by design
            warnings.filterwarnings("ignore", message="Warning! No annotated pixels")
            x_u = next(self.dataloader_unlabeled)["data"].to(self.device, non_blocking=True)
        with torch.no_grad():
            out_u = self._labeller()(x_u)
            y_u = pseudo_labels(out_u[0] if isinstance(out_u, (list, tuple)) else out_u, cfg.confidence,
                                self.label_manager.ignore_label)
        x_s, y_s = strong_view(x_u, y_u, cfg.strong)

        self.optimizer.zero_grad(set_to_none=True)
        autocast = torch.autocast(self.device.type, enabled=True) if self.device.type == "cuda" else contextlib.nullcontext()
        with autocast:
            output = self.network(torch.cat([x_l, x_s]))
            n = x_l.shape[0]
            if isinstance(output, (list, tuple)):
                out_l, out_s = [o[:n] for o in output], [o[n:] for o in output]
                t_s = downsample_labels(y_s, [o.shape[2:] for o in out_s])
            else:
                out_l, out_s, t_s = output[:n], output[n:], y_s
            loss = self.loss(out_l, y_l) + weight * self.loss(out_s, t_s)
        if self.grad_scaler is not None:
            self.grad_scaler.scale(loss).backward()
            self.grad_scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.grad_scaler.step(self.optimizer)
            self.grad_scaler.update()
        else:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.network.parameters(), 12)
            self.optimizer.step()
        if self.teacher is not None:
            self._update_teacher()
        return {"loss": loss.detach().cpu().numpy()}

    # the filter ---------------------------------------------------------------------------------

    def on_epoch_end(self) -> None:
        cfg = self.filtermatch
        if self.pool and self.current_epoch in filter_epochs(cfg.filter_start, cfg.filter_every, self.num_epochs):
            self.run_filter()
        super().on_epoch_end()  # the checkpoint written there carries the filtered pool

    @torch.no_grad()
    def run_filter(self) -> list[str]:
        """Score every remaining unlabeled case by mean entropy (sliding window, one case
        in memory at a time, no test-time mirroring) and drop the most confident fraction."""
        from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor

        labeller = self._labeller()
        _deep_supervision(labeller, False)
        predictor = nnUNetPredictor(tile_step_size=0.5, use_gaussian=True, use_mirroring=False,
                                    perform_everything_on_device=self.device.type == "cuda", device=self.device,
                                    verbose=False, allow_tqdm=False)
        predictor.manual_initialization(labeller, self.plans_manager, self.configuration_manager, None,
                                        self.dataset_json, type(self).__name__, self.inference_allowed_mirroring_axes)
        dataset = self.dataset_class(self.preprocessed_dataset_folder, self.pool,
                                     folder_with_segs_from_previous_stage=self.folder_with_segs_from_previous_stage)
        scores = {}
        for key in self.pool:
            data = torch.from_numpy(np.asarray(dataset.load_case(key)[0][:]))
            logits = predictor.predict_sliding_window_return_logits(data).float()
            scores[key] = mean_entropy(torch.softmax(logits, dim=0))
        _deep_supervision(labeller, True)
        self.network.train()
        dropped = cases_to_drop(scores, self.filtermatch.drop_fraction)
        self.pool = sorted(set(self.pool) - set(dropped))
        decision = {"epoch": self.current_epoch + 1, "dropped": [{"case": c, "entropy": round(scores[c], 6)} for c in dropped],
                    "remaining": len(self.pool), "entropy": {k: round(v, 6) for k, v in sorted(scores.items())}}
        self.filter_log.append(decision)
        self.print_to_log_file(f"FilterMatch filter after epoch {decision['epoch']}: dropped {dropped}")
        emit("filter", epoch=decision["epoch"], dropped=dropped, remaining=len(self.pool))
        self.dataloader_unlabeled = self._unlabeled_loader()
        return dropped

    # checkpoints ---------------------------------------------------------------------------------

    def save_checkpoint(self, filename: str) -> None:
        super().save_checkpoint(filename)
        if self.local_rank == 0 and not self.disable_checkpointing:
            if self.teacher is not None:  # tensors only: loadable with weights_only=True
                atomic.write_with(_teacher_file(filename), lambda tmp: torch.save(self.teacher.state_dict(), tmp))
            atomic.write_json(_state_file(filename), {
                "current_epoch": self.current_epoch + 1, "pool": self.pool, "filter_log": self.filter_log,
                "config": asdict(self.filtermatch)})

    def load_checkpoint(self, filename_or_checkpoint: dict | str) -> None:
        super().load_checkpoint(filename_or_checkpoint)
        if isinstance(filename_or_checkpoint, (str, Path)) and _state_file(filename_or_checkpoint).is_file():
            state = json.loads(_state_file(filename_or_checkpoint).read_text())
            self.pool, self.filter_log = state["pool"], state["filter_log"]
            self.filtermatch = FilterMatchConfig.from_json(state["config"])
            if self.filtermatch.teacher == "ema" and _teacher_file(filename_or_checkpoint).is_file():
                teacher_file = _teacher_file(filename_or_checkpoint)
                self._teacher_state = torch.load(teacher_file, map_location=self.device, weights_only=True)


def _state_file(checkpoint: str | Path) -> Path:
    return Path(checkpoint).with_suffix(".filtermatch.json")


def _teacher_file(checkpoint: str | Path) -> Path:
    return Path(checkpoint).with_suffix(".teacher.pth")


def _deep_supervision(network: torch.nn.Module, enabled: bool) -> None:
    """Switch the extra deep-supervision outputs of an nnU-Net network on or off."""
    module = network._orig_mod if hasattr(network, "_orig_mod") else network
    module.decoder.deep_supervision = enabled
