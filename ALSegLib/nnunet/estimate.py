"""How long nnU-Net work will take on this machine, and whether it fits its memory: measured, not guessed.

A training's estimate comes from a **probe**: the model's own trainer, built on the
model's own preprocessed data in a throw-away output folder, runs a few real
training iterations (next batch with its augmentation, forward, backward, update),
one validation iteration, one checkpoint write and one sliding-window tile (batch 1,
no gradient). The figures are kept per machine, plans, configuration, batch and
trainer in ``nnunet/probes.json``, so the trainings of later rounds reuse them;
the running training's epoch events refresh the time left from its own epochs.

Before any dataset is written, one step at batch 1 on random data (the same network
and loss) measures the memory a sample needs; a batch expected not to fit the memory
left on the machine (or ``ALSEG_MEMORY_LIMIT``, e.g. ``8G``) is refused with the
batch that would fit. The same random-data steps time the batches the CPU plan weighs.

:func:`training_seconds` turns a probe and a job's shape (epochs, iterations, the
final validation's tiles, FilterMatch's unlabeled steps and filter passes) into
seconds; :func:`budget_for_minutes` chooses epochs x iterations that fit N minutes.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from .. import atomic
from ..errors import InputError
from ..progress import duration  # noqa: F401 (the estimates' wording, importable from here)
from ..store.files import now_iso

PROBE_STEPS = 3  # timed training iterations after one warm-up iteration
LONG_JOB_S = 2 * 3600  # a training expected to take longer is warned about, with the --minutes that fits
MAX_EPOCHS = 1000  # --minutes never chooses more epochs than nnU-Net's own budget
PROBES_FILE = "probes.json"


# --- memory -----------------------------------------------------------------------------------


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


def parse_bytes(text: str, where: str = "ALSEG_MEMORY_LIMIT") -> int:
    """``8G``, ``500M``, ``1.5GiB`` or a number of bytes."""
    value = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    scale = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}.get(value[-1:], 1)
    number = value[:-1] if scale > 1 else value
    try:
        out = int(float(number) * scale)
    except (ValueError, OverflowError):
        raise InputError(where, f"must be a size such as 8G or 500M, not {text!r}") from None
    if out <= 0:
        raise InputError(where, f"must be a positive size, not {text!r}")
    return out


def check_memory_limit() -> None:
    """``ALSEG_MEMORY_LIMIT``, if set, must be a size (checked before any work starts)."""
    if os.environ.get("ALSEG_MEMORY_LIMIT"):
        parse_bytes(os.environ["ALSEG_MEMORY_LIMIT"])


def headroom(device: torch.device) -> tuple[int, str]:
    """Bytes this process may still take on ``device`` and what sets that figure."""
    limit = os.environ.get("ALSEG_MEMORY_LIMIT")
    if device.type == "cuda":
        torch.cuda.empty_cache()  # memory the allocator keeps cached is free for the next job
        free, _total = torch.cuda.mem_get_info(device)
        room, why = int(free), f"free memory on {device}"
        if limit:
            used = torch.cuda.memory_allocated(device)
            if parse_bytes(limit) - used < room:
                room, why = parse_bytes(limit) - used, f"ALSEG_MEMORY_LIMIT={limit}"
        return max(0, room), why
    import psutil

    room, why = int(psutil.virtual_memory().available), "memory available on this machine"
    if limit and parse_bytes(limit) - _rss() < room:
        room, why = parse_bytes(limit) - _rss(), f"ALSEG_MEMORY_LIMIT={limit}"
    return max(0, room), why


class MemoryWatch:
    """The peak memory of the code inside: sampled process RSS on a CPU, the allocator's peak on CUDA."""

    def __init__(self, device: torch.device, every_s: float = 0.002):
        self.device, self.every_s = device, every_s
        self.start = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def __enter__(self) -> MemoryWatch:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.start = self.peak = torch.cuda.memory_allocated(self.device)
            return self
        self.start = self.peak = _rss()

        def sample():
            while not self._stop.wait(self.every_s):
                self.peak = max(self.peak, _rss())

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = max(self.peak, torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _rss())

    @property
    def grew(self) -> int:
        return max(0, self.peak - self.start)


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**29 else f"{n / 2**20:.0f} MiB"


