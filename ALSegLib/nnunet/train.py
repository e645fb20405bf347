"""Training: pretrain on pseudo-labels, fine-tune from those weights, or a supervised baseline.

Each model has a name and its own dataset snapshot; its record lives in
``models/<name>/model.json`` and its nnU-Net output (checkpoints, logs) in
``nnunet/results``. Training checkpoints every epoch and resumes from the latest
checkpoint when run again after a kill. The project lock is held only for the
short writes, so labels can be accepted while a model trains.
"""
from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch

from .. import atomic, trust
from ..errors import InputError
from ..progress import announce, emit
from ..project import Project
from ..store.files import now_iso
from ..store.ids import check_case_id
from ..store.locks import exclusive_run
from ..store.models import list_models, model_dir, read_model  # noqa: F401 (importable from here too)
from ..store.models import write_model as _write_record
from . import estimate as est
from .dataset import SPARSE_FILLS, Dataset, export_dataset, find_dataset
from .env import folders, nnunet_environment, resolve_device, scratch_environment
from .modes import MODES, TrainingMode, check_budget, check_minutes, default_budget
from .plan import PLANS, plan, preprocess, project_plans
from .trainers import ALSegTrainer, load_checkpoint_safely, weights_digest

TRUST_DICE = trust.TRUST_DICE

TRAINER = ALSegTrainer  # the class whose network predict.py builds (all ALSeg trainers share it)


def training_mode(mode: str) -> TrainingMode:
    if mode not in MODES:
        raise InputError("--mode", f"must be one of {', '.join(MODES)}, not {mode!r}")
    return MODES[mode]


def trainer_class(mode: str) -> type[ALSegTrainer]:
    return training_mode(mode).trainer_class()


def _model_lock(folder: Path):
    """One training of a model at a time (another process gets a clear error, not a wait)."""
    return exclusive_run(folder / "train.lock", "this model is being trained already")


def sample_repeats(sources: dict[str, str], pseudo_share: float) -> dict[str, int]:
    """How many times each human-labeled case is listed for sampling so that the
    pseudo-labeled cases make up about ``pseudo_share`` of the draws (the rest human).

    With 8 human and 152 pseudo-labeled cases and a share of 0.5, each human case is
    listed 19 times. Empty when nothing needs weighting (a share of 0, or one kind only)."""
    human = [c for c, src in sources.items() if src.startswith("human")]
    pseudo = len(sources) - len(human)
    if not pseudo_share or not human or not pseudo:
        return {}
    repeats = max(1, round((1.0 - pseudo_share) / pseudo_share * pseudo / len(human)))
    return {c: repeats for c in human}


def _dataset_for(project: Project, mode: TrainingMode, name: str, exclude: Sequence[str], policy: str,
                 sparse_fill: str = "ignore", fill_unknown: Mapping[str, Sequence[int]] | None = None) -> Dataset:
    """The model's dataset: its own snapshot; a model on pseudo-labels alone (pretraining) may
    take over the pseudo-labeled planning dataset (already preprocessed) if no other model uses
    it and no case is to be left out."""
    own = find_dataset(project, name)
    if own is not None:
        if own.policy != policy or own.pool_as_ignore != mode.pool_as_ignore:
            raise InputError(f"model {name!r}", f"a dataset snapshot {own.name} exists for another kind of model "
                                                f"({own.policy} labels{', with unlabeled pool' if own.pool_as_ignore else ''}); "
                                                "choose another --name")
        return own
    record = project_plans(project)
    if policy == "pseudo" and record and record["policy"] == "pseudo" and not exclude:
        folder = folders(project.root).raw / record["dataset"]
        claim = folder / ".alseg-claimed-by"
        with project.lock("claim the planning dataset"):  # two pretraining models must not both take it
            used = {read_model(project, m).get("dataset") for m in list_models(project) if m != name}
            holder = claim.read_text().strip() if claim.is_file() else None
            if record["dataset"] not in used and holder in (None, name):
                if holder is None:
                    atomic.write_bytes(claim, name.encode())
                return Dataset.load(folder)
    return export_dataset(project, policy, name, pool_as_ignore=mode.pool_as_ignore, exclude=exclude,
                          sparse_fill=sparse_fill, fill_unknown=fill_unknown)


