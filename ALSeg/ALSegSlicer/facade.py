"""The module's logic, as plain Python on a scene and a project folder.

``ALSegLogic`` in ``ALSeg.py`` is this :class:`Session` (plus Slicer's parameter
node) and is handed to the widget, which calls it directly; nothing here needs Qt,
so it is tested on ``slicer-core``. Long work is not run here: the ``*_args``
methods build the ``alseg`` command lines that :mod:`.jobs` runs in the background,
and the results come back through :meth:`Session.open_case` and
:meth:`Session.load_applied`. It imports with Slicer's own packages only (numpy,
SimpleITK, VTK): the engine's other packages are needed when work starts.
"""
from __future__ import annotations

import json
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from ALSegLib import atomic, rounds
from ALSegLib.errors import InputError
from ALSegLib.project import LabelTable, Project
from ALSegLib.report import format_number
from ALSegLib.settings import DEVICES, MODES, STRATEGIES, RoundSettings  # noqa: F401 (the panel offers the engine's lists)

from . import scene as glue
from .review import OpenCase, ReviewSession

PROMPTS_FILE = "prompts/slicer.json"  # Layout.slicer_prompts, relative to the project
# the markups node class of each prompt kind the panel places, and the attributes that tie a node to its case
PROMPT_KINDS = {"positive": "vtkMRMLMarkupsFiducialNode", "negative": "vtkMRMLMarkupsFiducialNode",
                "box": "vtkMRMLMarkupsROINode"}
PROMPT_ATTRIBUTES = ("ALSeg.PromptCase", "ALSeg.PromptLabel", "ALSeg.PromptKind")
PROMPT_STORED = "ALSeg.PromptStored"


@dataclass
class RoundOptions:
    """The panel's settings for a round (the parameter node's values)."""
    budget: str = "5"
    strategy: str = "hybrid"
    mode: str = "finetune"
    device: str = "auto"
    pseudo_source: str = ""  # "", "sam", "import"
    checkpoint: str = ""
    prompts: str = ""
    import_folder: str = ""
    configuration: str = ""
    epochs: int = 0  # 0: the engine's default for the device
    pretrain_epochs: int = 0
    minutes: float = 0  # each training fits this many minutes on this machine (0: the default budget)
    exclude: tuple[str, ...] = ()  # held-out cases: never selected or trained on, scored each round (the panel's
    # "Test cases": they need reference labels, added with the images or by import-labels --kind reference)
    unit: str = "case"  # "slice": slabs of ``slab`` slices, the budget counted in slices
    slab: int = 1
    bootstrap: str = "predict"  # the cases without prompts: predict, sam or off (ALSegLib.bootstrap)


