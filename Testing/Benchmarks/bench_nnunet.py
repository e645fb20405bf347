"""nnU-Net inside ALSeg on real MRI: test Dice under a CPU budget, seconds per iteration,
and the engine's wall-time overhead against nnU-Net's own command-line tools.

Data: the shared MSD Hippocampus cases, a fixed seeded split (40 training, 40 test).
The training cases' references are revealed as (simulated) human labels; the
project is planned on them (2d configuration, batch 12, the CPU-sized plan).
Arm "engine": alseg's train (supervised) + predict, in this process.
Arm "cli": nnUNetv2_train + nnUNetv2_predict from the shell on the same dataset,
the same trainer class (found via nnUNet_extTrainer), plans and budget.

Run: .venv/bin/python Testing/Benchmarks/bench_nnunet.py [--epochs 10 --iters 100]
Writes Testing/Benchmarks/results/nnunet.json.
"""
from __future__ import annotations

import os

os.environ.setdefault("nnUNet_def_n_proc", "1")  # before nnunetv2 is imported
os.environ.setdefault("nnUNet_compile", "f")

import argparse  # noqa: E402
import random  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import SimpleITK as sitk  # noqa: E402
from common import shared_data, write_results  # noqa: E402

from ALSegLib import metrics  # noqa: E402
from ALSegLib.nnunet import trainers  # noqa: E402
from ALSegLib.nnunet.dataset import export_dataset  # noqa: E402
from ALSegLib.nnunet.env import folders  # noqa: E402
from ALSegLib.nnunet.plan import PLANS, plan, preprocess  # noqa: E402
from ALSegLib.nnunet.predict import predict  # noqa: E402
from ALSegLib.nnunet.train import train  # noqa: E402
from ALSegLib.project import LabelTable, Project  # noqa: E402

BIN = Path(sys.executable).parent


def split(hippo: Path, n_train: int, n_test: int, seed: int) -> tuple[list[Path], list[Path]]:
    images = sorted((hippo / "imagesTr").glob("*.nii.gz"))
    random.Random(seed).shuffle(images)
    return images[:n_train], images[n_train : n_train + n_test]


def case_id(path: Path) -> str:
    return path.name[: -len(".nii.gz")]


def hippocampus_source(folder: Path, hippo: Path, images: list[Path]) -> Project:
    """A project of these shared Hippocampus images with their expert labels as references."""
    from ALSegLib.project import LabelTable

    source = Project.create(folder, LabelTable.parse("anterior=1,posterior=2"), "MRI", name="hippocampus")
    source.add_cases(images, references=[hippo / "labelsTr" / p.name for p in images],
                     case_ids=[case_id(p) for p in images])
    return source


