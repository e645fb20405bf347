"""Prompts for SAM on volumes: prompt files, slice-to-slice propagation, automatic mode, prior labels.

Prompt file (JSON)::

    {
      "space": "RAS",                      # RAS (Slicer), LPS (ITK/DICOM) or index (i, j, k voxels)
      "axis": "axial",                     # optional; axial, coronal or sagittal
      "labels": {                          # optional settings per label name
        "organ": {"window": "soft_tissue", # or [width, level] or {"percentile": [0.5, 99.5]}
                  "keep_components": 1, "fill_holes": true, "min_island_mm3": 0,
                  "min_iou": 0.5, "min_area_ratio": 0.2, "max_area_ratio": 3.0},
        "myocardium": {"minus": ["cavity"]},   # a ring: the region of its box minus label "cavity"
        "lesion": {"inside": "organ"}          # kept only inside label "organ" (its holes filled)
      },
      "cases": {
        "case_001": {
          "organ": [
            {"box": [[x0, y0, z], [x1, y1, z]]},                 # two corners on one slice
            {"box": [[x0, y0, z0], [x1, y1, z1]]},               # a 3D box (Slicer's ROI): its middle slice,
                                                                   # propagated within slices z0..z1 only
            {"points": [[x, y, z]], "negative": [[x, y, z]]},   # clicks on one slice
            {"box": [...], "points": [...]}                       # both, on one slice
          ]
        }
      }
    }

Each entry is one prompt on one slice; from each, the mask is propagated slice
by slice: the previous slice's mask gives the next box (with a margin) and a
positive point inside it, until the predicted IoU drops below ``min_iou`` or the
area collapses (< ``min_area_ratio`` × previous) or explodes (> ``max_area_ratio`` ×).
Several prompts of one label on different slices re-anchor the propagation: a
track stops where it meets another prompted slice's mask.

Label relations (per label, in the prompt file's ``labels`` or a settings file):
``minus`` (labels whose masks are cut out of this one, slice by slice: a box
around a ring-shaped structure such as the myocardium comes back filled, and the
cavity's own mask is removed from it) and ``inside`` (a label this one must lie
in). Prompts from a reference label (:func:`reference_prompts`, experiments
only): N boxes per structure per case, the first on the slice where it is
largest, more spread along its extent.

Automatic mode (``--auto [FILE]``): a grid of point prompts on every slice,
each mask kept if its predicted IoU, area (mm²), mean intensity and position
pass the label's filters (``{"labels": {"organ": {"auto": {...}}}}``, see
:class:`AutoSettings`). Prior mode (``--from-labels DIR``): a box and a centre
point per 2D connected component of a coarse label, slice by slice.
"""
from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from ..errors import InputError
from ..store.files import read_json_object
from .postprocess import PostProcess
from .sam import MaskDecoder, SliceEmbeddings
from .slices import AXES, VolumeSlices, Window, parse_window, physical_to_array_index

SPACES = ("RAS", "LPS", "index")


# ---------------------------------------------------------------------------------------
# settings


@dataclass(frozen=True)
class Propagation:
    min_iou: float = 0.5
    min_area_ratio: float = 0.2
    max_area_ratio: float = 3.0
    min_area_px: int = 4
    margin: float | None = None  # box margin as a fraction of the previous mask's box side; None: the model's own
    min_margin_px: int | None = None  # raw pixels; None: the model's own (see default_min_margin)
    max_steps: int | None = None  # slices per direction; None: until a stop rule
    between: str = "mask"  # between two prompted slices: "mask" (box from the previous mask) or "interpolate"

    @classmethod
    def from_json(cls, obj: Mapping, where: str, base: Propagation | None = None) -> Propagation:
        base = base or cls()
        kw = {}
        for name, lo, hi in (("min_iou", 0.0, 1.0), ("min_area_ratio", 0.0, 1.0), ("max_area_ratio", 1.0, float("inf")),
                             ("margin", 0.0, 2.0)):
            if name in obj:
                kw[name] = _number(obj[name], f"{where}.{name}", lo, hi)
        for name in ("min_area_px", "min_margin_px", "max_steps"):
            if name in obj:
                v = obj[name]
                if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                    raise InputError(where, f"{name} must be a whole number >= 0, not {v!r}")
                kw[name] = v
        if "between" in obj:
            if obj["between"] not in ("mask", "interpolate"):
                raise InputError(f"{where}.between", f"must be \"mask\" or \"interpolate\", not {obj['between']!r}")
            kw["between"] = obj["between"]
        return replace(base, **kw)


