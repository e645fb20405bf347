"""Write Testing/Benchmarks/README.md from the results files: no hand-typed figures.

Every figure on the page is read from ``Testing/Benchmarks/results/*.json``; the commands come from
the docstring of the benchmark script that writes each file. The prose kept here explains what a
row means and holds no number.

Run: python Testing/Benchmarks/make_readme.py            # rewrite the page
     python Testing/Benchmarks/make_readme.py --check    # exit 1 if the page on disk is not what it would write
     python Testing/Benchmarks/make_readme.py --results DIR --out FILE
"""
from __future__ import annotations

import argparse
import ast
import json
import math
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
README = HERE / "README.md"
NOT_MEASURED = "not measured"
NOT_RECORDED = "not recorded"
MISSING = object()

Rows = list[tuple[str, str]]

INTRO = """\
# Benchmarks: what was measured

Each `bench_*.py` script here writes `results/NAME.json` with the commit and the machine that made it; run them
alone on the machine (other jobs on the same cores change the times). This page is generated from those files:
`python Testing/Benchmarks/make_readme.py` regenerates it, and `--check` exits with status 1 if the page on disk
differs from what it would write (for CI and the tests), so a results file changed without regenerating the page
fails. Do not edit it by hand. Every figure below is read from a results file; a figure the file does not hold is
shown as "not measured". The sections of [../../docs/](../../docs/) explain each figure's setup and what it means.
"""

# Short explanations per benchmark (results-file stem or prefix). No numbers here: numbers come from the JSON only.
PROSE = {
    "add": "Wall time of `alseg add` (then `status` and `evaluate --kind reference`) on the shared Hippocampus cases with "
           "their references, each command as the installed console script in a fresh process (start-up included).",
    "al_round": "The oracle experiment on the shared Hippocampus: every arm at the same small annotated fraction of the "
                "pool, pseudo-labels simulated by degrading the references, the same compute per arm; test Dice is the "
                "mean of both classes on held-out cases, and each arm is also given as a fraction of full supervision.",
    "filtermatch": "FilterMatch against supervised-only and full supervision on the shared Hippocampus, the same "
                   "iteration budget for every arm; test Dice is the mean over both classes. The step ratio compares "
                   "post-warm-up FilterMatch steps to supervised steps (the goals are discussed in docs/nnunet.md).",
    "litemedsam": "The built-in LiteMedSAM: pseudo-label Dice with boxes taken from the references (Hippocampus against "
                  "expert labels; the CT example against a label a model made), encoder speed against "
                  "`SamPredictor.set_image`, the pseudo-label process's own peak memory, and the oracle experiment "
                  "on LiteMedSAM's pseudo-labels.",
    "nnunet": "nnU-Net inside ALSeg on the shared Hippocampus under a CPU budget: test Dice, seconds per iteration, and "
              "the engine's wall time against nnU-Net's own `nnUNetv2_train` and `nnUNetv2_predict` on the same "
              "dataset, trainer, plans and budget (ratio below one: the engine is faster).",
    "reliability": "Reliability at the issue's counts: processes killed at random moments, the bad-input catalogue, "
                   "untrusted checkpoints, full disk and read-only folders, fuzzing, concurrent writers, and training "
                   "resumed after kills. The goal is no lost or torn file and a clean error for every bad input.",
    "sam": "SAM pseudo-labels with random weights (speed and memory do not depend on them): ALSeg's one encoder pass "
           "per slice, shared by every label and prompt, against a naive loop that encodes the slice again for every "
           "prompt. The ratio is the naive loop's time over ALSeg's.",
    "selection": "Selection speed on synthetic case features (every strategy, with its peak memory, against the "
                 "distance-matrix method and the seed's reference loop, extrapolated) and selection quality on the "
                 "shared Hippocampus (a fresh model trained on each strategy's picks, scored on held-out cases).",
    "time_budget": "Estimated against actual durations on this machine (docs/time-and-memory.md): a validated nnU-Net "
                   "training (estimated after its probe of a few real iterations), a pool prediction and LiteMedSAM "
                   "pseudo-labels of a few cases, on phantoms, the shared Hippocampus and the shared CT example; "
                   "`alseg train --minutes` timed from outside as a user runs it; and the CT example's CPU plan "
                   "(the batch chosen, a real training step there against one at nnU-Net's batch).",
    "review": "The review loop's wait in the Slicer module: from Accept to the next case's volume and segmentation in "
              "the scene, on slicer-core's real MRML core with the module's glue and the engine (no Qt: the editor's "
              "and views' redraw inside Slicer is not in it), on a CT-sized case with three segments.",
    "sparse": "Slices against whole cases on the shared Hippocampus: every arm annotates about the same "
              "number of slices (as many as the whole-case arm's cases hold on average), the slice arms through nnU-Net's ignore "
              "label, the same fine-tuning from the same pretrained weights per arm; test Dice is the mean of both "
              "classes on held-out cases, AUBC the area under Dice against the share of slices annotated divided by "
              "its span, and the goals are paired per-seed differences in Dice points.",
    "distributed": "`--ray` against the single-machine path in one run on the shared Hippocampus: each path one "
                   "`alseg` command in a fresh process, timed from start to exit (Ray's start, the workers' model "
                   "loading and the driver's writes included); LiteMedSAM pseudo-labels (real weights, boxes from the "
                   "expert labels, no embedding cache on any path) and nnU-Net prediction with probabilities. "
                   "The speed-up compares two workers of one thread to one; the overhead compares `--ray` on all "
                   "cores to the single-machine path on all cores; the stored labels are compared byte for byte.",
    "few_prompts": "Boxes for a few cases: the Hippocampus oracle when only part of the pool is prompted (simulated "
                   "boxes from the references) and a round bootstraps the rest from a first nnU-Net, against "
                   "prompting every case; the pool's pseudo-label Dice and the held-out Dice after two rounds, per "
                   "seed, and the two bootstrap methods compared on the same cases.",
    "demo": "`alseg demo` (the README's main command) over several seeds: the held-out mean Dice per row (pseudo-labels "
            "only, each round, supervised-only on the last round's human labels), what the pseudo-labels buy, and the "
            "wall time per seed.",
}

