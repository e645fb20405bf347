"""Prediction with a trained model: ``predicted`` labels and per-case class probabilities.

Runs ``nnUNetPredictor`` set up by ``manual_initialization`` with a network
built by ALSeg's trainer class and weights loaded with ``weights_only=True``
(no trainer-name lookup, no pickle). Probabilities are stored per case as
compressed float16 in ``predictions/<model>/<case>.npz`` (``probabilities``:
classes x z x y x on the image grid; ``class_values``: the project label value
of each channel, 0 first), for the uncertainty scores of selection. The same
pass pools the encoder bottleneck into one feature vector per case
(``features/nnunet/<model>/<case>.npy``, the diversity features of selection).
"""
from __future__ import annotations

import io
import json
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import atomic
from ..cluster import Worker
from ..devices import device_name
from ..errors import InputError
from ..progress import announce, duration, emit, track
from ..project import Project
from ..store.predictions import load_probabilities, probabilities_path, stored_with  # noqa: F401 (importable here)
from .env import folders, nnunet_environment, resolve_device
from .plan import PLANS
from .train import TRAINER, checked_checkpoint, model_dir, read_model
from .trainers import load_weights_checked


def _discard(project: Project, path: Path) -> None:
    if path.is_file():
        with project.lock("discard stale prediction outputs"):
            path.unlink(missing_ok=True)
            project.log_event("prediction_output_discarded", file=str(path.relative_to(project.root)),
                              reason="the case was predicted again without storing it")


def make_predictor(project: Project, record: dict, checkpoint: dict, device, mirroring: bool, tile_step: float):
    pre = folders(project.root).preprocessed / record["dataset"]
    return build_predictor(json.loads((pre / f"{PLANS}.json").read_text()), json.loads((pre / "dataset.json").read_text()),
                           record["configuration"], checkpoint, device, mirroring, tile_step,
                           str(project.layout.resolve(record["checkpoint"])))


def build_predictor(plans: dict, dataset_json: dict, configuration: str, checkpoint: dict, device, mirroring: bool,
                    tile_step: float, where: str):
    """An ``nnUNetPredictor`` from the plans, the dataset description and a safely loaded checkpoint
    (no project needed: a Ray worker builds its own from these); ``where`` names the checkpoint in errors."""
    from nnunetv2.inference.predict_from_raw_data import nnUNetPredictor
    from nnunetv2.utilities.label_handling.label_handling import determine_num_input_channels
    from nnunetv2.utilities.plans_handling.plans_handler import PlansManager

    pm = PlansManager(plans)
    cm = pm.get_configuration(configuration)
    network = TRAINER.build_network_architecture(
        pm, cm, determine_num_input_channels(pm, cm, dataset_json),
        pm.get_label_manager(dataset_json).num_segmentation_heads, enable_deep_supervision=False,
    )
    load_weights_checked(network, checkpoint["network_weights"], where)
    predictor = nnUNetPredictor(
        tile_step_size=tile_step, use_gaussian=True, use_mirroring=mirroring,
        perform_everything_on_device=device.type == "cuda", device=device, verbose=False, allow_tqdm=False,
    )
    predictor.manual_initialization(
        network, pm, cm, [checkpoint["network_weights"]], dataset_json, TRAINER.__name__,
        checkpoint.get("inference_allowed_mirroring_axes"),
    )
    return predictor


def infer(predictor, pool, data: np.ndarray, props: dict, probabilities: bool) -> dict:
    """One case through the network: nnU-Net's label indices, the probabilities (float16, or None)
    and the pooled bottleneck vector (or None). The part a Ray worker runs."""
    if pool is not None:
        pool.reset()
    seg, probs = predictor.predict_single_npy_array(data, props, None, None, True)
    return {"seg": np.asarray(seg), "probs": np.asarray(probs, dtype=np.float16) if probabilities else None,
            "vector": pool.vector() if pool is not None else None}