# --- the probe ----------------------------------------------------------------------------------


@dataclass
class TrainingProbe:
    """What a few real iterations of a training measured on this machine."""

    trainer: str
    configuration: str
    batch_size: int
    patch_size: list[int]
    device: str
    machine: str
    setup_s: float  # building the trainer's network and data loaders (and unpacking the data)
    step_s: float  # one training iteration: the next batch with augmentation, forward, backward, update
    val_step_s: float  # one validation iteration
    checkpoint_s: float  # writing one checkpoint
    tile_s: float  # one sliding-window tile forward at batch 1, no gradient (prediction, validation, filters)
    sample_bytes: int  # a sample's share of a step's memory (steps at batch 1 and 2 on random data)
    peak_bytes: int  # the memory growth over the full-batch iterations
    steps: int  # timed training iterations
    unlabeled_step_s: float | None = None  # FilterMatch after warm-up: labeled + strong unlabeled batch
    fixed_bytes: int = 0  # a step's memory paid once, whatever the batch
    step_times_s: list[float] = field(default_factory=list)
    measured: str = ""
    probe_s: float = 0.0  # the probe's own time
    cached: bool = False

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> TrainingProbe:
        names = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in data.items() if k in names})


def machine(device: torch.device | None = None) -> str:
    """The machine a figure is valid on: host, processors, torch's threads, torch's and nnU-Net's
    versions, and the GPU's name for a CUDA device."""
    from importlib.metadata import version

    gpu = f", {torch.cuda.get_device_name(device)}" if device is not None and device.type == "cuda" else ""
    return (f"{platform.node()} ({os.cpu_count()} cpus, {torch.get_num_threads()} torch threads, torch "
            f"{torch.__version__}, nnunetv2 {version('nnunetv2')}{gpu})")


def augmentation_workers(device: torch.device) -> str:
    """nnU-Net's augmentation workers as a training here runs them (the engine sets 0 on a CPU
    unless ``nnUNet_n_proc_DA`` is set): part of what a training step costs."""
    return os.environ.get("nnUNet_n_proc_DA") or ("0" if device.type == "cpu" else "nnU-Net's default")


def probe_key(trainer: str, plans_digest: str | None, configuration: str, batch: int, device: torch.device,
              extra: str = "") -> str:
    return "|".join([trainer, (plans_digest or "")[:16], configuration, str(batch), str(device), machine(device),
                     f"augmentation workers {augmentation_workers(device)}", extra])


def cached_probe(nnunet_root: Path, key: str) -> TrainingProbe | None:
    path = nnunet_root / PROBES_FILE
    try:
        data = json.loads(path.read_text())[key]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    probe = TrainingProbe.from_json(data)
    probe.cached = True
    return probe


def store_probe(nnunet_root: Path, key: str, probe: TrainingProbe) -> None:
    path = nnunet_root / PROBES_FILE
    try:
        stored = json.loads(path.read_text())
    except (OSError, ValueError):
        stored = {}
    stored[key] = {**probe.to_json(), "cached": False}
    atomic.write_json(path, stored)


def _first_samples(value, n: int):
    if isinstance(value, torch.Tensor):
        return value[:n]
    if isinstance(value, (list, tuple)):
        if value and isinstance(value[0], torch.Tensor):
            return type(value)(v[:n] for v in value)
        return value[:n]
    if isinstance(value, dict):
        return {k: _first_samples(v, n) for k, v in value.items()}
    return value


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(device: torch.device, fn: Callable[[], object]) -> float:
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - t