DEMO_GOALS = ("mean_dice_rises_every_round", "every_class_above_0.5_at_last_round", "at_most_10_min_per_seed")


# --------------------------------------------------------------------------- values

def get(data, *path, default=MISSING):
    """The value at ``path`` (keys or list indices), or ``default`` when any step is absent."""
    for key in path:
        if isinstance(data, dict) and key in data:
            data = data[key]
        elif isinstance(data, list) and isinstance(key, int) and -len(data) <= key < len(data):
            data = data[key]
        else:
            return default
    return data


def absent(value) -> bool:
    return value is MISSING or value is None or (isinstance(value, float) and not math.isfinite(value))


def num(value) -> str:
    """A number rounded to four significant digits (whole numbers from ten thousand up)."""
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int):
        return str(value)
    if abs(value) >= 10_000:
        return str(round(value))
    return f"{value:.4g}"


def fmt(value, unit: str = "") -> str:
    """One value for a table cell: numbers rounded, ``unit`` appended, anything absent "not measured"."""
    if absent(value):
        return NOT_MEASURED
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, (int, float)):
        return num(value) + ("×" if unit == "×" else f" {unit}" if unit else "")
    if isinstance(value, list):
        return ", ".join(fmt(v, unit) for v in value) if value else "none"
    if isinstance(value, dict):
        return "; ".join(f"{k} {fmt(v, unit)}" for k, v in value.items()) if value else "none"
    return str(value)


def goal(value) -> str:
    if isinstance(value, bool):
        return "met" if value else "not met"
    return fmt(value)


def count(value) -> str:
    """How many items a list or dict holds (a failures list: its length), or the number itself."""
    if isinstance(value, (list, dict)):
        return str(len(value))
    return fmt(value)


def percent(fraction) -> str:
    try:
        return f"{float(fraction) * 100:g} %"
    except (TypeError, ValueError):
        return str(fraction)


def both(value, other, unit: str = "", sep: str = " vs ") -> str:
    return f"{fmt(value, unit)}{sep}{fmt(other, unit)}"


def cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


# --------------------------------------------------------------------------- extractors

def rows_add(d: dict) -> Rows:
    return [
        ("data", fmt(get(d, "data"))),
        ("cases added (with a reference)", f"{fmt(get(d, 'cases'))} ({fmt(get(d, 'with_reference'))})"),
        ("`alseg add` wall time", fmt(get(d, "add_wall_s"), "s")),
        ("`alseg add` per case", fmt(get(d, "add_per_case_ms"), "ms")),
        ("`alseg status` wall time (cases listed)", f"{fmt(get(d, 'status_wall_s'), 's')} ({fmt(get(d, 'status_cases'))})"),
        ("`alseg evaluate --kind reference` wall time", fmt(get(d, "evaluate_reference_wall_s"), "s")),
        ("its mean Dice (references against themselves)", fmt(get(d, "evaluate_mean_dice"))),
        ("project folder size", fmt(get(d, "project_size_mb"), "MB")),
    ]


def rows_al_round(d: dict) -> Rows:
    b = get(d, "budget", default={})
    setup = (f"{fmt(get(b, 'pool'))} pool / {fmt(get(b, 'test'))} test cases (split seed {fmt(get(b, 'split_seed'))}); "
             f"seeds {fmt(get(b, 'seeds'))}; rounds: {fmt(get(b, 'rounds'))} of {fmt(get(b, 'cases_per_round'))} cases, "
             f"{percent(get(d, 'fraction'))} of the pool annotated at the end; {fmt(get(b, 'device'))}, "
             f"{fmt(get(b, 'configuration'))}, batch {fmt(get(b, 'batch_size'))}; epochs × iterations: pretraining "
             f"{fmt(get(b, 'pretrain'))}, each training {fmt(get(b, 'each_training'))}, each from-scratch baseline "
             f"{fmt(get(b, 'each_baseline'))}")
    rows = [("setup", setup), ("pseudo-label Dice (simulated)", fmt(get(d, "pseudo_label_dice")))]
    dice = get(d, "dice", default={})
    if not isinstance(dice, dict) or not dice:
        rows.append(("test Dice per arm", NOT_MEASURED))
        dice = {}
    for arm, value in dice.items():
        ratio = get(d, "ratio_to_full", arm)
        text = f"{fmt(value)} = {fmt(ratio)} × full supervision" if not absent(ratio) else \
            f"{fmt(value)} (ratio to full supervision: {NOT_MEASURED})"
        curve = get(d, "curves", arm, default=[])
        if isinstance(curve, list) and len(curve) > 1:
            text += "; by round " + " → ".join(f"{fmt(get(p, 'mean_dice'))} (round {fmt(get(p, 'round'))})" for p in curve)
        seeds = get(d, "per_seed", arm)
        if isinstance(seeds, list) and len(seeds) > 1:
            text += f"; per seed {fmt(seeds)}"
        rows.append((f"test Dice, {arm}", text))
    rows.append(("best ALSeg arm", fmt(get(d, "best_alseg_arm"))))
    rows.append(("wall time, every arm and seed", fmt(get(b, "seconds"), "s")))
    return rows


