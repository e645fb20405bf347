"""The label table: the project's foreground classes (unique names, values 1..65535, colours)."""
from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .. import volumes
from ..errors import InputError

RESERVED_LABEL_NAMES = ("mean", "background")
PALETTE = [
    (0.5, 0.68, 0.5), (0.95, 0.84, 0.57), (0.69, 0.48, 0.4), (0.44, 0.72, 0.82), (0.85, 0.4, 0.35),
    (0.56, 0.36, 0.65), (0.9, 0.6, 0.2), (0.3, 0.5, 0.85), (0.86, 0.86, 0.4), (0.4, 0.8, 0.6),
]


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
            color = parse_color(color_text, "--labels", name.strip()) if color_text else PALETTE[i % len(PALETTE)]
            classes.append(LabelClass(name.strip(), value, tuple(color)))
        return cls(classes, where="--labels")

    @classmethod
    def from_mapping(cls, labels: Mapping[str, int], colors: Mapping[str, Sequence[float]] | None = None) -> LabelTable:
        colors = colors or {}
        return cls(
            [LabelClass(n, v, tuple(colors.get(n, PALETTE[i % len(PALETTE)]))) for i, (n, v) in enumerate(labels.items())]
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