def initialize_without_data(trainer) -> None:
    """nnU-Net's ``initialize`` less its look at the preprocessed data: network, optimizer and
    loss, for steps on random data before (or without) a dataset on disk."""
    if trainer.network is not None:
        return
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels

    trainer._set_batch_size_and_oversample()
    trainer.num_input_channels = determine_num_input_channels(trainer.plans_manager, trainer.configuration_manager,
                                                              trainer.dataset_json)
    trainer.network = trainer.build_network_architecture(
        trainer.plans_manager, trainer.configuration_manager, trainer.num_input_channels,
        trainer.label_manager.num_segmentation_heads, trainer.enable_deep_supervision).to(trainer.device)
    trainer.optimizer, trainer.lr_scheduler = trainer.configure_optimizers()
    trainer.loss = trainer._build_loss()


def synthetic_batch(trainer, n: int) -> dict:
    """A batch of ``n`` random samples shaped as the trainer's data loader gives them (targets at
    every deep-supervision scale): a step on it costs what a real step's network part costs."""
    patch = [int(p) for p in trainer.configuration_manager.patch_size]
    classes = max(2, int(trainer.label_manager.num_segmentation_heads))
    data = torch.randn((n, trainer.num_input_channels, *patch), device=trainer.device)
    scales = trainer._get_deep_supervision_scales() if trainer.enable_deep_supervision else None

    def target(scale):
        size = [max(1, round(p * s)) for p, s in zip(patch, scale)]
        return torch.randint(0, classes, (n, 1, *size), device=trainer.device).float()

    return {"data": data, "target": [target(s) for s in scales] if scales is not None else target([1] * len(patch))}


def step_memory(trainer) -> tuple[int, int]:
    """(fixed, per sample) memory growth of a training step on random data: after a warm-up step
    (gradients, optimizer state and first-call workspaces, paid once), steps at batch 1 and 2;
    the difference is a sample's share, the rest is paid once per step."""
    initialize_without_data(trainer)
    trainer.train_step(synthetic_batch(trainer, 1))  # warm-up
    grew = []
    for n in (1, 2):
        with MemoryWatch(trainer.device) as watch:
            trainer.train_step(synthetic_batch(trainer, n))
        grew.append(watch.grew)
    sample = grew[1] - grew[0] if grew[1] > grew[0] else grew[1] // 2
    return max(0, grew[0] - sample), int(max(sample, 1))


def sample_bytes(trainer) -> int:
    """The memory a sample's share of a training step needs (see :func:`step_memory`)."""
    return step_memory(trainer)[1]


def refuse_memory(sample_bytes: int, batch_size: int, room: int, why: str, what: str, factor: int = 1,
                  fixed: int = 0) -> None:
    need = fixed + sample_bytes * batch_size * factor
    fits = max(0, room - fixed) // max(1, sample_bytes * factor)
    hint = (f"--batch-size {fits} would fit" if 1 <= fits < batch_size else
            "not even one sample fits: a smaller patch (the 2d configuration) or a machine with more memory")
    raise InputError(f"--batch-size {batch_size}", f"{what} needs about {gib(need)} per step ({gib(sample_bytes)} per "
                                                   f"sample, measured at batch 1) but {gib(room)} is left ({why}); {hint}")


def synthetic_step_seconds(trainer, batch: int, steps: int = 2) -> float:
    """Median seconds of a training step at ``batch`` on random data (after one warm-up step)."""
    initialize_without_data(trainer)
    data = synthetic_batch(trainer, batch)
    trainer.network.train()
    trainer.train_step(data)
    return statistics.median(_timed(trainer.device, lambda: trainer.train_step(data)) for _ in range(steps))