def rows_filtermatch(d: dict) -> Rows:
    b = get(d, "budget", default={})
    rows = [("budget, every arm", f"{fmt(get(b, 'epochs'))} epochs × {fmt(get(b, 'iterations_per_epoch'))} iterations, "
                                  f"batch {fmt(get(b, 'batch_size'))}, {fmt(get(d, 'configuration'))}, {fmt(get(b, 'device'))}; "
                                  f"pool {fmt(get(d, 'split', 'pool'))}, test {fmt(get(d, 'split', 'test'))}")]
    fractions = get(d, "fractions", default={})
    if not isinstance(fractions, dict) or not fractions:
        rows.append(("test Dice per labeled fraction", NOT_MEASURED))
        fractions = {}
    drops = []
    for key, f in fractions.items():
        rows.append((f"test Dice at {percent(key)} labeled ({fmt(get(f, 'labeled'))} labeled, {fmt(get(f, 'unlabeled'))} "
                     "unlabeled): supervised / FilterMatch / FilterMatch with ALSeg's options / full",
                     " / ".join(fmt(get(f, arm)) for arm in ("supervised", "filtermatch", "filtermatch_alseg", "full"))))
        log = get(f, "filter_log", default=[])
        if isinstance(log, list) and log:
            drops.append(f"{percent(key)}: " + ", ".join(f"{fmt(get(e, 'dropped'))} at epoch {fmt(get(e, 'epoch'))}"
                                                         for e in log))
    if drops:
        rows.append(("unlabeled cases dropped by the filter passes", "; ".join(drops)))
    rows += [
        ("seconds per step: supervised / FilterMatch / FilterMatch with ALSeg's options",
         " / ".join(fmt(get(d, "step_s", arm), "s") for arm in ("supervised", "filtermatch", "filtermatch_alseg"))),
        ("step ratio FilterMatch / supervised", fmt(get(d, "step_ratio"))),
        ("step ratio with ALSeg's options", fmt(get(d, "step_ratio_alseg"))),
        ("wall time, whole benchmark", fmt(get(d, "total_s"), "s")),
    ]
    return rows


def rows_litemedsam(d: dict) -> Rows:
    rows: Rows = []
    for part, label in (("hippocampus", "Hippocampus"), ("ct", "CT example")):
        variants = get(d, part, "variants", default={})
        if not isinstance(variants, dict) or not variants:
            rows.append((f"{label} pseudo-label Dice", NOT_MEASURED))
            continue
        for v in variants.values():
            dice = get(v, "dice", default={})
            text = fmt(get(dice, "mean"))
            if part == "hippocampus" and isinstance(dice, dict):
                text += " (" + ", ".join(f"{c} {fmt(x)}" for c, x in dice.items() if c != "mean") + ")"
            rows.append((f"{label} (cases: {fmt(get(d, part, 'cases'))}, {fmt(get(d, part, 'axis'))}) pseudo-label mean Dice; "
                         f"boxes per structure: {fmt(get(v, 'boxes_per_structure'))}, between boxes by "
                         f"{fmt(get(v, 'between'))}", text))
    s = get(d, "speed", default={})
    rows += [
        ("encoder seconds per slice, fastest arm", f"{fmt(get(s, 'encoder_s_per_slice'), 's')} ({fmt(get(s, 'fastest'))})"),
        ("`SamPredictor.set_image` seconds per slice", fmt(get(s, "arms", "set_image", "s_per_slice"), "s")),
        ("speed-up against `set_image`", fmt(get(s, "speedup_vs_set_image"), "×")),
        ("encoder calls per slice / seconds per slice, Hippocampus pseudo-labels (every slice encoded)",
         both(get(d, "hippocampus", "encoding", "encoder_calls_per_slice"), get(d, "hippocampus", "encoding", "s_per_slice"),
              sep=" / ") + " s"),
    ]
    runs = get(d, "memory", "runs", default=[])
    if isinstance(runs, list) and runs:
        text = ", ".join(f"{fmt(get(r, 'peak_gib'), 'GiB')} on {fmt(get(r, 'cases'))} cases" for r in runs)
        rows.append(("peak memory, the pseudo-label process alone", f"{text} (grows with the cases: "
                                                                    f"{fmt(get(d, 'memory', 'grows_with_cases'))})"))
    else:
        rows.append(("peak memory, the pseudo-label process alone", NOT_MEASURED))
    rows.append(("peak memory, the whole Hippocampus part's process", fmt(get(d, "hippocampus", "peak_gib"), "GiB")))
    oracle = get(d, "oracle")
    if absent(oracle):
        rows.append(("oracle experiment on LiteMedSAM's pseudo-labels (`--parts oracle`)", NOT_MEASURED))
    else:
        rows.append(("oracle: best ALSeg arm, × full supervision",
                     f"{fmt(get(oracle, 'best_alseg_arm'))}, {fmt(get(oracle, 'best_alseg_ratio_to_full'))}"))
        rows.append(("oracle: test Dice per arm", fmt(get(oracle, "dice"))))
    return rows


def rows_nnunet(d: dict) -> Rows:
    b = get(d, "budget", default={})
    return [
        ("setup", f"{fmt(get(d, 'split', 'train'))} training / {fmt(get(d, 'split', 'test'))} test cases, "
                  f"{fmt(get(d, 'configuration'))}, batch {fmt(get(d, 'plans', 'batch_size'))}, {fmt(get(b, 'epochs'))} epochs × "
                  f"{fmt(get(b, 'iterations_per_epoch'))} iterations, {fmt(get(b, 'device'))}"),
        ("test Dice, engine (mean of both classes)", fmt(get(d, "dice_test"))),
        ("test Dice, nnU-Net's command-line tools", fmt(get(d, "dice_test_cli"))),
        ("validation Dice", fmt(get(d, "validation_dice"))),
        ("seconds per iteration (training and validation)", fmt(get(d, "s_per_iter"), "s")),
        ("planning", fmt(get(d, "plan_s"), "s")),
        ("engine wall time (train + predict)", f"{fmt(get(d, 'engine_s'), 's')} ({fmt(get(d, 'engine_train_s'), 's')} + "
                                               f"{fmt(get(d, 'engine_predict_s'), 's')})"),
        ("command-line tools wall time (train + predict)", f"{fmt(get(d, 'cli_s'), 's')} ({fmt(get(d, 'cli_train_s'), 's')} + "
                                                           f"{fmt(get(d, 'cli_predict_s'), 's')})"),
        ("ratio engine / command-line tools", fmt(get(d, "overhead_ratio"))),
    ]