def train(
    project: Project,
    mode: str,
    *,
    name: str | None = None,
    epochs: int | None = None,
    iterations: int | None = None,
    val_iterations: int | None = None,
    device: str = "auto",
    configuration: str | None = None,
    init_from: str | None = None,
    validate: bool = True,
    batch_size: int | None = None,
    filtermatch=None,
    exclude_cases: Sequence[str] | None = None,
    pseudo_share: float = 0.0,
    seed: int | None = None,
    minutes: float | None = None,
    sparse_fill: str = "ignore",
    num_gpus: int = 1,
    trust_dice: float | None = TRUST_DICE,
    learning_rate: float | None = None,
) -> dict:
    """Train (or resume, or return the finished) model ``name``; returns its record.

    ``init_from``: the model whose weights to start from (``finetune``: default
    ``pretrain``; ``filtermatch``: optional). ``filtermatch``: a
    :class:`~ALSegLib.nnunet.filtermatch.FilterMatchConfig` (default settings if None).
    ``exclude_cases``: cases the model never sees, labeled or not (held-out test
    cases); a resumed model must be given the same ones (or none).
    ``pseudo_share`` (``finetune`` only): train on the human labels *and* the
    pseudo-labels of the cases no human has labeled yet, drawing pseudo-labeled
    cases this share of the time (0: human labels only). A resumed model keeps its own.
    ``validate=False`` also trains on every labeled case (no validation split held out).
    ``seed``: the same data, budget and seed give the same model on this machine (a resumed run keeps its own).
    ``minutes``: choose the epochs (or, with ``epochs`` given, the iterations) that fit this many
    minutes on this machine, from a probe of a few real iterations (:mod:`.estimate`); explicit
    ``epochs`` and ``iterations`` both given win. Every training's estimate is in its record.
    ``sparse_fill``: what a sparse human version's unannotated voxels train as: nnU-Net's ``ignore``
    label (no loss from them), or ``pseudo``: the case's pseudo-label there.
    ``num_gpus``: train one model on this many GPUs of this node with nnU-Net's own data-parallel
    training (one process per GPU, the batch split among them, rank 0 writing the checkpoints);
    ``device`` must be CUDA; not with ``minutes`` (every rank must run the same epochs).
    ``trust_dice``: the pseudo-labeled cases are trained with a partial-label loss: the classes the
    project's trust table (:mod:`ALSegLib.trust`, classes trusted at this mean Dice against the human
    labels) does not teach, and those a case's pseudo-label says nothing about, are merged with
    background there instead of learned as background; ``None``: every pseudo-label taken whole.
    The record keeps the table and the cases' unknown classes (a resumed model keeps its own).
    ``learning_rate``: the initial rate of nnU-Net's poly schedule (None: nnU-Net's 1e-2; a resumed model keeps its own).
    """
    started = time.perf_counter()
    m = training_mode(mode)
    check_budget(epochs=epochs, iterations=iterations, val_iterations=val_iterations,  # before anything is written
                 batch_size=batch_size)
    check_minutes(minutes)
    if sparse_fill not in SPARSE_FILLS:
        raise InputError("sparse fill", f"must be one of {', '.join(SPARSE_FILLS)}, not {sparse_fill!r}")
    est.check_memory_limit()
    name = check_case_id(name or mode)
    dev = resolve_device(device)
    check_num_gpus(num_gpus, dev, minutes, batch_size, mode)
    folder = model_dir(project, name)
    previous = read_model(project, name) if (folder / "model.json").is_file() else None
    exclude = _resolve_exclusions(project, name, m, previous, exclude_cases)
    if previous and previous["status"] == "done":
        return previous
    if previous is not None:
        pseudo_share = previous.get("pseudo_share", 0.0)  # a resumed model keeps its own
        seed = previous.get("seed")
        learning_rate = previous.get("learning_rate")
    if not 0.0 <= pseudo_share < 1.0:
        raise InputError("--pseudo-share", f"must be in [0, 1), not {pseudo_share}")
    if pseudo_share and not m.mixes_pseudo:
        raise InputError("--pseudo-share", f"mixes pseudo-labels into fine-tuning only, not into {mode!r}")
    policy = m.policy(pseudo_share)
    hold_out = previous.get("validation_split", True) if previous is not None else validate
    init = _resolve_init(project, m, init_from)

    factor = 2 if m.pool_as_ignore else 1  # FilterMatch's steps add an unlabeled batch
    sample_bytes = None
    if project_plans(project) is not None:  # the memory a step needs, before any of the model's files is written
        chosen = configuration or (previous or {}).get("configuration") or project_plans(project)["configurations"][0]
        _check_gpu_batch(project, chosen, batch_size, num_gpus)
        sample_bytes = _check_memory(project, chosen, batch_size, dev, name, factor)
    with _model_lock(folder):
        if project_plans(project) is None:
            plan(project, policy=m.labels, configurations=(configuration or "3d_fullres",), batch_size=batch_size,
                 preprocess_dataset=False, device=str(dev))
        plans_record = project_plans(project)
        configuration = configuration or (previous or {}).get("configuration") or plans_record["configurations"][0]
        cls = m.trainer_class()
        if sample_bytes is None:  # planned just now: checked before the model's dataset is written
            _check_gpu_batch(project, configuration, batch_size, num_gpus)
            sample_bytes = _check_memory(project, configuration, batch_size, dev, name, factor)
        table = functools.cache(lambda: trust.trust_table(project, trust_dice))  # read once, by both, if needed
        dataset = _model_dataset(project, m, name, previous, exclude, policy, sparse_fill, trust_dice, table)
        partial = _partial_labels(project, dataset, previous, trust_dice, table)
        preprocess(project, dataset, configuration, hold_out=hold_out)
        probe = _probe(project, m, dataset, configuration, batch_size, dev, pseudo_share, filtermatch, sample_bytes)
        shape = _job_shape(project, m, dataset, configuration, validate, filtermatch, probe)
        budget, estimate = _plan_budget(previous, dev, epochs, iterations, val_iterations, minutes, probe, shape,
                                        spent_s=time.perf_counter() - started,
                                        epochs_done=_epochs_done(project, m, dataset, configuration))
        record = previous or {
            "name": name, "mode": mode, "dataset": dataset.name, "policy": dataset.policy,
            "labeled_cases": len(dataset.cases), "label_sources": dataset.sources, "configuration": configuration,
            "plans": PLANS, "trainer": cls.__name__, "init_from": init, "started": now_iso(), "resumed_at_epochs": [],
            "excluded_cases": sorted(dataset.excluded), "plans_digest": plans_record.get("plans_digest"),
            "validation_split": hold_out, "pseudo_share": pseudo_share, "seed": seed, "sparse_fill": sparse_fill,
            "human_cases": sum(1 for v in dataset.sources.values() if v.startswith("human")),
            "partial_labels": partial, "learning_rate": learning_rate,
        }
        if record.get("estimate") and previous is not None:  # a resumed run: each run's estimate and actual time kept
            record["earlier_estimates"] = [*record.get("earlier_estimates", []), record["estimate"]]
        record.update({"status": "training", "device": str(dev), "budget": budget, "estimate": estimate})
        if num_gpus > 1:
            record["num_gpus"] = num_gpus
        _write_record(project, record, "training_started")
        emit("stage", stage="train", model=name, mode=mode, dataset=dataset.name, epochs=budget["epochs"],
             iterations=budget["iterations"])
        _announce_estimate(name, mode, budget, estimate, minutes)

        start = time.perf_counter()
        with nnunet_environment(project.root, training_on_cpu=dev.type == "cpu", log=folder / "nnunet.log"):
            trainer, output = _make_trainer(project, m, dataset, configuration, batch_size, budget, dev, pseudo_share,
                                            filtermatch, unknown=partial["unknown"], learning_rate=learning_rate)
            trainer.seed = seed
            trainer.final_phase_s = est.final_seconds(probe, shape)
            if previous is None and estimate.get("time_budget", {}).get("fitted"):
                trainer.deadline = time.time() - (time.perf_counter() - started) + minutes * 60.0
                trainer.max_epochs = est.MAX_EPOCHS
            final = output / "checkpoint_final.pth"
            _resume_or_start(project, trainer, output, record, init, name)
            trained_now = not final.is_file()
            if trained_now:
                try:
                    if num_gpus > 1:  # nnU-Net's data-parallel training, one process per GPU; then its final weights here
                        _train_on_gpus(project, mode, dataset, configuration, batch_size, budget, pseudo_share,
                                       filtermatch, record, init, name, seed, num_gpus, folder / "nnunet.log")
                        trainer.load_checkpoint(str(final))
                    else:
                        trainer.run_training()
                except BaseException:
                    record["status"] = "failed (resumable)"
                    _write_record(project, record, "training_failed")
                    raise
            validation = None
            if validate:
                trainer.perform_actual_validation(False)
                validation = _validation_summary(output / "validation" / "summary.json", dataset)
            ends = trainer.logger.get_value("epoch_end_timestamps", None)
            if trained_now and ends and trainer.current_epoch == budget["epochs"]:  # this run trained its last epoch
                _remember_finish(validate, configuration, dev,
                                 time.time() - ends[-1] - est.final_seconds(probe, shape, overhead=False))
            record.update(_finished_fields(project, trainer, final, budget, validation,
                                           seconds=time.perf_counter() - start + record.get("seconds", 0.0)))
            record["estimate"]["actual_s"] = round(time.perf_counter() - start, 1)
            if trainer.refits:  # --minutes: the epochs the deadline chose after each epoch, at the epochs' own pace
                record["estimate"]["time_budget"]["refits"] = trainer.refits
                record["budget"]["epochs"] = trainer.num_epochs
            record.update(m.record_fields(trainer, dataset))
        _write_record(project, record, "training_finished")
        emit("stage", stage="train-done", model=name, seconds=record["seconds"])
        return record