def probe_trainer(trainer, *, steps: int = PROBE_STEPS, sample_bytes: int = 0) -> TrainingProbe:
    """Run ``trainer`` (built in a throw-away output folder) for a few real iterations and measure them."""
    device = trainer.device
    t0 = time.perf_counter()
    trainer.on_train_start()
    trainer.on_epoch_start()
    trainer.on_train_epoch_start()
    setup_s = time.perf_counter() - t0
    try:
        with MemoryWatch(device) as full:  # the warm-up at the full batch; the timed steps run unwatched
            trainer.train_step(next(trainer.dataloader_train))
        times = [_timed(device, lambda: trainer.train_step(next(trainer.dataloader_train))) for _ in range(steps)]
        unlabeled = None
        later = getattr(trainer, "probe_epochs", lambda: [])()
        if later:  # a trainer whose iterations cost more from some epoch on (FilterMatch after warm-up)
            saved = trainer.current_epoch
            trainer.current_epoch = later[0]
            try:
                trainer.train_step(next(trainer.dataloader_train))
                unlabeled = statistics.median(_timed(device, lambda: trainer.train_step(next(trainer.dataloader_train)))
                                              for _ in range(max(1, steps - 1)))
            finally:
                trainer.current_epoch = saved
        with torch.no_grad():
            trainer.on_validation_epoch_start()
            val_step_s = _timed(device, lambda: trainer.validation_step(next(trainer.dataloader_val)))
        checkpoint_s = _timed(device, lambda: trainer.save_checkpoint(os.path.join(trainer.output_folder, "probe.pth")))
        tile_s = _tile_seconds(trainer)
    finally:
        _close_loaders(trainer)
    return TrainingProbe(
        trainer=type(trainer).__name__, configuration=trainer.configuration_name, batch_size=int(trainer.batch_size),
        patch_size=[int(p) for p in trainer.configuration_manager.patch_size], device=str(device), machine=machine(),
        setup_s=round(setup_s, 3), step_s=round(statistics.median(times), 4), val_step_s=round(val_step_s, 4),
        checkpoint_s=round(checkpoint_s, 4), tile_s=round(tile_s, 4), sample_bytes=int(sample_bytes),
        peak_bytes=int(full.grew), steps=steps, unlabeled_step_s=round(unlabeled, 4) if unlabeled is not None else None,
        step_times_s=[round(t, 4) for t in times], measured=now_iso(), probe_s=round(time.perf_counter() - t0, 2))


def _tile_seconds(trainer) -> float:
    network = trainer.network._orig_mod if hasattr(trainer.network, "_orig_mod") else trainer.network
    trainer.set_deep_supervision_enabled(False)
    try:
        return tile_seconds(network, trainer.num_input_channels, trainer.configuration_manager.patch_size, trainer.device)
    finally:
        trainer.set_deep_supervision_enabled(True)
        network.train()


def _inference_autocast(device: torch.device):
    """nnU-Net predicts under autocast on CUDA; elsewhere in full precision."""
    import contextlib

    return torch.autocast(device.type, enabled=True) if device.type == "cuda" else contextlib.nullcontext()


def prediction_threads() -> int:
    """The torch threads nnU-Net predicts with: its ``nnUNet_def_n_proc`` when fewer than torch's own
    (``predict_logits_from_preprocessed_data`` sets them; with ``nnUNet_def_n_proc=1`` one thread)."""
    from nnunetv2.configuration import default_num_processes

    n = torch.get_num_threads()
    return default_num_processes if default_num_processes < n else n


def tile_seconds(network: torch.nn.Module, channels: int, patch, device: torch.device) -> float:
    """One sliding-window tile forward at batch 1, no gradient (after a warm-up one), as nnU-Net
    predicts: on its device, under autocast on CUDA, with the threads it predicts with."""
    network = network.to(device)
    network.eval()
    x = torch.zeros((1, channels, *patch), device=device)
    threads = torch.get_num_threads()
    torch.set_num_threads(prediction_threads())
    try:
        with torch.no_grad(), _inference_autocast(device):
            network(x)
            return _timed(device, lambda: network(x))
    finally:
        torch.set_num_threads(threads)


def _close_loaders(trainer) -> None:
    for loader in (getattr(trainer, "dataloader_train", None), getattr(trainer, "dataloader_val", None),
                   getattr(trainer, "dataloader_unlabeled", None)):
        finish = getattr(loader, "_finish", None)
        if finish is not None:
            finish()


# --- the job's shape and its seconds ---------------------------------------------------------------


