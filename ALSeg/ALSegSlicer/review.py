"""The review loop: open a proposed case with its machine label, accept the edit as a human label.

``ReviewSession`` works on a project folder and a scene. ``open_next`` loads
the first case of the review queue that still waits for a human label (the
order the selection ranked them in; skipped cases last) as a volume and an
editable segmentation; ``accept`` exports the edited segmentation onto the
image grid with the project's label values and stores it through the engine
as the case's next human-label version (``v0001``, ``v0002``, …: never
overwritten), then the caller opens the next case.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import SimpleITK as sitk

from ALSegLib import rounds
from ALSegLib.errors import InputError
from ALSegLib.project import Project

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


class ReviewSession:
    """One reviewer's pass over the project's review queue in one scene."""

    def __init__(self, project: Project, scene, author: str | None = None):
        self.project = project
        self.scene = scene
        self.author = author
        self.skipped: list[str] = []
        self.current: OpenCase | None = None

    def queue(self) -> list[dict]:
        """Queued cases waiting for a human label, in review order (round, rank; skipped last)."""
        pending = [q for q in rounds.queue_items(self.project) if q["status"] == "pending"]
        pending.sort(key=lambda q: (q["case"] in self.skipped, q["round"], q.get("rank", 0)))
        return pending

    def open_next(self) -> OpenCase | None:
        """Open the first waiting case (closing the current one); None when the queue is empty."""
        items = self.queue()
        if not items:
            self.close()
            return None
        item = items[0]
        return self.open(item["case"], item)

    def open(self, case: str, item: dict | None = None) -> OpenCase:
        """Load ``case``'s image and its best label to start from: the latest human version,
        else the pseudo-label, else the latest prediction, else empty segments."""
        if not self.project.has_case(case):
            raise InputError(f"case {case!r}", f"not in project {self.project.root}")
        self.close()
        image = self.project.read_image(case)
        volume = glue.volume_node_from_image(self.scene, image, case)
        started_from, label = None, None
        human = self.project.human_versions(case)
        if human:
            started_from, label = f"human v{human[-1]:04d}", self.project.read_label(case, "human")
        else:
            preferred = (item or {}).get("open_with")
            for kind in dict.fromkeys([k for k in (preferred, "pseudo", "predicted") if k]):
                if self.project.label_path(case, kind) is not None:
                    started_from, label = kind, self.project.read_label(case, kind)
                    break
        segmentation = glue.segmentation_node_from_label(self.scene, label, volume, self.project.labels,
                                                         f"{case} segmentation")
        item = item or {}
        self.current = OpenCase(case, item.get("round"), started_from, volume, segmentation,
                                item.get("reason", ""), item.get("score"))
        return self.current

    def accept(self) -> int:
        """Store the current segmentation as the case's next human-label version; returns it."""
        if self.current is None:
            raise InputError("review", "no case is open")
        c = self.current
        label = glue.label_from_segmentation(self.scene, c.segmentation, c.volume, self.project.labels)
        version = self.project.add_human_label(
            c.case, label, author=self.author, source="human",
            produced_by={"tool": "3D Slicer Segment Editor (ALSeg)", "started_from": c.started_from, "round": c.round})
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

    def close(self) -> None:
        """Remove the current case's nodes from the scene (stored labels are untouched)."""
        if self.current is None:
            return
        for node in (*self.current.overlays, self.current.segmentation, self.current.volume):
            if node is not None and node.GetScene() is not None:
                self.scene.RemoveNode(node)
        self.current = None

    def uncertainty_volume(self):
        """The current case's voxel entropy (0..1) from the probabilities its round's selection used
        (or, for a selection that used none, the round's pool prediction), as a scalar volume for
        the foreground layer; None when none are stored."""
        from ALSegLib.selection.uncertainty import entropy_map

        if self.current is None or self.current.round is None:
            return None
        record = rounds.read_round(self.project, self.current.round)
        model = record.get("selection", {}).get("model") or record["stages"].get("predict-pool", {}).get("model")
        if not model:
            return None
        from ALSegLib.store.predictions import load_probabilities, probabilities_path

        if not probabilities_path(self.project, model, self.current.case).is_file():
            return None
        entropy = entropy_map(load_probabilities(self.project, model, self.current.case)[0])
        image = sitk.GetImageFromArray(entropy.astype(np.float32))
        image.CopyInformation(self.project.read_image(self.current.case))
        node = glue.volume_node_from_image(self.scene, image, f"{self.current.case} uncertainty")
        self.current.overlays.append(node)
        return node