@dataclass(frozen=True)
class AutoSettings:
    """Filters for automatic (grid-prompt) mode, per label."""

    grid: int = 16  # points per side of the slice
    min_iou: float = 0.7
    intensity: tuple[float, float] | None = None  # raw units (HU for CT): prompt points and mask mean
    area_mm2: tuple[float, float] | None = None
    region: tuple[tuple[float, float], tuple[float, float], tuple[float, float]] = ((0, 1), (0, 1), (0, 1))  # i, j, k fractions

    @classmethod
    def from_json(cls, obj: Mapping, where: str) -> AutoSettings:
        if not isinstance(obj, Mapping):
            raise InputError(where, "auto settings must be an object")
        unknown = set(obj) - {"grid", "min_iou", "intensity", "area_mm2", "region"}
        if unknown:
            raise InputError(where, f"unknown auto setting(s): {', '.join(sorted(unknown))}")
        kw: dict = {}
        if "grid" in obj:
            if not isinstance(obj["grid"], int) or isinstance(obj["grid"], bool) or not 1 <= obj["grid"] <= 128:
                raise InputError(where, f"grid must be a whole number 1..128, not {obj['grid']!r}")
            kw["grid"] = obj["grid"]
        if "min_iou" in obj:
            kw["min_iou"] = _number(obj["min_iou"], f"{where}.min_iou", 0, 1)
        for name in ("intensity", "area_mm2"):
            if name in obj:
                kw[name] = _range(obj[name], f"{where}.{name}")
        if "region" in obj:
            reg = obj["region"]
            if not isinstance(reg, Mapping) or set(reg) - {"i", "j", "k"}:
                raise InputError(f"{where}.region", "must be an object with optional i, j, k ranges of fractions [lo, hi]")
            kw["region"] = tuple(_range(reg.get(a, [0, 1]), f"{where}.region.{a}", 0, 1) for a in "ijk")
        return cls(**kw)


def _number(v, where: str, lo: float = float("-inf"), hi: float = float("inf")) -> float:
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not lo <= v <= hi:
        raise InputError(where, f"must be a number in [{lo:g}, {hi:g}], not {v!r}")
    return float(v)


def _range(v, where: str, lo: float = float("-inf"), hi: float = float("inf")) -> tuple[float, float]:
    if not (isinstance(v, (list, tuple)) and len(v) == 2):
        raise InputError(where, f"must be [low, high], not {v!r}")
    a, b = _number(v[0], where, lo, hi), _number(v[1], where, lo, hi)
    if a > b:
        raise InputError(where, f"low {a:g} is above high {b:g}")
    return a, b


@dataclass(frozen=True)
class LabelSettings:
    window: Window | None = None  # None: the project's default for its modality
    post: PostProcess = PostProcess()
    propagation: Propagation = Propagation()
    auto: AutoSettings | None = None
    minus: tuple[str, ...] = ()  # labels cut out of this one (a ring around them)
    inside: str | None = None  # the label this one lies in

    def related(self) -> list[str]:
        return [*self.minus, *([self.inside] if self.inside else [])]


_LABEL_KEYS = {"window", "keep_components", "fill_holes", "min_island_mm3", "auto", "minus", "inside",
               "min_iou", "min_area_ratio", "max_area_ratio", "min_area_px", "margin", "min_margin_px", "max_steps",
               "between"}


