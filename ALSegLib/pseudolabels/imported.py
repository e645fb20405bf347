"""Pseudo-labels made by any other model (TotalSegmentator, an earlier nnU-Net, …).

A folder of label files matched to cases by file name, an optional value
mapping (``5=1,6=2``: the other model's value 5 becomes the project's 1; values
not in the mapping become background and are listed in the provenance), and
the same validation as any label. Every file is read, mapped and checked before
the first one is stored, so a bad file or mapping leaves the project as it was.
"""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import SimpleITK as sitk

from .. import progress, volumes
from ..errors import InputError
from ..project import Project
from ..store.files import sha256_file
from ..store.ids import label_index
from ..store.labels import map_label, parse_mapping  # noqa: F401 (parse_mapping: importable from here too)
from ..store.labels import read_any_label as _read_any_label


def import_pseudolabels(
    project: Project, folder: str | Path, mapping: str | Mapping[int, int] | None = None, *,
    cases: Sequence[str] | None = None, resample: bool = False, model: str | None = None,
) -> list[dict]:
    """Import another model's labels as ``pseudo`` labels; returns one record per case stored."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(folder, "folder of label files not found")
    values = project.labels.values
    lut = parse_mapping(mapping, values) if isinstance(mapping, str) else (dict(mapping) if mapping else None)
    index = label_index(folder)
    if not index:
        raise InputError(folder, "holds no label files (.nii, .nii.gz, .nrrd, .mha)")
    unknown = sorted(c for c in index if not project.has_case(c))
    if unknown and not cases:
        raise InputError(folder, f"label file(s) for case(s) not in the project: {', '.join(unknown[:10])}"
                                 + (" …" if len(unknown) > 10 else "") + " (select cases with --cases)")
    selected = list(cases) if cases else sorted(index)
    for c in selected:
        if c not in index:
            raise InputError(folder, f"no label file for case {c!r}")
        if len(index[c]) > 1:
            raise InputError(folder, f"several label files match case {c!r}: {', '.join(p.name for p in index[c])}")
    staged = []
    seen_sources: set[int] = set()
    for case in progress.track(selected, desc="checking imported labels"):
        path = index[case][0]
        img = _read_any_label(path)
        geometry = project.geometry(case)
        resampled = False
        diffs = geometry.differences(volumes.Geometry.of(img))
        if diffs:
            if not resample:
                raise InputError(path, f"grid differs from case {case!r}'s image ({'; '.join(diffs)}); "
                                       "pass --resample to resample it (nearest neighbour) onto the image grid")
            img = sitk.Resample(img, project.read_image(case), sitk.Transform(), sitk.sitkNearestNeighbor, 0,
                                img.GetPixelID())
            resampled = True
        mapped, dropped, present = map_label(img, lut, path, values)
        seen_sources |= present
        mapped = volumes.validate_label(mapped, str(path), label_values=values, geometry=geometry)
        staged.append((case, path, mapped, dropped, resampled))
    if lut is not None:
        unused = sorted(set(lut) - seen_sources)
        if unused and len(unused) == len(lut):
            raise InputError("--map", f"none of the mapped values ({', '.join(map(str, unused))}) occurs in the label files "
                                      f"of {folder}; values present: {', '.join(map(str, sorted(seen_sources))) or 'none'}")
    out = []
    for case, path, mapped, dropped, resampled in staged:
        produced_by = {"file": str(path.resolve()), "sha256": sha256_file(path)}
        if model:
            produced_by["model"] = model
        project.write_label(case, "pseudo", mapped, source="import", produced_by=produced_by,
                            mapping={str(k): v for k, v in lut.items()} if lut else None,
                            dropped_values={str(k): n for k, n in dropped.items()}, resampled=resampled)
        out.append({"case": case, "file": str(path), "dropped_values": dropped, "resampled": resampled})
    return out
