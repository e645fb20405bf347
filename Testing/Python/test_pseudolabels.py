"""SAM pseudo-labels on volumes with tiny SAM models built from segment-anything's own classes.

A tiny ``Sam`` is trained for a minute on CT phantom slices (see ``sam_helpers``)
so that masks, propagation and its stop rules are tested on a model that
segments; random-weight models check loading, shapes and counting.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
import torch
from conftest import tree_hash
from sam_helpers import SIZE, TINY, organ_mask, save, tiny_sam, train_tiny_sam

from ALSegLib import phantoms
from ALSegLib.errors import InputError
from ALSegLib.project import LabelTable, Project
from ALSegLib.pseudolabels import prompts as pr
from ALSegLib.pseudolabels.postprocess import PostProcess, clean_mask
from ALSegLib.pseudolabels.run import pseudolabel_with_sam
from ALSegLib.pseudolabels.sam import (
    PROFILES,
    MaskDecoder,
    SliceEmbeddings,
    build_sam,
    detect_architecture,
    encoder_input,
    load_checkpoint,
    read_state_dict,
    slice_frame,
    standard_architecture,
)
from ALSegLib.pseudolabels.slices import (
    Window,
    parse_window,
    physical_to_array_index,
    slice_axis,
    to_uint8,
    volume_slices,
)
from ALSegLib.selection.features import available, case_features

TABLE = LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS)


def dice(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(bool), b.astype(bool)
    return 2 * float((a & b).sum()) / max(1, int(a.sum() + b.sum()))


# ---------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="session")
def trained_checkpoint(tmp_path_factory):
    """The tiny SAM trained on phantom slices (about a minute), saved as a plain state dict."""
    path = tmp_path_factory.mktemp("sam") / "tiny_trained.pth"
    return save(train_tiny_sam(), path)


@pytest.fixture(scope="session")
def random_checkpoint(tmp_path_factory):
    return save(tiny_sam(seed=1), tmp_path_factory.mktemp("sam_random") / "tiny_random.pth")


def oblique_anisotropic(image: sitk.Image, label: sitk.Image) -> tuple[sitk.Image, sitk.Image]:
    """The phantom on a rotated grid with 2:1 anisotropic in-plane pixels (rows twice as coarse)."""
    angle = np.deg2rad(12)
    c, s = np.cos(angle), np.sin(angle)
    direction = (c, -s, 0.0, s, c, 0.0, 0.0, 0.0, 1.0)
    sx, sy, sz = image.GetSpacing()
    size = image.GetSize()
    ref = sitk.Image(size[0], size[1] // 2, size[2], sitk.sitkInt16)
    ref.SetSpacing((sx, sy * 2, sz))
    ref.SetDirection(direction)
    # keep the centre where it was
    centre = image.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2 for n in size])
    half = np.array(direction).reshape(3, 3) @ (np.array([(size[0] - 1) * sx, (size[1] // 2 - 1) * sy * 2,
                                                          (size[2] - 1) * sz]) / 2)
    ref.SetOrigin(tuple(np.array(centre) - half))
    img = sitk.Resample(image, ref, sitk.Transform(), sitk.sitkLinear, -1000, sitk.sitkInt16)
    lab = sitk.Resample(label, ref, sitk.Transform(), sitk.sitkNearestNeighbor, 0, sitk.sitkUInt8)
    return img, lab


@pytest.fixture
def sam_project(tmp_path):
    """Three CT phantoms (the tiny model never saw them) with references, one of them oblique and anisotropic."""
    src = tmp_path / "src"
    src.mkdir()
    project = Project.create(tmp_path / "project", TABLE, "CT")
    paths, refs = [], []
    for i in range(3):
        image, label = phantoms.make_phantom(i, "CT", seed=7, size=SIZE)
        if i == 2:
            image, label = oblique_anisotropic(image, label)
        sitk.WriteImage(image, str(src / f"case{i}.nrrd"))
        sitk.WriteImage(label, str(src / f"case{i}_label.nrrd"))
        paths.append(src / f"case{i}.nrrd")
        refs.append(src / f"case{i}_label.nrrd")
    project.add_cases(paths, references=refs, case_ids=[f"case{i}" for i in range(3)])
    return project


def organ_reference(project: Project, case: str) -> np.ndarray:
    return organ_mask(sitk.GetArrayFromImage(project.read_label(case, "reference")))


def box_prompt_file(project: Project, path, cases, space="RAS", label="organ", extra=None) -> dict:
    """A prompt file with one box (in ``space``) around the organ on its middle axial slice, per case."""
    cases_obj = {}
    for case in cases:
        image = project.read_image(case)
        organ = organ_reference(project, case)
        vs = volume_slices(image, "axial")
        stack = vs.from_array(organ)
        ks = np.flatnonzero(stack.any(axis=(1, 2)))
        k = int(ks[len(ks) // 2])
        rows, cols = np.flatnonzero(stack[k].any(1)), np.flatnonzero(stack[k].any(0))
        corners = []
        for r, c in ((rows[0], cols[0]), (rows[-1], cols[-1])):
            idx = [0, 0, 0]
            in_plane = [a for a in range(3) if a != vs.axis]
            idx[vs.axis], idx[in_plane[0]], idx[in_plane[1]] = k, r, c  # array (z, y, x) order
            i, j, kk = idx[2], idx[1], idx[0]
            if space == "index":
                corners.append([int(i), int(j), int(kk)])
            else:
                p = image.TransformContinuousIndexToPhysicalPoint([float(i), float(j), float(kk)])
                corners.append([-p[0], -p[1], p[2]] if space == "RAS" else list(p))
        cases_obj[case] = {label: [{"box": corners}]}
    obj = {"space": space, "axis": "axial", "cases": cases_obj, **(extra or {})}
    path.write_text(json.dumps(obj))
    return obj


# ---------------------------------------------------------------------------------------
# checkpoints


@pytest.mark.parametrize("model_type", ["vit_b", "vit_l", "vit_h"])
def test_published_architectures_are_read_from_shapes(model_type):
    arch = standard_architecture(model_type)
    with torch.device("meta"):  # shapes only, no memory
        sd = build_sam(arch).state_dict()
    found = detect_architecture(sd)
    assert found == arch and found.name == model_type


def test_custom_architecture_round_trips_through_a_checkpoint(tmp_path):
    model = tiny_sam(seed=3)
    sd = model.state_dict()
    assert detect_architecture(sd) == TINY and TINY.name == "custom"
    # plain, wrapped in {"model": ...} (training checkpoints) and DataParallel-prefixed
    torch.save(sd, tmp_path / "plain.pth")
    torch.save({"model": sd, "epoch": 3}, tmp_path / "wrapped.pth")
    torch.save({f"module.{k}": v for k, v in sd.items()}, tmp_path / "prefixed.pth")
    for name in ("plain", "wrapped", "prefixed"):
        loaded = load_checkpoint(tmp_path / f"{name}.pth")
        assert loaded.model_type == "custom" and loaded.profile.name == "sam"
        for k, v in loaded.model.state_dict().items():
            assert torch.equal(v, sd[k]), (name, k)
        assert len(loaded.sha256) == 64
    with pytest.raises(InputError, match="not vit_b"):
        load_checkpoint(tmp_path / "plain.pth", model_type="vit_b")


def test_bad_checkpoints_are_clear_errors(tmp_path):
    (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint at all")
    with pytest.raises(InputError, match="garbage.pth: not a readable PyTorch checkpoint"):
        read_state_dict(tmp_path / "garbage.pth")
    torch.save({"weight": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(InputError, match="other.pth: not a SAM checkpoint"):
        load_checkpoint(tmp_path / "other.pth")
    sd = tiny_sam().state_dict()
    sd.pop("mask_decoder.iou_token.weight")
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(InputError, match="partial.pth: does not match.*iou_token"):
        load_checkpoint(tmp_path / "partial.pth")
    with pytest.raises(InputError, match="checkpoint file not found"):
        load_checkpoint(tmp_path / "missing.pth")


class _Payload:
    """Unpickling this would create a file: the checkpoint loader must never do it."""

    def __init__(self, sentinel):
        self.sentinel = str(sentinel)

    def __reduce__(self):
        return (open, (self.sentinel, "w"))


def test_checkpoint_with_pickled_code_is_refused_and_never_run(tmp_path, run_cli, sam_project):
    sentinel = tmp_path / "pwned"
    sd = tiny_sam().state_dict()
    sd["extra"] = _Payload(sentinel)
    torch.save(sd, tmp_path / "evil.pth")
    assert not sentinel.exists()
    with pytest.raises(InputError, match="evil.pth: refused: the checkpoint holds pickled code"):
        load_checkpoint(tmp_path / "evil.pth")
    (tmp_path / "auto.json").write_text(json.dumps({"labels": {"organ": {"auto": {"intensity": [50, 150]}}}}))
    before = tree_hash(sam_project.root)
    code, _, err = run_cli("pseudolabel", str(sam_project.root), "--source", "sam", "--checkpoint",
                           str(tmp_path / "evil.pth"), "--auto", str(tmp_path / "auto.json"))
    assert code == 2 and "refused" in err
    assert not sentinel.exists()
    assert tree_hash(sam_project.root) == before


# ---------------------------------------------------------------------------------------
# slices, windows, geometry


def test_windows_and_axes():
    assert parse_window("soft_tissue") == Window("window", 400, 40)
    assert parse_window("1800,400") == Window("window", 1800, 400)
    assert parse_window({"percentile": [1, 99]}) == Window("percentile", 1, 99)
    with pytest.raises(InputError, match="width must be positive"):
        parse_window([0, 40])
    with pytest.raises(InputError, match="unknown window"):
        parse_window("abdominal")
    hu = np.array([-1000, -160, 40, 240, 3000], np.float32)
    assert to_uint8(hu, parse_window("soft_tissue")).tolist() == [0, 0, 128, 255, 255]
    # a volume stored coronally (index axis k along A-P): "axial" picks the index axis along S
    img = sitk.Image(10, 12, 14, sitk.sitkInt16)
    img.SetDirection((1, 0, 0, 0, 0, 1, 0, 1, 0))  # i -> L, j -> S, k -> P
    assert slice_axis(img, "axial") == 1  # array axis of j
    assert slice_axis(img, "coronal") == 0
    assert slice_axis(img, "sagittal") == 2
    vs = volume_slices(img, "axial")
    assert vs.raw.shape == (12, 14, 10) and vs.pixel_spacing == (1.0, 1.0)
    arr = np.arange(14 * 12 * 10).reshape(14, 12, 10)
    assert np.array_equal(vs.to_array(vs.from_array(arr)), arr)


def test_physical_points_map_to_voxels_on_an_oblique_grid():
    img = sitk.Image(20, 30, 10, sitk.sitkInt16)
    img.SetSpacing((0.7, 1.4, 3.0))
    img.SetOrigin((10.0, -5.0, 2.0))
    a = np.deg2rad(20)
    img.SetDirection((np.cos(a), -np.sin(a), 0, np.sin(a), np.cos(a), 0, 0, 0, 1))
    lps = img.TransformIndexToPhysicalPoint((4, 7, 3))
    assert np.allclose(physical_to_array_index(img, lps, "LPS"), (3, 7, 4))
    assert np.allclose(physical_to_array_index(img, (-lps[0], -lps[1], lps[2]), "RAS"), (3, 7, 4))
    assert physical_to_array_index(img, (4, 7, 3), "index") == (3, 7, 4)


def test_anisotropic_slices_are_made_square_for_sam_not_for_medsam():
    frame = slice_frame((24, 48), (3.0, 1.5), 256, PROFILES["sam"])  # 72 x 72 mm
    assert frame.input_size == (256, 256)
    frame = slice_frame((48, 48), (1.0, 2.0), 256, PROFILES["sam"])  # 48 x 96 mm
    assert frame.input_size == (128, 256)
    assert slice_frame((48, 48), (1.0, 2.0), 256, PROFILES["medsam"]).input_size == (256, 256)
    model = tiny_sam()
    x = encoder_input(np.full((2, 48, 48), 200, np.uint8), frame, model, PROFILES["sam"])
    assert x.shape == (2, 3, 256, 256)
    x = encoder_input(np.arange(48 * 48, dtype=np.uint8).reshape(1, 48, 48),
                      slice_frame((48, 48), (1, 2), 256, PROFILES["medsam"]), model, PROFILES["medsam"])
    assert x.shape == (1, 3, 256, 256) and float(x.min()) == 0.0 and float(x.max()) == 1.0


# ---------------------------------------------------------------------------------------
# post-processing


def test_postprocess_keeps_largest_component_fills_holes_drops_islands():
    m = np.zeros((10, 20, 20), bool)
    m[2:8, 2:12, 2:12] = True
    m[4:6, 5:8, 5:8] = False  # a hole
    m[2:4, 15:18, 15:18] = True  # a second, smaller component (18 voxels)
    out = clean_mask(m, 1.0, PostProcess(keep_components=1, fill_holes=True))
    assert out[4:6, 5:8, 5:8].all() and not out[2:4, 15:18, 15:18].any()
    out = clean_mask(m, 1.0, PostProcess(keep_components=0, fill_holes=False, min_island_mm3=20))
    assert not out[2:4, 15:18, 15:18].any() and not out[4:6, 5:8, 5:8].any()
    out = clean_mask(m, 1.0, PostProcess(keep_components=0, fill_holes=False, min_island_mm3=10))
    assert out[2:4, 15:18, 15:18].all()


# ---------------------------------------------------------------------------------------
# the pipeline with the trained tiny model


def test_box_prompt_propagates_through_the_organ_and_stops_where_it_ends(sam_project, trained_checkpoint, tmp_path):
    cases = ["case0", "case1"]
    box_prompt_file(sam_project, tmp_path / "prompts.json", cases)
    summaries = pseudolabel_with_sam(sam_project, trained_checkpoint, prompts=tmp_path / "prompts.json")
    assert [s["status"] for s in summaries] == ["written", "written"]
    for s in summaries:
        ref = organ_reference(sam_project, s["case"])
        extent = np.flatnonzero(ref.any(axis=(1, 2)))
        track = s["labels"]["organ"]["tracks"][0]
        lo, hi = track["reached"]
        # propagation covers the organ and stops near its ends, by a rule (not the volume's end)
        assert abs(lo - extent[0]) <= 2 and abs(hi - extent[-1]) <= 2, (s["case"], track, extent[[0, -1]])
        assert "end of volume" not in track["stop"].values(), track
        pseudo = sitk.GetArrayFromImage(sam_project.read_label(s["case"], "pseudo"))
        assert dice(pseudo == 1, ref) > 0.8
        # one encoder pass per slice visited
        assert s["encoder"]["max_calls_per_slice"] == 1
        assert s["encoder"]["slices_encoded"] == hi - lo + 1 + sum(
            1 for r in track["stop"].values() if r != "end of volume")
        prov = sam_project.provenance(s["case"], "pseudo")
        assert prov["source"] == "sam" and prov["produced_by"]["model_type"] == "custom"
        assert prov["prompts"]["organ"][0]["box"] and 0 < prov["confidence"] <= 1.5


def test_masks_land_on_the_right_voxels_of_an_oblique_anisotropic_volume(sam_project, trained_checkpoint, tmp_path):
    """case2 lies on a 12° rotated grid with rows twice as coarse as columns; prompts come in RAS millimetres."""
    box_prompt_file(sam_project, tmp_path / "prompts.json", ["case2"], space="RAS")
    (s,) = pseudolabel_with_sam(sam_project, trained_checkpoint, prompts=tmp_path / "prompts.json", cache=False)
    pseudo_img = sam_project.read_label("case2", "pseudo")
    image = sam_project.read_image("case2")
    assert pseudo_img.GetDirection() == image.GetDirection() and pseudo_img.GetSpacing() == image.GetSpacing()
    ref = organ_reference(sam_project, "case2")
    assert dice(sitk.GetArrayFromImage(pseudo_img) == 1, ref) > 0.75
    assert s["encoder"]["max_calls_per_slice"] == 1


def test_second_run_reads_every_embedding_from_the_cache(sam_project, trained_checkpoint, tmp_path):
    box_prompt_file(sam_project, tmp_path / "prompts.json", ["case0"])
    (first,) = pseudolabel_with_sam(sam_project, trained_checkpoint, prompts=tmp_path / "prompts.json")
    label1 = sitk.GetArrayFromImage(sam_project.read_label("case0", "pseudo"))
    (second,) = pseudolabel_with_sam(sam_project, trained_checkpoint, prompts=tmp_path / "prompts.json")
    assert first["encoder"]["forward_passes"] > 0 and second["encoder"]["forward_passes"] == 0
    assert second["encoder"]["cache_hits"] == first["encoder"]["slices_encoded"]
    assert np.array_equal(sitk.GetArrayFromImage(sam_project.read_label("case0", "pseudo")), label1)
    assert available(sam_project, "sam", sam_project.cases()) == ["case0"]  # only the case that was run
    source, feats = case_features(sam_project, ["case0"], "auto")  # selection reads them
    assert source == "sam" and feats.shape == (1, TINY.prompt_embed_dim)


def test_one_encoder_pass_per_slice_for_several_labels_and_prompts(sam_project, random_checkpoint, tmp_path):
    """Two labels, three prompts on overlapping slices: every slice still goes through the encoder once."""
    obj = box_prompt_file(sam_project, tmp_path / "p.json", ["case0"], space="index")
    box = obj["cases"]["case0"]["organ"][0]["box"]
    k = box[0][2]
    moved = [[box[0][0], box[0][1], k + 1], [box[1][0], box[1][1], k + 1]]
    obj["cases"]["case0"]["organ"].append({"box": moved})
    obj["cases"]["case0"]["vessel"] = [{"points": [[20, 20, k]], "negative": [[5, 5, k]]}]
    obj["labels"] = {"organ": {"min_iou": 0.0, "min_area_ratio": 0.0, "max_area_ratio": 1e9, "max_steps": 6},
                     "vessel": {"min_iou": 0.0, "min_area_ratio": 0.0, "max_area_ratio": 1e9, "max_steps": 6}}
    (tmp_path / "p.json").write_text(json.dumps(obj))
    (s,) = pseudolabel_with_sam(sam_project, random_checkpoint, prompts=tmp_path / "p.json", cache=False)
    enc = s["encoder"]
    assert enc["max_calls_per_slice"] == 1 and enc["encoder_calls"] == enc["slices_encoded"]
    assert enc["decoder_calls"] > enc["slices_encoded"]  # many prompts answered from one embedding


def test_embeddings_counted_once_in_batches(tmp_path):
    loaded_model = tiny_sam()
    from ALSegLib.pseudolabels.sam import LoadedSam

    loaded = LoadedSam(loaded_model, TINY, "custom", PROFILES["sam"], "memory", "0" * 64, torch.device("cpu"))
    slices = np.random.default_rng(0).integers(0, 255, (12, 40, 40), dtype=np.uint8)
    emb = SliceEmbeddings(loaded, slices, (1.0, 1.0), batch=4, memory_bytes=1, cache_dir=tmp_path / "cache")
    for k in range(12):
        emb.get(k, ahead=range(k + 1, k + 4))
    emb.encode(range(12))
    assert emb.encoder_calls == {k: 1 for k in range(12)}
    assert emb.forward_passes == 3
    # batched and single-slice encodings agree
    single = SliceEmbeddings(loaded, slices, (1.0, 1.0), batch=1)
    for k in (0, 5, 11):
        assert torch.allclose(single.get(k), emb.get(k), atol=2e-2)


def test_medsam_profile_uses_boxes_only(sam_project, trained_checkpoint):
    loaded = load_checkpoint(trained_checkpoint)
    loaded.profile = PROFILES["medsam"]
    vs = volume_slices(sam_project.read_image("case0"))
    emb = SliceEmbeddings(loaded, vs.uint8(parse_window("soft_tissue")), vs.pixel_spacing)
    dec = MaskDecoder(loaded, emb.frame)
    with pytest.raises(InputError, match="box prompts only"):
        dec(emb.get(20), points=np.array([[[10.0, 10.0]]]), point_labels=np.array([[1]]))
    out = dec(emb.get(20), boxes=np.array([[10, 10, 30, 30]]), points=np.array([[[10.0, 10.0]]]), point_labels=np.array([[1]]))
    assert out.masks.shape == (1, SIZE, SIZE)


def test_automatic_mode_finds_the_organ_with_intensity_filters(sam_project, trained_checkpoint, tmp_path):
    """Grid prompts filtered by HU range and area; the tiny model was only trained on boxes and points."""
    settings = {"labels": {"organ": {"auto": {"grid": 8, "min_iou": 0.5, "intensity": [55, 140], "area_mm2": [40, 4000]}}}}
    (tmp_path / "auto.json").write_text(json.dumps(settings))
    (s,) = pseudolabel_with_sam(sam_project, trained_checkpoint, auto=True, auto_settings=tmp_path / "auto.json",
                                cases=["case0"])
    assert s["status"] == "written" and s["encoder"]["slices_encoded"] == SIZE  # every slice, once
    pseudo = sitk.GetArrayFromImage(sam_project.read_label("case0", "pseudo"))
    assert dice(pseudo == 1, organ_reference(sam_project, "case0")) > 0.5
    assert set(np.unique(pseudo)) <= {0, 1}


def test_prompts_from_a_prior_label(sam_project, trained_checkpoint, tmp_path):
    """A coarse prior (the organ shrunk and shifted): a box per slice and component refines it."""
    from scipy import ndimage

    prior_dir = tmp_path / "prior"
    prior_dir.mkdir()
    ref = organ_reference(sam_project, "case1")
    coarse = ndimage.binary_erosion(ref, iterations=2)
    arr = np.roll(coarse, 1, axis=2).astype(np.uint8)
    img = sitk.GetImageFromArray(arr)
    img.CopyInformation(sam_project.read_image("case1"))
    sitk.WriteImage(img, str(prior_dir / "case1.nii.gz"))
    (s,) = pseudolabel_with_sam(sam_project, trained_checkpoint, from_labels=prior_dir)
    pseudo = sitk.GetArrayFromImage(sam_project.read_label("case1", "pseudo"))
    assert dice(pseudo == 1, ref) > dice(arr == 1, ref)
    prompted = {p.slice for p in pr.prior_prompts(arr, 1)}  # slices with a component of >= 4 pixels
    assert s["encoder"]["slices_encoded"] == len(prompted) and s["encoder"]["max_calls_per_slice"] == 1


# ---------------------------------------------------------------------------------------
# bad prompt files leave the project untouched


@pytest.mark.parametrize("mutate, message", [
    (lambda o: o["cases"].update({"nope": {"organ": [{"points": [[1, 1, 1]]}]}}), "no case 'nope'"),
    (lambda o: o["cases"]["case0"].update({"liver": [{"points": [[1, 1, 1]]}]}), "unknown label 'liver'"),
    (lambda o: o["cases"]["case0"]["organ"].append({"points": [[500, 1, 1]]}), "lies outside the image"),
    (lambda o: o["cases"]["case0"]["organ"].append({"points": [[1, 1, 1], [5, 5, 9]]}), "must lie on one axial slice"),
    (lambda o: o["cases"]["case0"]["organ"].append({"box": [[1, 1, 1], [5, 5, 9]], "points": [[3, 3, 12]]}),
     "inside the box"),
    (lambda o: o.update({"labels": {"organ": {"minus": ["organ"]}}}), "related to itself"),
    (lambda o: o.update({"labels": {"organ": {"minus": ["vessel"]}, "vessel": {"inside": "organ"}}}), "cycle"),
    (lambda o: o.update({"labels": {"organ": {"minus": ["liver"]}}}), "unknown label 'liver'"),
    (lambda o: o.update({"labels": {"organ": {"minus": ["vessel"]}}}), "relations need vessel"),
    (lambda o: o.update({"labels": {"organ": {"between": "spline"}}}), "between"),
    (lambda o: o["cases"]["case0"]["organ"].append({"box": [[1, 1, 1]]}), "exactly two corners"),
    (lambda o: o.update({"space": "XYZ"}), "space"),
    (lambda o: o.update({"labels": {"organ": {"window": [-5, 3]}}}), "width must be positive"),
    (lambda o: o.update({"labels": {"organ": {"min_iou": 2}}}), "min_iou"),
])
def test_bad_prompt_files_are_clear_errors(sam_project, random_checkpoint, tmp_path, mutate, message):
    obj = box_prompt_file(sam_project, tmp_path / "p.json", ["case0"], space="index")
    mutate(obj)
    (tmp_path / "p.json").write_text(json.dumps(obj))
    before = tree_hash(sam_project.root)
    with pytest.raises(InputError, match=message) as exc:
        pseudolabel_with_sam(sam_project, random_checkpoint, prompts=tmp_path / "p.json")
    assert "p.json" in str(exc.value)
    assert tree_hash(sam_project.root) == before


def test_pseudolabels_never_touch_human_labels(sam_project, trained_checkpoint, tmp_path):
    ref = sam_project.read_label("case0", "reference")
    sam_project.add_human_label("case0", ref, source="simulated")
    human_before = (sam_project.label_path("case0", "human").read_bytes())
    box_prompt_file(sam_project, tmp_path / "prompts.json", ["case0"])
    pseudolabel_with_sam(sam_project, trained_checkpoint, prompts=tmp_path / "prompts.json")
    assert sam_project.human_versions("case0") == [1]
    assert sam_project.label_path("case0", "human").read_bytes() == human_before


def test_cli_pseudolabel_sam_with_progress_per_slice(sam_project, trained_checkpoint, tmp_path, monkeypatch, run_cli):
    box_prompt_file(sam_project, tmp_path / "prompts.json", ["case1"])
    monkeypatch.setenv("ALSEG_PROGRESS", "jsonl")
    code, out, err = run_cli("pseudolabel", str(sam_project.root), "--source", "sam", "--checkpoint", str(trained_checkpoint),
                             "--prompts", str(tmp_path / "prompts.json"), "--json")
    assert code == 0, err
    result = json.loads(out)
    assert result["cases"][0]["case"] == "case1" and result["cases"][0]["status"] == "written"
    events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    slices = [e for e in events if e["event"] == "slice"]
    assert slices and {e["case"] for e in slices} == {"case1"} and all(e["label"] == "organ" for e in slices)
    assert any(e["event"] == "progress" and e["stage"] == "pseudo-labels" for e in events)
    # the duration is announced before the first slice, from one slice encoded as a probe
    first_estimate = next(i for i, e in enumerate(events) if e["event"] == "estimate" and e["job"] == "pseudolabels")
    assert first_estimate < next(i for i, e in enumerate(events) if e["event"] == "slice")
    estimate = events[first_estimate]
    assert estimate["estimated_s"] > 0 and estimate["slices"] >= 1 and estimate["slice_s"] > 0
    assert "estimate: pseudo-labels of 1 case(s)" in estimate["message"]


def test_cli_refuses_contradictory_or_missing_options(sam_project, random_checkpoint, tmp_path, run_cli):
    box_prompt_file(sam_project, tmp_path / "p.json", ["case0"])
    root = str(sam_project.root)
    before = tree_hash(sam_project.root)
    cases = [
        (["--checkpoint", str(random_checkpoint), "--auto"], "grid prompts cannot tell them apart"),
        (["--checkpoint", str(random_checkpoint), "--prompts", str(tmp_path / "p.json"), "--axis", "coronal"],
         "contradicts the axis"),
        (["--prompts", str(tmp_path / "p.json"), "--model-type", "vit_b"], "needs --checkpoint FILE"),
        (["--prompts", str(tmp_path / "p.json"), "--settings", str(tmp_path / "p.json")], "--settings: belongs to"),
        (["--prompts-from-reference", "0"], "whole number of boxes"),
        (["--prompts-from-reference", "1", "--cases", "case0", "--exclude", "case0"], "both asked for and excluded"),
        (["--checkpoint", str(random_checkpoint)], "exactly one of --prompts"),
        (["--checkpoint", str(random_checkpoint), "--prompts", str(tmp_path / "p.json"), "--map", "5=1"],
         "belong to --source import"),
        (["--checkpoint", str(random_checkpoint), "--prompts", str(tmp_path / "p.json"), "--cases", "case1"],
         "no prompts for case"),
    ]
    for options, message in cases:
        code, _, err = run_cli("pseudolabel", root, "--source", "sam", *options)
        assert code == 2 and message in err, (options, err)
    assert tree_hash(sam_project.root) == before


# ---------------------------------------------------------------------------------------
# prompts from the reference (experiments), 3D boxes, re-anchoring


def test_reference_prompts_largest_slice_then_spread_along_the_structure():
    ref = np.zeros((10, 20, 20), np.uint8)
    areas = [0, 2, 3, 5, 4, 9, 6, 2, 1, 0]
    for k, a in enumerate(areas):
        ref[k, 5:5 + a, 6:6 + a] = 1
    (one,) = pr.reference_prompts(ref, 1, 1, (1.0, 1.0))
    assert one.slice == 5 and one.range == (1, 8) and one.box == (5.0, 4.0, 15.0, 14.0)
    three = pr.reference_prompts(ref, 1, 3, (0.0, 0.0))
    # present slices 1..8 cut into runs [1,2,3], [4,5,6], [7,8]; the largest slice of each
    assert [p.slice for p in three] == [3, 5, 7] and all(p.range == (1, 8) for p in three)
    assert three == pr.reference_prompts(ref, 1, 3, (0.0, 0.0))  # deterministic
    assert len(pr.reference_prompts(ref, 1, 50, (0.0, 0.0))) == 8  # at most one box per slice
    assert pr.reference_prompts(ref, 2, 3, (0.0, 0.0)) == []
    with pytest.raises(InputError, match="whole number"):
        pr.reference_prompts(ref, 1, 0, (0.0, 0.0))


def test_prompts_from_reference_never_touch_excluded_cases_and_are_recorded(sam_project, trained_checkpoint):
    before = {c: sam_project.label_path(c, "pseudo") for c in sam_project.cases()}
    assert not any(before.values())
    runs = []
    for _ in range(2):
        out = pseudolabel_with_sam(sam_project, trained_checkpoint, prompts_from_reference=2, exclude=["case1"])
        runs.append(out)
        assert [s["case"] for s in out] == ["case0", "case2"]
        assert sam_project.label_path("case1", "pseudo") is None  # the held-out case: nothing, ever
    for case in ("case0", "case2"):
        prov = sam_project.provenance(case, "pseudo")
        assert prov["mode"] == "reference" and prov["prompts_simulated"]["boxes_per_structure"] == 2
        assert len(prov["prompts"]["organ"]) == 2 and all("range" in p for p in prov["prompts"]["organ"])
    # same prompts, same labels on a second run
    assert [s["labels"] for s in runs[0]] == [s["labels"] for s in runs[1]]
    with pytest.raises(InputError, match="no reference label"):
        p2 = Project.create(sam_project.root.parent / "noref", TABLE, "CT")
        p2.add_cases([sam_project.image_path("case0")], case_ids=["c"])
        pseudolabel_with_sam(p2, trained_checkpoint, prompts_from_reference=1, cases=["c"])


def test_a_3d_box_propagates_only_within_its_slices(sam_project, trained_checkpoint, tmp_path):
    obj = box_prompt_file(sam_project, tmp_path / "p.json", ["case0"], space="index")
    (a, b) = obj["cases"]["case0"]["organ"][0]["box"]
    k = a[2]
    a, b = [a[0], a[1], k - 2], [b[0], b[1], k + 2]  # the same box, spanning 5 slices
    obj["cases"]["case0"]["organ"] = [{"box": [a, b]}]
    (tmp_path / "p.json").write_text(json.dumps(obj))
    (s,) = pseudolabel_with_sam(sam_project, trained_checkpoint, prompts=tmp_path / "p.json")
    track = s["labels"]["organ"]["tracks"][0]
    assert track["slice"] == k and track["reached"] == [k - 2, k + 2]
    assert set(track["stop"].values()) == {"end of the box's slices"}
    pseudo = sitk.GetArrayFromImage(sam_project.read_label("case0", "pseudo"))
    assert set(np.flatnonzero((pseudo == 1).any(axis=(1, 2)))) <= set(range(k - 2, k + 3))


def lesion_free_case(project: Project, folder: Path, case: str = "plain0") -> str:
    """Phantom 0 with its lesion brought to the organ's intensity (noise kept) and labeled organ: the tiny
    model segments an organ with a large hypodense lesion poorly (the real LiteMedSAM is tested apart)."""
    image, label = phantoms.make_phantom(0, "CT", seed=7, size=SIZE)
    arr, lab = sitk.GetArrayFromImage(image).astype(np.float32), sitk.GetArrayFromImage(label)
    lesion, organ = lab == phantoms.LABELS["lesion"], lab == phantoms.LABELS["organ"]
    arr[lesion] += arr[organ].mean() - arr[lesion].mean()
    lab[lesion] = phantoms.LABELS["organ"]
    out_image, out_label = sitk.GetImageFromArray(np.round(arr).astype(np.int16)), sitk.GetImageFromArray(lab)
    for im in (out_image, out_label):
        im.CopyInformation(image)
    folder.mkdir(parents=True, exist_ok=True)
    sitk.WriteImage(out_image, str(folder / f"{case}.nrrd"))
    sitk.WriteImage(out_label, str(folder / f"{case}_label.nrrd"))
    project.add_cases([folder / f"{case}.nrrd"], references=[folder / f"{case}_label.nrrd"], case_ids=[case])
    return case


def test_boxes_on_two_slices_re_anchor_and_can_be_interpolated(sam_project, trained_checkpoint, tmp_path):
    case = lesion_free_case(sam_project, tmp_path / "plain")
    ref = organ_reference(sam_project, case)
    ks = np.flatnonzero(ref.any(axis=(1, 2)))
    prompts = pr.reference_prompts(ref.astype(np.uint8), 1, 2, (1.0, 1.0))
    assert len(prompts) == 2 and prompts[0].slice < prompts[1].slice
    for between in ("mask", "interpolate"):
        settings = tmp_path / f"{between}.json"
        settings.write_text(json.dumps({"labels": {"organ": {"between": between}}}))
        (s,) = pseudolabel_with_sam(sam_project, trained_checkpoint, prompts_from_reference=2, cases=[case],
                                    settings_file=settings)
        first, second = s["labels"]["organ"]["tracks"]
        assert first["stop"]["up"] == second["stop"]["down"] == "reached another prompted slice"
        assert first["reached"][1] < second["slice"] and second["reached"][0] > first["slice"]
        pseudo = sitk.GetArrayFromImage(sam_project.read_label(case, "pseudo"))
        assert dice(pseudo == 1, ref) > 0.8, between
        assert set(np.flatnonzero((pseudo == 1).any(axis=(1, 2)))) <= set(range(ks[0], ks[-1] + 1))


def test_auto_is_one_device_rule_for_the_pseudo_labels_as_for_nnunet(monkeypatch, project):
    """``auto`` is the GPU when there is one, for LiteMedSAM as for nnU-Net: the round hands its
    device to the pseudo-label stage (unless the source names one), ``alseg pseudolabel`` defaults
    to auto (None -> "auto"), and auto is resolved once, by the rule nnU-Net's stages use."""
    from ALSegLib import devices, loop
    from ALSegLib.cli import build_parser
    from ALSegLib.pseudolabels import run

    # a stand-in CUDA check (this machine has no GPU): the answer torch.cuda gives on one with a GPU
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    assert devices.resolve_device("auto") == torch.device("cuda")

    class Loaded(Exception):
        pass

    def load_checkpoint(path, model_type=None, device="cpu", **kw):
        raise Loaded(device)  # where the model would be moved to the device: stop here

    monkeypatch.setattr(run, "load_checkpoint", load_checkpoint)
    case = project.cases()[0]
    for device, spec_device, expected in (("auto", None, "cuda"), ("cpu", None, "cpu"), ("auto", "cpu", "cpu")):
        spec = {"source": "sam", "prompts_from_reference": 1, **({"device": spec_device} if spec_device else {})}
        with pytest.raises(Loaded) as got:
            loop.make_pseudolabels(project, [case], spec, device=device)
        assert str(got.value) == expected, (device, spec_device)
    with pytest.raises(Loaded) as got:  # the engine API's own default
        run.pseudolabel_with_sam(project, cases=[case], prompts_from_reference=1)
    assert str(got.value) == "cuda"
    from ALSegLib.cluster import RaySpec

    with pytest.raises(Loaded) as got:  # on Ray the driver only checks the model; each worker resolves auto itself
        run.pseudolabel_with_sam(project, cases=[case], prompts_from_reference=1, ray=RaySpec())
    assert str(got.value) == "cpu"
    parser = build_parser()
    assert parser.parse_args(["pseudolabel", "p", "--source", "sam", "--prompts-from-reference", "1"]).device is None
    assert parser.parse_args(["round", "p"]).device == "auto"