class PredictWorker(Worker):
    """A Ray actor: builds the predictor once from the model's plans and weights, then predicts the
    images it is handed (arrays from the object store); it may not change the project folder."""

    def __init__(self, plans: dict, dataset_json: dict, configuration: str, checkpoint: dict, device: str,
                 mirroring: bool, tile_step: float, probabilities: bool, features: bool, where: str,
                 guard: str | None = None, threads: int = 1):
        from ..cluster import worker_device
        from .features import BottleneckPool

        super().__init__(guard, threads)
        dev = resolve_device(worker_device(device))  # a GPU asked for: the one Ray gave this worker
        self.predictor = build_predictor(plans, dataset_json, configuration, checkpoint, dev, mirroring, tile_step,
                                         where)
        self.pool = BottleneckPool(self.predictor.network) if features else None
        self.probabilities = probabilities

    def run(self, data: np.ndarray, props: dict) -> dict:
        from ..cluster import worker_name

        return {**infer(self.predictor, self.pool, data, props, self.probabilities), "worker": worker_name()}


def case_tiles(project: Project, case: str, predictor, mirroring: bool, tile_step: float) -> int:
    """Sliding-window forward passes for one case: its image resampled to the plans' spacing (from
    the file's header), tiled by the patch, times the mirrorings."""
    return image_tiles(project, case, predictor.plans_manager, predictor.configuration_manager,
                       len(predictor.allowed_mirroring_axes or ()) if mirroring else 0, tile_step)


def image_voxels(project: Project, case: str) -> int:
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(project.image_path(case)))
    reader.ReadImageInformation()
    return int(np.prod(reader.GetSize()))


OVERHEAD_KEY = "prediction besides its tiles, seconds per voxel"


def image_tiles(project: Project, case: str, plans_manager, configuration_manager, mirror_axes: int = 0,
                tile_step: float = 0.5) -> int:
    """:func:`case_tiles` from the plans alone (``mirror_axes``: axes mirrored, 0 for none)."""
    from .estimate import sliding_window_tiles

    reader = sitk.ImageFileReader()
    reader.SetFileName(str(project.image_path(case)))
    reader.ReadImageInformation()
    size, spacing = list(reader.GetSize())[::-1], list(reader.GetSpacing())[::-1]  # z, y, x as nnU-Net reads them
    order = plans_manager.transpose_forward
    size, spacing = [size[i] for i in order], [spacing[i] for i in order]
    cm = configuration_manager
    target = list(cm.spacing)[-len(cm.patch_size):]
    n = len(target)
    shape = size[:-n] + [max(1, round(s * sp / t)) for s, sp, t in zip(size[-n:], spacing[-n:], target)]
    return sliding_window_tiles(shape, cm.patch_size, tile_step) * 2 ** mirror_axes


class PredictionEstimate:
    """A pool's prediction time: one tile forward timed before the first case, times the tiles of
    every case, plus what earlier predictions on this machine took besides their tiles (reading,
    resampling, writing: per voxel); refreshed after each case from the time the cases really took."""

    def __init__(self, project: Project, predictor, cases: Sequence[str], mirroring: bool, tile_step: float,
                 model: str):
        from .estimate import recalled, tile_seconds

        self.tiles = {c: case_tiles(project, c, predictor, mirroring, tile_step) for c in cases}
        self.voxels = {c: image_voxels(project, c) for c in cases}
        self.total_tiles, self.total_voxels = sum(self.tiles.values()), sum(self.voxels.values())
        self.per_voxel, runs = recalled(OVERHEAD_KEY, predictor.device)
        channels = len(predictor.dataset_json["channel_names"])
        # on the device nnU-Net moves the network to for the sliding window anyway
        self.tile_s = tile_seconds(predictor.network, channels, predictor.configuration_manager.patch_size,
                                   predictor.device)
        self.device = predictor.device
        total = self.tile_s * self.total_tiles + self.per_voxel * self.total_voxels
        self.estimated_s = total
        besides = (f"plus {duration(self.per_voxel * self.total_voxels)} reading, resampling and writing (as the last "
                   f"{runs} predictions here took)" if runs else "plus reading, resampling and writing, not measured "
                   "yet on this machine")
        announce("estimate", f"estimate: predicting {len(cases)} case(s) with {model} takes about {duration(total)} here: "
                 f"{self.total_tiles} sliding-window tiles at {self.tile_s:.3g} s each (measured just now), {besides}",
                 job="predict", model=model, estimated_s=round(total, 1), tiles=self.total_tiles,
                 tile_s=round(self.tile_s, 4), cases=len(cases), overhead_s_per_voxel=self.per_voxel)
        self.start = time.perf_counter()
        self.done_tiles = 0

    def case_done(self, case: str) -> None:
        from .estimate import remember

        self.done_tiles += self.tiles.pop(case, 0)
        self.voxels.pop(case, None)
        elapsed = time.perf_counter() - self.start
        if not self.tiles:  # what the cases took besides their tiles, for the next estimates here
            if self.total_voxels:
                remember(OVERHEAD_KEY, max(0.0, elapsed - self.tile_s * self.total_tiles) / self.total_voxels, self.device)
            return
        done_voxels = self.total_voxels - sum(self.voxels.values())
        # the cases so far: their time per (tile-time + measured rest), scaled to the cases left
        expected_done = self.tile_s * self.done_tiles + self.per_voxel * done_voxels
        expected_left = self.tile_s * sum(self.tiles.values()) + self.per_voxel * sum(self.voxels.values())
        left = expected_left * (elapsed / expected_done) if expected_done > 0 else 0.0
        emit("estimate", job="predict", seconds_left=round(left, 1), cases_left=len(self.tiles),
             message=f"prediction: about {duration(left)} left ({len(self.tiles)} case(s))")