def check_num_gpus(num_gpus, dev: torch.device, minutes: float | None, batch_size: int | None,
                   mode: str | None = None) -> None:
    """``num_gpus`` usable here, or a clear error before anything is written."""
    if not isinstance(num_gpus, int) or isinstance(num_gpus, bool) or num_gpus < 1:
        raise InputError("--num-gpus", f"must be a whole number of at least 1, not {num_gpus!r}")
    if num_gpus == 1:
        return
    if mode == "filtermatch":
        raise InputError("--num-gpus", "FilterMatch's teacher is not built for nnU-Net's multi-GPU training: "
                                       "train it on one GPU")
    if dev.type != "cuda":
        raise InputError("--num-gpus", f"trains on several GPUs: the device must be CUDA, not {dev}")
    if torch.cuda.device_count() < num_gpus:
        raise InputError("--num-gpus", f"{num_gpus} GPUs asked for; this node has {torch.cuda.device_count()}")
    if minutes is not None:
        raise InputError("--num-gpus", "not with --minutes: every GPU's process must run the same epochs")
    if batch_size is not None and batch_size < num_gpus:
        raise InputError("--num-gpus", f"the batch ({batch_size}) is split among the GPUs: it must be at least "
                                       f"{num_gpus}")


def _check_gpu_batch(project: Project, configuration: str, batch_size: int | None, num_gpus: int) -> None:
    """nnU-Net splits the batch among the GPUs: the batch (given, else the plans') must be at least ``num_gpus``."""
    if num_gpus == 1:
        return
    record = project_plans(project)
    plans = json.loads((folders(project.root).preprocessed / record["dataset"] / f"{PLANS}.json").read_text())
    batch = batch_size or plans["configurations"].get(configuration, {}).get("batch_size", 0)
    if batch < num_gpus:
        raise InputError("--num-gpus", f"the batch ({batch}) is split among the GPUs: it must be at least {num_gpus} "
                                       "(give --batch-size)")


