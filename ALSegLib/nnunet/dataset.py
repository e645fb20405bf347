"""The project as an nnU-Net v2 raw dataset.

One label per case, chosen by a policy: ``pseudo`` (pretraining), ``human``
(latest version; fine-tuning and the supervised baseline) or ``human+pseudo``
(human where there is one, else pseudo). Reference labels are never read: the
oracle experiment reveals a reference by storing it as a human label marked
``simulated``. Cases without a label under the policy form the unlabeled pool.

Images are hard-linked from the project (no copy; the project replaces files by
rename, so a link keeps the snapshot it was made from). Label values are mapped
to nnU-Net's consecutive 1..K when the project's table is not already so.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import atomic
from ..errors import InputError
from ..project import Project
from ..store.files import read_json_object
from ..store.ids import check_case_id
from ..store.layout import STORE_EXT
from .env import folders

POLICIES = {"pseudo": ("pseudo",), "human": ("human",), "human+pseudo": ("human", "pseudo")}
ALSEG_META = "alseg_dataset.json"
_DATASET = re.compile(r"^Dataset(\d{3})_(.+)$")


@dataclass(frozen=True)
class Dataset:
    """An exported nnU-Net dataset and what ALSeg knows about it."""

    id: int
    name: str
    folder: Path
    policy: str
    cases: list[str]  # labeled training cases
    pool: list[str]  # cases without a label under the policy (less the excluded ones)
    sources: dict[str, str]  # case -> "human v0002" / "pseudo"
    values: list[int]  # project label value of nnU-Net label i+1
    excluded: list[str]  # cases kept out entirely (e.g. held-out test cases)
    pool_as_ignore: bool = False  # the pool exported with all-ignore labels (semi-supervised)

    @classmethod
    def load(cls, folder: Path) -> Dataset:
        meta = json.loads((folder / ALSEG_META).read_text())
        m = _DATASET.match(folder.name)
        return cls(int(m.group(1)), folder.name, folder, meta["policy"], meta["cases"], meta["pool"], meta["sources"],
                   meta["values"], meta.get("excluded", []), bool(meta.get("pool_as_ignore", False)))


def find_dataset(project: Project, tag: str) -> Dataset | None:
    """The exported dataset named ``Dataset###_<tag>``, if any."""
    raw = folders(project.root).raw
    if raw.is_dir():
        for d in sorted(raw.iterdir()):
            m = _DATASET.match(d.name)
            if m and m.group(2) == tag and (d / ALSEG_META).is_file():
                return Dataset.load(d)
    return None


def _next_id(raw: Path) -> int:
    ids = [int(m.group(1)) for d in raw.iterdir() if (m := _DATASET.match(d.name))] if raw.is_dir() else []
    return max(ids, default=0) + 1


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


SPARSE_FILLS = ("ignore", "pseudo")


