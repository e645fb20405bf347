"""The bad-input catalogue beyond ``alseg add`` (those are in test_bad_input.py): DICOM
series with a broken or missing slice, malformed project and round files, malformed
prompt files, checkpoints of the wrong architecture or with pickled code, duplicate
label values, symbolic links that lead out of the project.

Each kind runs through the API and through the CLI: an InputError / exit code 2, a
message naming the file and the problem, the project folder byte-identical.
"""
import json
import locale
import re
import time

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import tree_hash
from sam_helpers import save, tiny_sam

from ALSegLib import rounds
from ALSegLib.errors import InputError
from ALSegLib.project import LabelTable, Project
from ALSegLib.pseudolabels.run import pseudolabel_with_sam


def dicom_series(folder, slices=6):
    """A real DICOM CT series written slice by slice (positions 2 mm apart).

    ITK's GDCM writer sets the C library's LC_CTYPE to "C" and leaves it so: Python's
    default text encoding then turns to ASCII for the rest of the process. The
    locale is put back afterwards (ALSeg itself reads DICOM, which does not do this)."""
    saved = locale.setlocale(locale.LC_ALL)
    try:
        return _write_series(folder, slices)
    finally:
        locale.setlocale(locale.LC_ALL, saved)


def _write_series(folder, slices):
    folder.mkdir(parents=True)
    arr = (np.random.default_rng(0).random((slices, 32, 32)) * 100).astype(np.int16)
    img = sitk.GetImageFromArray(arr)
    uid = f"1.2.826.0.1.3680043.2.1125.{time.time_ns()}"
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for i in range(slices):
        s = img[:, :, i]
        for key, value in (("0020|000e", uid + ".1"), ("0020|000d", uid), ("0008|0060", "CT"),
                           ("0020|0032", f"0\\0\\{2 * i}"), ("0020|0037", "1\\0\\0\\0\\1\\0"),
                           ("0020|0013", str(i + 1)), ("0028|0030", "1\\1"), ("0018|0050", "2")):
            s.SetMetaData(key, value)
        writer.SetFileName(str(folder / f"IM{i:04d}.dcm"))
        writer.Execute(s)
    return folder


class Kind:
    """One bad input: ``api()`` must raise, ``cli`` must exit 2; both must name ``where``."""

    def __init__(self, api, cli, where, problem):
        self.api, self.cli, self.where, self.problem = api, cli, where, problem


def corrupt_dicom_slice(p, tmp):
    series = dicom_series(tmp / "series")
    f = series / "IM0003.dcm"
    f.write_bytes(f.read_bytes()[:1400])
    return Kind(lambda: p.add_cases([series]), ["add", p.root, series], "IM0003.dcm", "unreadable DICOM file")


def missing_dicom_slice(p, tmp):
    series = dicom_series(tmp / "series")
    (series / "IM0002.dcm").unlink()
    return Kind(lambda: p.add_cases([series]), ["add", p.root, series], "series", "slices are not evenly spaced")


def config_not_json(p, tmp):
    cfg = p.root / "alseg.json"
    cfg.write_text(cfg.read_text()[:40])
    return Kind(lambda: Project.open(p.root), ["status", p.root], "alseg.json", "malformed JSON")


def config_duplicate_label_values(p, tmp):
    cfg = p.root / "alseg.json"
    obj = json.loads(cfg.read_text())
    obj["labels"][1]["value"] = obj["labels"][0]["value"]
    cfg.write_text(json.dumps(obj))
    return Kind(lambda: Project.open(p.root), ["status", p.root], "alseg.json", "duplicate label value 1")


def config_newer_schema(p, tmp):
    cfg = p.root / "alseg.json"
    obj = json.loads(cfg.read_text())
    obj["schema"] = 99
    cfg.write_text(json.dumps(obj))
    return Kind(lambda: Project.open(p.root), ["status", p.root], "alseg.json", "schema 99 is newer")


def init_duplicate_label_values(p, tmp):
    new = tmp / "new-project"
    return Kind(lambda: Project.create(new, LabelTable.parse("liver=1,spleen=1"), "CT"),
                ["init", new, "--labels", "liver=1,spleen=1", "--modality", "CT"], "--labels", "duplicate label value 1")


def _round(p, text):
    folder = p.root / "rounds" / "0001"
    folder.mkdir(parents=True)
    (folder / "round.json").write_text(text)


def round_file_not_json(p, tmp):
    _round(p, '{"round": 1, "stages": {"plan": {')
    return Kind(lambda: rounds.queue_items(p), ["queue", p.root], "round.json", "malformed JSON")


def round_file_wrong_number(p, tmp):
    _round(p, json.dumps({"round": 7, "stages": {}}))
    return Kind(lambda: rounds.queue_items(p), ["queue", p.root], "round.json", "not a round record")


