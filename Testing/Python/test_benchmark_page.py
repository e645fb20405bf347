"""The benchmark page is generated from the results files (no hand-typed figures): it must be up to date, and the
generator must cope with unknown and incomplete results files."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

MAKE_README = Path(__file__).resolve().parents[1] / "Benchmarks" / "make_readme.py"


def test_benchmark_page_is_generated_from_the_results():
    done = subprocess.run([sys.executable, str(MAKE_README), "--check"], capture_output=True, text=True)
    assert done.returncode == 0, ("Testing/Benchmarks/README.md differs from what make_readme.py writes from "
                                  f"results/*.json: run python Testing/Benchmarks/make_readme.py\n{done.stderr}")


def test_page_from_unknown_and_incomplete_results(tmp_path):
    results = tmp_path / "results"
    results.mkdir()
    (results / "made_up_benchmark.json").write_text(json.dumps(
        {"benchmark": "made_up_benchmark", "commit": "abc123", "speed_s": 1.23456, "cases": 7, "what": "fake",
         "nested": {"ignored": 1}}))
    # demo.json as bench_demo.py writes it, less the goals, the wall times and what the pseudo-labels buy
    (results / "demo.json").write_text(json.dumps(
        {"benchmark": "demo", "commit": "def456", "seeds": [0], "pseudo_source": "degraded-reference",
         "mean_over_seeds": {"pseudo-only": {"mean_dice": 0.5, "dice": {"a": 0.5}, "hd95": None, "seeds": 1},
                             "round 1": {"mean_dice": 0.6, "dice": {"a": 0.6}, "seeds": 1}}}))
    out = tmp_path / "README.md"
    done = subprocess.run([sys.executable, str(MAKE_README), "--results", str(results), "--out", str(out)],
                          capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    page = out.read_text()
    assert "## made_up_benchmark" in page and "`speed_s` | 1.235" in page and "| `cases` | 7 |" in page
    assert "## demo" in page and "bench_demo.py" in page and "not measured" in page
    assert "goal: `mean_dice_rises_every_round` | not measured" in page
    check = subprocess.run([sys.executable, str(MAKE_README), "--results", str(results), "--out", str(out), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 0, check.stderr
    out.write_text(page + "hand-typed\n")
    check = subprocess.run([sys.executable, str(MAKE_README), "--results", str(results), "--out", str(out), "--check"],
                           capture_output=True, text=True)
    assert check.returncode == 1