def export_dataset(project: Project, policy: str, tag: str, *, pool_as_ignore: bool = False,
                   exclude: Sequence[str] = (), sparse_fill: str = "ignore",
                   fill_unknown: Mapping[str, Sequence[int]] | None = None) -> Dataset:
    """Write ``nnunet/raw/Dataset###_<tag>`` for ``policy``; returns it.

    With ``pool_as_ignore`` (semi-supervised training) the unlabeled cases are
    exported too, with a label map that is nnU-Net's ``ignore`` label everywhere,
    so that nnU-Net preprocesses their images like the labeled ones; they never
    contribute a supervised loss. An export is a snapshot: exporting the same
    tag again returns the existing one. ``exclude``: cases left out entirely, neither
    labeled nor unlabeled (held-out test cases). A sparse human version (only some slices
    annotated, :mod:`..store.sparse`) is exported with nnU-Net's ``ignore`` label on its
    unannotated voxels (no loss comes from them; prediction stays dense), or, with
    ``sparse_fill="pseudo"``, with the case's pseudo-label there (ignore where it has none; with
    ``fill_unknown[case]``, the classes its pseudo-label must not teach, only its other classes' voxels).
    """
    if sparse_fill not in SPARSE_FILLS:
        raise InputError("sparse fill", f"must be one of {', '.join(SPARSE_FILLS)}, not {sparse_fill!r}")
    if policy not in POLICIES:
        raise InputError("--policy", f"must be one of {', '.join(POLICIES)}, not {policy!r}")
    check_case_id(tag)
    existing = find_dataset(project, tag)
    if existing is not None:
        return existing

    excluded = set(exclude)
    chosen: dict[str, tuple[str, int | None]] = {}
    for case in project.cases():
        if case in excluded:
            continue
        for kind in POLICIES[policy]:
            path = project.label_path(case, kind)
            if path is not None:
                chosen[case] = (kind, project.human_versions(case)[-1] if kind == "human" else None)
                break
    if not chosen:
        others = [p for p, kinds in POLICIES.items() if p != policy
                  and any(project.labeled_cases(k) for k in kinds if k not in POLICIES[policy])]
        hint = (f" (cases have {' or '.join(k for p in others[:1] for k in POLICIES[p])} labels: "
                f"--policy {others[0]})") if others else (" (make pseudo-labels first: alseg pseudolabel)"
                                                          if policy == "pseudo" else "")
        raise InputError(project.root, f"no case has a {' or '.join(POLICIES[policy])} label; nothing to train on{hint}")

    raw = folders(project.root).raw
    raw.mkdir(parents=True, exist_ok=True)
    with project.lock(f"export nnU-Net dataset {tag}"):
        ds_id = _next_id(raw)
        if ds_id > 999:
            raise InputError(raw, "more than 999 nnU-Net datasets in this project")
        name = f"Dataset{ds_id:03d}_{tag}"
        tmp = raw / f".{name}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "imagesTr").mkdir(parents=True)
        (tmp / "labelsTr").mkdir()

        values = project.labels.values
        ordered = sorted(values)
        consecutive = ordered == list(range(1, len(ordered) + 1))
        lut = np.zeros(max(ordered) + 1, np.uint8 if len(ordered) < 255 else np.uint16)
        for i, v in enumerate(ordered, start=1):
            lut[v] = i
        ignore = len(ordered) + 1
        pool = sorted(set(project.cases()) - set(chosen) - excluded)
        for case in pool if pool_as_ignore else []:
            _link_or_copy(project.image_path(case), tmp / "imagesTr" / f"{case}_0000{STORE_EXT}")
            geometry = project.geometry(case)
            blank = sitk.Image(geometry.size, sitk.sitkUInt8 if ignore < 256 else sitk.sitkUInt16)
            geometry.apply(blank)
            sitk.WriteImage(blank + ignore, str(tmp / "labelsTr" / f"{case}{STORE_EXT}"), True)
        sparse_cases: dict[str, dict] = {}
        for case, (kind, version) in chosen.items():
            _link_or_copy(project.image_path(case), tmp / "imagesTr" / f"{case}_0000{STORE_EXT}")
            label_file = project.label_path(case, kind, version)
            mask = project.annotation_mask(case, version) if kind == "human" else None
            if mask is not None:
                unknown = (fill_unknown or {}).get(case, ())
                sparse_cases[case] = _write_sparse(project, case, label_file, mask, lut, ignore, sparse_fill,
                                                   tmp / "labelsTr" / f"{case}{STORE_EXT}", unknown)
                if unknown and sparse_fill == "pseudo":
                    sparse_cases[case]["pseudo_unknown"] = [int(v) for v in unknown]
            elif consecutive:
                _link_or_copy(label_file, tmp / "labelsTr" / f"{case}{STORE_EXT}")
            else:
                label = sitk.ReadImage(str(label_file))
                mapped = sitk.GetImageFromArray(lut[sitk.GetArrayViewFromImage(label)])
                mapped.CopyInformation(label)
                sitk.WriteImage(mapped, str(tmp / "labelsTr" / f"{case}{STORE_EXT}"), True)

        by_value = {c.value: c.name for c in project.labels.classes}
        dataset_json = {
            "channel_names": {"0": "CT" if project.modality == "CT" else "MRI"},  # CT -> CT normalisation, else z-score
            "labels": {"background": 0, **{by_value[v]: i for i, v in enumerate(ordered, start=1)},
                       **({"ignore": ignore} if pool_as_ignore or any(v["ignored_voxels"] for v in sparse_cases.values())
                          else {})},
            "numTraining": len(chosen) + (len(pool) if pool_as_ignore else 0),
            "file_ending": STORE_EXT,
            "name": tag,
            "description": f"ALSeg project {project.name}: {policy} labels",
        }
        atomic.write_json(tmp / "dataset.json", dataset_json)
        sources = {}
        for c, (k, v) in chosen.items():
            sources[c] = k
            if k == "human":
                sidecar = project.label_path(c, "human", v).with_suffix(".json")  # provenance() would hash the label
                origin = read_json_object(sidecar).get("source") if sidecar.is_file() else None
                sources[c] = f"human v{v:04d}" + (f" ({origin})" if origin in ("simulated", "human-import") else "")
        meta = {
            "policy": policy, "cases": sorted(chosen), "pool": pool, "pool_as_ignore": pool_as_ignore,
            "sources": sources, "values": ordered, "project": project.name, "excluded": sorted(excluded),
            "sparse": sparse_cases, "sparse_fill": sparse_fill, "ignore_value": ignore,
        }
        atomic.write_json(tmp / ALSEG_META, meta)
        os.replace(tmp, raw / name)
        atomic.fsync_path(raw)
        project.log_event("nnunet_dataset_exported", dataset=name, policy=policy, cases=len(chosen), pool=len(meta["pool"]))
    return Dataset.load(raw / name)


def _write_sparse(project: Project, case: str, label_file, mask: np.ndarray, lut: np.ndarray, ignore: int,
                  fill: str, out, unknown: Sequence[int] = ()) -> dict:
    """A sparse human version as nnU-Net's label map: the annotated voxels in nnU-Net's indices, the
    rest ``ignore`` (or the pseudo-label's indices with ``fill="pseudo"`` where the case has one).
    ``unknown``: project values the pseudo-label must not teach (:mod:`..trust`); with any, only its
    voxels of the other foreground classes fill in (its background may hide an unknown class)."""
    label = sitk.ReadImage(str(label_file))
    values = sitk.GetArrayFromImage(label)
    dtype = np.uint8 if ignore < 256 else np.uint16
    out_arr = np.full(values.shape, ignore, dtype)
    out_arr[mask] = lut[values[mask]]
    filled = 0
    if fill == "pseudo" and project.label_path(case, "pseudo") is not None:
        pseudo = sitk.GetArrayFromImage(project.read_label(case, "pseudo"))
        take = ~mask & ~np.isin(pseudo, [0, *unknown]) if unknown else ~mask
        out_arr[take] = lut[pseudo[take]]
        filled = int(take.sum())
    image = sitk.GetImageFromArray(out_arr)
    image.CopyInformation(label)
    sitk.WriteImage(image, str(out), True)
    return {"annotated_voxels": int(mask.sum()), "ignored_voxels": int((~mask).sum()) - filled,
            "pseudo_filled_voxels": filled}