def predict(
    project: Project,
    model: str,
    cases: Sequence[str] | None = None,
    *,
    probabilities: bool = True,
    features: bool | None = None,
    mirroring: bool = False,
    device: str = "auto",
    round_id: str | None = None,
    tile_step: float = 0.5,
    reuse: bool = False,
    ray=None,
) -> list[dict]:
    """Predict ``cases`` (default: every case) with ``model``; writes ``predicted`` labels
    (and probabilities, and bottleneck features; ``features`` defaults to ``probabilities``).
    Returns one summary per case. ``reuse``: skip cases whose stored probabilities
    (and features, if asked for) come from these very weights. ``ray``: a :class:`..cluster.RaySpec`
    to predict on Ray workers (the driver still writes every file)."""
    from ..store.features import nnunet_features_path, write_vector
    from .features import BottleneckPool

    features = probabilities if features is None else features
    record = read_model(project, model)
    if record["status"] != "done":
        raise InputError(f"model {model!r}", "has not finished training")
    cases = list(cases) if cases is not None else project.cases()
    for case in cases:
        if not project.has_case(case):
            raise InputError(f"case {case!r}", f"not in project {project.root}")
    if reuse and probabilities:
        kept = [c for c in cases if stored_with(project, model, c, record["final_weights_digest"], mirroring, tile_step)
                and (not features or nnunet_features_path(project, model, c).is_file())
                and _label_made_by(project, c, model, record["final_weights_digest"], mirroring)]
        cases = [c for c in cases if c not in set(kept)]
        if not cases:
            return [{"case": c, "reused": True} for c in kept]
    else:
        kept = []
    dev = resolve_device(device) if ray is None else None  # on Ray each worker resolves it (the driver may have no GPU)
    checkpoint = checked_checkpoint(project, record)  # before anything is written
    values = json.loads((folders(project.root).raw / record["dataset"] / "alseg_dataset.json").read_text())["values"]
    back = np.array([0, *values], dtype=np.uint16 if max(values) > 255 else np.uint8)  # nnU-Net index -> project value
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    out = []
    log = model_dir(project, model) / "nnunet.log"
    produced_by = {"model": model, "checkpoint": record["checkpoint"], "weights_digest": record["final_weights_digest"],
                   "configuration": record["configuration"], "mirroring": mirroring, "round": round_id}

    def store(case: str, result: dict) -> None:
        """What the driver writes for one predicted case (the single-machine path and Ray's alike)."""
        label = sitk.GetImageFromArray(back[result["seg"]])
        project.geometry(case).apply(label)
        extra = {}
        if probabilities:
            path = probabilities_path(project, model, case)
            buffer = io.BytesIO()
            np.savez_compressed(buffer, probabilities=result["probs"], class_values=back.astype(np.int32),
                                weights_digest=np.array(record["final_weights_digest"]),
                                mirroring=np.array(bool(mirroring)), tile_step=np.array(float(tile_step)))
            with project.lock("store probabilities"):
                atomic.write_bytes(path, buffer.getvalue())
            extra["probabilities"] = str(path.relative_to(project.root))
        else:  # probabilities of an earlier pass no longer match the label stored now: selection must not read them
            _discard(project, probabilities_path(project, model, case))
        if result["vector"] is not None:
            path = nnunet_features_path(project, model, case)
            with project.lock("store features"):
                write_vector(path, result["vector"])
            extra["features"] = str(path.relative_to(project.root))
        else:
            _discard(project, nnunet_features_path(project, model, case))
        made_by = {**produced_by, "worker": result["worker"]} if "worker" in result else produced_by
        project.write_label(case, "predicted", label, source="nnunet", produced_by=made_by, **extra)
        out.append({"case": case, "labels_present": [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label)) if v],
                    **extra, **({"worker": result["worker"]} if "worker" in result else {})})

    if not cases:  # nothing to predict (none asked for): no model built, no Ray started
        return [{"case": c, "reused": True} for c in kept]
    with nnunet_environment(project.root, log=log):
        if ray is not None:
            _predict_on_ray(project, record, checkpoint, cases, ray, store, device=device, mirroring=mirroring,
                            tile_step=tile_step, probabilities=probabilities, features=features, model=model)
            order = {c: i for i, c in enumerate(cases)}
            out.sort(key=lambda o: order[o["case"]])  # the cases' order, as without Ray (not completion order)
            return out + [{"case": c, "reused": True} for c in kept]
        predictor = make_predictor(project, record, checkpoint, dev, mirroring, tile_step)
        pool = BottleneckPool(predictor.network) if features else None
        emit("stage", stage="predict", model=model, cases=len(cases))
        timer = PredictionEstimate(project, predictor, cases, mirroring, tile_step, model)
        for case in track(cases, desc=f"predicting with {model}"):
            data, props = SimpleITKIO().read_images([str(project.image_path(case))])
            store(case, infer(predictor, pool, data, props, probabilities))
            timer.case_done(case)
        if pool is not None:
            pool.close()
    return out + [{"case": c, "reused": True} for c in kept]


