"""Past one machine (issue 23): per-case work on a local Ray instance (2 CPUs here), the project
written by the driver only; dead workers retried, failing cases named, the rest stored."""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

ray = pytest.importorskip("ray")

from ALSegLib import phantoms  # noqa: E402
from ALSegLib.cluster import RaySpec, Worker, fan_out  # noqa: E402
from ALSegLib.project import LabelTable, Project  # noqa: E402

SPEC = RaySpec(workers=2, threads=1, retries=2)
ray.cloudpickle.register_pickle_by_value(__import__(__name__))  # the workers cannot import this test module


class Doubler(Worker):
    """Twice the array it is handed; dies (the whole process) the first time it sees ``die_on``,
    raises for ``fail_on``, and tries to write ``write_to`` when asked."""

    def __init__(self, marker: str, die_on: str = "", fail_on: str = "", always: bool = False, guard: str | None = None,
                 threads: int = 1):
        super().__init__(guard, threads)
        self.marker, self.die_on, self.fail_on, self.always = Path(marker), die_on, fail_on, always

    def run(self, key: str, data: np.ndarray, write_to: str = "") -> dict:
        if key == self.die_on and (self.always or not self.marker.exists()):
            self.marker.write_text("died once")
            os._exit(1)  # the worker process dies mid-task
        if key == self.fail_on:
            raise ValueError(f"cannot do {key}")
        if write_to:
            Path(write_to).write_text("a worker wrote this")
        return {"key": key, "twice": 2 * data, "worker": os.getpid()}


def _inputs(keys, write_to=""):
    for k in keys:
        yield k, lambda k=k: (k, np.full(4, int(k[1:])), write_to)


def test_a_worker_killed_mid_run_is_restarted_and_its_task_retried(tmp_path):
    got = {}
    keys = [f"c{i}" for i in range(6)]
    failures = fan_out(SPEC, Doubler, {"marker": str(tmp_path / "died"), "die_on": "c2"}, _inputs(keys),
                       lambda k, r: got.__setitem__(k, r))
    assert (tmp_path / "died").is_file()  # the worker did die on c2
    assert failures == [] and sorted(got) == keys
    assert all(np.array_equal(got[k]["twice"], np.full(4, 2 * int(k[1:]))) for k in keys)
    assert len({r["worker"] for r in got.values()}) >= 2  # the restarted worker is another process


def test_a_task_that_always_fails_is_named_and_the_others_complete(tmp_path):
    got = {}
    keys = [f"c{i}" for i in range(5)]
    failures = fan_out(SPEC, Doubler, {"marker": str(tmp_path / "m"), "fail_on": "c3"}, _inputs(keys),
                       lambda k, r: got.__setitem__(k, r))
    assert [f.key for f in failures] == ["c3"] and "cannot do c3" in failures[0].error
    assert sorted(got) == ["c0", "c1", "c2", "c4"]
    # a worker that dies on every try: named once the retries are spent
    # (the task in flight beside it on the same worker dies with it too: it runs again alone, and completes)
    got = {}
    failures = fan_out(RaySpec(workers=1, retries=1), Doubler,
                       {"marker": str(tmp_path / "m2"), "die_on": "c1", "always": True},
                       _inputs(["c0", "c1", "c2", "c3"]), lambda k, r: got.__setitem__(k, r))
    assert [f.key for f in failures] == ["c1"] and sorted(got) == ["c0", "c2", "c3"]