def rows_reliability(d: dict) -> Rows:
    fuzz = get(d, "fuzz_targets", default={})
    targets = ", ".join(f"{name} {fmt(get(t, 'examples'))} ({fmt(get(t, 'clean_errors'))} clean errors)"
                        for name, t in fuzz.items()) if isinstance(fuzz, dict) and fuzz else NOT_MEASURED
    return [
        ("processes killed at random moments: trials / torn or lost files",
         both(get(d, "kill_trials"), get(d, "torn"), sep=" / ")),
        ("kills while holding the lock; label and config writes; human label files",
         f"{fmt(get(d, 'kill_details', 'kills_while_holding_lock'))}; {fmt(get(d, 'kill_details', 'label_and_config_writes'))}; "
         f"{fmt(get(d, 'kill_details', 'human_label_files'))}"),
        ("bad-input kinds / not a clean error", both(get(d, "bad_input_kinds"), get(d, "bad_input_failures"), sep=" / ")),
        ("untrusted-checkpoint tests / failures", f"{fmt(get(d, 'untrusted_checkpoint_tests'))} / "
                                                  f"{count(get(d, 'untrusted_checkpoint_failures'))}"),
        ("full-disk and read-only tests / failures", f"{fmt(get(d, 'storage_tests'))} / {count(get(d, 'storage_failures'))}"),
        ("fuzzed inputs / neither a result nor a clean error", both(get(d, "fuzz_examples"), get(d, "fuzz_failures"), sep=" / ")),
        ("fuzz targets", targets),
        ("concurrent-writer trials / lost updates", both(get(d, "concurrent_trials"), get(d, "lost_updates"), sep=" / ")),
        ("training resumed after a kill: trials / failures", both(get(d, "resume_trials"), get(d, "resume_failures"), sep=" / ")),
        ("wall time per part", fmt(get(d, "seconds"), "s")),
    ]


def rows_sam(d: dict) -> Rows:
    rows: Rows = []
    models = get(d, "arms", default={})
    if not isinstance(models, dict) or not models:
        models = {}
        rows.append(("encoder calls, seconds and peak memory per slice", NOT_MEASURED))
    for model in models:
        arm = get(models, model, "alseg", default={})
        naive = get(models, model, "naive", default={})
        rows += [
            (f"{model}: encoder calls per slice, ALSeg vs naive",
             both(get(arm, "encoder_calls_per_slice"), get(naive, "encoder_calls_per_slice"))),
            (f"{model}: seconds per slice, ALSeg vs naive", both(get(arm, "s_per_slice"), get(naive, "s_per_slice"), "s")),
            (f"{model}: peak memory, ALSeg vs naive", both(get(arm, "peak_gib"), get(naive, "peak_gib"), "GiB")),
            (f"{model}: ALSeg faster than the naive loop by", fmt(get(models, model, "naive_ratio"), "×")),
        ]
    note = get(d, "real_weights", "note")
    dice = fmt(get(d, "real_weights", "dice"))
    rows.append(("pseudo-label Dice with real weights", dice + (f" ({note})" if not absent(note) else "")))
    rows.append(("wall time, whole benchmark", fmt(get(d, "total_s"), "s")))
    return rows


def rows_selection(d: dict) -> Rows:
    rows: Rows = [("speed setup", f"{fmt(get(d, 'n'))} cases × {fmt(get(d, 'd'))} dimensions, {fmt(get(d, 'k'))} picks, "
                                  f"{fmt(get(d, 'labeled'))} already labeled")]
    seconds = get(d, "seconds", default={})
    if not isinstance(seconds, dict) or not seconds:
        rows.append(("seconds and peak memory per strategy", NOT_MEASURED))
        seconds = {}
    for strategy, value in seconds.items():
        rows.append((f"{strategy}: seconds, peak memory", f"{fmt(value, 's')}, {fmt(get(d, 'peak_mib', strategy), 'MiB')}"))
    m = get(d, "matrix_method", default={})
    rows += [
        ("distance-matrix method: seconds, peak memory, same picks as coreset",
         f"{fmt(get(m, 'seconds'), 's')}, {fmt(get(m, 'peak_mib'), 'MiB')}, {fmt(get(m, 'same_picks_as_coreset'))}"),
        ("seed's reference loop (extrapolated)", fmt(get(d, "reference_loop", "extrapolated_seconds"), "s")),
        ("coreset faster than the matrix method / the reference loop by",
         both(get(d, "speedup_vs_matrix"), get(d, "speedup_vs_reference_loop"), "×", sep=" / ")),
        ("quality setup", f"pool {fmt(get(d, 'setup', 'pool'))}, test {fmt(get(d, 'setup', 'test'))}, budget "
                          f"{fmt(get(d, 'setup', 'budget_cases'))} cases ({fmt(get(d, 'setup', 'budget'))}), seeds "
                          f"{fmt(get(d, 'setup', 'seeds'))}"),
    ]
    mean = get(d, "mean_dice", default={})
    if not isinstance(mean, dict) or not mean:
        rows.append(("mean test Dice per strategy", NOT_MEASURED))
        mean = {}
    for strategy, value in mean.items():
        rows.append((f"mean test Dice, {strategy} (per seed)", f"{fmt(value)} ({fmt(get(d, 'dice', strategy))})"))
    return rows


def mapping(d: dict, key: str, what: str, rows: Rows) -> dict:
    """The results file's mapping ``key``; empty, with a "not measured" row for ``what``, when absent."""
    value = get(d, key, default={})
    if not isinstance(value, dict) or not value:
        rows.append((what, NOT_MEASURED))
        return {}
    return value