def _relations(spec: Mapping, name: str, label_names: Sequence[str], where: str) -> tuple[tuple[str, ...], str | None]:
    minus = spec.get("minus", [])
    if isinstance(minus, str):
        minus = [minus]
    if not isinstance(minus, list) or not all(isinstance(m, str) for m in minus):
        raise InputError(f"{where}.minus", f"must be a label name or a list of label names, not {minus!r}")
    inside = spec.get("inside")
    if inside is not None and not isinstance(inside, str):
        raise InputError(f"{where}.inside", f"must be a label name, not {inside!r}")
    for key, other in [("minus", m) for m in minus] + ([("inside", inside)] if inside else []):
        if other not in label_names:
            raise InputError(f"{where}.{key}", f"unknown label {other!r}; the project's labels are {', '.join(label_names)}")
        if other == name:
            raise InputError(f"{where}.{key}", f"a label cannot be related to itself ({name!r})")
    if inside and inside in minus:
        raise InputError(where, f"{inside!r} is both 'inside' and 'minus'")
    return tuple(dict.fromkeys(minus)), inside


def _check_acyclic(out: Mapping[str, LabelSettings], where: str) -> None:
    """Relations are applied from independent labels up: a cycle (a minus b, b inside a) has no order."""
    state: dict[str, int] = {}

    def visit(n: str, path: list[str]) -> None:
        if state.get(n) == 2:
            return
        if state.get(n) == 1:
            raise InputError(where, f"label relations form a cycle: {' -> '.join([*path, n])}")
        state[n] = 1
        for m in out[n].related() if n in out else []:
            visit(m, [*path, n])
        state[n] = 2

    for n in out:
        visit(n, [])


def relation_order(settings: Mapping[str, LabelSettings], names: Sequence[str]) -> list[str]:
    """``names`` ordered so that every label comes after the labels it is related to."""
    done: list[str] = []

    def visit(n: str) -> None:
        if n in done:
            return
        s = settings.get(n)
        for m in s.related() if s else []:
            if m in names:
                visit(m)
        done.append(n)

    for n in names:
        visit(n)
    return done


def parse_label_settings(obj: Mapping, label_names: Sequence[str], where: str) -> dict[str, LabelSettings]:
    if not isinstance(obj, Mapping):
        raise InputError(where, "'labels' must be an object keyed by label name")
    out = {}
    for name, spec in obj.items():
        w = f"{where}.{name}"
        if name not in label_names:
            raise InputError(w, f"unknown label {name!r}; the project's labels are {', '.join(label_names)}")
        if not isinstance(spec, Mapping):
            raise InputError(w, "label settings must be an object")
        unknown = set(spec) - _LABEL_KEYS
        if unknown:
            raise InputError(w, f"unknown setting(s): {', '.join(sorted(unknown))}")
        minus, inside = _relations(spec, name, label_names, w)
        out[name] = LabelSettings(
            window=parse_window(spec["window"], f"{w}.window") if "window" in spec else None,
            post=PostProcess.from_json(spec, w),
            propagation=Propagation.from_json(spec, w),
            auto=AutoSettings.from_json(spec["auto"], f"{w}.auto") if "auto" in spec else None,
            minus=minus, inside=inside,
        )
    _check_acyclic(out, where)
    return out


# ---------------------------------------------------------------------------------------
# prompt files


@dataclass
class SlicePrompt:
    """One prompt on one slice, in slice pixels (x = column, y = row)."""

    slice: int
    box: tuple[float, float, float, float] | None = None  # x0, y0, x1, y1 (covered pixels)
    points: list[tuple[float, float]] = field(default_factory=list)
    point_labels: list[int] = field(default_factory=list)
    source: str = ""  # where in the prompt file
    range: tuple[int, int] | None = None  # a 3D box's slices: propagation never leaves them

    def to_json(self) -> dict:
        out: dict = {"slice": self.slice}
        if self.range is not None:
            out["range"] = list(self.range)
        if self.box is not None:
            out["box"] = [round(v, 2) for v in self.box]
        if self.points:
            out["points"] = [[round(x, 2), round(y, 2)] for x, y in self.points]
            out["point_labels"] = list(self.point_labels)
        return out


