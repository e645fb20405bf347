"""Reports: a page per round, the project's learning curve, and the oracle experiment's page.

Each report is written three ways from the same rows: markdown (``.md``), a
self-contained HTML page (``.html``, the PNG referenced beside it) and JSON
(``.json``), plus a learning-curve PNG drawn with matplotlib (Agg, no display).
Files are replaced atomically.
"""
from __future__ import annotations

import html
import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from . import atomic, rounds
from .project import Project
from .store.files import now_iso

METRICS = ("dice", "iou", "hd95")


def format_number(value, digits: int = 3, missing: str = "–") -> str:
    """A metric as text: floats to ``digits`` places, a missing value (None, NaN) as ``missing``,
    anything else as ``str``. Shared by the reports, the CLI and the Slicer module's tables."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return missing
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)



def markdown_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(format_number(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def html_table(header: Sequence[str], rows: Sequence[Sequence]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(format_number(v))}</td>" for v in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _page(title: str, sections: Sequence[tuple[str, str, Sequence[str], Sequence[Sequence]]],
          image: str | None) -> tuple[str, str]:
    """(markdown, html) of a page: sections are (heading, text, table header, table rows)."""
    md = [f"# {title}", ""]
    body = [f"<h1>{html.escape(title)}</h1>"]
    for heading, text, header, rows in sections:
        md += [f"## {heading}", ""]
        body.append(f"<h2>{html.escape(heading)}</h2>")
        if text:
            md += [text, ""]
            body.append(f"<p>{html.escape(text)}</p>")
        if header:
            md += [markdown_table(header, rows), ""]
            body.append(html_table(header, rows))
    if image:
        md += [f"![learning curve]({image})", ""]
        body.append(f'<p><img src="{html.escape(image)}" alt="learning curve" style="max-width:720px"></p>')
    style = ("body{font-family:sans-serif;margin:2em}table{border-collapse:collapse}"
             "td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}")
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")
    return "\n".join(md), page


def plot_curves(curves: Mapping[str, Sequence[tuple[float, float]]], path: Path, title: str,
                reference: Mapping[str, float] | None = None, xlabel: str = "cases annotated (%)") -> Path:
    """Mean Dice against % annotated, one line per curve; ``reference``: horizontal lines."""
    import matplotlib
    import matplotlib.style

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure  # no pyplot: no global state, no display

    # matplotlib's own defaults, whatever a library changed globally before (nnU-Net's progress plot
    # sets seaborn with font_scale 2.5 in this process: titles and ticks were cut off)
    with matplotlib.style.context("default"):
        fig = Figure(figsize=(6.4, 4.2), dpi=110)
        ax = fig.add_subplot()
        for name, points in curves.items():
            pts = sorted(points)
            if pts:
                ax.plot([100 * x for x, _ in pts], [y for _, y in pts], marker="o", label=name)
        for name, value in (reference or {}).items():
            if value is not None and not math.isnan(value):
                ax.axhline(value, linestyle="--", linewidth=1, color="gray")
                ax.annotate(name, (0, value), textcoords="offset points", xytext=(2, 3), fontsize=8, color="gray")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("mean Dice (held-out cases)")
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.set_title(title)
        if curves:
            ax.legend(fontsize=8, loc="lower right")
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", bbox_inches="tight")
    atomic.write_bytes(path, buffer.getvalue())
    return path


def class_rows(summary: Mapping) -> list[list]:
    """One row per class (and the mean): Dice, IoU, HD95 means."""
    return [[name] + [summary[name][m]["mean"] for m in METRICS] for name in summary]


def curve_point(metrics: Mapping, round_number: int | None) -> dict:
    """A learning-curve point from a metrics record (:func:`..loop.held_out_metrics`)."""
    summary = metrics["summary"]
    return {"round": round_number, "model": metrics.get("model"), "annotated": metrics["annotated"],
            "of": metrics["of"], "fraction": metrics["fraction"], "mean_dice": summary["mean"]["dice"]["mean"],
            "per_class": {c: v["dice"]["mean"] for c, v in summary.items() if c != "mean"},
            # records from before slices were counted have none of these
            "foreground_dice": metrics.get("foreground_dice"), "slices": metrics.get("slices"),
            "slices_of": metrics.get("slices_of"), "voxels": metrics.get("voxels"),
            "slice_fraction": metrics.get("slice_fraction"), "voxels_corrected": metrics.get("voxels_corrected"),
            "voxels_from_scratch": metrics.get("voxels_from_scratch"),
            "corrected_fraction": metrics.get("corrected_fraction")}


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def aubc(points: Sequence[Mapping], x: str = "slice_fraction", y: str = "mean_dice",
         upto: float | None = None) -> float | None:
    """The area under the budget curve (nnActive's AUBC): the trapezoidal area under ``y`` against
    ``x`` (the annotated share, 0..1) from the first point to the last (or to ``upto``, the curve
    interpolated there: compare arms over one span), divided by that span so it reads as a mean Dice
    over the budget. None with fewer than two points, a missing or non-finite value, or no span."""
    raw = [(p.get(x), p.get(y)) for p in points]
    if len(raw) < 2 or not all(_finite(a) and _finite(b) for a, b in raw):
        return None
    pts = sorted(raw)
    xs, ys = [float(a) for a, _ in pts], [float(b) for _, b in pts]
    if upto is not None:
        if not xs[0] < upto <= xs[-1] + 1e-12:
            return None
        keep = [i for i, v in enumerate(xs) if v < upto]
        y_end = float(np.interp(upto, xs, ys))
        xs, ys = [xs[i] for i in keep] + [upto], [ys[i] for i in keep] + [y_end]
    span = xs[-1] - xs[0]
    if span <= 0:
        return None
    area = sum((xs[i + 1] - xs[i]) * (ys[i] + ys[i + 1]) / 2 for i in range(len(xs) - 1))
    return float(area / span)


def common_budget(curves: Sequence[Sequence[Mapping] | None], x: str = "slice_fraction") -> float | None:
    """The largest share every curve reached (the smallest of their last ``x``): one span for all."""
    ends = [max(p[x] for p in c) for c in curves if c and all(_finite(p.get(x)) for p in c)]
    return min(ends) if ends and len(ends) == len([c for c in curves if c]) else None


def budget_axis(points: Sequence[Mapping]) -> tuple[str, str]:
    """The learning curve's x: the share of slices annotated when every point counts slices (a
    whole-case label counts all its slices, so both units compare), else the share of cases."""
    if points and all(_finite(p.get("slice_fraction")) for p in points):
        return "slice_fraction", "slices annotated (%)"
    return "fraction", "cases annotated (%)"


def learning_curve(project: Project, current: Mapping | None = None) -> list[dict]:
    """One point per evaluated round (and the pretrained model before the first labels);
    ``current``: a round record newer than its stored file (the one being reported)."""
    points = []
    for number in rounds.list_rounds(project):
        record = rounds.RoundRecord(dict(current) if current is not None and current["round"] == number
                                    else rounds.read_round(project, number))
        if pre := record.pretrained_metrics:
            points.append(curve_point(pre, 0))
        if m := record.metrics:
            points.append(curve_point(m, number))
    return points


def write_round_report(project: Project, record: Mapping) -> dict[str, str]:
    """rounds/<NNNN>/report.{md,html,json} and reports/learning_curve.{png,json}; returns their paths."""
    folder = rounds.round_dir(project, record["round"])
    reports = project.layout.reports
    curve = learning_curve(project, record)
    png = project.layout.learning_curve_png
    classes = list(curve[-1]["per_class"]) if curve else []
    x, xlabel = budget_axis(curve)
    lines = {"mean": [(p[x], p["mean_dice"]) for p in curve]}
    lines.update({c: [(p[x], p["per_class"].get(c, math.nan)) for p in curve] for c in classes})
    plot_curves(lines, png, f"{project.name}: learning curve", xlabel=xlabel)
    area = aubc(curve, x)
    atomic.write_json(reports / "learning_curve.json", {"project": project.name, "time": now_iso(), "points": curve,
                                                        "aubc": area, "aubc_over": x})

    settings = record.get("settings", {})

    view = rounds.RoundRecord(dict(record))
    stages = [[name, view.stage(name).get("seconds"), view.stage(name)["done"]]
              for name in view.stages_done if "done" in view.stage(name)]
    sections = [("Settings", "", ["setting", "value"],
                 [[k, json.dumps(v) if isinstance(v, (dict, list)) else v]
                  for k, v in settings.items() if v not in (None, [], {})]),
                ("Stages", "", ["stage", "seconds", "finished"], stages)]
    queue = view.queue
    if queue:
        sections.append(("Cases selected for review", "", ["rank", "case", "score", "reason"],
                         [[q["rank"], q["case"], q["score"], q["reason"]] for q in queue]))
    texts = []
    boot = view.stage("bootstrap")
    if boot.get("prompted") is not None:  # the first round: who was prompted, what was bootstrapped
        drawn = f"{boot.get('boxes', 0)} boxes" + (" (simulated from the references)" if boot.get("simulated") else "")
        texts.append(f"{boot['prompted']} case(s) with their own pseudo-label ({drawn} drawn); "
                     f"{boot.get('bootstrapped', 0)} of {boot['unprompted']} without one bootstrapped from them "
                     f"(method {boot['method']})")
    pseudo = view.pseudo_label_quality
    if pseudo.get("pseudo_label_dice") is not None:
        texts.append(f"mean Dice of the pseudo-labels against the references: "
                     f"{pseudo['pseudo_label_dice']:.3f} over {pseudo['pseudo_label_cases']} cases"
                     + (f" (the bootstrapped ones: {boot['bootstrapped_dice']:.3f})"
                        if boot.get("bootstrapped_dice") is not None else ""))
    if texts:
        sections.append(("Pseudo-labels", "; ".join(texts), [], []))
    effort = rounds.review_effort(project, record["round"])
    if effort["accepted"]:
        sections.append(("Annotation effort (labels accepted for this round's queue, in Slicer or by the simulated "
                         "annotator)", rounds.effort_text(effort),
                         ["case", "version", "opened with", "seconds", "Dice to the proposal", "voxels changed",
                          "voxels from scratch", "unchanged"],
                         [[e["case"], e["version"], e.get("started_from"), e.get("seconds"), e.get("dice_to_proposal"),
                           e.get("voxels_changed"), e.get("voxels_from_scratch"), "yes" if e.get("unchanged") else "no"]
                          for e in effort["labels"]]))
    review = rounds.review_curve(project)
    if review["rounds"]:
        sections.append(("The model against what the reviewers accepted, by round (its quality without reference "
                         "labels)", f"{review['verdict']} ({review['rule']})",
                         ["round", "labels accepted", "model", "mean Dice model -> accepted", "accepted unchanged",
                          "mean Dice proposal shown -> accepted", "corrected / from scratch"],
                         [[r["round"], r["accepted"], r["model"], r["mean_model_dice"], r["unchanged"],
                           r["mean_dice_to_proposal"], r["corrected_fraction"]] for r in review["rounds"]]))
    trust = view.stage("train").get("trust")
    if trust:
        sections.append(("Pseudo-label trust (what this round's training learned from pseudo-labels)",
                         f"mean Dice of the pseudo-labels against {trust['cases']} human label(s); a class is trusted at "
                         f">= {trust['threshold']}; the others are merged with background on pseudo-labeled cases "
                         "(learned from the human labels alone)",
                         ["class", "state", "cases", "mean Dice", "spread (sd)", "min", "prompted", "returned empty"],
                         [[r["name"], r["state"], r["cases"], r["mean"], r["std"], r["min"], r["prompted"], r["empty"]]
                          for r in trust["classes"]]))
    metrics = record.get("metrics")
    if metrics:
        heading = (f"Held-out evaluation ({len(metrics['cases'])} cases, model {metrics['model']}, "
                   f"{metrics['annotated']} of {metrics['of']} cases annotated)")
        sections.append((heading, "", ["class", "Dice", "IoU", "HD95 (mm)"], class_rows(metrics["summary"])))
    if curve:
        text = (f"area under the budget curve (mean Dice against {xlabel}): {format_number(area)}"
                if area is not None else "")
        sections.append(("Learning curve", text, ["round", "cases annotated", "% cases", "slices annotated", "% slices",
                                                  "voxels corrected", "corrected / from scratch", "mean Dice",
                                                  "foreground Dice"] + classes,
                         [[p["round"], p["annotated"], 100 * p["fraction"], p.get("slices"),
                           None if p.get("slice_fraction") is None else 100 * p["slice_fraction"],
                           p.get("voxels_corrected"), p.get("corrected_fraction"), p["mean_dice"],
                           p.get("foreground_dice")] + [p["per_class"].get(c) for c in classes] for p in curve]))
    md, page = _page(f"{project.name} — round {record['round']}", sections, "../../reports/learning_curve.png")
    atomic.write_bytes(folder / "report.md", md.encode())
    atomic.write_bytes(folder / "report.html", page.encode())
    atomic.write_json(folder / "report.json", {"round": record["round"], "settings": settings, "stages": record["stages"],
                                               "queue": queue, "metrics": metrics, "learning_curve": curve, "aubc": area,
                                               "effort": {k: v for k, v in effort.items() if k != "labels"},
                                               "review_curve": review, "trust": trust})
    return {k: str(p.relative_to(project.root)) for k, p in
            (("markdown", folder / "report.md"), ("html", folder / "report.html"), ("json", folder / "report.json"),
             ("learning_curve", png))}


def write_experiment_report(results: Mapping, folder: Path) -> dict[str, str]:
    """experiment.{md,html,json} and experiment.png in ``folder`` from :func:`..simulate.simulate`'s results."""
    folder.mkdir(parents=True, exist_ok=True)
    arms = results["arms"]
    x, xlabel = budget_axis([p for data in arms.values() for p in data["points"]])
    curves = {arm: [(p[x], p["mean_dice"]) for p in data["points"]] for arm, data in arms.items()
              if len(data["points"]) > 1 or arm not in ("pseudo-only", "full supervision")}
    reference = {arm: arms[arm]["final"]["mean_dice"] for arm in ("pseudo-only", "full supervision") if arm in arms}
    png = plot_curves(curves, folder / "experiment.png", "oracle experiment (simulated annotator)", reference,
                      xlabel=xlabel)
    rows = []
    for arm, data in arms.items():
        for p in data["points"]:
            rows.append([arm, p.get("round"), 100 * p["fraction"], p.get("slices"),
                         None if p.get("slice_fraction") is None else 100 * p["slice_fraction"],
                         p.get("voxels_corrected"), p.get("corrected_fraction"), p["mean_dice"],
                         p.get("foreground_dice"), *(p["per_class"].get(c) for c in results["classes"]),
                         p.get("ratio_to_full")])
    setup = results["setup"]
    slices = (f"; slice arms {setup['slices_per_round']} slices a round" if setup.get("slices_per_round") else "")
    text = (f"pool {setup['pool']} cases, {setup['test']} held-out test cases (never selectable); "
            f"seeds {setup['seeds']}; {setup['rounds']} round(s) of {setup['budget_per_round']} case(s){slices}; "
            f"pseudo-labels: {setup['pseudo_source']} (mean Dice {format_number(results.get('pseudo_label_dice'))}); "
            f"compute: {setup['compute']}. Values are means over seeds.")
    sections = [("Setup", text, [], []),
                ("Mean Dice vs annotation", "voxels corrected: what the simulated annotator changed in the proposals "
                 "it was shown; corrected / from scratch: that against drawing the same labels from scratch",
                 ["arm", "round", "% cases", "slices", "% slices", "voxels corrected", "corrected / from scratch",
                  "mean Dice", "foreground Dice", *results["classes"], "ratio to full"], rows)]
    areas = [[arm, data["aubc"], *data["aubc_per_seed"]] for arm, data in arms.items() if data.get("aubc") is not None]
    if areas:
        spans = ", ".join(format_number(100 * v if v is not None else None, 2) for v in setup.get("aubc_span", []))
        sections.append(("Area under the budget curve", "mean Dice against the share of slices annotated, from the "
                         "pretrained model (nothing annotated) to the share every arm reached in that seed (the "
                         f"same span for every arm: {spans} % of the pool's slices), divided by that span; "
                         "then per seed",
                         ["arm", "AUBC", *(f"seed {s}" for s in setup["seeds"])], areas))
    if results.get("sweep"):
        sections.append(("Final Dice vs pseudo-label Dice", "", ["target pseudo-label Dice", "measured pseudo-label Dice",
                                                                 "final mean Dice"],
                         [[s["target"], s["pseudo_label_dice"], s["final_dice"]] for s in results["sweep"]]))
    md, page = _page("ALSeg oracle experiment", sections, png.name)
    atomic.write_bytes(folder / "experiment.md", md.encode())
    atomic.write_bytes(folder / "experiment.html", page.encode())
    atomic.write_json(folder / "experiment.json", dict(results))
    return {"markdown": str(folder / "experiment.md"), "html": str(folder / "experiment.html"),
            "json": str(folder / "experiment.json"), "png": str(png)}