def _train_on_gpus(project: Project, mode: str, dataset: Dataset, configuration: str, batch_size: int | None,
                   budget: dict, pseudo_share: float, filtermatch, record: dict, init: dict | None, name: str,
                   seed: int | None, num_gpus: int, log: Path) -> None:
    """nnU-Net's own multi-GPU training of one model: ``num_gpus`` processes (``torch.multiprocessing``),
    one per GPU of this node, joined in a NCCL process group on a free local port; nnU-Net's trainer
    then wraps the network in DistributedDataParallel, splits the batch among the ranks and writes
    the checkpoints from rank 0 only (as ``nnUNetv2_train -num_gpus N`` does)."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("localhost", 0))
        port = sock.getsockname()[1]
    job = {"root": str(project.root), "mode": mode, "dataset": dataset, "configuration": configuration,
           "batch_size": batch_size, "budget": budget, "pseudo_share": pseudo_share, "filtermatch": filtermatch,
           "record": dict(record), "init": init, "name": name, "seed": seed, "log": str(log), "port": port,
           "unknown": (record.get("partial_labels") or {}).get("unknown", {}), "learning_rate": record.get("learning_rate")}
    emit("stage", stage="train-gpus", model=name, gpus=num_gpus)
    mp.spawn(_gpu_rank, args=(num_gpus, job), nprocs=num_gpus, join=True)


def _gpu_rank(rank: int, world: int, job: dict) -> None:
    """One GPU's process of :func:`_train_on_gpus`."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="localhost", MASTER_PORT=str(job["port"]))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.cuda.set_device(rank)
    try:
        project = Project.open(job["root"])
        with nnunet_environment(project.root, training_on_cpu=False, log=Path(job["log"])):
            trainer, output = _make_trainer(project, training_mode(job["mode"]), job["dataset"], job["configuration"],
                                            job["batch_size"], job["budget"], torch.device("cuda", rank),
                                            job["pseudo_share"], job["filtermatch"], unknown=job["unknown"],
                                            learning_rate=job["learning_rate"])
            # each rank draws its own batches (the same seed on every rank would draw the same ones)
            trainer.seed = None if job["seed"] is None else job["seed"] + rank
            _resume_or_start(project, trainer, output, dict(job["record"], resumed_at_epochs=[]), job["init"],
                             job["name"])
            trainer.run_training()
    finally:
        dist.destroy_process_group()


def checked_checkpoint(project: Project, record: dict) -> dict:
    """A finished model's checkpoint, loaded safely, once its weights are checked to be those its
    record names: a checkpoint another program wrote since (``nnUNetv2_train`` run on the engine's
    own dataset overwrote one) is refused, so predictions and fine-tunings never carry a digest of
    weights they did not use."""
    path = project.layout.resolve(record["checkpoint"])
    checkpoint = load_checkpoint_safely(path)
    recorded = record.get("final_weights_digest")
    digest = weights_digest(checkpoint["network_weights"])
    if recorded and digest != recorded:
        raise InputError(path, f"the weights of model {record['name']!r} changed after it finished training "
                               f"(digest {digest[:12]}, recorded {recorded[:12]}): another program wrote this "
                               "checkpoint. Run nnU-Net's own trainings on a dataset of their own (see the README's "
                               "nnU-Net recipe), or train this model again under a new name")
    return checkpoint


