"""A trained model outside its project: applied to any image, and exported for nnU-Net tools.

:func:`apply_model` predicts one image file that is not a case of the project (a volume
loaded in Slicer, a new scan) and writes its label file; nothing in the project changes.
:func:`export_model` writes a folder in nnU-Net's results layout that nnU-Net's own
``nnUNetv2_predict`` and the SlicerNNUNet extension load::

    DEST/Dataset<NNN>_<name>/nnUNetTrainer__<plans>__<configuration>/
        dataset.json  plans.json  fold_0/checkpoint_final.pth  alseg_model.json

The checkpoint names nnU-Net's stock ``nnUNetTrainer``: ALSeg's trainers build the very
network nnU-Net's trainer builds from the plans, so a plain nnunetv2 install runs it without
ALSeg. Its weights are those of the model record (digest checked before anything is written).
"""
from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .. import atomic, volumes
from ..errors import InputError
from ..progress import emit
from ..project import Project
from .env import folders, nnunet_environment, resolve_device
from .plan import PLANS
from .predict import make_predictor
from .train import checked_checkpoint, model_dir, read_model
from .trainers import weights_digest

EXPORT_TRAINER = "nnUNetTrainer"


def _finished(project: Project, model: str) -> dict:
    record = read_model(project, model)
    if record["status"] != "done":
        raise InputError(f"model {model!r}", "has not finished training")
    return record


def _outside(project: Project, path: Path, what: str) -> None:
    if path.resolve().is_relative_to(project.root.resolve()):
        raise InputError(path, f"{what} is inside the project folder; choose a path outside it")


def _label_values(project: Project, record: dict) -> np.ndarray:
    values = json.loads((folders(project.root).raw / record["dataset"] / "alseg_dataset.json").read_text())["values"]
    return np.array([0, *values], dtype=np.uint16 if max(values) > 255 else np.uint8)  # nnU-Net index -> project value


def apply_model(project: Project, model: str, image: str | Path, out: str | Path, *, device: str = "auto",
                mirroring: bool = False, tile_step: float = 0.5, force: bool = False) -> dict:
    """Predict ``image`` (any 3D image file, not a case) with ``model`` and write its label to
    ``out`` (``.nii.gz``, ``.nrrd``, ``.mha`` or ``.seg.nrrd`` with the project's segment names
    and colors). Every input is checked before the model loads; the project is not changed."""
    record = _finished(project, model)
    image, out = Path(image), Path(out)
    if not image.is_file():
        raise InputError(image, "no such image file")
    name = out.name.lower()
    if not any(name.endswith(ext) for ext in volumes.LABEL_EXPORT_EXTENSIONS):
        raise InputError(out, f"unsupported label file type; use one of {', '.join(volumes.LABEL_EXPORT_EXTENSIONS)}")
    if out.is_dir():
        raise InputError(out, "is a folder; give a file name such as label.nii.gz")
    if not out.parent.is_dir():
        raise InputError(out, "its folder does not exist")
    if out.exists() and not force:
        raise InputError(out, "exists; give --force to replace it")
    _outside(project, out, "the output label")
    img = volumes.read_image(image)  # 3D, finite values, or an InputError naming the file
    dev = resolve_device(device)
    checkpoint = checked_checkpoint(project, record)
    back = _label_values(project, record)
    log = model_dir(project, model) / "nnunet.log"
    with nnunet_environment(project.root, log=log):
        predictor = make_predictor(project, record, checkpoint, dev, mirroring, tile_step)
        emit("stage", stage="apply", model=model, image=str(image))
        data = sitk.GetArrayFromImage(img).astype(np.float32)[None]
        seg = predictor.predict_single_npy_array(data, {"spacing": list(img.GetSpacing())[::-1]}, None, None, False)
    label = sitk.GetImageFromArray(back[np.asarray(seg)])
    label.CopyInformation(img)
    try:
        volumes.write_label_file(label, out, project.labels.segments())
    except OSError as exc:
        raise InputError(out, f"cannot write: {exc.strerror or exc}") from None
    present = [int(v) for v in np.unique(sitk.GetArrayViewFromImage(label)) if v]
    return {"model": model, "image": str(image.resolve()), "label": str(out.resolve()), "labels_present": present,
            "weights_digest": record["final_weights_digest"], "mirroring": mirroring, "device": str(dev)}


