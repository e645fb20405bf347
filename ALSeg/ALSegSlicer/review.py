"""The review loop: open a proposed case with its machine label, accept the edit as a human label.

``ReviewSession`` works on a project folder and a scene. ``open_next`` loads
the first case of the review queue that still waits for a human label (the
order the selection ranked them in; skipped cases last) as a volume and an
editable segmentation; ``accept`` exports the edited segmentation onto the
image grid with the project's label values and stores it through the engine
as the case's next human-label version (``v0001``, ``v0002``, …: never
overwritten), then the caller opens the next case. Each accepted version's
provenance carries the reviewer's effort: the seconds from open to accept, the
Dice between the label the case opened with and the accepted one, and the voxels
changed (:func:`ALSegLib.rounds.review_effort` sums them up for the report).
"""
from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ALSegLib import rounds
from ALSegLib.agreement import edit_effort
from ALSegLib.errors import InputError
from ALSegLib.project import Project
from ALSegLib.store.sparse import SliceSet

from . import scene as glue


@dataclass
class OpenCase:
    case: str
    round: int | None
    started_from: str | None  # "human vNNNN", "pseudo", "predicted" or None (empty segments)
    volume: object  # vtkMRMLScalarVolumeNode
    segmentation: object  # vtkMRMLSegmentationNode
    reason: str = ""
    score: float | None = None
    overlays: list = field(default_factory=list)  # extra nodes (uncertainty), removed with the case
    opened_at: float = field(default_factory=time.monotonic)
    proposal: np.ndarray | None = None  # the voxels it opened with (None: empty segments)
    axis: int | None = None  # a slice unit: the array axis (0 = k) and the slices to label; None: the whole case
    slices: list[int] | None = None

    @property
    def machine_label(self) -> bool:
        return self.started_from in ("pseudo", "predicted")


@dataclass
class CaseFiles:
    """A case as read for review, before any node exists."""
    voxels: np.ndarray
    ijk_to_ras: np.ndarray
    window_level: tuple[float, float]
    started_from: str | None
    label: np.ndarray | None  # the project's values
    numbered: np.ndarray | None  # renumbered for Slicer's import


def display_window(modality: str, voxels: np.ndarray) -> tuple[float, float]:
    """The window (width, level) a case opens with: CT's soft-tissue window (400, 40), else the
    0.5-99.5 percentiles of a 1-in-64 sample of the voxels (Slicer's automatic window/level would
    take a pass over every voxel of a CT-sized volume on the GUI thread)."""
    if modality == "CT":
        return 400.0, 40.0
    lo, hi = np.percentile(voxels[::4, ::4, ::4], [0.5, 99.5])
    return max(float(hi - lo), 1e-6), float(hi + lo) / 2