def _check_memory(project: Project, configuration: str, batch_size: int | None, dev: torch.device, name: str,
                  factor: int = 1) -> int:
    """Steps at batch 1 and 2 on random data with the project's network (:func:`~.estimate.step_memory`):
    the memory a step needs, checked against what the device has left before any of the model's
    files is written (``factor``: samples per step per batch sample; FilterMatch's unlabeled batch
    doubles them). Returns a sample's share."""
    record = project_plans(project)
    pre = folders(project.root).preprocessed / record["dataset"]
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    if configuration not in plans["configurations"]:
        raise InputError("--configuration", f"the project's plans have no {configuration!r} configuration "
                         f"(planned: {', '.join(plans['configurations'])})")
    batch = int(batch_size or plans["configurations"][configuration]["batch_size"])
    key = est.probe_key("memory", record.get("plans_digest"), configuration, 1, dev)
    root = folders(project.root).preprocessed.parent
    cached = est.cached_probe(root, key)
    if cached is not None:
        fixed, sample = cached.fixed_bytes, cached.sample_bytes
    else:
        plans["configurations"][configuration]["batch_size"] = batch
        plans["continue_training"] = False
        dataset_json = json.loads((pre / "dataset.json").read_text())
        with scratch_environment(project.root, dev):
            trainer = ALSegTrainer(plans, configuration, 0, dataset_json, dev)
            fixed, sample = est.step_memory(trainer)
            del trainer  # its memory is free again before what is left is read
    room, why = est.headroom(dev)
    if fixed + sample * batch * factor > room:
        est.refuse_memory(sample, batch, room, why, f"training {name!r}", factor, fixed)
    if cached is None:
        with project.lock("store a memory probe"):
            est.store_probe(root, key, est.TrainingProbe(
                trainer="memory", configuration=configuration, batch_size=1, patch_size=[], device=str(dev),
                machine=est.machine(dev), setup_s=0, step_s=0, val_step_s=0, checkpoint_s=0, tile_s=0,
                sample_bytes=sample, fixed_bytes=fixed, peak_bytes=fixed + sample, steps=1, measured=now_iso()))
    return sample


def _probe(project: Project, mode: TrainingMode, dataset: Dataset, configuration: str, batch_size: int | None,
           dev: torch.device, pseudo_share: float, options, sample_bytes: int) -> est.TrainingProbe:
    """A few real iterations of this model's trainer on its own data (or the figures an earlier
    probe of the same trainer, plans, batch and machine stored)."""
    cls = mode.trainer_class()
    plans_record = project_plans(project)
    pre = folders(project.root).preprocessed / dataset.name
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    batch = int(batch_size or plans["configurations"][configuration]["batch_size"])
    extra = ""
    if mode.pool_as_ignore:  # FilterMatch: its settings, and whether a pool gives it unlabeled steps
        from .filtermatch_settings import FilterMatchConfig

        extra = json.dumps({**(options or FilterMatchConfig()).to_json(), "pool": bool(dataset.pool)}, sort_keys=True)
    key = est.probe_key(cls.__name__, plans_record.get("plans_digest"), configuration, batch, dev, extra)
    root = folders(project.root).preprocessed.parent
    cached = est.cached_probe(root, key)
    if cached is not None:
        return cached
    emit("stage", stage="probe", dataset=dataset.name, configuration=configuration, batch_size=batch)
    with scratch_environment(project.root, dev):
        trainer, _ = _make_trainer(project, mode, dataset, configuration, batch, {"epochs": 1, "iterations": 1,
                                   "val_iterations": 1}, dev, pseudo_share, options, fresh=True)
        probe = est.probe_trainer(trainer, sample_bytes=sample_bytes)
    with project.lock("store a time probe"):
        est.store_probe(root, key, probe)
    return probe


def _job_shape(project: Project, mode: TrainingMode, dataset: Dataset, configuration: str, validate: bool, options,
               probe: est.TrainingProbe) -> est.JobShape:
    """The tiles the final validation (mirrored, as nnU-Net validates) and FilterMatch's filters predict."""
    pre = folders(project.root).preprocessed / dataset.name
    shape = est.JobShape()
    shape.finish_overhead_s, shape.finish_overhead_runs = _finish_overhead(validate, configuration,
                                                                            torch.device(probe.device))
    if validate:
        split = json.loads((pre / "splits_final.json").read_text())[0]
        shape.validation_tiles = est.mirror_passes(probe.patch_size, True) * sum(
            est.sliding_window_tiles(s, probe.patch_size) for s in preprocessed_shapes(pre, configuration, split["val"]))
    if mode.pool_as_ignore and dataset.pool:
        from .filtermatch_settings import FilterMatchConfig

        cfg = options or FilterMatchConfig()
        shape.unlabeled_from = cfg.warmup_epochs if cfg.unlabeled_weight > 0 else None
        shape.filter_start, shape.filter_every = cfg.filter_start, cfg.filter_every
        shape.filter_tiles = sum(est.sliding_window_tiles(s, probe.patch_size)
                                 for s in preprocessed_shapes(pre, configuration, dataset.pool))
    return shape