def _sam(tmp, prompt_text):
    ckpt = save(tiny_sam(seed=3), tmp / "tiny.pth")
    (tmp / "prompts.json").write_text(prompt_text)
    return ckpt, tmp / "prompts.json"


def _pseudo_kind(p, ckpt, prompts, where, problem, model_type=None):
    extra = ["--model-type", model_type] if model_type else []
    return Kind(lambda: pseudolabel_with_sam(p, ckpt, prompts=prompts, model_type=model_type),
                ["pseudolabel", p.root, "--source", "sam", "--checkpoint", ckpt, "--prompts", prompts, *extra],
                where, problem)


def _box_prompts(case, box):
    return json.dumps({"space": "index", "axis": "axial", "cases": {case: {"organ": [{"box": box}]}}})


def prompt_file_not_json(p, tmp):
    ckpt, prompts = _sam(tmp, '{"space": "index", "cases": ')
    return _pseudo_kind(p, ckpt, prompts, "prompts.json", "malformed JSON")


def prompt_point_outside_image(p, tmp):
    ckpt, prompts = _sam(tmp, _box_prompts(p.cases()[0], [[2, 2, 5], [400, 9, 5]]))
    return _pseudo_kind(p, ckpt, prompts, "prompts.json", "lies outside the image")


def prompt_unknown_case(p, tmp):
    ckpt, prompts = _sam(tmp, _box_prompts("no_such_case", [[2, 2, 5], [9, 9, 5]]))
    return _pseudo_kind(p, ckpt, prompts, "prompts.json", "no case 'no_such_case'")


def sam_checkpoint_wrong_architecture(p, tmp):
    ckpt, prompts = _sam(tmp, _box_prompts(p.cases()[0], [[2, 2, 5], [9, 9, 5]]))
    return _pseudo_kind(p, ckpt, prompts, "tiny.pth", "encoder .* not vit_h", model_type="vit_h")


def sam_checkpoint_shapes_mismatch(p, tmp):
    ckpt, prompts = _sam(tmp, _box_prompts(p.cases()[0], [[2, 2, 5], [9, 9, 5]]))
    sd = torch.load(ckpt, weights_only=True)
    sd["mask_decoder.iou_token.weight"] = torch.zeros(3, 5)
    torch.save(sd, ckpt)
    return _pseudo_kind(p, ckpt, prompts, "tiny.pth", "does not match the SAM model")


def checkpoint_not_a_checkpoint(p, tmp):
    ckpt, prompts = _sam(tmp, _box_prompts(p.cases()[0], [[2, 2, 5], [9, 9, 5]]))
    ckpt.write_bytes(b"PK\x03\x04 this is not a torch archive")
    return _pseudo_kind(p, ckpt, prompts, "tiny.pth", "not a readable PyTorch checkpoint")