def _dataset_folder_name(dataset: str) -> str:
    """nnU-Net's ``Dataset<NNN>_<name>`` (the engine's dataset names have that form already)."""
    if dataset.startswith("Dataset") and dataset[7:10].isdigit():
        return dataset
    return f"Dataset999_{dataset}"


def export_model(project: Project, model: str, dest: str | Path, *, force: bool = False) -> dict:
    """Write ``model`` as an nnU-Net results folder under ``dest`` (see the module text); returns
    the paths. ``dest`` must be outside the project and empty or new (``force``: replace an
    earlier export of this model's folder there)."""
    record = _finished(project, model)
    dest = Path(dest)
    _outside(project, dest, "the export folder")
    if dest.exists() and not dest.is_dir():
        raise InputError(dest, "is a file; give a folder")
    pre = folders(project.root).preprocessed / record["dataset"]
    plans = json.loads((pre / f"{PLANS}.json").read_text())
    dataset_json = json.loads((pre / "dataset.json").read_text())
    configuration = record["configuration"]
    if configuration not in plans["configurations"]:
        raise InputError(f"model {model!r}", f"its configuration {configuration!r} is not in the project's plans")
    dataset_dir = dest / _dataset_folder_name(record["dataset"])
    target = dataset_dir / f"{EXPORT_TRAINER}__{plans.get('plans_name', PLANS)}__{configuration}"
    staging = dataset_dir.with_name(f".{dataset_dir.name}.partial")  # an interrupted export's leftovers
    if target.exists():
        if not force:
            raise InputError(target, "exists (an earlier export?); give --force to replace it")
    elif dest.is_dir() and any(p for p in dest.iterdir() if p.name not in (dataset_dir.name, staging.name)):
        raise InputError(dest, "is not empty; give a new or empty folder")
    checkpoint = checked_checkpoint(project, record)  # the recorded weights, or an error before anything is written
    weights = {k: v.detach().cpu() for k, v in checkpoint["network_weights"].items()}
    if weights_digest(weights) != record["final_weights_digest"]:
        raise InputError(f"model {model!r}", "its weights changed while they were read")
    mirroring = checkpoint.get("inference_allowed_mirroring_axes")
    exported = {
        "network_weights": weights,
        "init_args": {"plans": plans, "configuration": configuration, "fold": 0, "dataset_json": dataset_json,
                      "device": "cpu"},
        "trainer_name": EXPORT_TRAINER,
        "inference_allowed_mirroring_axes": tuple(int(a) for a in mirroring) if mirroring is not None else None,
        "current_epoch": int(record.get("epochs_done") or 0),
    }
    buffer = io.BytesIO()
    torch.save(exported, buffer)
    shutil.rmtree(staging, ignore_errors=True)
    folder = staging / target.name
    try:
        (folder / "fold_0").mkdir(parents=True)
    except OSError as exc:
        raise InputError(dest, f"cannot write: {exc.strerror or exc}") from None
    try:
        atomic.write_json(folder / "dataset.json", dataset_json)
        atomic.write_json(folder / "plans.json", plans)
        atomic.write_bytes(folder / "fold_0" / "checkpoint_final.pth", buffer.getvalue())
        atomic.write_json(folder / "alseg_model.json", {
            "project": project.name, "model": model, "mode": record.get("mode"), "configuration": configuration,
            "weights_digest": record["final_weights_digest"], "label_values": _label_values(project, record).tolist(),
            "labels": project.labels.mapping, "trainer_in_alseg": record.get("trainer"),
            "note": "nnU-Net index i is the project's label value label_values[i]"})
        if target.exists():
            shutil.rmtree(target)
        dataset_dir.mkdir(parents=True, exist_ok=True)
        folder.rename(target)
    except OSError as exc:
        raise InputError(dest, f"cannot write: {exc.strerror or exc}") from None
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return {"model": model, "folder": str(target.resolve()), "dataset_folder": str(dataset_dir.resolve()),
            "configuration": configuration, "trainer": EXPORT_TRAINER, "plans": plans.get("plans_name", PLANS), "fold": 0,
            "checkpoint": str((target / "fold_0" / "checkpoint_final.pth").resolve())}