def rows_demo(d: dict) -> Rows:
    rows: Rows = [("setup", f"pseudo-labels {fmt(get(d, 'pseudo_source'))}, seeds {fmt(get(d, 'seeds'))}, arguments "
                            f"{fmt(get(d, 'extra_arguments'))}")]
    mean = mapping(d, "mean_over_seeds", "held-out mean Dice per row, mean over seeds", rows)
    for key, row in mean.items():
        rows.append((f"{key}: mean Dice (per class; HD95; seeds)",
                     f"{fmt(get(row, 'mean_dice'))} ({fmt(get(row, 'dice'))}; {fmt(get(row, 'hd95'))}; "
                     f"{fmt(get(row, 'seeds'))})"))
    rows += [
        ("what the pseudo-labels buy (last round - supervised-only)", fmt(get(d, "pseudo_labels_buy"))),
        ("wall time per seed: max / mean", both(get(d, "wall_s", "max"), get(d, "wall_s", "mean"), "s", sep=" / ")),
        ("wall time, each seed", fmt(get(d, "wall_s", "per_seed"), "s")),
    ]
    goals = get(d, "goals", default={})
    for name in DEMO_GOALS:
        if not isinstance(goals, dict) or name not in goals:
            rows.append((f"goal: `{name}`", NOT_MEASURED))
    return rows


def rows_time_budget(d: dict) -> Rows:
    rows: Rows = []
    estimates = mapping(d, "estimates", "estimated vs actual", rows)
    for job, e in estimates.items():
        rows.append((f"`{job}`: estimated vs actual (ratio; within 25 %)",
                     f"{both(get(e, 'estimated_s'), get(e, 'actual_s'), 's')} ({fmt(get(e, 'ratio'))}; "
                     f"{fmt(get(e, 'within_25_percent'))})"))
    rows.append(("estimates within 25 %", fmt(get(d, "estimates_within_25_percent"))))
    m = get(d, "minutes_budget", default=None)
    if isinstance(m, dict):
        rows.append(("`alseg train --minutes`: asked vs actual (min; within 2 min)",
                     f"{both(get(m, 'asked_min'), get(m, 'actual_min'))} ({fmt(get(m, 'within_2_min'))})"))
        rows.append(("`--minutes`: budget chosen", fmt(get(m, "chosen"))))
    else:
        rows.append(("`alseg train --minutes`", NOT_MEASURED))
    plans = get(d, "cpu_plan", default=None)
    if isinstance(plans, dict):
        for config, p in plans.items():
            rows.append((f"CT example CPU plan, {config}: batch vs nnU-Net's; step s vs nnU-Net's batch's",
                         f"{both(get(p, 'batch'), get(p, 'nnunet_batch'))}; "
                         f"{both(get(p, 'step_s'), get(p, 'default_step_s'), 's')} (ratio {fmt(get(p, 'step_ratio'))})"))
    else:
        rows.append(("CT example CPU plan", NOT_MEASURED))
    rows.append(("wall time of the benchmark", fmt(get(d, "seconds"), "s")))
    return rows


def rows_sparse(d: dict) -> Rows:
    b = get(d, "budget", default={})
    setup = (f"{fmt(get(b, 'pool'))} pool / {fmt(get(b, 'test'))} test cases (split seed {fmt(get(b, 'split_seed'))}); "
             f"seeds {fmt(get(b, 'seeds'))}; {fmt(get(b, 'rounds'))} rounds; whole-case arm {fmt(get(b, 'cases_per_round'))} "
             f"cases a round, slice arms {fmt(get(b, 'slices_per_round'))} slices a round (slabs of {fmt(get(b, 'slab'))}, "
             f"unannotated voxels: {fmt(get(b, 'sparse_fill'))}); {fmt(get(b, 'device'))}, {fmt(get(b, 'configuration'))}, "
             f"batch {fmt(get(b, 'batch_size'))}; epochs × iterations: pretraining {fmt(get(b, 'pretrain'))}, each "
             f"round's fine-tuning {fmt(get(b, 'each_training'))}; pseudo-label share {fmt(get(b, 'pseudo_share'))}")
    rows = [("setup", setup), ("slice budget (all rounds)", fmt(get(d, "slices_budget"))),
            ("pseudo-label Dice (simulated)", fmt(get(d, "pseudo_label_dice")))]
    dice = get(d, "dice", default={})
    if not isinstance(dice, dict) or not dice:
        return [*rows, ("test Dice per arm", NOT_MEASURED)]
    for arm, value in dice.items():
        spread = get(d, "spread", arm, default={})
        text = (f"{fmt(value)} (per seed {fmt(get(d, 'per_seed', arm))}; std {fmt(get(spread, 'std'))}); AUBC "
                f"{fmt(get(d, 'aubc', arm))}; foreground Dice {fmt(get(d, 'foreground_dice', arm))}; slices annotated "
                f"{fmt(get(d, 'slices_annotated', arm))}")
        rows.append((f"test Dice, {arm}", text))
    for key, what in (("best_slice_minus_whole", f"best slice arm ({fmt(get(d, 'best_slice_arm'))}) − whole-case hybrid"),
                      ("slice_hybrid_minus_random_fg", "slice hybrid − slice random-fg")):
        g = get(d, "goals", key, default=None)
        if isinstance(g, dict):
            rows.append((f"{what}, Dice points (paired by seed)",
                         f"{fmt(get(g, 'mean_points'))} (per seed {fmt(get(g, 'per_seed_points'))}; better in "
                         f"{fmt(get(g, 'seeds_better'))} of {fmt(get(g, 'of_seeds'))} seeds); AUBC "
                         f"{fmt(get(g, 'aubc_points'))} points"))
    rows.append(("wall time per run", fmt(get(b, "seconds"), "s")))
    return rows