@dataclass
class PromptFile:
    path: Path
    space: str
    axis: str
    labels: dict[str, LabelSettings]
    cases: dict[str, dict[str, list[dict]]]  # raw entries, checked against each image in :func:`case_prompts`


def read_prompt_file(path: str | Path, label_names: Sequence[str], case_ids: Sequence[str]) -> PromptFile:
    """Parse and check a prompt file's structure (coordinates are checked per image later)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "prompt file not found")
    obj = read_json_object(path)
    unknown = set(obj) - {"space", "axis", "labels", "cases", "comment"}
    if unknown:
        raise InputError(path, f"unknown key(s): {', '.join(sorted(unknown))}")
    space = obj.get("space", "RAS")
    if space not in SPACES:
        raise InputError(f"{path}: space", f"must be one of {', '.join(SPACES)}, not {space!r}")
    axis = obj.get("axis", "axial")
    if axis not in AXES:
        raise InputError(f"{path}: axis", f"must be one of {', '.join(AXES)}, not {axis!r}")
    labels = parse_label_settings(obj.get("labels", {}), label_names, f"{path}: labels")
    cases = obj.get("cases")
    if not isinstance(cases, dict) or not cases:
        raise InputError(f"{path}: cases", "must be a non-empty object keyed by case id")
    known = set(case_ids)
    for case, per_label in cases.items():
        w = f"{path}: cases.{case}"
        if case not in known:
            raise InputError(w, f"no case {case!r} in the project")
        if not isinstance(per_label, dict) or not per_label:
            raise InputError(w, "must be an object keyed by label name")
        for name, entries in per_label.items():
            if name not in label_names:
                raise InputError(f"{w}.{name}", f"unknown label {name!r}; the project's labels are {', '.join(label_names)}")
            if not isinstance(entries, list) or not entries:
                raise InputError(f"{w}.{name}", "must be a non-empty list of prompts")
            for i, e in enumerate(entries):
                if not isinstance(e, dict) or not ({"box", "points"} & set(e)) or set(e) - {"box", "points", "negative"}:
                    raise InputError(f"{w}.{name}[{i}]", "a prompt is {\"box\": [[x,y,z],[x,y,z]]} and/or "
                                                         "{\"points\": [[x,y,z], ...]}, with optional \"negative\" points")
                for key in ("box", "points", "negative"):
                    if key in e and not _is_points(e[key]):
                        raise InputError(f"{w}.{name}[{i}].{key}", "must be a list of [x, y, z] number triples")
                if "box" in e and len(e["box"]) != 2:
                    raise InputError(f"{w}.{name}[{i}].box", "needs exactly two corners")
    return PromptFile(path, space, axis, labels, cases)


def _is_points(v) -> bool:
    return (isinstance(v, list) and len(v) > 0 and all(
        isinstance(p, list) and len(p) == 3
        and all(isinstance(c, (int, float)) and not isinstance(c, bool) and np.isfinite(c) for c in p)
        for p in v))


def case_prompts(pf: PromptFile, case: str, image: sitk.Image, vs: VolumeSlices) -> dict[str, list[SlicePrompt]]:
    """The prompt file's entries for one case, as slice prompts; every coordinate checked against the image."""
    out: dict[str, list[SlicePrompt]] = {}
    for name, entries in pf.cases.get(case, {}).items():
        for i, e in enumerate(entries):
            where = f"{pf.path}: cases.{case}.{name}[{i}]"
            located: list[tuple[str, int, float, float]] = []
            for key in ("box", "points", "negative"):
                for p in e.get(key, []):
                    k, x, y = vs.locate(physical_to_array_index(image, p, pf.space))
                    rows, cols = vs.size
                    if not (0 <= k < vs.n and -0.5 <= x <= cols - 0.5 and -0.5 <= y <= rows - 0.5):
                        raise InputError(where, f"{key} point {p} ({pf.space}) lies outside the image of case {case!r}")
                    located.append((key, k, x, y))
            box_slices = sorted({k for key, k, _, _ in located if key == "box"})
            point_slices = sorted({k for key, k, _, _ in located if key != "box"})
            span = None
            if len(box_slices) == 2:  # a 3D box: its corners on two slices give the range
                span = (box_slices[0], box_slices[1])
                if len(point_slices) > 1 or (point_slices and not span[0] <= point_slices[0] <= span[1]):
                    raise InputError(where, f"the points of a 3D box prompt must lie on one {pf.axis} slice inside "
                                            f"the box (slices {span[0]}..{span[1]}); they fall on {point_slices}")
                slices = point_slices or [(span[0] + span[1]) // 2]
            else:
                slices = sorted(set(box_slices) | set(point_slices))
            if len(slices) != 1:
                raise InputError(where, f"a prompt must lie on one {pf.axis} slice (or be a 3D box); its points fall on "
                                        f"slices {slices}")
            prompt = SlicePrompt(slice=slices[0], source=f"cases.{case}.{name}[{i}]", range=span)
            corners = [(x, y) for key, _, x, y in located if key == "box"]
            if corners:
                (xa, ya), (xb, yb) = corners
                prompt.box = (min(xa, xb), min(ya, yb), max(xa, xb), max(ya, yb))
            for key, _, x, y in located:
                if key != "box":
                    prompt.points.append((x, y))
                    prompt.point_labels.append(1 if key == "points" else 0)
            out.setdefault(name, []).append(prompt)
    return out


# ---------------------------------------------------------------------------------------
# per-slice results


@dataclass
class SliceResult:
    mask: np.ndarray  # (rows, cols) bool
    iou: float


def _box_of(mask: np.ndarray, margin: float, min_margin: int) -> tuple[float, float, float, float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    y0, y1, x0, x1 = rows[0], rows[-1], cols[0], cols[-1]
    mx = max(min_margin, margin * (x1 - x0 + 1))
    my = max(min_margin, margin * (y1 - y0 + 1))
    h, w = mask.shape
    return max(0.0, x0 - mx), max(0.0, y0 - my), min(w - 1.0, x1 + mx), min(h - 1.0, y1 + my)


def inner_point(mask: np.ndarray) -> tuple[float, float]:
    """The mask's centroid if it lies inside the mask, else its point farthest from the edge (x, y)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    iy, ix = int(round(cy)), int(round(cx))
    if mask[iy, ix]:
        return float(cx), float(cy)
    dist = ndimage.distance_transform_edt(mask)
    iy, ix = np.unravel_index(int(np.argmax(dist)), mask.shape)
    return float(ix), float(iy)


def decode_prompt(decoder: MaskDecoder, emb, prompt: SlicePrompt) -> SliceResult:
    single_click = prompt.box is None and len(prompt.points) == 1
    out = decoder(
        emb,
        boxes=None if prompt.box is None else np.array([prompt.box]),
        points=np.array([prompt.points]) if prompt.points else None,
        point_labels=np.array([prompt.point_labels]) if prompt.points else None,
        multimask=single_click,  # one click is ambiguous: take the best of SAM's candidates
    )
    return SliceResult(out.masks[0], float(out.iou[0]))


SliceCallback = Callable[[int, SliceResult], None]


def propagate(embeddings: SliceEmbeddings, decoder: MaskDecoder, prompts: Sequence[SlicePrompt],
              settings: Propagation = Propagation(),
              on_slice: SliceCallback | None = None) -> tuple[dict[int, SliceResult], list[dict]]:
    """Masks of one label from its prompts, propagated up and down from each prompted slice.

    Returns per-slice results (masks of several tracks on one slice are united, the
    IoU is their mean) and one record per track: where it started, the slices it
    reached and why it stopped.
    """
    per_slice: dict[int, list[SliceResult]] = {}
    seeds: list[tuple[SlicePrompt, SliceResult]] = []
    min_margin = settings.min_margin_px if settings.min_margin_px is not None else default_min_margin(embeddings)
    frac_margin = settings.margin if settings.margin is not None else FRACTION_MARGIN.get(embeddings.loaded.profile.name, 0.1)
    for p in prompts:
        res = decode_prompt(decoder, embeddings.get(p.slice), p)
        seeds.append((p, res))
        per_slice.setdefault(p.slice, []).append(res)
        if on_slice:
            on_slice(p.slice, res)
    seeded = {k: _unite(rs) for k, rs in per_slice.items()}
    tracks = []
    for p, start in seeds:
        record = {"prompt": p.source, "slice": p.slice, "seed_iou": round(start.iou, 4), "seed_area_px": int(start.mask.sum())}
        if start.mask.sum() < max(1, settings.min_area_px):
            record.update(reached=[p.slice, p.slice], stop={"up": "empty seed mask", "down": "empty seed mask"})
            tracks.append(record)
            continue
        reached, stops = [p.slice, p.slice], {}
        for direction, name in ((1, "up"), (-1, "down")):
            target = _next_anchor(p, prompts, direction) if settings.between == "interpolate" else None
            prev = start.mask
            k = p.slice
            steps = 0
            while True:
                k += direction
                steps += 1
                if not 0 <= k < len(embeddings):
                    stops[name] = "end of volume"
                    break
                if p.range is not None and not p.range[0] <= k <= p.range[1]:
                    stops[name] = "end of the box's slices"
                    break
                if settings.max_steps is not None and steps > settings.max_steps:
                    stops[name] = "max_steps"
                    break
                ahead = [k + direction * j for j in range(1, embeddings.batch)]
                emb = embeddings.get(k, ahead=ahead)
                if target is not None and k == target.slice:
                    stops[name] = "reached another prompted slice"
                    break
                if target is not None:  # between two boxes of the same structure: their linear interpolation
                    t = (k - p.slice) / (target.slice - p.slice)
                    x0, y0, x1, y1 = (a + t * (b - a) for a, b in zip(p.box, target.box))
                else:
                    x0, y0, x1, y1 = _box_of(prev, frac_margin, min_margin)
                cx, cy = inner_point(prev)
                pts = [(cx, cy)] if decoder.loaded.profile.points else []
                res = decode_prompt(decoder, emb, SlicePrompt(k, (x0, y0, x1, y1), pts, [1] * len(pts)))
                area, prev_area = int(res.mask.sum()), int(prev.sum())
                reason = None
                if res.iou < settings.min_iou:
                    reason = f"predicted IoU {res.iou:.2f} < {settings.min_iou:g}"
                elif area == 0 or area < settings.min_area_px or area < settings.min_area_ratio * prev_area:
                    reason = f"area collapsed ({prev_area} -> {area} px)"
                elif area > settings.max_area_ratio * prev_area:
                    reason = f"area exploded ({prev_area} -> {area} px)"
                elif k in seeded and (res.mask & seeded[k].mask).any():
                    reason = "reached another prompted slice"
                if reason:
                    stops[name] = reason
                    break
                per_slice.setdefault(k, []).append(res)
                if on_slice:
                    on_slice(k, res)
                reached[0 if direction < 0 else 1] = k
                prev = res.mask
        record.update(reached=reached, stop=stops)
        tracks.append(record)
    return {k: _unite(rs) for k, rs in per_slice.items()}, tracks


# LiteMedSAM was trained on boxes a few pixels (of its 256-pixel input) outside the structure; on small slices
# (a 35 x 51 Hippocampus crop is enlarged 5x) SAM's margins (10 % of the side, at least 2 raw pixels) became
# 10+ input pixels and the propagated masks grew: mean Dice 0.655 -> 0.746 with 3 boxes on 4 Hippocampus
# cases (sagittal) with no fractional margin and 5 input pixels
INPUT_MARGIN_PX = {"litemedsam": 5.0}
FRACTION_MARGIN = {"litemedsam": 0.0}  # others: 0.1
RAW_MARGIN_PX = 2.0  # SAM and MedSAM (their 1024-pixel input)


def default_min_margin(embeddings: SliceEmbeddings) -> float:
    """The propagated box's least margin in raw pixels: SAM's 2 raw pixels, or a fixed number of encoder-input pixels."""
    profile = embeddings.loaded.profile.name
    if profile not in INPUT_MARGIN_PX:
        return RAW_MARGIN_PX
    frame = embeddings.frame
    return INPUT_MARGIN_PX[profile] * max(frame.size[0] / frame.input_size[0], frame.size[1] / frame.input_size[1])


def _next_anchor(p: SlicePrompt, prompts: Sequence[SlicePrompt], direction: int) -> SlicePrompt | None:
    """The nearest other box prompt beyond ``p`` in ``direction`` (both boxes needed to interpolate)."""
    if p.box is None:
        return None
    ahead = [q for q in prompts if q.box is not None and (q.slice - p.slice) * direction > 0]
    return min(ahead, key=lambda q: abs(q.slice - p.slice)) if ahead else None


def _unite(results: Sequence[SliceResult]) -> SliceResult:
    if len(results) == 1:
        return results[0]
    mask = np.logical_or.reduce([r.mask for r in results])
    return SliceResult(mask, float(np.mean([r.iou for r in results])))


# ---------------------------------------------------------------------------------------
# automatic mode


def automatic(embeddings: SliceEmbeddings, decoder: MaskDecoder, vs: VolumeSlices, settings: AutoSettings,
              on_slice: SliceCallback | None = None) -> dict[int, SliceResult]:
    """Grid point prompts on every slice inside the region; masks filtered by IoU, area, intensity, position."""
    rows, cols = vs.size
    frac = dict(zip("ijk", settings.region))
    # the region's fractions are along the image axes i (x), j (y), k (z); map them to slice axes
    array_axes = {2: "i", 1: "j", 0: "k"}
    in_plane = [a for a in range(3) if a != vs.axis]
    ks = range(int(np.floor(frac[array_axes[vs.axis]][0] * (vs.n - 1))),
               int(np.ceil(frac[array_axes[vs.axis]][1] * (vs.n - 1))) + 1)
    row_lo, row_hi = (f * (rows - 1) for f in frac[array_axes[in_plane[0]]])
    col_lo, col_hi = (f * (cols - 1) for f in frac[array_axes[in_plane[1]]])
    gy = (np.arange(settings.grid) + 0.5) / settings.grid * rows - 0.5
    gx = (np.arange(settings.grid) + 0.5) / settings.grid * cols - 0.5
    grid = np.array([(x, y) for y in gy for x in gx if row_lo <= y <= row_hi and col_lo <= x <= col_hi])
    pixel_mm2 = vs.pixel_spacing[0] * vs.pixel_spacing[1]
    out: dict[int, SliceResult] = {}
    for k in ks:
        if not embeddings.cached(k):  # the next batch of slices in one encoder call
            embeddings.encode([j for j in ks if j >= k][: embeddings.batch])
        raw = vs.raw[k]
        pts = grid
        if settings.intensity is not None and len(pts):
            vals = raw[np.clip(np.round(pts[:, 1]).astype(int), 0, rows - 1),
                       np.clip(np.round(pts[:, 0]).astype(int), 0, cols - 1)]
            pts = pts[(vals >= settings.intensity[0]) & (vals <= settings.intensity[1])]
        if not len(pts):
            continue
        res = decoder(embeddings.get(k), points=pts[:, None, :], point_labels=np.ones((len(pts), 1), int), multimask=True)
        keep = []
        for m, iou in zip(res.masks, res.iou):
            if iou < settings.min_iou or not m.any():
                continue
            area = m.sum() * pixel_mm2
            if settings.area_mm2 is not None and not settings.area_mm2[0] <= area <= settings.area_mm2[1]:
                continue
            if settings.intensity is not None and not settings.intensity[0] <= float(raw[m].mean()) <= settings.intensity[1]:
                continue
            cy, cx = ndimage.center_of_mass(m)
            if not (row_lo <= cy <= row_hi and col_lo <= cx <= col_hi):
                continue
            keep.append((m, float(iou)))
        if keep:
            out[k] = SliceResult(np.logical_or.reduce([m for m, _ in keep]), float(np.mean([i for _, i in keep])))
            if on_slice:
                on_slice(k, out[k])
    return out


# ---------------------------------------------------------------------------------------
# prompts from a prior (coarse) label


def prior_prompts(prior_slices: np.ndarray, value: int, min_area_px: int = 4, margin: float = 0.05,
                  min_margin_px: int = 1) -> list[SlicePrompt]:
    """A box and a centre point per 2D connected component of ``value`` on every slice of a prior label."""
    out = []
    for k in np.flatnonzero((prior_slices == value).any(axis=(1, 2))):
        comps, n = ndimage.label(prior_slices[k] == value)
        for c in range(1, n + 1):
            m = comps == c
            if m.sum() < min_area_px:
                continue
            box = _box_of(m, margin, min_margin_px)
            x, y = inner_point(m)
            out.append(SlicePrompt(int(k), box, [(x, y)], [1], source=f"prior slice {k} component {c}"))
    return out


def reference_prompts(ref_slices: np.ndarray, value: int, n: int, margin_xy: tuple[float, float]) -> list[SlicePrompt]:
    """``n`` box prompts for one structure from its reference label, as an annotator would draw them (experiments only).

    ``ref_slices``: the reference label, slice axis first. The slices where the
    structure is present are cut into ``n`` runs of (nearly) equal length along
    it; each run gives one box, on its slice of largest area (``n = 1``: the slice
    where the structure is largest). A box is the bounding box of every pixel of
    the structure on that slice, widened by ``margin_xy`` raw pixels (x, y) and
    clipped to the slice, and spans the structure's slices (a 3D box, as the
    field's box-prompt protocol gives: propagation stays within them).
    Deterministic: no random draw.
    """
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError("--prompts-from-reference", f"must be a whole number of boxes >= 1, not {n!r}")
    mask = ref_slices == value
    areas = mask.sum(axis=(1, 2))
    present = np.flatnonzero(areas)
    if not len(present):
        return []
    runs = np.array_split(present, min(n, len(present)))
    rows, cols = mask.shape[1:]
    out = []
    for i, run in enumerate(runs):
        k = int(run[int(np.argmax(areas[run]))])
        ys = np.flatnonzero(mask[k].any(axis=1))
        xs = np.flatnonzero(mask[k].any(axis=0))
        box = (max(0.0, xs[0] - margin_xy[0]), max(0.0, ys[0] - margin_xy[1]),
               min(cols - 1.0, xs[-1] + margin_xy[0]), min(rows - 1.0, ys[-1] + margin_xy[1]))
        out.append(SlicePrompt(k, tuple(float(v) for v in box), source=f"reference box {i + 1}/{len(runs)} on slice {k}",
                               range=(int(present[0]), int(present[-1]))))
    return out


def from_prior(embeddings: SliceEmbeddings, decoder: MaskDecoder, prompts: Sequence[SlicePrompt],
               on_slice: SliceCallback | None = None) -> dict[int, SliceResult]:
    """Decode the prior's prompts slice by slice (all components of a slice in one decoder call)."""
    by_slice: dict[int, list[SlicePrompt]] = {}
    for p in prompts:
        by_slice.setdefault(p.slice, []).append(p)
    out = {}
    order = sorted(by_slice)
    for i, (k, ps) in enumerate(sorted(by_slice.items())):
        if not embeddings.cached(k):
            embeddings.encode(order[i: i + embeddings.batch])
        pts = decoder.loaded.profile.points
        res = decoder(embeddings.get(k), boxes=np.array([p.box for p in ps]),
                      points=np.array([p.points for p in ps]) if pts else None,
                      point_labels=np.array([p.point_labels for p in ps]) if pts else None)
        out[k] = SliceResult(np.logical_or.reduce(list(res.masks)), float(np.mean(res.iou)))
        if on_slice:
            on_slice(k, out[k])
    return out