class ReviewSession:
    """One reviewer's pass over the project's review queue in one scene."""

    def __init__(self, project: Project, scene, author: str | None = None):
        self.project = project
        self.scene = scene
        self.author = author
        self.skipped: list[str] = []
        self.current: OpenCase | None = None
        self._reader: ThreadPoolExecutor | None = None
        self._ahead: tuple | None = None  # (what was read, the read's future)
        self.failed: dict[str, str] = {}  # cases that could not be opened: their errors

    def queue(self) -> list[dict]:
        """Queued cases waiting for a human label, in review order (round, rank; skipped last)."""
        pending = [q for q in rounds.queue_items(self.project) if q["status"] == "pending"]
        pending.sort(key=lambda q: (q["case"] in self.skipped, q["round"], q.get("rank", 0)))
        return pending

    def open_next(self) -> OpenCase | None:
        """Open the first waiting case (closing the current one); None when the queue is empty. A
        case that cannot be opened (a corrupt file, values outside the label table) goes to the end
        of the queue like a skipped one, its error kept in :attr:`failed` for the panel to show, and
        the next case opens instead."""
        for item in self.queue():
            if item["case"] in self.failed:
                continue
            try:
                return self.open(item["case"], item)
            except (InputError, RuntimeError, OSError) as exc:  # RuntimeError: ITK could not read a file
                self.failed[item["case"]] = str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__
                if item["case"] not in self.skipped:
                    self.skipped.append(item["case"])
        self.close()
        return None

    def open(self, case: str, item: dict | None = None, start_with: str | None = None) -> OpenCase:
        """Load ``case``'s image and its best label to start from: the latest human version,
        else the pseudo-label, else the latest prediction, else empty segments (``start_with``:
        this kind first, e.g. ``pseudo`` for a pseudo-label made just now). The files come from
        the read-ahead of :meth:`prefetch` when it read this very case's current files."""
        if not self.project.has_case(case):
            raise InputError(f"case {case!r}", f"not in project {self.project.root}")
        if item is None:
            item = next((q for q in self.queue() if q["case"] == case), {})
        self.close()
        files = self._take_prefetched(case, item, start_with) or self._read(case, item, start_with)
        volume = glue.volume_node_from_array(self.scene, files.voxels, files.ijk_to_ras, case,
                                             window_level=files.window_level)
        volume.SetAttribute(glue.CASE_ATTRIBUTE, case)  # a project case shown for review, not a new volume to add
        try:
            segmentation = glue.segmentation_node_from_numbers(self.scene, files.numbered, volume, self.project.labels,
                                                               f"{case} segmentation")
        except Exception:
            self.scene.RemoveNode(volume)
            raise
        self.failed.pop(case, None)
        self.current = OpenCase(case, item.get("round"), files.started_from, volume, segmentation,
                                item.get("reason", ""), item.get("score"), proposal=files.label,
                                axis=None if item.get("slices") is None else int(item.get("axis", 0)),
                                slices=None if item.get("slices") is None else [int(i) for i in item["slices"]])
        self.prefetch()
        return self.current

    # read-ahead: the next case's files are read (decompressed, checked) while the reviewer edits this one

    def _read(self, case: str, item: dict, start_with: str | None) -> CaseFiles:
        """Everything of a case's opening that needs no scene: the reads, the arrays, the display
        window, the label renumbered for Slicer's import (safe off the GUI thread)."""
        image = self.project.read_image(case)
        voxels = sitk.GetArrayFromImage(image)
        started_from, label = self._start_label(case, item, start_with)
        values = None if label is None else sitk.GetArrayFromImage(label)
        numbered = None if values is None else glue.segment_numbers(values, self.project.labels, f"{case} segmentation")
        return CaseFiles(voxels, glue.ijk_to_ras(image), display_window(self.project.modality, voxels), started_from,
                         values, numbered)

    def _state(self, case: str, item: dict, start_with: str | None) -> tuple:
        """What the files read for ``case`` depend on: the image's and labels' files and their times."""
        paths = [self.project.image_path(case)]
        paths += [p for k in ("human", "pseudo", "predicted") if (p := self.project.label_path(case, k)) is not None]
        return (case, item.get("open_with"), start_with,
                tuple((str(p), p.stat().st_mtime_ns, p.stat().st_size) for p in paths))

    def prefetch(self) -> None:
        """Start reading the case that would open after the current one is accepted (in a thread:
        the reads and decompression release the GIL; nothing of the scene is touched there)."""
        if self._reader is None:
            self._reader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="alseg-review-read")
        current = self.current.case if self.current is not None else None
        upcoming = next((q for q in self.queue() if q["case"] != current), None)
        if upcoming is None:
            self._ahead = None
            return
        case = upcoming["case"]
        if self._ahead is not None and self._ahead[0][0] == case:
            return
        try:
            state = self._state(case, upcoming, None)
        except OSError:
            self._ahead = None
            return
        self._ahead = (state, self._reader.submit(self._read, case, upcoming, None))

    def _take_prefetched(self, case: str, item: dict, start_with: str | None):
        ahead, self._ahead = self._ahead, None
        if ahead is None or ahead[0][0] != case:
            return None
        try:
            if self._state(case, item, start_with) != ahead[0]:
                return None  # a file changed since it was read (another reviewer, a new pseudo-label)
            return ahead[1].result()
        except Exception:  # noqa: BLE001 - read again in the open, where its error reaches the reviewer
            return None

    def _start_label(self, case: str, item: dict, start_with: str | None) -> tuple[str | None, sitk.Image | None]:
        human = self.project.human_versions(case)
        if human and start_with in (None, "human"):
            return f"human v{human[-1]:04d}", self.project.read_label(case, "human")
        for kind in dict.fromkeys([k for k in (start_with, item.get("open_with"), "pseudo", "predicted")
                                   if k and k != "human"]):
            if self.project.label_path(case, kind) is not None:
                return kind, self.project.read_label(case, kind)
        return None, None

    def revert(self) -> OpenCase:
        """Throw away the edits of the open case: a fresh segmentation from its machine label (the
        pseudo-label or prediction it opened with, else the pseudo-label, else the prediction);
        stored labels are untouched. The effort clock keeps running."""
        if self.current is None:
            raise InputError("review", "no case is open")
        c = self.current
        kind = self.machine_kind()
        if kind is None:
            raise InputError(f"case {c.case!r}", "has no machine label (pseudo-label or prediction) to revert to")
        label = self.project.read_label(c.case, kind)
        segmentation = glue.segmentation_node_from_label(self.scene, label, c.volume, self.project.labels,
                                                         f"{c.case} segmentation")
        if c.segmentation is not None and c.segmentation.GetScene() is not None:
            self.scene.RemoveNode(c.segmentation)
        c.segmentation, c.started_from, c.proposal = segmentation, kind, sitk.GetArrayFromImage(label)
        return c

    def machine_kind(self) -> str | None:
        """The machine label the open case would revert to: the one it opened with, else its
        pseudo-label, else its prediction; None when it has none."""
        if self.current is None:
            return None
        c = self.current
        kinds = [c.started_from] if c.machine_label else []
        return next((k for k in dict.fromkeys([*kinds, "pseudo", "predicted"])
                     if self.project.label_path(c.case, k) is not None), None)

    def shutdown(self) -> None:
        """Stop the read-ahead thread (a project closed)."""
        if self._reader is not None:
            self._reader.shutdown(wait=False, cancel_futures=True)
            self._reader = None
        self._ahead = None

    def accept(self) -> int:
        """Store the current segmentation as the case's next human-label version, with the
        reviewer's effort in its provenance; returns the version."""
        if self.current is None:
            raise InputError("review", "no case is open")
        c = self.current
        label = glue.label_from_segmentation(self.scene, c.segmentation, c.volume, self.project.labels)
        accepted = sitk.GetArrayViewFromImage(label)
        proposal = c.proposal
        if c.slices is not None:  # a slice unit: only its slices are stored, and only they count as effort
            index = [slice(None)] * 3
            index[c.axis] = c.slices
            accepted = accepted[tuple(index)]
            proposal = None if proposal is None else proposal[tuple(index)]
        effort = edit_effort(proposal, accepted, self.project.labels.values, time.monotonic() - c.opened_at)
        produced_by = {"tool": "3D Slicer Segment Editor (ALSeg)", "started_from": c.started_from, "round": c.round}
        # read at open: the trust and model-agreement records need no second read
        held = {"pseudo": c.proposal if c.started_from == "pseudo" else None,
                "predicted": c.proposal if c.started_from == "predicted" else None}
        if c.slices is not None:
            version = self.project.add_human_slices(c.case, label, SliceSet.of(c.axis, c.slices), author=self.author,
                                                    source="human", produced_by={**produced_by, "slices": c.slices},
                                                    effort=effort, **held)
        else:
            version = self.project.add_human_label(c.case, label, author=self.author, source="human",
                                                   produced_by=produced_by, effort=effort, **held)
        if c.case in self.skipped:
            self.skipped.remove(c.case)
        return version

    def accept_and_next(self) -> tuple[int, OpenCase | None]:
        version = self.accept()
        return version, self.open_next()

    def skip(self) -> OpenCase | None:
        """Put the current case at the end of this session's queue and open the next one."""
        if self.current is not None:
            if self.current.case not in self.skipped:
                self.skipped.append(self.current.case)
            with self.project.lock("skip review"):
                self.project.log_event("review_skipped", case=self.current.case)
        return self.open_next()

    def scene_closed(self) -> None:
        """The scene was closed (its nodes are gone): forget the open case without touching nodes."""
        self.current = None

    def close(self) -> None:
        """Remove the current case's nodes from the scene (stored labels are untouched)."""
        if self.current is None:
            return
        for node in (*self.current.overlays, self.current.segmentation, self.current.volume):
            if node is not None and node.GetScene() is not None:
                self.scene.RemoveNode(node)
        self.current = None

    def uncertainty_map(self, case: str | None = None, round_number: int | None = None) -> sitk.Image | None:
        """A case's voxel entropy (0..1) from the probabilities its round's selection used (or, for
        a selection that used none, the round's pool prediction); None when none are stored. Reads
        files and computes only (no scene access): the panel runs it off the GUI thread."""
        from ALSegLib.selection.uncertainty import entropy_map
        from ALSegLib.store.predictions import load_probabilities, probabilities_path

        if case is None:
            if self.current is None:
                return None
            case, round_number = self.current.case, self.current.round
        if round_number is None:
            return None
        record = rounds.read_round(self.project, round_number)
        model = record.get("selection", {}).get("model") or record["stages"].get("predict-pool", {}).get("model")
        if not model or not probabilities_path(self.project, model, case).is_file():
            return None
        entropy = entropy_map(load_probabilities(self.project, model, case)[0])
        image = sitk.GetImageFromArray(entropy.astype(np.float32))
        image.CopyInformation(self.project.read_image(case))
        return image

    def uncertainty_volume(self, image: sitk.Image | None = None):
        """The open case's uncertainty as one scalar volume for the foreground layer (the same node
        on every call; removed with the case), shown with the Inferno colormap from 0 to 1, from
        ``image``, the map :meth:`uncertainty_map` computed (off the GUI thread). None when there
        is no overlay yet and no map."""
        if self.current is None:
            return None
        name = f"{self.current.case} uncertainty"
        for node in self.current.overlays:
            if node.GetScene() is not None and node.GetName() == name:
                return node
        if image is None:
            return None  # computed off the GUI thread by uncertainty_map, or none stored: never here
        node = glue.volume_node_from_image(self.scene, image, name)
        node.SetAttribute(glue.CASE_ATTRIBUTE, self.current.case)
        node.SetHideFromEditors(True)  # an overlay: not offered by the panel's (or any) volume selectors
        display = node.GetDisplayNode()
        if display is not None:
            display.SetAndObserveColorNodeID(UNCERTAINTY_COLORS)
            display.SetAutoWindowLevel(0)
            display.SetWindowLevelMinMax(0.0, 1.0)
        self.current.overlays.append(node)
        return node


UNCERTAINTY_COLORS = "vtkMRMLColorTableNodeFileInferno.txt"  # one of Slicer's default color tables