def rows_review(d: dict) -> Rows:
    case = get(d, "case", default={})
    return [
        ("case", f"{fmt(get(case, 'shape_zyx'))} voxels (z, y, x), {fmt(get(case, 'segments'))} segments"),
        ("accept -> next case ready: median / max (goal < 1 s; met)",
         f"{both(get(d, 'accept_to_next_s', 'median'), get(d, 'accept_to_next_s', 'max'), 's', sep=' / ')} "
         f"({fmt(get(d, 'goal_met'))})"),
        ("of which accept / open the next (medians)",
         both(get(d, "accept_s_median"), get(d, "open_next_s_median"), "s", sep=" / ")),
        ("the first case's open (nothing read ahead)", fmt(get(d, "first_open_s"), "s")),
        ("accepts timed", fmt(get(d, "accepts"))),
    ]


def rows_distributed(d: dict) -> Rows:
    st = get(d, "settings", default={})
    rows = [("setup", f"{fmt(get(d, 'cases'))} cases; LiteMedSAM {fmt(get(st, 'boxes'))} boxes per structure, axis "
                      f"{fmt(get(st, 'axis'))}; nnU-Net {fmt(get(st, 'configuration'))}; device {fmt(get(st, 'device'))}; "
                      f"Ray workers compared {fmt(get(st, 'workers'))} of {fmt(get(st, 'threads'))} thread(s)")]
    seconds = get(d, "seconds", default={})
    if not isinstance(seconds, dict) or not seconds:
        return [*rows, ("seconds per path", NOT_MEASURED)]
    for part, per_path in seconds.items():
        paths = ", ".join(f"{k} {fmt(v, 's')}" for k, v in per_path.items()) if isinstance(per_path, dict) else fmt(per_path)
        rows.append((f"{part}: wall time per path", paths))
        rows.append((f"{part}: 2 workers vs 1 (goal ≥ 1.7)", fmt(get(d, "speedup_2_vs_1", part))))
        rows.append((f"{part}: --ray on all cores vs the single-machine path (goal ≤ 1.1)",
                     fmt(get(d, "overhead_vs_local", part))))
        rows.append((f"{part}: stored labels identical on every path", fmt(get(d, "identical", part))))
    rows.append(("wall time of the run", fmt(get(d, "wall_s"), "s")))
    return rows


def rows_pseudo_trust(d: dict) -> Rows:
    rows: Rows = []
    ablation = mapping(d, "ablation", "ablation of the round's recipe on LiteMedSAM's pseudo-labels", rows)
    for seed, data in ablation.items():
        rows.append((f"ablation seed {seed}: LiteMedSAM pseudo-label Dice per class (training cases)",
                     fmt(get(data, "pseudo_label_dice"))))
        for arm, a in get(data, "arms", default={}).items():
            chain = " → ".join(fmt(get(a, k, "mean_dice")) for k in ("pseudo_only", "round1", "round2"))
            rows.append((f"seed {seed}, {arm}: mean Dice pseudo-only → round 1 → round 2; supervised-only",
                         f"{chain}; {fmt(get(a, 'supervised_only', 'mean_dice'))}"))
            rows.append((f"seed {seed}, {arm}: round 2 per class; supervised-only per class",
                         f"{fmt(get(a, 'round2', 'dice'))}; {fmt(get(a, 'supervised_only', 'dice'))}"))
            rows.append((f"seed {seed}, {arm}: voxels corrected / drawn from scratch", fmt(get(a, "effort",
                                                                                              "corrected_fraction"))))
    demo = get(d, "demo", default={})
    per_seed = get(demo, "per_seed", default=[]) if isinstance(demo, dict) else []
    if not per_seed:
        rows.append(("demo (alseg demo on LiteMedSAM), per seed", NOT_MEASURED))
    for row in per_seed:
        rows.append((f"demo seed {fmt(get(row, 'seed'))}: pseudo-only → round 1 → round 2; supervised-only; wall",
                     f"{fmt(get(row, 'pseudo_only'))} → {fmt(get(row, 'round1'))} → {fmt(get(row, 'round2'))}; "
                     f"{fmt(get(row, 'supervised_only'))}; {fmt(get(row, 'wall_s'), 's')}"))
        rows.append((f"demo seed {fmt(get(row, 'seed'))}: round 2 per class", fmt(get(row, "round2_per_class"))))
    oracle = get(d, "oracle", default=None)
    if not absent(oracle):
        seeds = get(oracle, "seeds_run", default=[])
        rows.append(("Hippocampus oracle on LiteMedSAM pseudo-labels: seeds; pool / test",
                     f"{fmt(seeds)}; {fmt(get(oracle, 'pool'))} / {fmt(get(oracle, 'test'))}"))
        for fraction, arms in sorted((get(oracle, "fractions", default={}) or {}).items(), key=lambda kv: float(kv[0])):
            rows.append((f"oracle at {100 * float(fraction):g} % annotated: mean Dice per arm (per seed)",
                         "; ".join(f"{arm} {fmt(v)}" for arm, v in arms.items())))
        rows.append(("oracle: full supervision (per seed)", fmt(get(oracle, "full"))))
    effort = get(d, "effort", default=None)
    if not absent(effort):
        rows.append(("effort at the last fraction, voxels corrected / drawn from scratch (mean over seeds)",
                     "; ".join(f"{arm} {fmt(v)}" for arm, v in effort.items())))
    for key, what in (("oracle", "Hippocampus oracle on LiteMedSAM pseudo-labels (2.5 % and 5 %)"),
                      ("cardiac", "a class the source fails on: the shared cardiac set"),
                      ("effort", "effort per arm at 5 % (Hippocampus oracle)")):
        if absent(get(d, key, default=None)):
            rows.append((what, NOT_MEASURED))
    return rows


