"""The project folder: the single source of truth of an ALSeg project.

:class:`Project` is the front over the store package, which owns the folder's parts:
:mod:`~ALSegLib.store.layout` (every path, with its containment check),
:mod:`~ALSegLib.store.locks` (the writer lock and long-job locks),
:mod:`~ALSegLib.store.events` (the event log), :mod:`~ALSegLib.store.labels` (the label
table) and :mod:`~ALSegLib.store.ids` (case ids). ``Project`` itself holds the cases, their
labels of each kind (``reference``, ``pseudo``, ``predicted``; ``human`` versioned, never
overwritten) with their provenance, and recovery after a writer killed holding the lock.

Every write is atomic (see :mod:`ALSegLib.atomic`) and happens under the project
lock. Inputs are fully validated before anything is written, so a bad input
leaves the folder as it was.
"""
from __future__ import annotations

import os
import re
import secrets
import shutil
import socket
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from . import agreement, atomic, volumes
from ._version import __version__
from .errors import InputError
from .progress import track
from .store import sparse
from .store.events import EventLog
from .store.files import now_iso, read_json_object, sha256_file, user_name
from .store.ids import check_case_id, derive_case_id, expand_sources, label_index
from .store.labels import LabelClass, LabelTable, map_label, parse_color, parse_mapping, read_any_label
from .store.layout import CONFIG, STORE_EXT, Layout
from .store.locks import WriterLock, exclusive_run, lock_timeout

# the public API, importable from here as before the store package held them
__all__ = ["HUMAN_SOURCES", "LABEL_KINDS", "MACHINE_KINDS", "MODALITIES", "SCHEMA_VERSION", "LabelClass", "LabelTable",
           "Project", "check_case_id", "derive_case_id", "exclusive_run", "expand_sources", "lock_timeout", "now_iso",
           "parse_color", "read_json_object", "sha256_file"]

SCHEMA_VERSION = 1
MODALITIES = ("CT", "MRI")
LABEL_KINDS = ("reference", "pseudo", "human", "predicted")
MACHINE_KINDS = ("pseudo", "predicted")
HUMAN_SOURCES = ("human", "simulated", "human-import")

_VERSION_FILE = re.compile(r"^v(\d{4,})" + re.escape(STORE_EXT) + "$")




# --- the project ---------------------------------------------------------------------------


def _read_config(root: Path) -> tuple[dict, LabelTable]:
    cfg_path = Layout(root).config
    if not root.is_dir():
        raise InputError(root, "project folder not found")
    if not cfg_path.is_file():
        raise InputError(root, f"not an ALSeg project ({CONFIG} missing)")
    config = read_json_object(cfg_path)
    schema = config.get("schema")
    if not isinstance(schema, int) or schema < 1:
        raise InputError(cfg_path, f"missing or invalid 'schema' ({schema!r})")
    if schema > SCHEMA_VERSION:
        raise InputError(cfg_path, f"schema {schema} is newer than this ALSeg understands ({SCHEMA_VERSION}); upgrade alseg")
    if not isinstance(config.get("name"), str) or not config["name"]:
        raise InputError(cfg_path, "missing or invalid 'name'")
    if config.get("modality") not in MODALITIES:
        raise InputError(cfg_path, f"'modality' must be CT or MRI, not {config.get('modality')!r}")
    return config, LabelTable.from_json(config.get("labels"), where=str(cfg_path))