def test_each_case_done_is_one_progress_event_with_its_worker(tmp_path, monkeypatch, capsys):
    """The JSON-lines events the Slicer module's bar reads: per case done, the count, the total and the worker."""
    monkeypatch.setenv("ALSEG_PROGRESS", "jsonl")
    keys = [f"c{i}" for i in range(4)]
    failures = fan_out(SPEC, Doubler, {"marker": str(tmp_path / "m"), "fail_on": "c2"}, _inputs(keys), lambda k, r: None,
                       desc="doubling", total=len(keys))
    assert [f.key for f in failures] == ["c2"]
    events = [json.loads(line) for line in capsys.readouterr().err.splitlines() if line.startswith("{")]
    done = [e for e in events if e["event"] == "progress" and e["stage"] == "doubling"]
    assert [e["done"] for e in done] == [1, 2, 3] and {e["total"] for e in done} == {4}
    assert sorted(e["case"] for e in done) == ["c0", "c1", "c3"] and all(isinstance(e["worker"], int) for e in done)
    assert [e["case"] for e in events if e["event"] == "ray_failed"] == ["c2"]
    started = [e for e in events if e["event"] == "ray" and "hosts" in e]
    assert started and started[0]["workers"] == 2


def test_a_worker_may_not_write_the_guarded_folder(tmp_path):
    project = tmp_path / "project"
    project.mkdir()
    failures = fan_out(SPEC, Doubler, {"marker": str(tmp_path / "m")}, _inputs(["c0"], str(project / "x.txt")),
                       lambda k, r: None, guard=project)
    assert [f.key for f in failures] == ["c0"] and "may not write the project folder" in failures[0].error
    assert not (project / "x.txt").exists()
    got = []  # outside the guarded folder it may (a worker's own scratch space)
    assert fan_out(SPEC, Doubler, {"marker": str(tmp_path / "m")}, _inputs(["c1"], str(tmp_path / "y.txt")),
                   lambda k, r: got.append(k), guard=project) == []
    assert got == ["c1"] and (tmp_path / "y.txt").is_file()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from ALSegLib.nnunet.plan import plan
    from ALSegLib.nnunet.train import train
    from ALSegLib.pseudolabels.degraded import pseudolabel_degraded

    root = tmp_path_factory.mktemp("cluster")
    images, labels = phantoms.write_dataset(root / "src", n=6, modality="CT", size=32)
    project = Project.create(root / "project", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    project.add_cases([images], reference_dir=labels)
    pseudolabel_degraded(project, target_dice=0.8)
    plan(project, configurations=("3d_fullres",), batch_size=2)
    train(project, "pretrain", validate=False, epochs=1, iterations=2, val_iterations=1, device="cpu")
    return project


def _provenance(project, case):
    prov = dict(project.provenance(case, "predicted"))
    made = dict(prov.pop("produced_by"))
    worker = made.pop("worker", None)
    for key in ("time", "created", "stored_at"):
        prov.pop(key, None)
    return prov, made, worker


def test_prediction_on_ray_stores_what_the_single_machine_path_stores(trained, tmp_path, run_cli):
    from ALSegLib.nnunet.predict import predict
    from ALSegLib.store.predictions import probabilities_path

    local = trained.copy_to(tmp_path / "local")
    fanned = trained.copy_to(tmp_path / "ray")
    cases = local.cases()
    predict(local, "pretrain", cases, device="cpu")
    code, out, err = run_cli("predict", fanned.root, "--model", "pretrain", "--probabilities", "--device", "cpu",
                             "--ray", "--ray-workers", "2", "--json")
    assert code == 0, err
    results = json.loads(out)["predicted"]
    assert sorted(r["case"] for r in results) == cases
    workers = set()
    for case in cases:
        a = local.label_path(case, "predicted").read_bytes()
        b = fanned.label_path(case, "predicted").read_bytes()
        assert np.array_equal(sitk.GetArrayFromImage(local.read_label(case, "predicted")),
                              sitk.GetArrayFromImage(fanned.read_label(case, "predicted"))), case
        assert a == b, case  # the same label bytes
        pa, ma, wa = _provenance(local, case)
        pb, mb, wb = _provenance(fanned, case)
        assert pa == pb and ma == mb and wa is None, case  # the same provenance, the worker's name aside
        assert wb and wb.split(":")[1].isdigit() and int(wb.split(":")[1]) != os.getpid()  # made by a worker
        workers.add(wb)
        pl = np.load(probabilities_path(local, "pretrain", case))["probabilities"]
        pr = np.load(probabilities_path(fanned, "pretrain", case))["probabilities"]
        np.testing.assert_allclose(pl.astype(np.float32), pr.astype(np.float32), atol=2e-3)
    assert len(workers) == 2  # both workers took cases


def test_a_prediction_reused_only_where_its_label_too_is_these_weights(trained, tmp_path):
    """A driver killed between a case's probabilities and its label leaves new probabilities beside an
    older label: predicting again with reuse (a round goes on) predicts that case again."""
    from ALSegLib.nnunet.predict import predict

    project = trained.copy_to(tmp_path / "p")
    cases = project.cases()[:3]
    predict(project, "pretrain", cases, device="cpu")
    made = {c: project.label_path(c, "predicted").read_bytes() for c in cases}
    stale = cases[1]  # as a kill leaves it: these weights' probabilities, another model's label
    project.write_label(stale, "predicted", project.read_label(stale, "reference"), source="nnunet",
                        produced_by={"model": "older", "weights_digest": "0" * 64})
    out = predict(project, "pretrain", cases, device="cpu", reuse=True)
    assert {o["case"] for o in out if o.get("reused")} == {cases[0], cases[2]}
    assert [o["case"] for o in out if not o.get("reused")] == [stale]
    assert {c: project.label_path(c, "predicted").read_bytes() for c in cases} == made


def test_a_round_with_ray_predicts_on_the_workers_and_stores_in_the_driver(tmp_path, run_cli):
    from ALSegLib import rounds

    images, labels = phantoms.write_dataset(tmp_path / "src", n=6, modality="CT", size=32)
    project = Project.create(tmp_path / "p", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    project.add_cases([images], reference_dir=labels)
    test = project.cases()[-2:]
    code, out, err = run_cli("round", project.root, "--budget", "1", "--exclude", *test, "--pseudo-source",
                             "degraded-reference", "--device", "cpu", "--configuration", "3d_fullres", "--batch-size",
                             "2", "--pretrain-epochs", "1", "--pretrain-iters", "2", "--epochs", "1", "--iters", "2",
                             "--val-iters", "1", "--ray", "--ray-workers", "2", "--json")
    assert code == 0, err
    record = json.loads(out)
    assert record["waiting"] and rounds.read_round(project, 1)["stages"]["predict-pool"]["cases"] == 4
    pool = [c for c in project.cases() if c not in test]
    for case in pool:  # the pool's prediction: made by a worker, stored by the driver, with probabilities
        made = project.provenance(case, "predicted")["produced_by"]
        assert made["model"] == "pretrain" and int(made["worker"].split(":")[1]) != os.getpid()
    assert "ray" not in record["settings"]  # how it ran is not a setting: the record reads as without Ray


def _lite_project(root: Path, n: int = 3) -> Project:
    """Three MR-like cases of two slices each, a bright ellipse per case (a handful of LiteMedSAM slices)."""
    root.mkdir(parents=True)
    y, x = np.mgrid[:64, :64]
    paths, refs = [], []
    for i in range(n):
        blob = ((y - 28 - 2 * i) / 11.0) ** 2 + ((x - 32 - 2 * i) / 8.0) ** 2 < 1
        rng = np.random.default_rng(i)
        img = np.stack([np.where(blob, 190.0, 70.0) + rng.normal(0, 6, blob.shape) for _ in range(2)]).astype(np.float32)
        image, label = sitk.GetImageFromArray(img), sitk.GetImageFromArray(np.stack([blob] * 2).astype(np.uint8))
        for im in (image, label):
            im.SetSpacing((1.0, 1.0, 3.0))
        sitk.WriteImage(image, str(root / f"b{i}.nrrd"))
        sitk.WriteImage(label, str(root / f"b{i}_label.nrrd"))
        paths.append(root / f"b{i}.nrrd")
        refs.append(root / f"b{i}_label.nrrd")
    project = Project.create(root / "project", {"blob": 1}, "MRI")
    project.add_cases(paths, references=refs, case_ids=[f"b{i}" for i in range(n)])
    return project


def _pseudo_provenance(project, case):
    prov = dict(project.provenance(case, "pseudo"))
    made = dict(prov.pop("produced_by"))
    worker = made.pop("worker", None)
    for key in ("time", "created", "stored_at", "encoder"):  # the encoder's record holds the case's seconds
        prov.pop(key, None)
    return prov, made, worker


def test_litemedsam_pseudo_labels_on_ray_are_the_single_machine_path_s(tmp_path, run_cli):
    """The built-in LiteMedSAM's real weights on two workers: the same label bytes, provenance (the
    worker aside) and pooled embeddings as the single-machine path; --resume then skips them all."""
    import shutil

    from ALSegLib.store.features import sam_features_path

    local = _lite_project(tmp_path / "a")
    code, out, err = run_cli("pseudolabel", local.root, "--source", "sam", "--prompts-from-reference", "1", "--json")
    assert code == 0, err
    fanned = _lite_project(tmp_path / "b")
    onnx = local.layout.sam_cache / "onnx"  # the exported encoder graph, so the driver does not export it again
    if onnx.is_dir():
        shutil.copytree(onnx, fanned.layout.sam_cache / "onnx")
    code, out, err = run_cli("pseudolabel", fanned.root, "--source", "sam", "--prompts-from-reference", "1",
                             "--ray", "--ray-workers", "2", "--json")
    assert code == 0, err
    summaries = json.loads(out)["cases"]
    assert [s["case"] for s in summaries] == local.cases() and all(s["status"] == "written" for s in summaries)
    workers = set()
    for case in local.cases():
        assert local.label_path(case, "pseudo").read_bytes() == fanned.label_path(case, "pseudo").read_bytes(), case
        pa, ma, wa = _pseudo_provenance(local, case)
        pb, mb, wb = _pseudo_provenance(fanned, case)
        assert pa == pb and ma == mb and wa is None, case
        assert wb and int(wb.split(":")[1]) != os.getpid()
        workers.add(wb)
        assert sam_features_path(local, case).read_bytes() == sam_features_path(fanned, case).read_bytes()
    assert len(workers) == 2
    # the embedding cache is the single-machine path's alone: workers may not write the project
    cached = fanned.layout.sam_cache
    assert not [p for p in cached.rglob("*") if p.is_file() and "onnx" not in p.parts]
    before = {p: p.stat().st_mtime_ns for p in (fanned.root / "labels").rglob("*") if p.is_file()}
    code, out, err = run_cli("pseudolabel", fanned.root, "--source", "sam", "--prompts-from-reference", "1",
                             "--ray", "--ray-workers", "2", "--resume", "--json")
    assert code == 0, err
    assert all(s["status"].startswith("kept") for s in json.loads(out)["cases"])
    assert before == {p: p.stat().st_mtime_ns for p in (fanned.root / "labels").rglob("*") if p.is_file()}
    # another request (two boxes per structure) is not the one that made them: it runs again
    code, out, err = run_cli("pseudolabel", local.root, "--source", "sam", "--prompts-from-reference", "2",
                             "--case", "b0", "--resume", "--json")
    assert code == 0, err
    assert json.loads(out)["cases"][0]["status"] == "written"


def test_simulate_on_ray_gives_the_sequential_run_s_arms_and_figures(tmp_path, run_cli):
    """The experiment's seeds' bases, arms and baselines as Ray tasks side by side: the same arms
    and figures as one after another here (both with one torch thread per training)."""
    import torch

    from ALSegLib.settings import RoundSettings
    from ALSegLib.simulate import ExperimentSettings, simulate

    images, labels = phantoms.write_dataset(tmp_path / "src", n=6, modality="CT", size=32)
    source = Project.create(tmp_path / "source", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    source.add_cases([images], reference_dir=labels)
    arms = ["random+finetune", "pseudo-only", "supervised-only"]
    tiny = dict(device="cpu", configuration="3d_fullres", batch_size=2, pretrain_epochs=1, pretrain_iterations=2,
                epochs=1, iterations=2, val_iterations=1)
    settings = ExperimentSettings(rounds=1, seeds=[0, 1], test_fraction=0.34, arms=arms, round=RoundSettings(
        budget="1", pseudo={"source": "degraded-reference", "target_dice": 0.75}, **tiny))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        here = simulate(source, tmp_path / "here", settings)
    finally:
        torch.set_num_threads(threads)
    code, out, err = run_cli("simulate", source.root, "--out", tmp_path / "ray", "--arms", *arms, "--rounds", "1",
                             "--budget", "1", "--seeds", "0", "1", "--test-fraction", "0.34", "--pseudo-source",
                             "degraded-reference", "--target-dice", "0.75",
                             "--device", "cpu", "--configuration", "3d_fullres", "--batch-size", "2",
                             "--pretrain-epochs", "1", "--pretrain-iters", "2", "--epochs", "1", "--iters", "2",
                             "--val-iters", "1", "--ray", "--ray-workers", "2", "--json")
    assert code == 0, err
    fanned = json.loads(out)
    assert fanned["setup"]["test_cases"] == here["setup"]["test_cases"]
    assert set(fanned["arms"]) == set(here["arms"]) == set(arms)
    for arm in arms:
        a, b = here["arms"][arm], fanned["arms"][arm]
        assert [p["annotated"] for p in a["points"]] == [p["annotated"] for p in b["points"]], arm
        assert a["final"]["per_seed"] == pytest.approx(b["final"]["per_seed"], abs=1e-6), arm
        assert a["final"]["per_class"] == pytest.approx(b["final"]["per_class"], abs=1e-6), arm
    assert fanned["pseudo_label_dice"] == pytest.approx(here["pseudo_label_dice"], abs=1e-9)
    assert fanned["dice"] == pytest.approx(here["dice"], abs=1e-6)
    for seed in (0, 1):  # each job on its own copy, as without Ray
        for folder in ("base", "random-finetune", "supervised-only"):
            assert (tmp_path / "ray" / f"seed{seed}" / folder / "alseg.json").is_file()
    assert sorted(p.name for p in (source.root / "labels").iterdir()) == ["reference"]  # the source untouched


@pytest.mark.parametrize("args, message", [
    (["--num-gpus", "2", "--device", "cpu"], "the device must be CUDA"),
    (["--num-gpus", "0", "--device", "cpu"], "at least 1"),
])
def test_multi_gpu_training_is_refused_where_it_cannot_run_before_anything_is_written(tmp_path, run_cli, args, message):
    """nnU-Net's multi-GPU training of one model (--num-gpus) needs CUDA and that many GPUs; here (no GPU)
    the refusal is what can be checked: exit code 2, the reason, nothing written."""
    from reliability import tree_hash

    images, labels = phantoms.write_dataset(tmp_path / "src", n=3, modality="CT", size=32)
    project = Project.create(tmp_path / "p", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    project.add_cases([images], reference_dir=labels)
    before = tree_hash(project.root)
    for command in (["train", project.root, "--mode", "pretrain"], ["round", project.root, "--budget", "1", "--pseudo-source",
                                                                     "degraded-reference"]):
        code, _, err = run_cli(*command, *args)
        assert code == 2 and "--num-gpus" in err and message in err, err
        assert tree_hash(project.root) == before
    code, _, err = run_cli("train", project.root, "--mode", "filtermatch", "--num-gpus", "2", "--device", "cpu")
    assert code == 2 and "FilterMatch" in err and tree_hash(project.root) == before