class _Planted:
    """Unpickling this would create the sentinel file."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def checkpoint_with_pickled_code(p, tmp):
    ckpt, prompts = _sam(tmp, _box_prompts(p.cases()[0], [[2, 2, 5], [9, 9, 5]]))
    sd = torch.load(ckpt, weights_only=True)
    sd["payload"] = _Planted(tmp / "SENTINEL")
    torch.save(sd, ckpt)
    return _pseudo_kind(p, ckpt, prompts, "tiny.pth", "refused: the checkpoint holds pickled code")


def symlinked_label_folder_escapes(p, tmp):
    case = p.cases()[0]
    outside = tmp / "elsewhere"
    outside.mkdir()
    (p.root / "labels" / "human").mkdir(parents=True, exist_ok=True)
    (p.root / "labels" / "human" / case).symlink_to(outside, target_is_directory=True)
    label = tmp / f"{case}.nii.gz"
    sitk.WriteImage(p.read_label(case, "reference"), str(label))
    return Kind(lambda: p.add_human_label(case, label), ["import-labels", p.root, label, "--kind", "human"],
                f"labels/human/{case}", "leads outside the project")


def symlinked_image_escapes(p, tmp):
    case = p.cases()[1]
    outside = tmp / "secret.nrrd"
    image = p.root / "images" / f"{case}.nrrd"
    outside.write_bytes(image.read_bytes())
    image.unlink()
    image.symlink_to(outside)
    return Kind(lambda: p.read_image(case), ["export", p.root, case, "--kind", "image", "--to", tmp / "out.nrrd"],
                f"images/{case}.nrrd", "leads outside the project")


def symlinked_model_escapes(p, tmp):
    """A model folder that is a link to elsewhere: its model.json (and the weights it names) are not read."""
    from ALSegLib.nnunet.train import read_model

    outside = tmp / "elsewhere"
    outside.mkdir()
    (outside / "model.json").write_text(json.dumps({"name": "planted", "mode": "pretrain"}))
    (p.root / "models").mkdir(exist_ok=True)
    (p.root / "models" / "planted").symlink_to(outside, target_is_directory=True)
    return Kind(lambda: read_model(p, "planted"), ["models", p.root], "models/planted", "leads outside the project")


def case_id_escapes_in_export(p, tmp):
    return Kind(lambda: p.read_label("../../etc/passwd", "reference"),
                ["export", p.root, "../../etc/passwd", "--kind", "reference", "--to", tmp / "out.nrrd"],
                "../../etc/passwd", "must not contain path separators")


def zero_training_budget(p, tmp):
    """'--epochs 0' once fell back to the default budget and trained."""
    from ALSegLib.nnunet.train import train

    return Kind(lambda: train(p, "pretrain", name="m", epochs=0, iterations=0),
                ["train", p.root, "--mode", "pretrain", "--name", "m", "--epochs", "0", "--iters", "0"],
                "--epochs", "at least 1")


def negative_training_budget(p, tmp):
    """'--epochs -1' was refused but left a model record 'training' behind."""
    from ALSegLib.nnunet.train import train

    return Kind(lambda: train(p, "pretrain", name="m", epochs=-1),
                ["train", p.root, "--mode", "pretrain", "--name", "m", "--epochs", "-1"], "--epochs", "at least 1")


def zero_minutes(p, tmp):
    """'--minutes 0' must not train a default budget nor leave a record."""
    from ALSegLib.nnunet.train import train

    return Kind(lambda: train(p, "pretrain", name="m", minutes=0),
                ["train", p.root, "--mode", "pretrain", "--name", "m", "--minutes", "0"], "--minutes", "positive number")


def round_settings_file_unknown_setting(p, tmp):
    from ALSegLib.cli import _settings_file, build_parser

    path = tmp / "settings.json"
    path.write_text(json.dumps({"budget": "2", "stratgy": "random"}))
    args = ["round", str(p.root), "--settings", str(path)]
    return Kind(lambda: _settings_file(build_parser().parse_args(args)), args, "settings.json",
                "unknown round settings: stratgy")


def model_weights_changed_after_training(p, tmp):
    """A finished model whose checkpoint another program rewrote (nnUNetv2_train on the engine's dataset)."""
    from ALSegLib.nnunet.predict import predict
    from ALSegLib.nnunet.trainers import weights_digest

    folder = p.root / "models" / "planted"
    folder.mkdir(parents=True)
    checkpoint = folder / "checkpoint_final.pth"
    weights = {"conv.weight": torch.ones(2, 2)}
    torch.save({"network_weights": weights}, checkpoint)
    recorded = weights_digest({"conv.weight": torch.zeros(2, 2)})  # what the model finished with
    (folder / "model.json").write_text(json.dumps({
        "name": "planted", "mode": "pretrain", "status": "done", "checkpoint": "models/planted/checkpoint_final.pth",
        "final_weights_digest": recorded, "dataset": "Dataset001_x", "configuration": "2d", "labeled_cases": 1,
        "budget": {"epochs": 1, "iterations": 1}}))
    case = p.cases()[0]
    return Kind(lambda: predict(p, "planted", [case], device="cpu"),
                ["predict", p.root, "--model", "planted", "--case", case, "--device", "cpu"],
                "checkpoint_final.pth", "changed after it finished training")


KINDS = [
    corrupt_dicom_slice, missing_dicom_slice, config_not_json, config_duplicate_label_values, config_newer_schema,
    init_duplicate_label_values, round_file_not_json, round_file_wrong_number, prompt_file_not_json,
    prompt_point_outside_image, prompt_unknown_case, sam_checkpoint_wrong_architecture, sam_checkpoint_shapes_mismatch,
    checkpoint_not_a_checkpoint, checkpoint_with_pickled_code, symlinked_label_folder_escapes, symlinked_image_escapes,
    symlinked_model_escapes, case_id_escapes_in_export, zero_training_budget, negative_training_budget,
    round_settings_file_unknown_setting, model_weights_changed_after_training, zero_minutes,
]


def _check(kind, project, tmp, run):
    before = tree_hash(project.root)
    message = run(kind)
    assert kind.where in message and re.search(kind.problem, message), message
    assert tree_hash(project.root) == before
    assert not (tmp / "SENTINEL").exists()  # no pickled code ran
    assert not (tmp / "new-project").exists() and not (tmp / "elsewhere" / "v0001.nrrd").exists()


@pytest.mark.parametrize("make", KINDS, ids=[f.__name__ for f in KINDS])
def test_api(make, project, tmp_path):
    kind = make(project, tmp_path)

    def run(k):
        with pytest.raises(InputError) as err:
            k.api()
        return str(err.value)

    _check(kind, project, tmp_path, run)


@pytest.mark.parametrize("make", KINDS, ids=[f.__name__ for f in KINDS])
def test_cli(make, project, tmp_path, run_cli):
    kind = make(project, tmp_path)

    def run(k):
        code, out, err = run_cli(*k.cli)
        assert code == 2 and err.startswith("alseg: error: ") and out == "", (code, out, err)
        return err

    _check(kind, project, tmp_path, run)
