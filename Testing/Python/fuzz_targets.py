"""Fuzz targets: the readers of everything a user or another tool hands to ALSeg.

Each target feeds one generated input to the real reader and accepts exactly two
outcomes: a result, or an :class:`InputError` (the clean error the CLI turns into
exit code 2). Anything else propagates and is a finding. ``test_fuzz.py`` runs them
with a small hypothesis budget; ``Testing/Benchmarks/bench_reliability.py`` with a
large one, counting examples.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import SimpleITK as sitk
from hypothesis import strategies as st

from ALSegLib import phantoms, rounds, volumes
from ALSegLib.errors import InputError
from ALSegLib.project import LabelTable, Project
from ALSegLib.pseudolabels import prompts as pr
from ALSegLib.pseudolabels.slices import volume_slices

LABELS = LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS)
CASES = ["case0", "case1"]
_FORMATS = (".nii.gz", ".nii", ".nrrd", ".mha")


def _seed_files() -> dict[str, bytes]:
    """Small valid image and label files in every supported format: the fuzzers mutate these."""
    image, label = phantoms.make_phantom(0, "CT", seed=0, size=12)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for ext in _FORMATS:
            for kind, img in (("image", image), ("label", label)):
                path = Path(tmp) / f"{kind}{ext}"
                sitk.WriteImage(img, str(path), ext == ".nii.gz")
                out[f"{kind}{ext}"] = path.read_bytes()
    return out


SEEDS = _seed_files()


def mutated_files():
    """(file name, bytes): a seed file cut short, with bytes overwritten, and/or bytes inserted."""
    return st.tuples(
        st.sampled_from(sorted(SEEDS)),
        st.lists(st.tuples(st.floats(0, 1, exclude_max=True), st.binary(min_size=1, max_size=8)), max_size=6),
        st.one_of(st.none(), st.floats(0, 1)),
        st.booleans(),
    ).map(_mutate)


def _mutate(spec):
    name, edits, cut, insert = spec
    data = bytearray(SEEDS[name])
    for where, chunk in edits:
        at = int(where * len(data))
        if insert:
            data[at:at] = chunk
        else:
            data[at : at + len(chunk)] = chunk
    if cut is not None:
        data = data[: int(cut * len(data))]
    return name, bytes(data)


def read_volume(name: str, data: bytes, folder: Path) -> str:
    """The image or label reader on fuzzed bytes: 'ok' or 'error'."""
    path = folder / name
    path.write_bytes(data)
    try:
        if name.startswith("label"):
            volumes.read_label(path, label_values=LABELS.values)
        else:
            volumes.read_image(path)
        return "ok"
    except InputError:
        return "error"


JSON = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


def _valid_prompt_file() -> dict:
    return {"space": "index", "axis": "axial", "comment": "fuzz seed",
            "labels": {"organ": {"window": [40, 400], "min_iou": 0.5}},
            "cases": {"case0": {"organ": [{"box": [[2, 2, 5], [9, 9, 5]]}, {"points": [[5, 5, 5]], "negative": [[1, 1, 5]]}]}}}


def _valid_config() -> dict:
    return {"schema": 1, "name": "fuzz", "modality": "CT", "labels": LABELS.to_json(), "created": "2026-01-01T00:00:00+00:00"}


def _valid_round() -> dict:
    return {"round": 1, "created": "2026-01-01T00:00:00+00:00", "stages": {"select": {"done": True}},
            "queue": [{"case": "case0", "score": 0.5, "reason": "uncertain"}]}


def _paths(obj, prefix=()):
    """Every key path of a nested JSON object (dict keys and list indices)."""
    yield prefix
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _paths(v, (*prefix, k))
    elif isinstance(obj, list):
        for i, v in enumerate(obj):
            yield from _paths(v, (*prefix, i))


def _replace(obj, path, value):
    if not path:
        return value
    obj = json.loads(json.dumps(obj))
    node = obj
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    return obj


def json_documents(valid: dict):
    """Whole random JSON, the valid document with one part replaced by random JSON, or
    the valid document's text cut short."""
    paths = list(_paths(valid))
    text = json.dumps(valid)
    return st.one_of(
        JSON.map(json.dumps),
        st.tuples(st.sampled_from(paths), JSON).map(lambda pv: json.dumps(_replace(valid, *pv))),
        st.integers(0, len(text)).map(lambda n: text[:n]),
    )


PROMPT_DOCUMENTS = json_documents(_valid_prompt_file())
CONFIG_DOCUMENTS = json_documents(_valid_config())
ROUND_DOCUMENTS = json_documents(_valid_round())


def read_prompts(text: str, folder: Path) -> str:
    path = folder / "prompts.json"
    path.write_text(text)
    try:
        pf = pr.read_prompt_file(path, list(LABELS.mapping), CASES)
    except InputError:
        return "error"
    image = sitk.Image([12, 12, 12], sitk.sitkInt16)
    try:  # the per-case step maps the prompts onto an image's slices
        pr.case_prompts(pf, "case0", image, volume_slices(image, pf.axis)) if "case0" in pf.cases else None
        return "ok"
    except InputError:
        return "error"


def _project(folder: Path) -> Path:
    root = folder / "project"
    if not root.exists():
        Project.create(root, LABELS, "CT")
    return root


def open_project(text: str, folder: Path) -> str:
    root = _project(folder)
    saved = (root / "alseg.json").read_bytes()
    (root / "alseg.json").write_text(text)
    try:
        Project.open(root).status()
        return "ok"
    except InputError:
        return "error"
    finally:
        (root / "alseg.json").write_bytes(saved)


def read_round(text: str, folder: Path) -> str:
    root = _project(folder)
    (root / "rounds" / "0001").mkdir(parents=True, exist_ok=True)
    (root / "rounds" / "0001" / "round.json").write_text(text)
    project = Project.open(root)
    try:
        rounds.read_round(project, 1)
        rounds.queue_items(project)
        return "ok"
    except InputError:
        return "error"


TARGETS = {
    "volume_reader": (mutated_files(), lambda v, f: read_volume(*v, f)),
    "prompt_parser": (PROMPT_DOCUMENTS, read_prompts),
    "project_loader": (CONFIG_DOCUMENTS, open_project),
    "round_loader": (ROUND_DOCUMENTS, read_round),
}