def mean_dice(project: Project, cases: list[str], pred_of) -> float:
    scores = []
    for case in cases:
        ref = sitk.GetArrayFromImage(project.read_label(case, "reference"))
        pred = pred_of(case)
        per_class = metrics.label_metrics(pred, ref, (1, 1, 1), project.labels.mapping)
        scores.append(np.mean([m["dice"] for m in per_class.values()]))
    return float(np.mean(scores))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--iters", type=int, default=100)
    ap.add_argument("--val-iters", type=int, default=10)
    ap.add_argument("--batch", type=int, default=12)
    ap.add_argument("--train", type=int, default=40)
    ap.add_argument("--test", type=int, default=40)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", action="store_true", help="keep the work folder")
    args = ap.parse_args()
    data = shared_data()
    if data is None or not (data / "hippocampus" / "imagesTr").is_dir():
        print("shared Hippocampus data not found; nothing measured")
        return 0
    hippo = data / "hippocampus"
    train_imgs, test_imgs = split(hippo, args.train, args.test, args.seed)
    work = Path(tempfile.mkdtemp(prefix="alseg-bench-nnunet-"))
    try:
        project = Project.create(work / "project", LabelTable.parse("anterior=1,posterior=2"), "MRI")
        project.add_cases(train_imgs + test_imgs, references=[hippo / "labelsTr" / p.name for p in train_imgs + test_imgs],
                          case_ids=[p.name[: -len(".nii.gz")] for p in train_imgs + test_imgs])
        train_ids = [p.name[: -len(".nii.gz")] for p in train_imgs]
        test_ids = [p.name[: -len(".nii.gz")] for p in test_imgs]
        for case in train_ids:
            project.add_human_label(case, project.read_label(case, "reference"), source="simulated")

        t = time.perf_counter()
        planned = plan(project, policy="human", configurations=("2d",), batch_size=args.batch)
        plan_s = time.perf_counter() - t

        # the model's dataset is exported and preprocessed before the clock starts:
        # both arms then time the same work (training on preprocessed data)
        preprocess(project, export_dataset(project, "human", "bench"), "2d")

        # --- engine arm
        t = time.perf_counter()
        record = train(project, "supervised", name="bench", epochs=args.epochs, iterations=args.iters,
                       val_iterations=args.val_iters, device="cpu", configuration="2d")
        engine_train_s = time.perf_counter() - t
        t = time.perf_counter()
        predict(project, "bench", test_ids, probabilities=False, mirroring=False, device="cpu")
        engine_predict_s = time.perf_counter() - t
        dice_engine = mean_dice(project, test_ids, lambda c: sitk.GetArrayFromImage(project.read_label(c, "predicted")))
        ck = trainers.load_checkpoint_safely(project.root / record["checkpoint"])
        log = ck["logging"]
        epoch_s = [e - s for s, e in zip(log["epoch_start_timestamps"], log["epoch_end_timestamps"])]
        s_per_iter = sum(epoch_s) / (args.epochs * (args.iters + args.val_iters))

        # --- CLI arm: nnU-Net's own tools on the same dataset, trainer, plans and budget
        f = folders(project.root)
        dataset_id = int(record["dataset"][7:10])
        cli_results = work / "cli_results"
        images_ts, out_ts = work / "imagesTs", work / "predTs"
        images_ts.mkdir()
        for case in test_ids:
            os.link(project.image_path(case), images_ts / f"{case}_0000.nrrd")
        env = dict(os.environ, nnUNet_raw=str(f.raw), nnUNet_preprocessed=str(f.preprocessed),
                   nnUNet_results=str(cli_results), nnUNet_extTrainer=str(trainers.EXT_TRAINER_PATH),
                   nnUNet_n_proc_DA="0", ALSEG_EPOCHS=str(args.epochs), ALSEG_ITERS=str(args.iters),
                   ALSEG_VAL_ITERS=str(args.val_iters), ALSEG_PROGRESS="off")
        t = time.perf_counter()
        subprocess.run([str(BIN / "nnUNetv2_train"), str(dataset_id), "2d", "0", "-tr", "ALSegTrainer", "-p", PLANS,
                        "-device", "cpu"], env=env, check=True, stdout=subprocess.DEVNULL)
        cli_train_s = time.perf_counter() - t
        t = time.perf_counter()
        subprocess.run([str(BIN / "nnUNetv2_predict"), "-i", str(images_ts), "-o", str(out_ts), "-d", str(dataset_id),
                        "-c", "2d", "-f", "0", "-tr", "ALSegTrainer", "-p", PLANS, "-device", "cpu", "--disable_tta",
                        "-npp", "1", "-nps", "1"], env=env, check=True, stdout=subprocess.DEVNULL)
        cli_predict_s = time.perf_counter() - t
        dice_cli = mean_dice(project, test_ids, lambda c: sitk.GetArrayFromImage(sitk.ReadImage(str(out_ts / f"{c}.nrrd"))))
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        else:
            print("work folder:", work)

    engine_s = engine_train_s + engine_predict_s
    cli_s = cli_train_s + cli_predict_s
    write_results("nnunet", {
        "data": "MSD Task04 Hippocampus (shared): seeded split, references of the training cases as simulated human labels",
        "split": {"train": args.train, "test": args.test, "seed": args.seed},
        "configuration": "2d",
        "plans": {"name": PLANS, "batch_size": args.batch, "patch_size": planned["patch_size"]["2d"]},
        "budget": {"epochs": args.epochs, "iterations_per_epoch": args.iters, "val_iterations_per_epoch": args.val_iters,
                   "device": "cpu", "mirroring": False},
        "dice_test": round(dice_engine, 4),
        "dice_test_cli": round(dice_cli, 4),
        "validation_dice": (record.get("validation") or {}).get("mean_dice"),
        "s_per_iter": round(s_per_iter, 3),
        "plan_s": round(plan_s, 1),
        "engine_s": round(engine_s, 1),
        "engine_train_s": round(engine_train_s, 1),
        "engine_predict_s": round(engine_predict_s, 1),
        "cli_s": round(cli_s, 1),
        "cli_train_s": round(cli_train_s, 1),
        "cli_predict_s": round(cli_predict_s, 1),
        "overhead_ratio": round(engine_s / cli_s, 3),
        "notes": "Both arms run the same ALSegTrainer class, ALSegPlans and budget, with nnU-Net's final validation; "
                 "prediction without test-time mirroring, one preprocessing and one export worker for the CLI.",
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