class Session:
    """One open project in one scene: cases in, review, rounds' command lines, results."""

    def __init__(self, scene=None):
        # scene=None: Slicer's ScriptedLoadableModuleLogic.__init__ calls super().__init__() with no
        # arguments, which reaches here through ALSegLogic's bases; ALSegLogic then gives the scene
        self.scene = scene
        self.project: Project | None = None
        self.review: ReviewSession | None = None

    def _end_review(self) -> None:
        """Another project: the open case's nodes go (its stored labels stay), the read-ahead stops."""
        if self.review is not None:
            self.review.close()
            self.review.shutdown()
        self.review = None

    # project -------------------------------------------------------------------------------

    def create(self, folder: str | Path, labels: str, modality: str, name: str | None = None) -> Project:
        """A new project (``labels``: ``NAME=VALUE[:#RRGGBB],...``)."""
        project = Project.create(_chosen_folder(folder, "create the project in"), LabelTable.parse(labels), modality,
                                 name=name)
        self._end_review()
        self.project = project
        return self.project

    def open(self, folder: str | Path) -> Project:
        project = Project.open(_chosen_folder(folder, "open"))
        self._end_review()
        self.project = project
        return self.project

    @property
    def has_project(self) -> bool:
        return self.project is not None

    def case_names(self) -> list[str]:
        return self.require().cases()

    def label_names(self) -> list[str]:
        return list(self.require().labels.mapping)

    def scene_closed(self) -> None:
        """File -> Close Scene removed every node: the open review case is gone with them."""
        if self.review is not None:
            self.review.scene_closed()

    def require(self) -> Project:
        if self.project is None:
            raise InputError("ALSeg", "no project is open: create or open one first")
        return self.project

    def add_files(self, paths: Sequence[str | Path], reference_dir: str | Path | None = None) -> list[str]:
        """Images from files, folders or DICOM series folders (with optional reference labels)."""
        return self.require().add_cases(list(paths), reference_dir=reference_dir, allow_missing_reference=True)

    def add_volumes(self, nodes: Sequence) -> list[str]:
        """Volumes already loaded in the scene, as new cases named after the nodes."""
        return glue.add_volume_nodes(self.require(), list(nodes))

    # prompts -------------------------------------------------------------------------------

    def prompt_markups(self, case: str, label: str, kind: str, create: bool = True):
        """The markups node that collects ``kind`` (``positive``/``negative`` points, ``box``)
        prompts of ``case``/``label`` and is not stored yet: found by its attributes, else made
        (named ``CASE LABEL KIND``) when ``create``, else None. One node per case, label and kind:
        points placed for one case never land in another's node."""
        cls = PROMPT_KINDS.get(kind)
        if cls is None:
            raise InputError(f"prompt kind {kind!r}", f"not one of {', '.join(PROMPT_KINDS)}")
        for i in range(self.scene.GetNumberOfNodesByClass(cls)):  # no collection to release
            node = self.scene.GetNthNodeByClass(i, cls)
            if prompt_owner(node) == (case, label, kind) and node.GetAttribute(PROMPT_STORED) != "1":
                return node
        if not create:
            return None
        node = self.scene.AddNewNodeByClass(cls, f"{case} {label} {kind}")
        for key, value in zip(PROMPT_ATTRIBUTES, (case, label, kind), strict=True):
            node.SetAttribute(key, value)
        return node

    def set_keep_components(self, count: int) -> Path | None:
        """The 3D parts kept per structure after SAM (``keep_components`` of every label in the
        project's Slicer prompt file; parts a prompt covers are always kept: see
        ``ALSegLib.pseudolabels.postprocess``); None while no prompt is stored (nothing to run on)."""
        project = self.require()
        if isinstance(count, bool) or not isinstance(count, int) or count < 0:
            raise InputError("parts kept per structure", f"must be a whole number >= 0 (0 keeps all), not {count!r}")
        path = project.layout.slicer_prompts
        with project.lock("write prompts"):
            if not path.is_file():
                return None
            data = json.loads(path.read_text())
            labels = data.setdefault("labels", {})
            if all(labels.get(name, {}).get("keep_components", 1) == count for name in project.labels.mapping):
                return path
            for name in project.labels.mapping:
                labels.setdefault(name, {})["keep_components"] = count
            atomic.write_json(path, data)
        return path

    def add_prompt(self, case: str, label: str, *, points=None, negative=None, roi=None) -> Path:
        """Store one SAM prompt placed in the scene for ``case``/``label`` in the project's
        Slicer prompt file (RAS): positive points and negative points from markups point-list
        nodes, a box from a markups ROI node: its in-plane extent on the slice through its centre, or,
        for an ROI deeper than two of the image's largest voxel spacings, a 3D box whose slices bound
        the propagation (the structure's extent, as the radiologist drew it)."""
        project = self.require()
        if not project.has_case(case):
            raise InputError(f"case {case!r}", f"not in project {project.root}")
        if label not in project.labels.mapping:
            raise InputError(f"label {label!r}", f"not in the label table ({', '.join(project.labels.mapping)})")
        for node, kind in ((points, "positive"), (negative, "negative"), (roi, "box")):
            owner = None if node is None else prompt_owner(node)
            if owner is not None and owner != (case, label, kind):
                raise InputError(f"markups {node.GetName()!r}", f"were placed as {owner[2]} for {owner[0]}/{owner[1]}, "
                                 f"not as {kind} for {case}/{label}: choose that case and label, or place new ones")
            if owner is not None and node.GetAttribute(PROMPT_STORED) == "1":
                raise InputError(f"markups {node.GetName()!r}", "are stored already as a prompt: place new ones")
        entry: dict = {}
        if roi is not None:
            center, size = [0.0] * 3, [0.0] * 3
            roi.GetCenterWorld(center)
            roi.GetSizeWorld(size)
            z0 = z1 = center[2]
            if size[2] > 2 * max(project.read_image(case).GetSpacing()):
                z0, z1 = center[2] - size[2] / 2, center[2] + size[2] / 2
            entry["box"] = [[center[0] - size[0] / 2, center[1] - size[1] / 2, z0],
                            [center[0] + size[0] / 2, center[1] + size[1] / 2, z1]]
        if points is not None and points.GetNumberOfControlPoints():
            entry["points"] = _control_points(points)
        if negative is not None and negative.GetNumberOfControlPoints():
            entry["negative"] = _control_points(negative)
        if "box" not in entry and "points" not in entry:
            raise InputError(f"prompt for {case}/{label}", "needs a box (ROI) or at least one positive point")
        path = project.layout.slicer_prompts
        with project.lock("write prompts"):
            data = json.loads(path.read_text()) if path.is_file() else {"space": "RAS", "cases": {}}
            data["cases"].setdefault(case, {}).setdefault(label, []).append(entry)
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(path, data)
        for node in (points, negative, roi):  # ALSeg's own, stored: locked, and the next placement makes a new node
            if node is not None and prompt_owner(node) is not None:
                node.SetAttribute(PROMPT_STORED, "1")
                node.SetLocked(1)
        return path

    # background work -----------------------------------------------------------------------

    def round_settings(self, options: RoundOptions) -> RoundSettings:
        """The panel's settings as the engine's :class:`RoundSettings` (checked by it: a bad choice is refused)."""
        project = self.require()
        if options.device not in DEVICES:
            raise InputError("round settings", f"unknown device {options.device!r} (one of {', '.join(DEVICES)})")
        pseudo = None
        if options.pseudo_source == "sam":  # no checkpoint: the built-in LiteMedSAM
            pseudo = {"source": "sam", "prompts": options.prompts or str(project.layout.slicer_prompts),
                      **({"checkpoint": options.checkpoint} if options.checkpoint else {})}
        elif options.pseudo_source == "import":
            if not options.import_folder:
                raise InputError("pseudo-labels", "importing needs the folder of the other model's labels")
            pseudo = {"source": "import", "from": options.import_folder}
        elif options.pseudo_source:
            raise InputError("pseudo-labels", f"the panel offers sam or import, not {options.pseudo_source!r}")
        return RoundSettings(budget=str(options.budget), strategy=options.strategy, mode=options.mode,
                             device=options.device, exclude=list(options.exclude),
                             configuration=options.configuration or None, epochs=options.epochs or None,
                             pretrain_epochs=options.pretrain_epochs or None, pseudo=pseudo,
                             minutes=options.minutes or None, unit=options.unit, slab=int(options.slab),
                             bootstrap=options.bootstrap)

    def round_args(self, options: RoundOptions) -> list[str]:
        """``alseg round`` arguments for the panel's settings: they are written to the project's
        ``rounds/next-settings.json`` and the round reads them (``--settings FILE``); continuing
        an unfinished round keeps the settings it started with."""
        from ALSegLib.loop import current_round

        project = self.require()
        settings = self.round_settings(options)  # checked before anything is written
        args = ["round", str(project.root)]
        unfinished = current_round(project)
        if unfinished is not None and "settings" in unfinished:
            return args  # the round continues with the settings it started with
        path = project.layout.next_round_settings
        with project.lock("write the next round's settings"):
            path.parent.mkdir(parents=True, exist_ok=True)
            atomic.write_json(path, settings.to_json())
        return [*args, "--settings", str(path)]

    def pseudolabel_case_args(self, case: str, checkpoint: str = "", device: str = "auto") -> list[str]:
        """``alseg pseudolabel`` for one case with its prompts stored from the scene (LiteMedSAM,
        or ``checkpoint``); the prompts are checked here, before a job starts."""
        project = self.require()
        if not project.has_case(case):
            raise InputError(f"case {case!r}", f"not in project {project.root}")
        if device not in DEVICES:
            raise InputError("device", f"unknown device {device!r} (one of {', '.join(DEVICES)})")
        path = project.layout.slicer_prompts
        stored = json.loads(path.read_text()).get("cases", {}) if path.is_file() else {}
        if not stored.get(case):
            raise InputError(f"case {case!r}", "has no stored prompt: place a box or points and store a prompt first")
        args = ["pseudolabel", str(project.root), "--source", "sam", "--case", case, "--prompts", str(path)]
        if checkpoint:
            args += ["--checkpoint", str(checkpoint)]
        return args + (["--device", device] if device != "auto" else [])

    # models ------------------------------------------------------------------------------

    def latest_model(self) -> str:
        """The most recently finished model of the project (an InputError when none has finished)."""
        from ALSegLib.store.models import list_models, read_model

        project = self.require()
        done = [read_model(project, m) for m in list_models(project)]
        done = [r for r in done if r.get("status") == "done"]
        if not done:
            raise InputError(f"project {project.name}", "has no trained model yet: run a round first")
        return max(done, key=lambda r: (str(r.get("finished") or ""), r["name"]))["name"]

    def apply_model_args(self, volume_node, model: str | None = None, device: str = "auto") -> tuple[list[str], Path]:
        """``alseg apply`` for a volume in the scene (any volume, not only the project's cases): the
        volume is written to a temporary file; returns the arguments and the label file the job
        writes, for :meth:`load_applied`."""
        project = self.require()
        if volume_node is None:
            raise InputError("apply the model", "choose a volume")
        model = model or self.latest_model()
        work = Path(tempfile.mkdtemp(prefix="alseg-apply-"))
        image = work / "volume.nii"  # uncompressed: written in a fraction of a second on the GUI thread
        import SimpleITK as sitk

        sitk.WriteImage(glue.image_from_volume_node(volume_node), str(image), False)
        out = work / "label.nii.gz"
        args = ["apply", str(project.root), "--model", model, "--image", str(image), "--out", str(out)]
        return args + (["--device", device] if device != "auto" else []), out

    def load_applied(self, label_file: str | Path, volume_node, model: str = ""):
        """The label an ``alseg apply`` job wrote, as a segmentation node on the volume (the
        project's segment names and colors)."""
        from ALSegLib import volumes

        try:
            label = volumes.read_label(label_file, label_values=self.require().labels.values)
            name = f"{volume_node.GetName()} segmentation" + (f" ({model})" if model else "")
            return glue.segmentation_node_from_label(self.scene, label, volume_node, self.require().labels, name)
        finally:
            discard_apply_files(label_file)

    def export_model_args(self, folder: str | Path, model: str | None = None) -> list[str]:
        """``alseg export-model``: the model as an nnU-Net results folder (SlicerNNUNet loads it)."""
        project = self.require()
        return ["export-model", str(project.root), "--model", model or self.latest_model(), "--to", str(folder)]

    # review --------------------------------------------------------------------------------

    def start_review(self, author: str | None = None) -> ReviewSession:
        self.review = ReviewSession(self.require(), self.scene, author=author)
        return self.review

    def queue_rows(self) -> list[tuple[str, str, str]]:
        """(case, score, reason) for the review table."""
        review = self.review or self.start_review()
        return [(q["case"], "" if q.get("score") is None else f"{q['score']:.3g}", q.get("reason", ""))
                for q in review.queue()]

    def open_case(self, case: str, start_with: str | None = None) -> OpenCase:
        """Open one case for review (a double-click in the queue; a pseudo-label made just now:
        ``start_with="pseudo"``)."""
        return (self.review or self.start_review()).open(case, start_with=start_with)

    def revert(self) -> OpenCase:
        if self.review is None or self.review.current is None:
            raise InputError("review", "no case is open")
        return self.review.revert()

    def revert_kind(self) -> str | None:
        """The machine label :meth:`revert` would start again from (None: nothing to revert to)."""
        return self.review.machine_kind() if self.review is not None and self.review.current is not None else None

    def current_case(self) -> OpenCase | None:
        return self.review.current if self.review is not None else None

    def effort(self) -> dict:
        return rounds.review_effort(self.require())

    def effort_text(self) -> str:
        """``accepted in Slicer: 2/5 unchanged, mean Dice proposal -> accepted 0.941, median 38 s per case``."""
        effort = self.effort()
        return ("accepted in Slicer: " if effort["accepted"] else "") + rounds.effort_text(effort)

    def prompt_coverage_text(self) -> str:
        """How many cases have prompts in the panel's prompt file, and the fewest to prompt (a round
        bootstraps the others: :func:`ALSegLib.bootstrap.enough_prompts`)."""
        from ALSegLib.bootstrap import ENOUGH_FRACTION, enough_prompts

        if self.project is None:
            return ""
        path = self.project.layout.slicer_prompts
        cases = self.project.cases()
        try:
            data = json.loads(path.read_text()) if path.is_file() else {}
            prompted = sum(1 for c in cases if (data.get("cases") or {}).get(c))
        except (OSError, ValueError, AttributeError) as exc:  # a hand-edited file: said here, refused by the round
            return f"The prompt file {path} cannot be read ({exc})."
        enough = enough_prompts(len(cases))
        more = "more prompted cases end closer to prompting every case (measured: docs/rounds.md)."
        if prompted >= enough:
            return (f"Prompts for {prompted} of {len(cases)} cases: a round labels the other {len(cases) - prompted} "
                    f"from them (see 'Cases without prompts'); {more}")
        return (f"Prompts for {prompted} of {len(cases)} cases. Prompt at least {enough} ({ENOUGH_FRACTION:.0%}): "
                f"a round labels the others from them; {more}")

    def open_next(self) -> OpenCase | None:
        return (self.review or self.start_review()).open_next()

    def accept_and_next(self) -> tuple[int, OpenCase | None]:
        if self.review is None:
            raise InputError("review", "no case is open")
        return self.review.accept_and_next()

    def skip(self) -> OpenCase | None:
        return (self.review or self.start_review()).skip()

    # results -------------------------------------------------------------------------------

    def result_rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the per-round results table (held-out Dice per class)."""
        from ALSegLib.report import learning_curve

        points = learning_curve(self.require())
        classes = list(self.require().labels.mapping)
        header = ["round", "model", "annotated", "mean Dice", *classes]
        rows = []
        for p in points:
            rows.append([("pseudo-only" if p["round"] == 0 else str(p["round"])), str(p.get("model") or ""),
                         f"{p['annotated']}/{p['of']} ({100 * p['fraction']:.1f} %)", _fmt(p["mean_dice"]),
                         *(_fmt(p["per_class"].get(c)) for c in classes)])
        return header, rows

    def review_curve_rows(self) -> tuple[list[str], list[list[str]], str]:
        """The panel's learning curve without references (:func:`ALSegLib.rounds.review_curve`): per
        round the model's predictions of the reviewed cases against what the reviewers accepted, their
        corrections of the proposals shown, and the "when am I done" verdict with its rule."""
        curve = rounds.review_curve(self.require())
        header = ["round", "accepted", "model -> accepted (Dice)", "unchanged", "proposal -> accepted (Dice)",
                  "corrected / from scratch"]
        rows = [[str(r["round"]), str(r["accepted"]), _fmt(r["mean_model_dice"]), str(r["unchanged"]),
                 _fmt(r["mean_dice_to_proposal"]), _fmt(r["corrected_fraction"])] for r in curve["rounds"]]
        return header, rows, f"{curve['verdict']} ({curve['rule']})"

    def trust_rows(self) -> tuple[list[str], list[list[str]]]:
        """Header and rows of the trust table (:mod:`ALSegLib.trust`): per class whether its pseudo-labels
        are learned, from their Dice against the human labels; no rows without pseudo-labels."""
        from ALSegLib.trust import TRUST_DICE, trust_table

        project = self.require()
        header = ["class", "state", "human labels", "mean Dice", "min", "prompted / empty"]
        if not project.labeled_cases("pseudo"):
            return header, []
        rows = [[r["name"], r["state"] + ("" if r["taught"] else " (not learned from pseudo-labels)"), str(r["cases"]),
                 _fmt(r["mean"]), _fmt(r["min"]), f"{r['prompted']} / {r['empty']}" if r["prompted"] else "-"]
                for r in trust_table(project, rounds.trust_dice_in_use(project, TRUST_DICE))["classes"]]
        return header, rows

    def learning_curve_png(self) -> Path | None:
        path = self.require().layout.learning_curve_png
        return path if path.is_file() else None

    def latest_report(self) -> Path | None:
        """The last round's HTML report."""
        reports = self.require().layout.round_reports()
        return reports[-1] if reports else None

    def rounds_waiting(self) -> list[int]:
        """Rounds whose review queue still has cases without a human label."""
        return sorted({q["round"] for q in rounds.queue_items(self.require()) if q["status"] == "pending"})

    def summary_text(self) -> str:
        """One line for the panel: the project, its cases, how many have each kind of label, what waits."""
        status = self.require().status()
        counts = status["label_counts"]
        labeled = ", ".join(f"{counts[kind]} {kind}" for kind in ("human", "pseudo", "predicted", "reference")
                            if counts.get(kind))
        waiting = self.rounds_waiting()
        return (f"{status['name']} ({status['modality']}): {status['cases']} cases"
                + (f"; labels: {labeled}" if labeled else "; no labels yet")
                + (f"; round(s) {', '.join(map(str, waiting))} wait for review" if waiting else ""))