class Project:
    """An ALSeg project folder. ``Project(path)`` (or :meth:`open`) opens one; :meth:`create` makes one."""

    def __init__(self, root: str | Path, config: dict | None = None, labels: LabelTable | None = None):
        root = Path(root)
        if config is None or labels is None:
            config, labels = _read_config(root)
        self.root = root
        self.layout = Layout(root)  # every path of the folder, each checked to stay inside it
        self.config = config
        self.labels = labels
        self._writer = WriterLock(self.layout.lock, on_acquire=self._after_acquire)
        self._events = EventLog(self.layout.events)

    # construction ------------------------------------------------------------------------

    @classmethod
    def create(
        cls, root: str | Path, labels: LabelTable | Mapping[str, int], modality: str, name: str | None = None
    ) -> Project:
        root = Path(root)
        table = labels if isinstance(labels, LabelTable) else LabelTable.from_mapping(labels)
        modality = str(modality).upper()
        if modality == "MR":
            modality = "MRI"
        if modality not in MODALITIES:
            raise InputError("--modality", f"must be CT or MRI, not {modality!r}")
        if root.exists() and not root.is_dir():
            raise InputError(root, "exists and is not a folder")
        if Layout(root).config.exists():
            raise InputError(root, "is already an ALSeg project")
        if root.exists() and any(root.iterdir()):
            raise InputError(root, "folder is not empty; create a project in a new or empty folder")
        root.mkdir(parents=True, exist_ok=True)
        config = {
            "schema": SCHEMA_VERSION,
            "name": name or root.resolve().name,
            "modality": modality,
            "labels": table.to_json(),
            "created": now_iso(),
            "tool": f"alseg {__version__}",
        }
        project = cls(root, config, table)
        with project.lock("init"):
            try:
                atomic.write_json(Layout(root).config, config, exclusive=True)
            except FileExistsError:
                raise InputError(root, "is already an ALSeg project (created concurrently)") from None
            project.log_event("project_created", modality=modality, labels=table.mapping)
        return project

    @classmethod
    def open(cls, root: str | Path) -> Project:
        return cls(root)

    # the loop (console API) -----------------------------------------------------------------

    def copy_to(self, dest: str | Path, *, cache: bool = False) -> Project:
        """A copy of the whole folder at ``dest`` (replaced if it exists), opened: one per seed or arm of the
        experiment, or the demo's supervised-only baseline. Lock files are left behind. The SAM embedding
        cache (GBs for a pool of volumes) is left out, or with ``cache`` hard-linked: its files are only
        ever replaced whole, never written in place."""
        dest = Path(dest)
        if dest.exists():
            shutil.rmtree(dest)
        ignore = shutil.ignore_patterns("*.lock")
        cache_dir, dest_cache = self.layout.cache, Layout(dest).cache
        shutil.copytree(self.root, dest, symlinks=True,
                        ignore=lambda d, names: set(ignore(d, names)) | ({cache_dir.name} if Path(d) == self.root else set()))
        if cache and cache_dir.is_dir():
            try:
                shutil.copytree(cache_dir, dest_cache, symlinks=True, copy_function=os.link, ignore=ignore)
            except OSError:  # another file system: a plain copy
                shutil.rmtree(dest_cache, ignore_errors=True)
                shutil.copytree(cache_dir, dest_cache, symlinks=True, ignore=ignore)
        return Project.open(dest)

    def update_labels(self, rename: Mapping[str, str] | None = None,
                      colors: Mapping[str, Sequence[float]] | None = None) -> LabelTable:
        """Rename label classes or change their colors in ``alseg.json`` (values stay).

        The configuration is read again under the lock, so a concurrent change by
        another process is kept, and replaced atomically."""
        with self.lock("update labels"):
            config, table = _read_config(self.root)
            new = table.updated(rename, colors, where="labels")
            config = {**config, "labels": new.to_json()}
            atomic.write_json(self.layout.config, config)
            self.config, self.labels = config, new
            self.log_event("labels_updated", rename=dict(rename or {}),
                           colors={k: list(v) for k, v in (colors or {}).items()}, labels=new.mapping)
        return new

    @property
    def modality(self) -> str:
        return self.config["modality"]

    @property
    def name(self) -> str:
        return self.config["name"]

    # lock and events ---------------------------------------------------------------------

    @contextmanager
    def lock(self, purpose: str = "write", timeout: float | None = None) -> Iterator[None]:
        """Hold the project's writer lock (re-entrant within one thread).

        Waits up to ``timeout`` seconds (``ALSEG_LOCK_TIMEOUT``, default 60) for
        another writer, process or thread, then raises :class:`ProjectLockedError`
        naming the holder. The OS releases the lock if the holder dies, so a
        killed writer never leaves the project locked; the next writer cleans up
        after it (see :meth:`_after_acquire`).
        """
        with self._writer.hold(purpose, timeout):
            yield

    def _after_acquire(self, stale_holder: str) -> None:
        self._clean_leftovers()
        if stale_holder:
            self._recover_after_crash(stale_holder)

    def _clean_leftovers(self) -> None:
        """Under the lock, temporaries and staging folders can only be a dead writer's."""
        for staging in self.root.glob(".staging-*"):
            shutil.rmtree(staging, ignore_errors=True)
        atomic.remove_stale_temporaries(self.root, recursive=False)
        for sub in (self.layout.images, self.layout.labels("human").parent, self.layout.rounds):
            if sub.is_dir():
                atomic.remove_stale_temporaries(sub)

    def _recover_after_crash(self, stale_holder: str) -> None:
        """The previous writer was killed holding the lock: record who it was and make
        the human labels' records whole again. A version file is only ever placed
        complete (atomic link), but the kill may have come before its provenance
        sidecar or its event: both are restored here, marked as recovered, so the
        event log names every stored human label."""
        m = re.match(r"pid (\d+) on (\S+)", stale_holder)
        pid, host = (int(m.group(1)), m.group(2)) if m else (None, None)
        self.log_event("lock_recovered", holder=stale_holder, holder_pid=pid, holder_host=host)
        logged = {(e.get("case"), e.get("version")) for e in self.events()
                  if e.get("event") in ("human_label_added", "human_label_recovered")}
        folder = self.layout.labels("human")
        cases = set(self.cases())
        for case_dir in sorted(folder.iterdir()) if folder.is_dir() else ():
            if not case_dir.is_dir() or case_dir.name not in cases:
                continue
            for version in self.human_versions(case_dir.name):
                path = self._label_file(case_dir.name, "human", version)
                sidecar = path.with_suffix(".json")
                if not sidecar.is_file():
                    atomic.write_json(sidecar, {
                        "kind": "human", "case": case_dir.name, "version": version, "source": "unknown",
                        "note": "recovered: the writer was killed after storing the label and before its provenance",
                        "recovered": now_iso(), "file_sha256": sha256_file(path), "tool": f"alseg {__version__}",
                    }, exclusive=True)
                if (case_dir.name, version) not in logged:
                    self.log_event("human_label_recovered", case=case_dir.name, version=version, after=stale_holder)

    def require_lock(self) -> None:
        """Refuse a write made without holding the project lock (a programming error)."""
        if not self._writer.held:
            raise RuntimeError("project write outside the project lock")

    def log_event(self, event: str, **details) -> None:
        self.require_lock()
        self._events.append(event, **details)

    def events(self) -> list[dict]:
        """All events; a torn last line (writer killed mid-append) is skipped."""
        return self._events.read()

    # cases ---------------------------------------------------------------------------------

    def cases(self) -> list[str]:
        folder = self.layout.images
        if not folder.is_dir():
            return []
        return sorted(p.name[: -len(STORE_EXT)] for p in folder.glob(f"*{STORE_EXT}") if not p.name.startswith("."))

    def has_case(self, case: str) -> bool:
        return self.image_path(case).is_file()

    def image_path(self, case: str) -> Path:
        return self.layout.image(case)

    def _require_case(self, case: str) -> None:
        if not self.has_case(case):
            raise InputError(f"case {case!r}", f"no such case in project {self.root}")

    def read_image(self, case: str) -> sitk.Image:
        self._require_case(case)
        return sitk.ReadImage(str(self.image_path(case)))

    def geometry(self, case: str) -> volumes.Geometry:
        self._require_case(case)
        return volumes.Geometry.read(self.image_path(case))

    def add_cases(
        self,
        sources: Sequence[str | Path],
        *,
        reference_dir: str | Path | None = None,
        references: Sequence[str | Path | None] | None = None,
        case_ids: Sequence[str] | None = None,
        allow_missing_reference: bool = False,
        reference_map: str | Mapping[int, int] | None = None,
    ) -> list[str]:
        """Add images (files, DICOM folders, or folders of them), optionally with reference labels.

        All or nothing: every image and label is read and validated into a staging
        folder first; any problem raises :class:`InputError` and nothing is added.
        References come from ``reference_dir`` (matched by case id, i.e. file name;
        nnU-Net's ``case_0000.nii.gz`` images find ``case.nii.gz`` labels) or from
        ``references`` (one path or None per source, API use); ``reference_map``
        (``"5=1,6=2"``) maps their values to the project's.
        """
        lut = (parse_mapping(reference_map, self.labels.values, "--map") if isinstance(reference_map, str)
               else dict(reference_map) if reference_map else None)
        items = expand_sources(sources) if references is None and case_ids is None else [Path(s) for s in sources]
        if case_ids is not None and len(case_ids) != len(items):
            raise InputError("case ids", f"{len(case_ids)} ids given for {len(items)} images")
        if references is not None and len(references) != len(items):
            raise InputError("references", f"{len(references)} references given for {len(items)} images")
        ids = [check_case_id(c) for c in case_ids] if case_ids is not None else [derive_case_id(p) for p in items]

        existing = {c.lower() for c in self.cases()}
        seen: dict[str, Path] = {}
        for case, src in zip(ids, items):
            if case.lower() in existing:
                raise InputError(src, f"case id {case!r} already exists in the project")
            if case.lower() in seen:
                raise InputError(src, f"case id {case!r} is also derived from {seen[case.lower()]}; rename one of them")
            seen[case.lower()] = src

        refs: list[Path | None] = [None] * len(items)
        if references is not None:
            refs = [Path(r) if r is not None else None for r in references]
            for r in refs:
                if r is not None and not r.exists():
                    raise InputError(r, "label file not found")
        elif reference_dir is not None:
            rdir = Path(reference_dir)
            if not rdir.is_dir():
                raise InputError(rdir, "reference folder not found")
            index = label_index(rdir)
            for case in ids:
                if len(index.get(case, [])) > 1:
                    raise InputError(rdir, f"several label files match case {case!r}: {', '.join(p.name for p in index[case])}")
            refs = [index[case][0] if case in index else None for case in ids]
            missing = [case for case, r in zip(ids, refs) if r is None]
            if missing and not allow_missing_reference:
                raise InputError(rdir, f"missing label file for {len(missing)} image(s): {', '.join(missing[:10])}"
                                 + (" …" if len(missing) > 10 else "") + " (or pass --allow-missing-reference)")

        with self.lock("add"):
            staging = self.layout.staging(secrets.token_hex(4))
            try:
                staged = []
                for case, src, ref in track(list(zip(ids, items, refs)), desc="reading images"):
                    staged.extend(self._stage_case(staging, case, src, ref, lut))
                for case in ids:  # under the lock now: re-check against a concurrent add
                    if self.has_case(case):
                        raise InputError(self.image_path(case), "appeared while adding; nothing was added")
                # Commit by renames. A case exists once its image is in place, so each
                # case's image goes last: a crash mid-commit leaves only files of cases
                # that do not exist yet, which a retry simply replaces.
                for case in ids:  # leftovers of a killed add must not attach to the new case
                    for kind in ("reference", *MACHINE_KINDS):
                        for leftover in (self._label_file(case, kind), self._label_file(case, kind).with_suffix(".json")):
                            leftover.unlink(missing_ok=True)
                for tmp, final in staged:
                    atomic.make_dirs(final.parent)
                    os.replace(tmp, final)
                for folder in {final.parent for _, final in staged}:
                    atomic.fsync_path(folder)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
            self.log_event(
                "cases_added", cases=ids, with_reference=[c for c, r in zip(ids, refs) if r is not None]
            )
        return ids

    def _stage_case(self, staging: Path, case: str, src: Path, ref: Path | None,
                    lut: Mapping[int, int] | None = None) -> list[tuple[Path, Path]]:
        image = volumes.read_image(src)
        geometry = volumes.Geometry.of(image)
        out = []  # (staged, final) in commit order: labels and sidecars first, the image last
        img_tmp = staging / "images" / f"{case}{STORE_EXT}"
        volumes.write_image(image, img_tmp)
        meta = {
            "case": case, "source": str(src.resolve()), "added": now_iso(), "tool": f"alseg {__version__}",
            "size": list(geometry.size), "spacing": list(geometry.spacing), "origin": list(geometry.origin),
            "direction": list(geometry.direction), "pixel_type": image.GetPixelIDTypeAsString(),
        }
        if src.is_file():
            meta["source_sha256"] = sha256_file(src)
        atomic.write_json(img_tmp.with_suffix(".json"), meta)
        if ref is not None:
            mapped: dict = {}
            if lut is None:
                try:
                    label = volumes.read_label(ref, label_values=self.labels.values, geometry=geometry)
                except InputError as exc:
                    raise _with_map_hint(exc) from None
            else:
                raw, dropped, present = map_label(read_any_label(ref), lut, ref, self.labels.values)
                label = volumes.validate_label(raw, str(ref), label_values=self.labels.values, geometry=geometry)
                mapped = {"value_map": {str(k): v for k, v in lut.items()},
                          "dropped_values": {str(k): n for k, n in dropped.items()}, "values_in_file": sorted(present)}
            lab_tmp = staging / "labels" / "reference" / f"{case}{STORE_EXT}"
            volumes.write_image(label, lab_tmp)
            prov = self._provenance(case, "reference", "import", {"file": str(ref.resolve()), "sha256": sha256_file(ref),
                                                                  **mapped}, label, lab_tmp)
            atomic.write_json(lab_tmp.with_suffix(".json"), prov)
            final = self._label_file(case, "reference")
            out += [(lab_tmp.with_suffix(".json"), final.with_suffix(".json")), (lab_tmp, final)]
        out += [(img_tmp.with_suffix(".json"), self.image_path(case).with_suffix(".json")), (img_tmp, self.image_path(case))]
        return out

    # labels ----------------------------------------------------------------------------------

    def _label_file(self, case: str, kind: str, version: int | None = None) -> Path:
        if kind not in LABEL_KINDS:
            raise InputError("--kind", f"unknown label kind {kind!r}; one of {', '.join(LABEL_KINDS)}")
        if kind == "human":
            if version is None:
                raise ValueError("human labels need a version")
            return self.layout.human_version(case, version)
        return self.layout.label(kind, case)

    def human_versions(self, case: str) -> list[int]:
        folder = self.layout.human_versions(case)
        if not folder.is_dir():
            return []
        return sorted(int(m.group(1)) for p in folder.iterdir() if (m := _VERSION_FILE.match(p.name)))

    def label_path(self, case: str, kind: str, version: int | None = None) -> Path | None:
        """Path of a stored label (human: the latest version unless ``version``), or None."""
        if kind == "human":
            versions = self.human_versions(case)
            if version is None:
                if not versions:
                    return None
                version = versions[-1]
            path = self._label_file(case, "human", version)
        else:
            path = self._label_file(case, kind)
        return path if path.is_file() else None

    def read_label(self, case: str, kind: str, version: int | None = None) -> sitk.Image:
        self._require_case(case)  # "no such case", not "has no label", for a case id that is not there
        path = self.label_path(case, kind, version)
        if path is None:
            what = f"{kind} label" + (f" v{version:04d}" if version else "")
            raise InputError(f"case {case!r}", f"has no {what}")
        return sitk.ReadImage(str(path))

    def provenance(self, case: str, kind: str, version: int | None = None, *, check_file: bool = True) -> dict:
        """The label's provenance sidecar; ``matches_file``: whether the label file is the one it
        describes (its checksum; ``check_file=False`` skips reading the label for summaries)."""
        self._require_case(case)
        path = self.label_path(case, kind, version)
        if path is None:
            raise InputError(f"case {case!r}", f"has no {kind} label")
        sidecar = path.with_suffix(".json")
        if not sidecar.is_file():
            return {"kind": kind, "case": case, "source": "unknown", "note": "provenance sidecar missing"}
        prov = read_json_object(sidecar)
        # a crash between writing a label and its sidecar leaves an older sidecar
        if check_file:
            prov["matches_file"] = prov.get("file_sha256") == sha256_file(path)
        return prov

    def _provenance(self, case: str, kind: str, source: str, produced_by: Mapping, label: sitk.Image, file: Path,
                    **extra) -> dict:
        present = [int(v) for v in volumes.values_present(sitk.GetArrayViewFromImage(label)) if v != 0]
        return {
            "kind": kind, "case": case, "source": source, "produced_by": dict(produced_by), "time": now_iso(),
            "tool": f"alseg {__version__}", "user": user_name(), "host": socket.gethostname(),
            "label_values_present": present, "file_sha256": sha256_file(file), **extra,
        }

    def _validated(self, case: str, label: sitk.Image | str | Path) -> sitk.Image:
        self._require_case(case)
        geometry = self.geometry(case)
        if isinstance(label, (str, Path)):
            return volumes.read_label(label, label_values=self.labels.values, geometry=geometry)
        return volumes.validate_label(label, f"label for case {case!r}", label_values=self.labels.values, geometry=geometry)

    def write_label(
        self, case: str, kind: str, label: sitk.Image | str | Path, *, source: str,
        produced_by: Mapping | None = None, replace_reference: bool = False, **extra,
    ) -> Path:
        """Store a machine label (``pseudo``/``predicted``, replacing the previous one)
        or a ``reference`` label (refused if one exists, unless ``replace_reference``).
        Human labels go through :meth:`add_human_label`: a machine never writes there."""
        if kind == "human":
            raise InputError("--kind human", "human labels are stored with add_human_label (a new version each time)")
        final = self._label_file(case, kind)
        label = self._validated(case, label)
        with self.lock(f"write {kind} label"):
            if kind == "reference" and final.exists() and not replace_reference:
                raise InputError(final, "a reference label already exists for this case")
            # provenance first, from the written temporary: a write that fails (a full disk)
            # leaves the previous label and its provenance as they were
            with atomic.atomic_path(final) as tmp:
                sitk.WriteImage(label, str(tmp), True)
                prov = self._provenance(case, kind, source, produced_by or {}, label, tmp, **extra)
                atomic.write_json(final.with_suffix(".json"), prov)
            self.log_event("label_written", case=case, kind=kind, source=source)
        return final

    def add_human_label(
        self, case: str, label: sitk.Image | str | Path, *, author: str | None = None,
        source: str = "human", produced_by: Mapping | None = None, annotated=None,
        pseudo: np.ndarray | None = None, predicted: np.ndarray | None = None, **extra,
    ) -> int:
        """Store a human label as the next version (``v0001``, ``v0002``, …); never overwrites.

        ``source`` is ``human`` (edited by a person), ``human-import`` (a manual
        label brought from elsewhere) or ``simulated`` (the oracle experiment).
        ``annotated``: a sparse version covering only these slices (a
        :class:`~.store.sparse.SliceSet`) or this mask (an image on the label's grid);
        the label is kept inside it only, the mask is stored beside the version and the
        slices in its provenance (:mod:`.store.sparse`). Returns the new version number.

        When the case has a pseudo-label, its Dice per class against this label (within the
        annotated voxels) is stored in the provenance as ``pseudo_agreement``: what the project's
        trust in its pseudo-labels is measured from (:mod:`.trust`). ``pseudo``: the stored
        pseudo-label's voxels when the caller holds them already (the reviewer opened them).
        Likewise the case's latest stored prediction (the model that proposed the case) as
        ``model_agreement``: how good the model was, measured without any reference label
        (:func:`.rounds.review_curve`); ``predicted``: its voxels when the caller holds them.
        """
        if source not in HUMAN_SOURCES:
            raise InputError("source", f"human labels come from {', '.join(HUMAN_SOURCES)}, not {source!r}")
        label = self._validated(case, label)
        mask = None
        if annotated is not None:
            mask = sparse.mask_array(annotated, label, f"annotated region of the label for case {case!r}")
            kept = sitk.GetImageFromArray(np.where(mask, sitk.GetArrayViewFromImage(label), 0).astype(
                sitk.GetArrayViewFromImage(label).dtype))
            kept.CopyInformation(label)
            label = kept
        human = sitk.GetArrayViewFromImage(label)
        for key, measure, held in (("pseudo_agreement", self.pseudo_agreement, pseudo),
                                   ("model_agreement", self.model_agreement, predicted)):
            try:  # best-effort: an unreadable machine label never stops a human label being stored
                record = measure(case, human, mask, held)
            except (OSError, RuntimeError, ValueError, InputError) as exc:
                record = {"error": f"{type(exc).__name__}: {str(exc)[:200]}"}
            if record is not None:
                extra = {**extra, key: record}
        with self.lock("accept human label"):
            versions = self.human_versions(case)
            version = (versions[-1] if versions else 0) + 1
            final = self._label_file(case, "human", version)
            mask_file = self.layout.human_version_mask(case, version)
            if mask_file.exists():  # a mask whose version's label never got written (a crash in between)
                mask_file.unlink()
            written = []
            try:
                if mask is not None:  # the mask first: a version's label never exists without its mask
                    mask_image = sitk.GetImageFromArray(mask.astype(np.uint8))
                    mask_image.CopyInformation(label)
                    volumes.write_image(mask_image, mask_file, exclusive=True)
                    written.append(mask_file)
                    extra = {**extra, "annotated": {**sparse.annotation_record(mask), "mask_file": mask_file.name,
                                                    "mask_sha256": sha256_file(mask_file)}}
                volumes.write_image(label, final, exclusive=True)
                written.append(final)
                prov = self._provenance(case, "human", source, produced_by or {}, label, final,
                                        version=version, author=author or user_name(), **extra)
                atomic.write_json(final.with_suffix(".json"), prov, exclusive=True)
                self.log_event("human_label_added", case=case, version=version, source=source, author=prov["author"],
                               **({"sparse_voxels": int(mask.sum())} if mask is not None else {}))
            except atomic.StorageError as exc:  # disk full after the label itself fit: take back this version
                final.with_suffix(".json").unlink(missing_ok=True)
                for path in reversed(written):
                    path.unlink(missing_ok=True)
                raise atomic.storage_error(OSError(exc.errno, ""), exc.where, "the label was not stored") from None
        return version

    def _agreement(self, case: str, kind: str, human: np.ndarray, mask: np.ndarray | None,
                   held: np.ndarray | None) -> tuple[dict, dict] | None:
        """The case's stored ``kind`` label (``held``: its voxels, when the caller read them already)
        against ``human`` within ``mask``: (its provenance, Dice per label value); None without one."""
        path = self.label_path(case, kind)
        if path is None:
            return None
        sidecar = path.with_suffix(".json")
        prov = read_json_object(sidecar) if sidecar.is_file() else {}
        if held is None or np.shape(held) != np.shape(human):
            held = sitk.GetArrayFromImage(sitk.ReadImage(str(path)))
        if held.shape != np.shape(human):
            raise ValueError(f"the {kind} label of {case!r} is on another grid than the human label")
        dice = agreement.class_dice(held, human, self.labels.values, mask)
        return prov, {str(v): None if d is None else round(d, 4) for v, d in dice.items()}

    def pseudo_agreement(self, case: str, human: np.ndarray, mask: np.ndarray | None = None,
                         pseudo: np.ndarray | None = None) -> dict | None:
        """The case's stored pseudo-label against ``human`` (a label's voxels on the case's grid;
        within ``mask`` when given): Dice per label value (``None`` where neither holds it), and which
        pseudo-label that was (its file checksum, from its sidecar, and source). None without one."""
        found = self._agreement(case, "pseudo", human, mask, pseudo)
        if found is None:
            return None
        prov, dice = found
        return {"pseudo_sha256": prov.get("file_sha256"), "pseudo_source": prov.get("source"), "dice": dice}

    def model_agreement(self, case: str, human: np.ndarray, mask: np.ndarray | None = None,
                        predicted: np.ndarray | None = None) -> dict | None:
        """The case's latest stored prediction against ``human`` (within ``mask``): Dice per label
        value, the model that made it and the prediction's checksum; None without a prediction."""
        found = self._agreement(case, "predicted", human, mask, predicted)
        if found is None:
            return None
        prov, dice = found
        return {"model": (prov.get("produced_by") or {}).get("model"), "predicted_sha256": prov.get("file_sha256"),
                "dice": dice}

    def add_human_slices(self, case: str, label: sitk.Image | str | Path, slices: sparse.SliceSet, **options) -> int:
        """Store ``label`` on ``slices`` only, merged with what the case's latest human version holds:
        the new version keeps every voxel annotated before (a sparse version's mask, or all of a
        whole-case one) and takes ``label`` on the new slices; the mask is the union. Returns the
        new version (the earlier ones stay, as always)."""
        label = self._validated(case, label)
        shape = sitk.GetArrayViewFromImage(label).shape
        new = slices.check(shape, f"annotated slices of the label for case {case!r}").mask(shape)
        versions = self.human_versions(case)
        if not versions:
            return self.add_human_label(case, label, annotated=slices, **options)
        before = sitk.GetArrayFromImage(self.read_label(case, "human"))
        before_mask = self.annotation_mask(case)
        merged = np.where(new, sitk.GetArrayViewFromImage(label), before).astype(before.dtype)
        image = sitk.GetImageFromArray(merged)
        image.CopyInformation(label)
        if before_mask is None:  # a whole-case version edited on some slices: still whole
            return self.add_human_label(case, image, **options)
        union = sitk.GetImageFromArray((before_mask | new).astype(np.uint8))
        union.CopyInformation(label)
        return self.add_human_label(case, image, annotated=union, **options)

    def annotation_mask(self, case: str, version: int | None = None) -> np.ndarray | None:
        """The annotated mask (bool, k, j, i) of a sparse human version (default: the latest), or
        None for a whole-case version."""
        self._require_case(case)
        versions = self.human_versions(case)
        if not versions:
            raise InputError(f"case {case!r}", "has no human label")
        version = versions[-1] if version is None else version
        path = self.layout.human_version_mask(case, version)
        if not path.is_file():
            return None
        return sitk.GetArrayFromImage(sitk.ReadImage(str(path))).astype(bool)

    def import_labels(
        self, files: Sequence[str | Path], kind: str, *, source: str = "import", author: str | None = None,
        mapping: str | Mapping[int, int] | None = None, replace: bool = False,
    ) -> list[tuple[str, int | None]]:
        """Import label files matched to cases by file name. Every file is checked
        (case exists, one file per case, valid label) before any is stored.

        ``mapping`` (``"5=1,6=2"``): another tool's values to the project's (unmapped values
        become background; the provenance lists them). A case's reference label is only
        replaced with ``replace`` (the event log records the one replaced)."""
        if kind not in LABEL_KINDS:
            raise InputError("--kind", f"unknown label kind {kind!r}; one of {', '.join(LABEL_KINDS)}")
        lut = parse_mapping(mapping, self.labels.values) if isinstance(mapping, str) else (dict(mapping) if mapping else None)
        plan = []
        seen: dict[str, Path] = {}
        for path in expand_sources(files):
            case = derive_case_id(path)
            if not self.has_case(case) and self.has_case(kept := derive_case_id(path, strip_channel=False)):
                case = kept  # a case added with its _0000 suffix, before the suffix was dropped
            if not self.has_case(case):
                raise InputError(path, f"no case {case!r} in the project for this label file")
            if case in seen:
                raise InputError(path, f"gives the same case {case!r} as {seen[case]}")
            seen[case] = path
            if kind == "reference" and self.label_path(case, "reference") is not None and not replace:
                raise InputError(path, f"case {case!r} already has a reference label (give --replace to replace it)")
            label, mapped = self._read_for_import(case, path, lut)
            plan.append((case, label, path, mapped))
        out = []
        with self.lock(f"import {kind} labels"):
            for case, label, path, mapped in plan:
                produced_by = {"file": str(path.resolve()), "sha256": sha256_file(path), **mapped}
                if kind == "human":
                    out.append((case, self.add_human_label(case, label, author=author, source="human-import",
                                                           produced_by=produced_by)))
                    continue
                old = self.label_path(case, kind) if kind == "reference" else None
                replaced = {"file_sha256": sha256_file(old), **self.provenance(case, kind)} if old is not None else None
                self.write_label(case, kind, label, source=source, produced_by=produced_by,
                                 replace_reference=replaced is not None)
                if replaced is not None:
                    self.log_event("reference_replaced", case=case, file=str(path.resolve()),
                                   replaced_sha256=replaced["file_sha256"], replaced_source=replaced.get("source"))
                out.append((case, None))
        return out

    def _read_for_import(self, case: str, path: Path, lut: Mapping[int, int] | None) -> tuple[sitk.Image, dict]:
        """The file's label on the case's grid, its values mapped through ``lut`` when given; and what the
        mapping did, for the provenance."""
        if lut is None:
            try:
                return self._validated(case, path), {}
            except InputError as exc:
                raise _with_map_hint(exc) from None
        mapped, dropped, present = map_label(read_any_label(path), lut, path, self.labels.values)
        return self._validated(case, mapped), {"value_map": {str(k): v for k, v in lut.items()},
                                               "dropped_values": {str(k): n for k, n in dropped.items()},
                                               "values_in_file": sorted(present)}

    def labeled_cases(self, kind: str) -> list[str]:
        """Cases of the project that have a label of ``kind`` (human: at least one version)."""
        if kind not in LABEL_KINDS:
            raise InputError("--kind", f"unknown label kind {kind!r}; one of {', '.join(LABEL_KINDS)}")
        folder = self.layout.labels(kind)
        if not folder.is_dir():
            return []
        cases = set(self.cases())
        if kind == "human":
            return sorted(p.name for p in folder.iterdir() if p.name in cases and self.human_versions(p.name))
        return sorted(c for p in folder.glob(f"*{STORE_EXT}") if (c := p.name[: -len(STORE_EXT)]) in cases)

    # summary -----------------------------------------------------------------------------

    def status(self) -> dict:
        cases = self.cases()
        kinds = {kind: self.labeled_cases(kind) for kind in LABEL_KINDS}
        human_versions = sum(len(self.human_versions(c)) for c in kinds["human"])
        rounds = sorted(p.name for p in self.layout.rounds.iterdir() if p.is_dir()) if self.layout.rounds.is_dir() else []
        events = self.events()
        return {
            "project": str(self.root.resolve()),
            "name": self.name,
            "modality": self.modality,
            "labels": self.labels.mapping,
            "cases": len(cases),
            "label_counts": {kind: len(v) for kind, v in kinds.items()},
            "human_versions": human_versions,
            "unlabeled": len(set(cases) - set(kinds["human"]) - set(kinds["pseudo"])),
            "rounds": rounds,
            "models": sorted(p.parent.name for p in self.layout.models.glob("*/model.json")),
            "events": len(events),
            "last_event": {k: events[-1][k] for k in ("time", "event")} if events else None,
        }

    def case_table(self) -> list[dict]:
        kinds = {kind: set(self.labeled_cases(kind)) for kind in LABEL_KINDS}
        return [
            {"case": c, **{k: (c in kinds[k]) for k in LABEL_KINDS}, "human_versions": len(self.human_versions(c))}
            for c in self.cases()
        ]


def _with_map_hint(exc: InputError) -> InputError:
    """A label file in another tool's values: say how to map them."""
    if "not in the label table" in exc.problem:
        return InputError(exc.where, f"{exc.problem}; give --map SOURCE=TARGET,... (e.g. 5=1) to map them")
    return exc
