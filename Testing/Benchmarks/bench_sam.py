"""SAM pseudo-labels: encoder calls per slice, seconds per slice, peak memory, and the ratio to a naive loop.

Workload: one CT phantom (64^3, 1.5 x 1.5 x 2.5 mm) with three labels; prompts
from a prior label (its reference on ``--steps`` slices each side of the organ's
middle slice): a box and a centre point per label, slice and 2D component, so
every arm answers exactly the same prompts. Arms, each in a fresh process (so
its peak memory is its own):
- alseg: ``pseudolabel_with_sam --from-labels`` (one encoder pass per slice, shared
  by all labels and prompts, embeddings cached to disk);
- naive: segment-anything's ``SamPredictor`` encoding the slice again for every
  prompt of every label (``set_image`` then ``predict``), as a per-prompt loop does.
Models: the tiny test architecture (embed 64, depth 2, 256 px) and the real
vit_b dimensions (embed 768, depth 12, 1024 px), both with random weights:
speed and memory do not depend on the weights.

With ``--checkpoint FILE [--model-type T]`` (real SAM/MedSAM weights) it also
reports pseudo-label Dice on the shared CT example against its multi-organ label
(itself made by a model, TotalSegmentator). No real weights exist on the
development machine (no network): then the Dice field says so.

Run: .venv/bin/python Testing/Benchmarks/bench_sam.py [--steps-vit-b 2 --steps-tiny 30]
Writes Testing/Benchmarks/results/sam.json.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

from common import shared_data, write_results  # noqa: E402

LABELS = ("organ", "vessel", "lesion")


def make_case(root: Path):
    import SimpleITK as sitk

    from ALSegLib import phantoms
    from ALSegLib.project import LabelTable, Project

    image, label = phantoms.make_phantom(3, "CT", seed=0, size=64)
    root.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(image, str(root / "case.nrrd"))
    sitk.WriteImage(label, str(root / "case_label.nrrd"))
    project = Project.create(root / "project", LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS), "CT")
    project.add_cases([root / "case.nrrd"], references=[root / "case_label.nrrd"], case_ids=["case"])
    return project


def prior_for(project, steps: int, folder: Path) -> tuple[Path, int]:
    """The reference restricted to ``steps`` slices each side of the organ's middle: a prior label
    whose every 2D component becomes a box prompt, for all three labels."""
    import SimpleITK as sitk

    ref_img = project.read_label("case", "reference")
    ref = sitk.GetArrayFromImage(ref_img)
    ks = np.flatnonzero(np.isin(ref, (1, 3)).any(axis=(1, 2)))
    k = int(ks[len(ks) // 2])
    prior = np.zeros_like(ref)
    lo, hi = max(0, k - steps), min(ref.shape[0] - 1, k + steps)
    prior[lo: hi + 1] = ref[lo: hi + 1]
    img = sitk.GetImageFromArray(prior)
    img.CopyInformation(ref_img)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(img, str(folder / "case.nrrd"))
    return folder, hi - lo + 1


def checkpoint_for(model: str, folder: Path) -> Path:
    import torch

    from ALSegLib.pseudolabels.sam import SamArchitecture, build_sam, standard_architecture

    arch = standard_architecture("vit_b") if model == "vit_b" else SamArchitecture(
        image_size=256, patch_size=16, encoder_embed_dim=64, encoder_depth=2, encoder_num_heads=4,
        encoder_global_attn_indexes=(1,), window_size=4, mlp_ratio=2.0, prompt_embed_dim=64, mask_in_chans=8,
        decoder_depth=2, decoder_mlp_dim=128, iou_head_depth=3, iou_head_hidden_dim=64)
    path = folder / f"{model}_random.pth"
    torch.manual_seed(0)
    torch.save(build_sam(arch).state_dict(), path)
    return path


def arm(kind: str, model: str, steps: int) -> dict:
    """One measured arm, run inside its own process."""
    import torch

    work = Path(tempfile.mkdtemp(prefix="alseg-bench-sam-"))
    project = make_case(work)
    ckpt = checkpoint_for(model, work)
    prior_dir, n_slices = prior_for(project, steps, work / "prior")
    if kind == "alseg":
        from ALSegLib.pseudolabels.run import pseudolabel_with_sam

        t = time.perf_counter()
        (summary,) = pseudolabel_with_sam(project, ckpt, from_labels=prior_dir)
        seconds = time.perf_counter() - t
        enc = summary["encoder"]
        calls, slices, prompts = enc["encoder_calls"], enc["slices_encoded"], None
    else:
        import SimpleITK as sitk
        from segment_anything import SamPredictor

        from ALSegLib.pseudolabels.prompts import prior_prompts
        from ALSegLib.pseudolabels.sam import load_checkpoint
        from ALSegLib.pseudolabels.slices import parse_window, volume_slices

        loaded = load_checkpoint(ckpt)
        predictor = SamPredictor(loaded.model)
        vs = volume_slices(project.read_image("case"))
        u8 = vs.uint8(parse_window("soft_tissue"))
        prior = vs.from_array(sitk.GetArrayFromImage(sitk.ReadImage(str(prior_dir / "case.nrrd"))))
        t = time.perf_counter()
        calls, seen, prompts = 0, set(), 0
        for value in (1, 2, 3):  # every label ...
            for p in prior_prompts(prior, value):  # ... and every prompt: encode the slice again
                predictor.set_image(np.repeat(u8[p.slice][..., None], 3, axis=2))
                calls += 1
                seen.add(p.slice)
                x0, y0, x1, y1 = p.box
                predictor.predict(point_coords=np.array(p.points), point_labels=np.array(p.point_labels),
                                  box=np.array([x0, y0, x1 + 1, y1 + 1]), multimask_output=False)
                prompts += 1
        seconds = time.perf_counter() - t
        slices = len(seen)
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    return {"seconds": round(seconds, 3), "slices": slices, "slices_in_prior": n_slices, "encoder_calls": calls,
            "prompts": prompts,
            "encoder_calls_per_slice": round(calls / slices, 3), "s_per_slice": round(seconds / slices, 4),
            "peak_gib": round(peak_gib, 3), "labels": len(LABELS), "threads": torch.get_num_threads()}


def run_arm(kind: str, model: str, steps: int) -> dict:
    out = subprocess.run([sys.executable, __file__, "--arm", kind, "--model", model, "--steps", str(steps)],
                         capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"arm {kind}/{model} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{model} {kind}: {result}", flush=True)
    return result


def real_weights_dice(checkpoint: str, model_type: str | None) -> dict:
    """Pseudo-label Dice on the shared CT example (reference: TotalSegmentator's multi-organ label)."""
    import SimpleITK as sitk

    from ALSegLib.project import LabelTable, Project
    from ALSegLib.pseudolabels.run import pseudolabel_with_sam

    data = shared_data()
    ct = data / "ct_example" if data else None
    if ct is None or not (ct / "example_ct_sm.nii.gz").is_file():
        return {"note": "shared CT example not found"}
    organs = {"liver": 5, "spleen": 1, "kidney_right": 2, "kidney_left": 3}
    work = Path(tempfile.mkdtemp(prefix="alseg-bench-sam-real-"))
    seg = sitk.ReadImage(str(ct / "example_seg.nii.gz"))
    arr = sitk.GetArrayFromImage(seg)
    ref = np.zeros_like(arr, np.uint8)
    for i, v in enumerate(organs.values(), 1):
        ref[arr == v] = i
    ref_img = sitk.GetImageFromArray(ref)
    ref_img.CopyInformation(seg)
    sitk.WriteImage(ref_img, str(work / "ref.nii.gz"))
    project = Project.create(work / "project", LabelTable.parse(",".join(f"{n}={i}" for i, n in enumerate(organs, 1))), "CT")
    project.add_cases([ct / "example_ct_sm.nii.gz"], references=[work / "ref.nii.gz"], case_ids=["ct"])
    image = project.read_image("ct")
    entries = {}
    for i, name in enumerate(organs, 1):
        m = ref == i
        if not m.any():
            continue
        ks = np.flatnonzero(m.any(axis=(1, 2)))
        k = int(ks[len(ks) // 2])
        rows, cols = np.flatnonzero(m[k].any(1)), np.flatnonzero(m[k].any(0))
        entries[name] = [{"box": [[int(cols[0]), int(rows[0]), k], [int(cols[-1]), int(rows[-1]), k]]}]
    (work / "p.json").write_text(json.dumps({"space": "index", "cases": {"ct": entries}}))
    t = time.perf_counter()
    (summary,) = pseudolabel_with_sam(project, checkpoint, model_type=model_type, prompts=work / "p.json")
    pseudo = sitk.GetArrayFromImage(project.read_label("ct", "pseudo"))
    dice = {}
    for i, name in enumerate(organs, 1):
        a, b = pseudo == i, ref == i
        if b.any():
            dice[name] = round(2 * float((a & b).sum()) / float(a.sum() + b.sum()), 4)
    del image
    return {"dice": dice, "mean_dice": round(float(np.mean(list(dice.values()))), 4),
            "seconds": round(time.perf_counter() - t, 1),
            "reference": "TotalSegmentator label of the shared CT example (model-made, not expert)",
            "prompts": "one box per organ on its middle axial slice, propagated with the default stop rules",
            "model": summary}


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--arm", choices=("alseg", "naive"))
    ap.add_argument("--model", choices=("tiny", "vit_b"))
    ap.add_argument("--steps", type=int)
    ap.add_argument("--steps-tiny", type=int, default=30)
    ap.add_argument("--steps-vit-b", type=int, default=2)
    ap.add_argument("--checkpoint", help="real SAM/MedSAM weights, for pseudo-label Dice on the shared CT example")
    ap.add_argument("--model-type", choices=("vit_b", "vit_l", "vit_h", "medsam"))
    args = ap.parse_args()
    if args.arm:
        print(json.dumps(arm(args.arm, args.model, args.steps)))
        return 0
    start = time.perf_counter()
    figures = {}
    for model, steps in (("tiny", args.steps_tiny), ("vit_b", args.steps_vit_b)):
        a = run_arm("alseg", model, steps)
        n = run_arm("naive", model, steps)
        figures[model] = {"alseg": a, "naive": n, "naive_ratio": round(n["seconds"] / a["seconds"], 2),
                          "prior_slices_each_side": steps}
    if args.checkpoint:
        real = real_weights_dice(args.checkpoint, args.model_type)
    else:
        real = {"dice": None, "note": "no real SAM/MedSAM weights on this machine (no network); "
                                      "run with --checkpoint FILE [--model-type T] where they exist"}
    write_results("sam", {
        "workload": "CT phantom 64^3 (1.5 x 1.5 x 2.5 mm), 3 labels; prompts from a prior label (the reference on "
                    "2*steps+1 axial slices): a box + centre point per label, slice and 2D component; random weights "
                    "(speed and memory do not depend on them); CPU",
        "encoder_calls_per_slice": {m: figures[m]["alseg"]["encoder_calls_per_slice"] for m in figures},
        "s_per_slice": {m: figures[m]["alseg"]["s_per_slice"] for m in figures},
        "peak_gib": {m: figures[m]["alseg"]["peak_gib"] for m in figures},
        "naive_ratio": {m: figures[m]["naive_ratio"] for m in figures},
        "arms": figures,
        "real_weights": real,
        "total_s": round(time.perf_counter() - start, 1),
    })
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