def _label_made_by(project: Project, case: str, model: str, digest: str, mirroring: bool) -> bool:
    """Whether the case's stored prediction is these weights' (a kill between a case's probabilities and
    its label leaves new probabilities beside an older label: that case is predicted again)."""
    if project.label_path(case, "predicted") is None:
        return False
    prov = project.provenance(case, "predicted")
    made = prov.get("produced_by") or {}
    return (made.get("model") == model and made.get("weights_digest") == digest
            and bool(made.get("mirroring", False)) == bool(mirroring) and prov.get("matches_file", True))


def _predict_on_ray(project: Project, record: dict, checkpoint: dict, cases: Sequence[str], spec, store, *, device: str,
                    mirroring: bool, tile_step: float, probabilities: bool, features: bool, model: str) -> None:
    """The cases on Ray workers (:mod:`..cluster`): each worker builds the predictor once from the
    plans and the weights (shared through the object store), the driver reads each image, hands it
    over by reference and stores what comes back (``store``). Cases that failed after the retries are
    named in an error once the others are stored."""
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    from ..cluster import fan_out, raise_failures  # noqa: I001 (Ray itself is imported only there, only with --ray)

    pre = folders(project.root).preprocessed / record["dataset"]
    init = {"plans": json.loads((pre / f"{PLANS}.json").read_text()),
            "dataset_json": json.loads((pre / "dataset.json").read_text()), "configuration": record["configuration"],
            "checkpoint": {k: checkpoint[k] for k in ("network_weights", "inference_allowed_mirroring_axes")
                           if k in checkpoint},
            "device": device, "mirroring": mirroring, "tile_step": tile_step, "probabilities": probabilities,
            "features": features, "where": str(project.layout.resolve(record["checkpoint"]))}
    emit("stage", stage="predict", model=model, cases=len(cases), ray=spec.to_json())

    def inputs():
        for case in cases:
            yield case, lambda case=case: SimpleITKIO().read_images([str(project.image_path(case))])

    failures = fan_out(spec, PredictWorker, init, inputs(), store, gpus=device_name(device) != "cpu",
                       desc=f"predicting with {model}", guard=project.root, total=len(cases))
    raise_failures(failures, f"model {model!r}", len(cases), "run again to retry these")