def prompt_owner(node) -> tuple[str, str, str] | None:
    """(case, label, kind) a prompt markups node was made for (:meth:`Session.prompt_markups`);
    None for a node ALSeg did not make."""
    values = tuple(node.GetAttribute(key) for key in PROMPT_ATTRIBUTES)
    return values if all(values) else None


def _chosen_folder(folder: str | Path, what: str) -> Path:
    """The panel's folder field, refused when empty: an unset path field reads "" (or ".", an unset
    ``pathlib.Path`` written as text), which would be Slicer's working directory."""
    text = str(folder).strip()
    if text in ("", "."):
        raise InputError("project folder", f"none chosen: choose the folder to {what} first")
    return Path(text)


def discard_apply_files(label_file: str | Path) -> None:
    """Remove the temporary folder of :meth:`Session.apply_model_args` (the volume written for the
    job and the label it wrote), whether the job succeeded or not."""
    import shutil

    folder = Path(label_file).parent
    if folder.name.startswith("alseg-apply-"):
        shutil.rmtree(folder, ignore_errors=True)


def _control_points(node) -> list[list[float]]:
    out = []
    for i in range(node.GetNumberOfControlPoints()):
        p = [0.0, 0.0, 0.0]
        node.GetNthControlPointPositionWorld(i, p)
        out.append([float(v) for v in p])
    return out


def _fmt(value) -> str:
    return format_number(value, missing="")