def preprocessed_shapes(preprocessed: Path, configuration: str, cases: Sequence[str]) -> list[tuple[int, ...]]:
    """The spatial shapes of preprocessed cases (read from their headers, not decompressed)."""
    from nnunetv2.training.dataloading.nnunet_dataset import infer_dataset_class

    plans = json.loads((preprocessed / f"{PLANS}.json").read_text())
    folder = preprocessed / plans["configurations"][configuration]["data_identifier"]
    if not cases or not folder.is_dir():
        return []
    data = infer_dataset_class(str(folder))(str(folder), list(cases))
    return [tuple(int(v) for v in data.load_case(c)[0].shape[1:]) for c in cases]


def _finish_key(validate: bool, configuration: str) -> str:
    return f"after the last epoch, {'with' if validate else 'without'} validation, {configuration}"


def _remember_finish(validate: bool, configuration: str, dev: torch.device, overhead_s: float) -> None:
    """What followed the last epoch beyond the probe's figures (nnU-Net's final plot, the validation's
    worker processes, resampling and export), kept for the next estimates on this machine."""
    est.remember(_finish_key(validate, configuration), max(0.0, overhead_s), dev)


def _finish_overhead(validate: bool, configuration: str, dev: torch.device) -> tuple[float, int]:
    return est.recalled(_finish_key(validate, configuration), dev)


def _epochs_done(project: Project, mode: TrainingMode, dataset: Dataset, configuration: str) -> int:
    """Epochs a killed run of this model already trained (from its latest checkpoint; 0 for a new one)."""
    output = (folders(project.root).results / dataset.name / f"{mode.trainer_class().__name__}__{PLANS}__{configuration}"
              / "fold_0")
    latest = output / "checkpoint_latest.pth"
    if (output / "checkpoint_final.pth").is_file():
        return 10**9  # trained: only what follows the last epoch is left
    if not latest.is_file():
        return 0
    try:
        return int(load_checkpoint_safely(latest).get("current_epoch", 0))
    except InputError:
        return 0  # a torn or foreign checkpoint: the resume reports it


def _plan_budget(previous: dict | None, dev: torch.device, epochs, iterations, val_iterations, minutes,
                 probe: est.TrainingProbe, shape: est.JobShape, spent_s: float,
                 epochs_done: int = 0) -> tuple[dict, dict]:
    """The training's budget (given, a resumed run's own, fitted to ``minutes``, or the device's
    default) and its estimate, as the record stores them."""
    budget = _resolve_budget(previous, dev, epochs, iterations, val_iterations)
    fitted = None
    if minutes is not None and previous is None:
        d_epochs, d_iters = default_budget(dev)
        fitted = est.budget_for_minutes(probe, shape, minutes, spent_s=spent_s, epochs=epochs, iterations=iterations,
                                        val_iterations=val_iterations, default_iterations=d_iters)
        budget = {"epochs": fitted.epochs, "iterations": fitted.iterations, "val_iterations": val_iterations}
    done = min(epochs_done, budget["epochs"])
    seconds = est.training_seconds(probe, shape, budget["epochs"], budget["iterations"], budget["val_iterations"],
                                   from_epoch=done)
    estimate = {"estimated_s": round(seconds, 1), "spent_s": round(spent_s, 1), "probe": probe.to_json(),
                "from_epoch": done,
                "validation_tiles": shape.validation_tiles, "filter_tiles": shape.filter_tiles,
                "finish_overhead_s": round(shape.finish_overhead_s, 2),
                "finish_overhead_from": (f"the median of the last {shape.finish_overhead_runs} trainings on this machine"
                                         if shape.finish_overhead_runs else "not measured yet on this machine")}
    if minutes is not None:
        fits = fitted is not None and epochs is None  # the epochs were fitted: a deadline may refit them
        estimate["time_budget"] = {"minutes": minutes, "fitted": fits,
                                   "chosen": fitted.chosen_from if fitted else "a resumed training keeps its own budget"}
    return budget, estimate