def test_post_processing_never_drops_a_component_a_prompt_covers():
    """A structure in two parts (two kidneys, two foci) with the default keep_components=1: each
    prompted part is kept, a smaller prompted part over a larger unprompted one too; what no prompt
    covers is still cut to the largest component."""
    from ALSegLib.pseudolabels import prompts as pr
    from ALSegLib.pseudolabels.run import _assemble, prompted_voxels
    from ALSegLib.pseudolabels.slices import volume_slices

    image = sitk.GetImageFromArray(np.zeros((12, 40, 40), np.float32))
    vs = volume_slices(image, "axial")
    big, small, stray = np.zeros((40, 40), bool), np.zeros((40, 40), bool), np.zeros((40, 40), bool)
    big[5:20, 5:20] = True  # 225 px a slice
    small[25:30, 25:30] = True  # 25 px
    stray[32:36, 2:8] = True  # 24 px, never prompted
    results = {"kidney": {k: pr.SliceResult(big | small | stray, 0.9) for k in range(3, 9)}}
    settings = {"kidney": pr.LabelSettings()}  # keep_components=1, the default
    on_big = pr.SlicePrompt(slice=5, box=(5, 5, 19, 19))
    on_small = pr.SlicePrompt(slice=6, box=(25, 25, 29, 29))
    for given, kept in (((), (big,)), ((on_big,), (big,)), ((on_small,), (small,)), ((on_big, on_small), (big, small))):
        stack, _, _ = _assemble({"kidney": 1}, vs, results, settings, {"kidney": list(given)} if given else None)
        expected = np.zeros((40, 40), bool)
        for part in kept:
            expected |= part
        assert np.array_equal(stack[4] == 1, expected), [p.box for p in given]
        assert not (stack[:3] | stack[9:]).any()
    point = pr.SlicePrompt(slice=7, points=[(27.0, 27.0), (10.0, 10.0)], point_labels=[1, 0])
    covered = prompted_voxels([point], (12, 40, 40))
    assert covered.sum() == 1 and covered[7, 27, 27]  # a negative point covers nothing
    stack, _, _ = _assemble({"kidney": 1}, vs, results, settings, {"kidney": [point]})
    assert np.array_equal(stack[4] == 1, small)