def sliding_window_tiles(shape: Sequence[int], patch: Sequence[int], step: float = 0.5) -> int:
    """Tiles nnU-Net's sliding window predicts for an image of ``shape`` (spatial, preprocessed):
    a 2d patch tiles every slice of a 3d image."""
    from nnunetv2.inference.sliding_window_prediction import compute_steps_for_sliding_window

    shape = [int(s) for s in shape]
    patch = [int(p) for p in patch]
    slices = 1
    if len(patch) < len(shape):
        slices = math.prod(shape[: len(shape) - len(patch)])
        shape = shape[len(shape) - len(patch):]
    padded = [max(s, p) for s, p in zip(shape, patch)]
    return slices * math.prod(len(s) for s in compute_steps_for_sliding_window(padded, patch, step))


def mirror_passes(patch: Sequence[int], mirroring: bool) -> int:
    """Forward passes per tile: nnU-Net mirrors along every spatial axis of the patch."""
    return 2 ** len(patch) if mirroring else 1


@dataclass
class JobShape:
    """What a training does besides its iterations, in tiles to predict (data-dependent, not cached)."""

    validation_tiles: int = 0  # the final validation's sliding window (mirroring counted)
    unlabeled_from: int | None = None  # FilterMatch: the epoch from which iterations take the unlabeled batch
    filter_start: int | None = None
    filter_every: int | None = None
    filter_tiles: int = 0  # one filter pass over the pool
    finish_overhead_s: float = 0.0  # after the last epoch, beyond checkpoint and tiles: measured by earlier trainings
    finish_overhead_runs: int = 0


def epoch_seconds(probe: TrainingProbe, shape: JobShape, epoch: int, iterations: int, val_iterations: int,
                  epochs: int | None = None) -> float:
    """One epoch: its iterations, validation iterations, checkpoints (the latest and, while the EMA
    pseudo-Dice improves, the best: two counted) and a FilterMatch filter pass after it (never after
    the last of ``epochs``; the pool counted whole although it shrinks)."""
    step = probe.step_s
    if shape.unlabeled_from is not None and epoch >= shape.unlabeled_from and probe.unlabeled_step_s:
        step = probe.unlabeled_step_s
    seconds = iterations * step + val_iterations * probe.val_step_s + 2 * probe.checkpoint_s
    last = epochs is not None and epoch >= epochs - 1
    if shape.filter_tiles and shape.filter_every and epoch >= (shape.filter_start or 0) and not last \
            and (epoch - (shape.filter_start or 0)) % shape.filter_every == 0:
        seconds += shape.filter_tiles * probe.tile_s
    return seconds