def _announce_estimate(name: str, mode: str, budget: dict, estimate: dict, minutes) -> None:
    """The expected duration, printed (and emitted as an ``estimate`` event) before the training starts."""
    probe = estimate["probe"]
    seconds = estimate["estimated_s"]
    epochs = f"{budget['epochs']} epoch{'s' if budget['epochs'] != 1 else ''}"
    text = (f"estimate: training {name!r} ({mode}) takes about {est.duration(seconds)} here: {epochs} "
            f"x {budget['iterations']} iterations at {probe['step_s']:.3g} s each (batch {probe['batch_size']}, "
            f"{'measured earlier' if probe['cached'] else 'measured just now'} on this machine)")
    if estimate.get("time_budget"):
        text += f"; --minutes {minutes:g}: {estimate['time_budget']['chosen']}"
    announce("estimate", text, job="train", model=name, estimated_s=seconds, epochs=budget["epochs"],
             iterations=budget["iterations"], step_s=probe["step_s"], batch_size=probe["batch_size"])
    if minutes is not None and not estimate["from_epoch"] and estimate["spent_s"] + seconds > minutes * 60 + 1:
        announce("warning", f"warning: training {name!r} cannot fit {minutes:g} min: {est.duration(estimate['spent_s'])} "
                            f"went to planning, preprocessing and the probe, and its budget takes about "
                            f"{est.duration(seconds)} more", job="train", model=name, estimated_s=seconds,
                 spent_s=estimate["spent_s"], minutes=minutes)
    if minutes is None and seconds > est.LONG_JOB_S:
        limit = est.LONG_JOB_S / 60
        announce("warning", f"warning: training {name!r} is expected to take {est.duration(seconds)}, more than "
                            f"{est.duration(est.LONG_JOB_S)}; --minutes {limit:g} would fit it into "
                            f"{est.duration(est.LONG_JOB_S)} (fewer epochs), or give --epochs/--iters",
                 job="train", model=name, estimated_s=seconds, minutes_that_fit=limit)


def _resolve_budget(previous: dict | None, dev: torch.device, epochs, iterations, val_iterations) -> dict:
    """Epochs, iterations per epoch and validation iterations: as given, else a resumed run's own, else the defaults."""
    d_epochs, d_iters = default_budget(dev)
    budget = (previous or {}).get("budget", {})  # a resumed run keeps its budget unless told otherwise
    def pick(given, stored, default):
        return given if given is not None else stored if stored is not None else default

    return {"epochs": pick(epochs, budget.get("epochs"), d_epochs),
            "iterations": pick(iterations, budget.get("iterations"), d_iters),
            "val_iterations": pick(val_iterations, budget.get("val_iterations"), None)}


def _resolve_exclusions(project: Project, name: str, mode: TrainingMode, previous: dict | None,
                        exclude_cases: Sequence[str] | None) -> list[str]:
    """The held-out cases the model never sees; a model run again must be given the same (or none)."""
    if previous and previous["mode"] != mode.name:
        raise InputError(f"model {name!r}", f"exists with mode {previous['mode']!r}; choose another --name")
    exclude = sorted(set(exclude_cases or ()))
    for case in exclude:
        if not project.has_case(case):
            raise InputError(f"--exclude {case}", "no such case in the project")
    if previous and exclude_cases is not None and exclude != previous.get("excluded_cases", []):
        raise InputError(f"model {name!r}", f"was trained with {len(previous.get('excluded_cases', []))} excluded case(s), "
                                            f"not these {len(exclude)}; choose another --name")
    return exclude


def _resolve_init(project: Project, mode: TrainingMode, init_from: str | None) -> dict | None:
    """The weights the model starts from: the mode's default model unless another is named."""
    init_from = init_from or mode.default_init
    if init_from is None or not mode.takes_init:
        return None
    source = read_model(project, init_from)
    if source["status"] != "done":
        raise InputError(f"model {init_from!r}", "has not finished training; cannot fine-tune from it")
    current = (project_plans(project) or {}).get("plans_digest")
    if source.get("plans_digest") and current and source["plans_digest"] != current:
        raise InputError(f"model {init_from!r}", "was trained under other plans (the project was planned again "
                                                 "since); its weights do not fit the current network")
    checked_checkpoint(project, source)  # before anything is written
    return {"model": init_from, "checkpoint": source["checkpoint"], "weights_digest": source["final_weights_digest"]}


def _model_dataset(project: Project, mode: TrainingMode, name: str, previous: dict | None, exclude: list[str],
                   policy: str, sparse_fill: str = "ignore", trust_dice: float | None = None,
                   table: Callable[[], dict] | None = None) -> Dataset:
    if previous is not None:
        return Dataset.load(folders(project.root).raw / previous["dataset"])
    fill_unknown = None
    if sparse_fill == "pseudo" and trust_dice is not None:  # a sparse case's pseudo fill obeys the trust too
        fill_unknown = trust.unknown_classes(project, project.labeled_cases("pseudo"),
                                             table() if table else trust.trust_table(project, trust_dice))
    dataset = _dataset_for(project, mode, name, exclude, policy, sparse_fill, fill_unknown)
    if sorted(dataset.excluded) != exclude:
        raise InputError(f"model {name!r}", f"its dataset {dataset.name} exists with other excluded cases; "
                                            "choose another --name")
    return dataset