def rows_few_prompts(d: dict) -> Rows:
    rows: Rows = [("setup", fmt(get(d, "setup")))]
    fractions = get(d, "prompted_fraction", default={})
    if not isinstance(fractions, dict) or not fractions:
        return [*rows, ("per prompted fraction", NOT_MEASURED)]
    for fraction, f in sorted(fractions.items(), key=lambda kv: float(kv[0])):
        boot = get(f, "bootstrapped_dice")
        boot = "none bootstrapped" if isinstance(boot, list) and all(b is None for b in boot) else fmt(boot)
        rows.append((f"{100 * float(fraction):g} % prompted (seeds {fmt(get(f, 'seeds'))}): boxes drawn; pool pseudo-label "
                     "Dice (bootstrapped cases alone); mean Dice after 2 rounds (5 %)",
                     f"{fmt(get(f, 'boxes'))}; {fmt(get(f, 'pseudo_label_dice'))} ({boot}); "
                     f"{fmt(get(f, 'final_dice'))}"))
    for seed, g in (get(d, "goal_10_percent", default={}) or {}).items():
        rows.append((f"seed {seed}: 100 % minus 10 % prompted, final Dice (goal ≤ 0.02); boxes 10 % / 100 % (goal 0.1)",
                     f"{fmt(get(g, 'final_dice_gap'))} ({'met' if get(g, 'met') else 'missed'}); "
                     f"{fmt(get(g, 'boxes_ratio'))}"))
    methods = get(d, "bootstrap_methods", default=None)
    if not absent(methods):
        rows.append(("bootstrap methods on the same cases: prediction / LiteMedSAM from its outlines (s per case)",
                     f"{fmt(get(methods, 'predict'))} / {fmt(get(methods, 'sam'))} "
                     f"({fmt(get(methods, 'sam_seconds_per_case'), 's')}; {fmt(get(methods, 'cases'))} cases)"))
    return rows


def rows_generic(d: dict) -> Rows:
    """Unknown results file: its top-level scalar fields."""
    skip = {"benchmark", "commit", "time"}
    rows = [(f"`{k}`", fmt(v)) for k, v in d.items() if k not in skip and (v is None or isinstance(v, (str, int, float)))]
    return rows or [("figures", NOT_MEASURED)]


EXTRACTORS: dict[str, Callable[[dict], Rows]] = {
    "add": rows_add,
    "al_round": rows_al_round,
    "filtermatch": rows_filtermatch,
    "litemedsam": rows_litemedsam,
    "nnunet": rows_nnunet,
    "reliability": rows_reliability,
    "sam": rows_sam,
    "selection": rows_selection,
    "demo": rows_demo,
    "time_budget": rows_time_budget,
    "review": rows_review,
    "sparse": rows_sparse,
    "distributed": rows_distributed,
    "pseudo_trust": rows_pseudo_trust,
    "few_prompts": rows_few_prompts,
}


def family(stem: str) -> str | None:
    """The extractor key for a results-file stem: the stem itself, else the longest key it starts with (``key_...``)."""
    if stem in EXTRACTORS:
        return stem
    keys = [k for k in EXTRACTORS if stem.startswith(k + "_")]
    return max(keys, key=len) if keys else None


def goal_rows(data, path: tuple = ()) -> Rows:
    """Every field whose key contains "goal", wherever it is (per-seed lists aside), flattened."""
    rows: Rows = []
    if not isinstance(data, dict):
        return rows
    for key, value in data.items():
        here = (*path, str(key))
        if "goal" in str(key).lower():
            rows += flatten_goal(value, here)
        elif isinstance(value, dict):
            rows += goal_rows(value, here)
    return rows


def flatten_goal(value, path: tuple) -> Rows:
    if isinstance(value, dict):
        out: Rows = []
        for key, sub in value.items():
            out += flatten_goal(sub, (*path, str(key)))
        return out or [(f"goal: `{'.'.join(path)}`", NOT_MEASURED)]
    return [(f"goal: `{'.'.join(path)}`", goal(value))]


# --------------------------------------------------------------------------- scripts and commands

def docstring_text(source: str) -> str:
    """The module docstring as written in the source (backslash continuations kept)."""
    tree = ast.parse(source)
    if not (tree.body and isinstance(tree.body[0], ast.Expr) and isinstance(tree.body[0].value, ast.Constant)
            and isinstance(tree.body[0].value.value, str)):
        return ""
    text = ast.get_source_segment(source, tree.body[0].value) or ""
    text = re.sub(r'^[rRuUbB]*("""|\'\'\'|"|\')', "", text)
    return re.sub(r'("""|\'\'\'|"|\')$', "", text)


def is_command(line: str) -> bool:
    return line.startswith((".venv/bin/python", "python")) or (line.startswith("for ") and "python" in line)


def commands(script: Path) -> list[str]:
    """The docstring's command lines (after an optional ``Run:``), with their continuation lines, and the GPU
    heading ("... on a GPU ...") before a command as a comment."""
    lines = docstring_text(script.read_text()).splitlines()
    out: list[str] = []
    previous = ""
    i = 0
    while i < len(lines):
        raw = lines[i]
        line = re.sub(r"^\s*Run:\s*", "", raw).strip()
        if is_command(line):
            if "GPU" in previous and not is_command(previous):
                out.append("# " + previous.rstrip(":") + ":")
            out.append(line)
            while raw.rstrip().endswith("\\") and i + 1 < len(lines):
                i += 1
                raw = lines[i]
                out.append("    " + raw.strip())
        previous = raw.strip()
        i += 1
    return out


