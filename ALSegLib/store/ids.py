"""Case (and model) ids: what a name may be, and the id a file's name gives."""
from __future__ import annotations

import os
import re
from collections.abc import Iterable
from pathlib import Path

from .. import volumes
from ..errors import InputError

_CASE_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,126}[A-Za-z0-9_-]$|^[A-Za-z0-9]$")
_WINDOWS_RESERVED = re.compile(r"^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$", re.IGNORECASE)


def check_case_id(case: str) -> str:
    """Refuse ids that could escape the project or clash on disk."""
    if not isinstance(case, str) or not case:
        raise InputError(f"case id {case!r}", "must be a non-empty string")
    if "/" in case or "\\" in case or ".." in case or os.path.isabs(case):
        raise InputError(f"case id {case!r}", "must not contain path separators, '..' or be an absolute path")
    if not _CASE_ID.fullmatch(case):
        raise InputError(f"case id {case!r}", "use letters, digits, '.', '_' and '-' (start with a letter or digit, "
                         "do not end with '.', at most 128 characters)")
    if _WINDOWS_RESERVED.match(case):
        raise InputError(f"case id {case!r}", "is a reserved device name on Windows")
    return case


NNUNET_CHANNEL = "_0000"  # nnU-Net/MSD images are named <case>_0000.nii.gz, their labels <case>.nii.gz


def derive_case_id(source: Path, *, strip_channel: bool = True) -> str:
    """A stable id from a file or DICOM folder name: characters outside
    ``[A-Za-z0-9._-]`` become ``_``, runs of dots collapse, leading dots/dashes go; a file's
    nnU-Net channel suffix ``_0000`` goes, so ``case_0000.nii.gz`` and ``case.nii.gz`` are one case."""
    stem = volumes.strip_extension(source) if source.is_file() or volumes.image_extension(source) else source.name
    if strip_channel and (source.is_file() or volumes.image_extension(source)):
        stem = stem.removesuffix(NNUNET_CHANNEL) or stem
    return case_id_from_name(stem, where=source)


def case_id_from_name(name: str, *, where: object = None) -> str:
    """A case id from any name (a file's stem, a Slicer node's name such as ``3: CT chest``):
    characters outside ``[A-Za-z0-9._-]`` become ``_``, runs of dots collapse, leading
    dots/dashes/underscores go (``3_CT_chest``)."""
    cleaned = re.sub(r"[^A-Za-z0-9._-]", "_", name)
    cleaned = re.sub(r"\.{2,}", ".", cleaned).lstrip("._-")[:128].rstrip(".")
    if not cleaned:
        raise InputError(where if where is not None else f"name {name!r}",
                         "cannot derive a case id from this name; pass one explicitly")
    return check_case_id(cleaned)


def label_index(folder: Path) -> dict[str, list[Path]]:
    """Label files in ``folder`` by the case id their names give."""
    index: dict[str, list[Path]] = {}
    for child in sorted(folder.iterdir()):
        if child.is_file() and not child.name.startswith(".") and volumes.image_extension(child):
            try:
                index.setdefault(derive_case_id(child), []).append(child)
            except InputError:
                continue  # a name no case could have
    return index


def expand_sources(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given; a folder is a DICOM series, or else its image files and
    DICOM-series subfolders (sorted, hidden entries skipped)."""
    out: list[Path] = []
    for raw in paths:
        p = Path(raw)
        if not p.exists():
            raise InputError(p, "file not found")
        if p.is_file():
            if volumes.image_extension(p) is None:
                raise volumes.unsupported_type(p)
            out.append(p)
            continue
        if volumes.is_dicom_folder(p):
            out.append(p)
            continue
        found = []
        for child in sorted(p.iterdir()):
            if child.name.startswith("."):
                continue
            ext = volumes.image_extension(child)
            if child.is_file() and ext and ext != ".seg.nrrd":
                found.append(child)
            elif child.is_dir() and volumes.is_dicom_folder(child):
                found.append(child)
        if not found:
            raise InputError(p, "folder holds no images (.nii, .nii.gz, .nrrd, .mha, .mhd) and no DICOM series")
        out.extend(found)
    return out
