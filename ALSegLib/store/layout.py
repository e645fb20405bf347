"""Every path of a project folder, in one place.

::

    alseg.json            the configuration: name, modality, label table (schema 1)
    alseg.lock            the project lock (holder's pid and host inside)
    events.jsonl          the event log, one JSON object per line, append-only
    images/<case>.nrrd    the cases' images
    labels/<kind>/<case>.nrrd           reference, pseudo, predicted labels (+ .json provenance)
    labels/human/<case>/v<NNNN>.nrrd    human labels, versioned, never overwritten
    prompts/              prompt files (the Slicer module writes prompts/slicer.json)
    rounds/<NNNN>/round.json            a round's record (+ its report); rounds/round.lock
    rounds/next-settings.json           the settings the Slicer panel asked the next round to use
    models/<name>/model.json            trained models (nnU-Net's files under nnunet/results)
    predictions/<model>/<case>.npz      probabilities a model predicted
    features/nnunet/<model>/<case>.npy  pooled bottleneck features (selection's diversity)
    features/sam/<case>.npy             pooled SAM embeddings
    cache/sam/<key>/<case>/             SAM embeddings, one file per slice
    reports/              learning curves, the experiment's pages
    nnunet/{raw,preprocessed,results,logs}/   nnU-Net's own folders for this project

Every path a caller asks for goes through :meth:`Layout.inside`: a symbolic link planted in a
project (a copied or shared folder) must not make ALSeg read or write elsewhere.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import InputError
from .ids import check_case_id

CONFIG = "alseg.json"
LOCK = "alseg.lock"
EVENTS = "events.jsonl"
STORE_EXT = ".nrrd"  # double-precision geometry, read by Slicer, ITK and nnU-Net


@dataclass(frozen=True)
class NnunetFolders:
    """nnU-Net's folders for one project (``nnUNet_raw`` and the others point here during a call)."""

    root: Path

    @property
    def raw(self) -> Path:
        return self.root / "raw"

    @property
    def preprocessed(self) -> Path:
        return self.root / "preprocessed"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def plans_record(self) -> Path:
        """ALSeg's record of the planned dataset (which plans, which policy, which cases)."""
        return self.root / "alseg_plans.json"


class Layout:
    """The paths of the project folder at ``root``."""

    def __init__(self, root: str | Path):
        self.root = Path(root)
        self._real_root = self.root.resolve()

    def inside(self, path: Path) -> Path:
        """``path`` if it stays inside the project once symbolic links are followed; else refused."""
        real = Path(path).resolve()
        if not real.is_relative_to(self._real_root):
            raise InputError(path, f"leads outside the project (to {real}) through a symbolic link: refused")
        return Path(path)

    def resolve(self, relative: str | Path) -> Path:
        """A path a record stores relative to the project (a report, a checkpoint), checked to stay inside."""
        return self.inside(self.root / relative)

    # the project's own files
    @property
    def config(self) -> Path:
        return self.root / CONFIG

    @property
    def lock(self) -> Path:
        return self.root / LOCK

    @property
    def events(self) -> Path:
        return self.root / EVENTS

    # cases and labels
    @property
    def images(self) -> Path:
        return self.root / "images"

    def image(self, case: str) -> Path:
        return self.inside(self.images / f"{check_case_id(case)}{STORE_EXT}")

    def labels(self, kind: str) -> Path:
        return self.root / "labels" / kind

    def label(self, kind: str, case: str) -> Path:
        return self.inside(self.labels(kind) / f"{check_case_id(case)}{STORE_EXT}")

    def human_versions(self, case: str) -> Path:
        return self.inside(self.labels("human") / check_case_id(case))

    def human_version(self, case: str, version: int) -> Path:
        return self.inside(self.human_versions(case) / f"v{version:04d}{STORE_EXT}")

    def human_version_mask(self, case: str, version: int) -> Path:
        """A sparse human version's annotated mask, beside it (``v0003.annotated.nrrd``)."""
        from .sparse import MASK_SUFFIX

        return self.inside(self.human_versions(case) / f"v{version:04d}{MASK_SUFFIX}{STORE_EXT}")

    # the loop's records
    @property
    def prompts(self) -> Path:
        return self.root / "prompts"

    @property
    def slicer_prompts(self) -> Path:
        """The prompt file the Slicer module writes from its markups."""
        return self.prompts / "slicer.json"

    @property
    def rounds(self) -> Path:
        return self.root / "rounds"

    def round(self, number: int) -> Path:
        return self.inside(self.rounds / f"{int(number):04d}")

    @property
    def next_round_settings(self) -> Path:
        """The settings file the Slicer panel writes for ``alseg round --settings FILE``."""
        return self.rounds / "next-settings.json"

    @property
    def round_lock(self) -> Path:
        return self.rounds / "round.lock"

    @property
    def models(self) -> Path:
        return self.root / "models"

    def model(self, name: str) -> Path:
        return self.inside(self.models / check_case_id(name))

    def prediction(self, model: str, case: str) -> Path:
        return self.inside(self.root / "predictions" / check_case_id(model) / f"{check_case_id(case)}.npz")

    def nnunet_features(self, model: str, case: str) -> Path:
        return self.inside(self.root / "features" / "nnunet" / check_case_id(model) / f"{check_case_id(case)}.npy")

    def sam_features(self, case: str) -> Path:
        return self.inside(self.root / "features" / "sam" / f"{check_case_id(case)}.npy")

    @property
    def cache(self) -> Path:
        return self.root / "cache"

    @property
    def bootstrap_priors(self) -> Path:
        """The bootstrap model's predictions the foundation model was prompted from (``bootstrap sam``)."""
        return self.root / "bootstrap" / "priors"

    @property
    def sam_cache(self) -> Path:
        return self.cache / "sam"

    @property
    def reports(self) -> Path:
        return self.root / "reports"

    @property
    def learning_curve_png(self) -> Path:
        return self.reports / "learning_curve.png"

    def round_reports(self) -> list[Path]:
        """The rounds' HTML reports, oldest first."""
        return sorted(self.rounds.glob("*/report.html"))

    @property
    def nnunet(self) -> NnunetFolders:
        return NnunetFolders(self.root / "nnunet")

    def staging(self, token: str) -> Path:
        return self.root / f".staging-{token}"