def training_seconds(probe: TrainingProbe, shape: JobShape, epochs: int, iterations: int,
                     val_iterations: int | None = None, from_epoch: int = 0, setup: bool = True) -> float:
    """Seconds for epochs ``from_epoch``..``epochs`` and what follows them (final checkpoint, validation)."""
    val = val_iterations if val_iterations is not None else max(1, iterations // 5)
    total = probe.setup_s if setup else 0.0
    total += sum(epoch_seconds(probe, shape, e, iterations, val, epochs) for e in range(from_epoch, epochs))
    return total + final_seconds(probe, shape)


def final_seconds(probe: TrainingProbe, shape: JobShape, overhead: bool = True) -> float:
    """After the last epoch: the final checkpoint, the validation's sliding window and (``overhead``)
    what earlier trainings here measured beyond those."""
    return probe.checkpoint_s + shape.validation_tiles * probe.tile_s + (shape.finish_overhead_s if overhead else 0.0)


def machine_file() -> Path:
    """Figures of this machine that no project owns (what follows a training's last epoch, a
    prediction's work besides its tiles): ``$ALSEG_CACHE_DIR/machine.json``, by default under
    ``~/.cache/alseg``. Losing it costs only the precision of the next estimates."""
    folder = os.environ.get("ALSEG_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "alseg")
    return Path(folder) / "machine.json"


def _machine_data() -> dict:
    try:
        data = json.loads(machine_file().read_text())
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def _write_machine_data(data: dict) -> None:
    try:
        machine_file().parent.mkdir(parents=True, exist_ok=True)
        atomic.write_json(machine_file(), data)
    except OSError:
        pass


def machine_choice(key: str, device: torch.device | None = None):
    """A choice made earlier on this machine (the CPU plan's batch), or None."""
    return _machine_data().get(f"{key}|{machine(device)}")


def keep_machine_choice(key: str, value, device: torch.device | None = None) -> None:
    data = _machine_data()
    data[f"{key}|{machine(device)}"] = value
    _write_machine_data(data)


def remember(key: str, value: float, device: torch.device | None = None, keep: int = 5) -> None:
    """Add a measured figure to the last ``keep`` kept under ``key`` for this machine (best effort:
    a cache folder that cannot be written only leaves the next estimate less precise)."""
    key = f"{key}|{machine(device)}"
    stored = _machine_data()
    values = stored.get(key) if isinstance(stored.get(key), list) else []
    stored[key] = [*values, float(f"{float(value):.6g}")][-keep:]
    _write_machine_data(stored)


def recalled(key: str, device: torch.device | None = None) -> tuple[float, int]:
    """The median of the figures kept under ``key`` on this machine and how many there are (0.0, 0 if none)."""
    values = _machine_data().get(f"{key}|{machine(device)}")
    if not isinstance(values, list) or not values:
        return 0.0, 0
    return float(statistics.median(values)), len(values)


@dataclass
class Budget:
    epochs: int
    iterations: int
    val_iterations: int | None
    estimated_s: float
    minutes: float | None = None
    chosen_from: str = ""  # how the budget was reached, in words


def budget_for_minutes(probe: TrainingProbe, shape: JobShape, minutes: float, *, spent_s: float = 0.0,
                       epochs: int | None = None, iterations: int | None = None, val_iterations: int | None = None,
                       default_iterations: int = 50) -> Budget:
    """Epochs x iterations that fit ``minutes`` (less ``spent_s`` already spent on planning and the probe).

    Given iterations per epoch (or the device's default) the epochs are as many as fit; given
    epochs only, the iterations are; both given, they win and ``minutes`` only informs."""
    available = minutes * 60.0 - spent_s
    if epochs is not None and iterations is not None:
        est = training_seconds(probe, shape, epochs, iterations, val_iterations)
        return Budget(epochs, iterations, val_iterations, est, minutes, "--epochs and --iters given: they win over --minutes")
    if epochs is None:
        iters = iterations or default_iterations
        chosen = 1
        for e in range(1, MAX_EPOCHS + 1):  # the most epochs whose estimate fits
            if training_seconds(probe, shape, e, iters, val_iterations) > available:
                break
            chosen = e
        if chosen == 1 and training_seconds(probe, shape, 1, iters, val_iterations) > available and iterations is None:
            iters = _iterations_fitting(probe, shape, 1, available, val_iterations)
        est = training_seconds(probe, shape, chosen, iters, val_iterations)
        why = (f"{chosen} epoch{'s' if chosen != 1 else ''} x {iters} iterations at {probe.step_s:.3g} s per iteration "
               "(measured here) fit "
               f"{minutes:g} min")
        return Budget(chosen, iters, val_iterations, est, minutes, why)
    iters = _iterations_fitting(probe, shape, epochs, available, val_iterations)
    est = training_seconds(probe, shape, epochs, iters, val_iterations)
    return Budget(epochs, iters, val_iterations, est, minutes,
                  f"--epochs {epochs} given: {iters} iterations per epoch fit {minutes:g} min")


def _iterations_fitting(probe: TrainingProbe, shape: JobShape, epochs: int, available: float,
                        val_iterations: int | None) -> int:
    lo, hi = 1, 100000
    while lo < hi:  # the most iterations per epoch that fit (the estimate grows with them)
        mid = (lo + hi + 1) // 2
        if training_seconds(probe, shape, epochs, mid, val_iterations) <= available:
            lo = mid
        else:
            hi = mid - 1
    return lo

