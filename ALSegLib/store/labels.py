"""The label table: the project's foreground classes (unique names, values 1..65535, colours)."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from .. import volumes
from ..errors import InputError

RESERVED_LABEL_NAMES = ("mean", "background")
PALETTE = [
    (0.5, 0.68, 0.5), (0.95, 0.84, 0.57), (0.69, 0.48, 0.4), (0.44, 0.72, 0.82), (0.85, 0.4, 0.35),
    (0.56, 0.36, 0.65), (0.9, 0.6, 0.2), (0.3, 0.5, 0.85), (0.86, 0.86, 0.4), (0.4, 0.8, 0.6),
]

# Colours of known structures, from 3D Slicer's GenericAnatomyColors table (0-255 RGB), so that a liver
# is liver-coloured in Slicer and in the reports; a name not listed takes the next colour of PALETTE.
ANATOMY_COLORS = {
    "liver": (221, 130, 101), "spleen": (157, 108, 162), "pancreas": (249, 180, 111), "stomach": (216, 132, 105),
    "gallbladder": (139, 150, 98), "kidney": (185, 102, 83), "right_kidney": (185, 102, 83),
    "left_kidney": (185, 102, 83), "adrenal_gland": (249, 186, 150), "right_adrenal_gland": (249, 186, 150),
    "left_adrenal_gland": (249, 186, 150), "aorta": (224, 97, 76), "heart": (206, 110, 84), "lung": (197, 165, 145),
    "right_lung": (197, 165, 145), "left_lung": (197, 165, 145), "trachea": (182, 228, 255),
    "esophagus": (211, 171, 143), "duodenum": (255, 253, 229), "small_bowel": (205, 167, 142), "colon": (204, 168, 143),
    "urinary_bladder": (222, 154, 132), "bladder": (222, 154, 132), "prostate": (230, 158, 140),
    "uterus": (255, 181, 158), "thyroid_gland": (62, 162, 114), "thyroid": (62, 162, 114), "brain": (250, 250, 225),
    "bone": (241, 214, 145), "muscle": (192, 104, 88), "fat": (230, 220, 70), "skin": (177, 122, 101),
    "vein": (0, 151, 206), "artery": (216, 101, 79), "mass": (144, 238, 144),
    "tumor": (144, 238, 144), "tumour": (144, 238, 144), "cyst": (205, 205, 100),
    "left_ventricle": (152, 55, 13), "right_ventricle": (181, 85, 57), "left_atrium": (203, 108, 81),
    "right_atrium": (210, 115, 89), "spinal_cord": (244, 214, 49),
}


def default_color(name: str, index: int) -> tuple[float, float, float]:
    """A known structure's colour (``kidney_left``, ``Left kidney`` and ``left_kidney`` are one name), else
    the ``index``-th colour of :data:`PALETTE`."""
    key = re.sub(r"[\s-]+", "_", name.strip().lower())
    parts = key.split("_")
    if len(parts) == 2 and parts[1] in ("left", "right"):  # TotalSegmentator's kidney_left
        key = f"{parts[1]}_{parts[0]}"
    rgb = ANATOMY_COLORS.get(key)
    return tuple(round(c / 255, 4) for c in rgb) if rgb else PALETTE[index % len(PALETTE)]


@dataclass(frozen=True)
class LabelClass:
    name: str
    value: int
    color: tuple[float, float, float]


class LabelTable:
    """Foreground classes: unique names, unique integer values 1..65535 (0 is background)."""

    def __init__(self, classes: Sequence[LabelClass], where: str = "label table"):
        if not classes:
            raise InputError(where, "needs at least one label (NAME=VALUE)")
        names: dict[str, str] = {}
        values: dict[int, str] = {}
        for c in classes:
            if (not isinstance(c.name, str) or not re.fullmatch(r"[^=,:|\s][^=,:|\x00-\x1f\x7f]*", c.name)
                    or c.name != c.name.strip()):
                raise InputError(where, f"invalid label name {c.name!r} (no '=', ',', ':', '|' or control characters)")
            if c.name.lower() in RESERVED_LABEL_NAMES:
                raise InputError(where, f"label name {c.name!r} is reserved")
            if c.name.lower() in names:
                raise InputError(where, f"duplicate label name {c.name!r}")
            if isinstance(c.value, bool) or not isinstance(c.value, int):
                raise InputError(where, f"label value of {c.name!r} must be an integer, got {c.value!r}")
            if c.value == 0:
                raise InputError(where, f"label {c.name!r} has value 0, which is reserved for background")
            if not 0 < c.value <= 65535:
                raise InputError(where, f"label value {c.value} of {c.name!r} is outside 1..65535")
            if c.value in values:
                raise InputError(where, f"duplicate label value {c.value} ({values[c.value]!r} and {c.name!r})")
            if len(c.color) != 3 or not all(isinstance(v, (int, float)) and 0 <= v <= 1 for v in c.color):
                raise InputError(where, f"color of {c.name!r} must be three numbers in [0, 1]")
            names[c.name.lower()] = c.name
            values[c.value] = c.name
        self.classes = tuple(classes)

    @classmethod
    def parse(cls, spec: str) -> LabelTable:
        """``NAME=VALUE[:#RRGGBB],...`` as given on the command line."""
        classes = []
        for i, item in enumerate(s.strip() for s in spec.split(",")):
            if "=" not in item:
                raise InputError("--labels", f"expected NAME=VALUE, got {item!r}")
            name, _, rest = item.partition("=")
            value_text, _, color_text = rest.partition(":")
            try:
                value = int(value_text.strip())
            except ValueError:
                raise InputError("--labels", f"label value of {name.strip()!r} must be an integer, "
                                             f"got {value_text.strip()!r}") from None
            color = parse_color(color_text, "--labels", name.strip()) if color_text else default_color(name, i)
            classes.append(LabelClass(name.strip(), value, tuple(color)))
        return cls(classes, where="--labels")

    @classmethod
    def from_mapping(cls, labels: Mapping[str, int], colors: Mapping[str, Sequence[float]] | None = None) -> LabelTable:
        colors = colors or {}
        return cls(
            [LabelClass(n, v, tuple(colors.get(n, default_color(n, i)))) for i, (n, v) in enumerate(labels.items())]
        )

    @classmethod
    def from_json(cls, items: object, where: str) -> LabelTable:
        if not isinstance(items, list):
            raise InputError(where, "'labels' must be a list of {name, value, color}")
        classes = []
        for item in items:
            if not isinstance(item, dict) or not {"name", "value"} <= item.keys():
                raise InputError(where, f"malformed label entry {item!r}")
            color = item.get("color", PALETTE[len(classes) % len(PALETTE)])
            if not isinstance(color, list | tuple):
                raise InputError(where, f"malformed color in label entry {item!r}")
            classes.append(LabelClass(str(item["name"]), item["value"], tuple(color)))
        return cls(classes, where=where)

    def updated(self, rename: Mapping[str, str] | None = None, colors: Mapping[str, Sequence[float]] | None = None,
                where: str = "label table") -> LabelTable:
        """A copy with classes renamed and/or recolored; values never change, so stored
        labels and trained models stay valid. Unknown names are refused."""
        rename, colors = dict(rename or {}), dict(colors or {})
        known = {c.name for c in self.classes}
        for name in [*rename, *colors]:
            if name not in known:
                raise InputError(where, f"no label named {name!r} (labels: {', '.join(sorted(known))})")
        return LabelTable([LabelClass(rename.get(c.name, c.name), c.value, tuple(colors.get(c.name, c.color)))
                           for c in self.classes], where=where)

    def to_json(self) -> list[dict]:
        return [{"name": c.name, "value": c.value, "color": list(c.color)} for c in self.classes]

    @property
    def mapping(self) -> dict[str, int]:
        return {c.name: c.value for c in self.classes}

    @property
    def values(self) -> list[int]:
        return [c.value for c in self.classes]

    def segments(self) -> list[volumes.Segment]:
        return [volumes.Segment(c.name, c.value, c.color) for c in self.classes]


def parse_color(text: str, where: str, name: str) -> tuple[float, float, float]:
    """``#RRGGBB`` as three numbers in [0, 1]."""
    text = text.strip()
    if not re.fullmatch(r"#[0-9a-fA-F]{6}", text):
        raise InputError(where, f"color of {name!r} must look like #RRGGBB, got {text!r}")
    return tuple(int(text[k : k + 2], 16) / 255 for k in (1, 3, 5))


# --- value mappings: another tool's label values to the project's ------------------------------

_ITEM = re.compile(r"^\s*(\d+)\s*=\s*(\d+)\s*$")


def parse_mapping(text: str, project_values: Sequence[int], where: str = "--map") -> dict[int, int]:
    """``"5=1,6=2"`` -> {5: 1, 6: 2}. Targets must be the project's label values (or 0 to drop a value)."""
    if not isinstance(text, str) or not text.strip():
        raise InputError(where, "empty mapping; write SOURCE=TARGET pairs, e.g. 5=1,6=2")
    mapping: dict[int, int] = {}
    for item in text.split(","):
        m = _ITEM.match(item)
        if not m:
            raise InputError(where, f"cannot read {item.strip()!r}; write SOURCE=TARGET with whole numbers, e.g. 5=1")
        src, dst = int(m.group(1)), int(m.group(2))
        if src == 0:
            raise InputError(where, f"{item.strip()!r}: background (0) cannot be mapped")
        if src in mapping:
            raise InputError(where, f"value {src} is mapped twice ({src}={mapping[src]} and {src}={dst})")
        if dst != 0 and dst not in project_values:
            raise InputError(where, f"{item.strip()!r}: {dst} is not a label value of the project "
                                    f"(values: {', '.join(map(str, project_values))}; 0 drops a value)")
        mapping[src] = dst
    return mapping


def read_any_label(path: Path) -> sitk.Image:
    img = volumes.read_image(path)
    arr = sitk.GetArrayViewFromImage(img)
    if arr.dtype.kind == "f":
        if not np.all(np.isfinite(arr)) or not np.all(arr == np.round(arr)):
            raise InputError(path, "label file holds non-integer values")
    if arr.size and arr.min() < 0:
        raise InputError(path, f"label file holds negative values (min {arr.min()})")
    return img


def map_label(img: sitk.Image, mapping: Mapping[int, int] | None, path: Path,
              project_values: Sequence[int]) -> tuple[sitk.Image, dict[int, int], set[int]]:
    """Apply a value mapping; returns the mapped label, the voxel counts of values dropped to
    background, and the non-zero values the file holds."""
    arr = sitk.GetArrayFromImage(img)
    values, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)  # one pass, any value range
    present = {int(v): int(n) for v, n in zip(values, counts) if v != 0}
    if mapping is None:
        bad = [v for v in present if v not in project_values]
        if bad:
            raise InputError(path, f"holds value(s) {', '.join(map(str, bad[:10]))} that are not label values of the project "
                                   f"({', '.join(map(str, project_values))}); give --map SOURCE=TARGET,...")
        new_values = values.astype(np.uint16)
        dropped: dict[int, int] = {}
    else:
        new_values = np.array([mapping.get(int(v), 0) for v in values], np.uint16)
        dropped = {v: n for v, n in present.items() if mapping.get(v, 0) == 0}
    out = new_values[inverse.reshape(arr.shape)]
    mapped = sitk.GetImageFromArray(out)
    mapped.CopyInformation(img)
    return mapped, dropped, set(present)