def _partial_labels(project: Project, dataset: Dataset, previous: dict | None, trust_dice: float | None,
                    table: Callable[[], dict] | None = None) -> dict:
    """What the model learns from each pseudo-label (see ``trust_dice`` in :func:`train`): the trust
    table it was decided from and, per pseudo-labeled case, the label values merged with background."""
    if previous is not None:  # a resumed model keeps its own (an older record: every pseudo-label whole)
        return previous.get("partial_labels") or {"trust": None, "unknown": {}}
    pseudo = [c for c, source in dataset.sources.items() if source == "pseudo"]
    if trust_dice is None or not pseudo:
        return {"trust": None, "unknown": {}, **({"off": True} if trust_dice is None else {})}
    measured = table() if table else trust.trust_table(project, trust_dice)
    return {"trust": measured, "unknown": {c: [int(v) for v in vs] for c, vs in
                                           trust.unknown_classes(project, pseudo, measured).items()}}


def _make_trainer(project: Project, mode: TrainingMode, dataset: Dataset, configuration: str, batch_size: int | None,
                  budget: dict, dev: torch.device, pseudo_share: float, options,
                  fresh: bool = False, unknown: Mapping[str, Sequence[int]] | None = None,
                  learning_rate: float | None = None) -> tuple[ALSegTrainer, Path]:
    """The mode's nnU-Net trainer on the preprocessed dataset, with its budget and sampling; and its output folder.
    ``fresh``: never continuing a training (a probe's trainer). ``unknown``: case -> project label values
    its label says nothing about (merged with background in its loss)."""
    f = folders(project.root)
    pre = f.preprocessed / dataset.name
    cls = mode.trainer_class()
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    if batch_size is not None:
        plans["configurations"][configuration]["batch_size"] = int(batch_size)
    output = f.results / dataset.name / f"{cls.__name__}__{PLANS}__{configuration}" / "fold_0"
    plans["continue_training"] = not fresh and ((output / "checkpoint_latest.pth").is_file()
                                                or (output / "checkpoint_final.pth").is_file())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    trainer = cls(plans, configuration, 0, dataset_json, dev)
    trainer.set_budget(budget["epochs"], budget["iterations"], budget["val_iterations"])
    if learning_rate is not None:  # read by configure_optimizers when the trainer initialises
        trainer.initial_lr = float(learning_rate)
    trainer.case_repeats = sample_repeats(dataset.sources, pseudo_share)
    trainer.unknown_classes = {case: [dataset.values.index(v) + 1 for v in values]
                               for case, values in (unknown or {}).items()}
    mode.configure(trainer, dataset, options)
    return trainer, output


def _resume_or_start(project: Project, trainer: ALSegTrainer, output: Path, record: dict, init: dict | None,
                     name: str) -> None:
    """Continue from the last checkpoint of a killed run, else start from the initial weights (checked)."""
    latest, final = output / "checkpoint_latest.pth", output / "checkpoint_final.pth"
    if final.is_file():  # killed after training, during validation: do not train again
        trainer.load_checkpoint(str(final))
    elif latest.is_file():
        trainer.load_checkpoint(str(latest))
        record["resumed_at_epochs"].append(trainer.current_epoch)
        emit("resume", model=name, epoch=trainer.current_epoch)
    elif init is not None:
        weights = project.layout.resolve(init["checkpoint"])
        digest = trainer.load_pretrained_weights(weights)
        if digest != init["weights_digest"]:
            raise InputError(weights, "pretrained weights changed since that model finished")
        record["init_weights_digest"] = digest


def _finished_fields(project: Project, trainer: ALSegTrainer, final: Path, budget: dict, validation: dict | None,
                     seconds: float) -> dict:
    losses = [float(v) for v in trainer.logger.get_value("train_losses", None)]
    return {
        "status": "done",
        "finished": now_iso(),
        "seconds": round(seconds, 1),
        "epochs_done": trainer.current_epoch,
        "iterations_done": trainer.current_epoch * budget["iterations"],
        "final_train_loss": losses[-1],
        "final_pseudo_dice": float(trainer.logger.get_value("mean_fg_dice", -1)),
        "train_losses": [round(v, 5) for v in losses],
        "validation": validation,
        "checkpoint": str(final.relative_to(project.root)),
        "final_weights_digest": weights_digest(load_checkpoint_safely(final)["network_weights"]),
    }


def _validation_summary(path: Path, dataset: Dataset) -> dict | None:
    """nnU-Net's validation summary as Dice per class name (on the held-out split)."""
    if not path.is_file():
        return None
    summary = json.loads(path.read_text())
    names = json.loads((dataset.folder / "dataset.json").read_text())["labels"]
    by_index = {str(v): k for k, v in names.items()}
    per_class = {by_index.get(str(k), str(k)): round(float(v["Dice"]), 4) for k, v in summary.get("mean", {}).items()}
    return {"dice": per_class, "mean_dice": round(float(summary["foreground_mean"]["Dice"]), 4),
            "cases": len(summary.get("metric_per_case", []))}