def find_scripts(stem: str, data: dict, scripts: dict[str, str]) -> list[str]:
    """The benchmark scripts that write ``stem``.json: those naming the file (or ``write_results("stem"``), else
    those naming the recorded benchmark name, else the longest prefix of the stem that one of them names."""
    names = [stem]
    if isinstance(data.get("benchmark"), str):
        names.append(data["benchmark"])
    parts = stem.split("_")
    names += ["_".join(parts[:n]) for n in range(len(parts) - 1, 0, -1)]
    for name in names:
        pattern = re.compile(rf"(?<![\w/.-]){re.escape(name)}\.json\b|(?<=/){re.escape(name)}\.json\b"
                             rf"|write_results\(\s*[\"']{re.escape(name)}[\"']")
        found = sorted(s for s, text in scripts.items() if pattern.search(text))
        if found:
            return found
    return []


# --------------------------------------------------------------------------- page

def machine_text(m) -> str:
    if not isinstance(m, dict) or not m:
        return NOT_RECORDED
    parts = [str(m["platform"]) if m.get("platform") else None,
             f"Python {m['python']}" if m.get("python") else None,
             f"{m['cpus']} CPUs" if m.get("cpus") is not None else None,
             f"{num(m['memory_gib'])} GiB memory" if isinstance(m.get("memory_gib"), (int, float)) else None,
             str(m["processor"]) if m.get("processor") else None]
    return ", ".join(p for p in parts if p) or NOT_RECORDED


def meta_lines(d: dict, stem: str) -> list[str]:
    lines = [f"- commit: `{d['commit']}`" if d.get("commit") else f"- commit: {NOT_RECORDED}",
             f"- machine: {machine_text(d.get('machine'))}",
             f"- date: {d['time']}" if d.get("time") else f"- date: {NOT_RECORDED}"]
    if isinstance(d.get("benchmark"), str) and d["benchmark"] != stem:
        lines.append(f"- benchmark name recorded in the file: `{d['benchmark']}`")
    for key, value in d.items():
        if key.endswith("_commit") and isinstance(value, str):
            lines.append(f"- `{key}`: `{value}`")
        elif isinstance(value, dict) and isinstance(value.get("commit"), str):
            lines.append(f"- part `{key}`: commit `{value['commit']}`" + (f", {value['time']}" if value.get("time") else ""))
    runs = d.get("merged_runs")
    if isinstance(runs, list) and runs:
        pooled = "; ".join(f"`{get(r, 'file', default='?')}` (commit `{get(r, 'commit', default='?')}`, "
                           f"{get(r, 'time', default=NOT_RECORDED)}, seeds {fmt(get(r, 'seeds'))})" for r in runs)
        lines.append(f"- pooled from: {pooled}")
    for key, value in d.items():
        if (key in ("note", "notes") or key.endswith("_note")) and isinstance(value, str):
            lines.append(f"- {key.replace('_', ' ')} (from the results file): {value}")
    return lines


def check_prose() -> None:
    for key, text in PROSE.items():
        if re.search(r"(?<![\w.])\d", text):  # a number, not a digit inside a name (nnUNetv2_train)
            raise ValueError(f"PROSE[{key!r}] holds a number: figures come from the results files only")


def section(path: Path, out: Path, scripts: dict[str, str]) -> tuple[str, list[str]]:
    stem = path.stem
    rel = Path(os.path.relpath(path, out.parent)).as_posix()
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        return f"## {stem}\n\n`{rel}` could not be read: {exc}\n", []
    if not isinstance(data, dict):
        data = {"value": data}
    key = family(stem)
    extractor = EXTRACTORS.get(key, rows_generic) if key else rows_generic
    found = find_scripts(stem, data, scripts)
    lines = [f"## {stem}", ""]
    if found:
        by = ", ".join(f"[`{s}`]({s})" for s in found)
        lines.append(f"From [`{rel}`]({rel}), written by {by}.")
    else:
        lines.append(f"From [`{rel}`]({rel}); no benchmark script names this file.")
    lines.append("")
    if key in PROSE:
        lines += [PROSE[key], ""]
    cmds = [c for s in found for c in commands(HERE / s)]
    if cmds:
        lines += ["Rerun (the commands from the script's docstring):", "", "```sh", *cmds, "```", ""]
    lines += meta_lines(data, stem)
    lines.append("")
    rows = extractor(data) + goal_rows(data)
    lines += ["| what | value |", "| --- | --- |", *(f"| {cell(w)} | {cell(v)} |" for w, v in rows), ""]
    return "\n".join(lines), found


def build(results: Path = RESULTS, out: Path = README) -> str:
    """The page for the results files in ``results``, as it would be written to ``out``."""
    check_prose()
    scripts = {p.name: p.read_text() for p in sorted(HERE.glob("bench_*.py"))}
    sections, used = [], set()
    for path in sorted(results.glob("*.json")):
        text, found = section(path, out, scripts)
        sections.append(text)
        used.update(found)
    page = [INTRO]
    page += sections
    history = HERE / "history.md"  # hand-written: runs no results file holds any more
    if history.is_file():
        page.append(history.read_text().rstrip("\n") + "\n")
    unused = [s for s in scripts if s not in used]
    if unused:
        page.append("## Scripts without a results file yet\n")
        page.append("Their figures are not measured: no results file here comes from them.\n")
        for s in unused:
            page.append(f"### {s}\n")
            cmds = commands(HERE / s)
            page.append("\n".join(["```sh", *cmds, "```", ""]) if cmds else "No command in its docstring.\n")
    return "\n".join(page).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=RESULTS, help="folder of results files (default: results/ here)")
    ap.add_argument("--out", type=Path, default=README, help="page to write or check (default: README.md here)")
    ap.add_argument("--check", action="store_true", help="write nothing; exit 1 if the page differs from what it would write")
    args = ap.parse_args(argv)
    text = build(args.results, args.out)
    if args.check:
        current = args.out.read_text() if args.out.is_file() else None
        if current != text:
            print(f"{args.out} is not what {Path(__file__).name} writes from {args.results}: "
                  f"run python Testing/Benchmarks/make_readme.py", file=sys.stderr)
            return 1
        return 0
    args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
