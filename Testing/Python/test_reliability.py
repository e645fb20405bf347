"""Reliability, bounded: writers SIGKILLed at random moments, a stale lock, concurrent
writers, label-table changes, a full disk and a read-only folder.

The same harness runs with the issue's counts in Testing/Benchmarks/bench_reliability.py.
"""
import errno
import json
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import reliability
import SimpleITK as sitk
from conftest import tree_hash

from ALSegLib import atomic
from ALSegLib.errors import InputError
from ALSegLib.project import Project


def test_writers_killed_at_random_moments_leave_every_label_whole(project):
    result = reliability.kill_trials(project.root, trials=12, seed=1)
    assert result["problems"] == [] and result["torn"] == 0
    assert result["human_label_files"] > 0 and result["label_and_config_writes"] > 0
    # a kill that landed inside the lock was detected and recovered at least once in 12 trials
    assert result["kills_while_holding_lock"] > 0


def test_checker_finds_a_torn_label(project):
    """Control: the harness's check is not blind."""
    checker = reliability.Checker(project.root)
    case = checker.cases[0]
    img = sitk.GetImageFromArray(reliability.expected_label(checker.refs[case], 1))
    img.CopyInformation(project.read_label(case, "reference"))
    path = project.root / "labels" / "human" / case / "v0001.nrrd"
    project.add_human_label(case, img, source="simulated")
    assert checker.problems(recovered=True) == []
    data = path.read_bytes()
    path.chmod(0o644)
    path.write_bytes(data[: len(data) - 100])
    checker.verified.clear()
    assert any("v0001.nrrd" in p and "unreadable" in p for p in checker.problems(recovered=False))


def _hold_then_die(root, purpose):
    code = ("import sys, os; from ALSegLib.project import Project; p = Project.open(sys.argv[1])\n"
            f"with p.lock({purpose!r}):\n    print('locked', flush=True); import time; time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code, str(root)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "locked"
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    holder.stdout.close()
    return holder.pid


def test_stale_lock_is_detected_named_and_recovered(project):
    pid = _hold_then_die(project.root, "accept human label")
    assert f"pid {pid} on " in (project.root / "alseg.lock").read_text()  # the dead holder's line is left
    case = project.cases()[0]
    # what the killed writer would have left: a complete version file without provenance or event
    folder = project.root / "labels" / "human" / case
    folder.mkdir(parents=True)
    sitk.WriteImage(project.read_label(case, "reference"), str(folder / "v0001.nrrd"), True)
    (project.root / "labels" / f"{atomic.TMP_PREFIX}{pid}-dead-x.nrrd").write_bytes(b"partial")
    assert project.add_human_label(case, project.read_label(case, "reference"), source="simulated") == 2
    events = project.events()
    recovered = next(e for e in events if e["event"] == "lock_recovered")
    assert recovered["holder_pid"] == pid and recovered["holder_host"] and "accept human label" in recovered["holder"]
    assert any(e["event"] == "human_label_recovered" and e["case"] == case and e["version"] == 1 for e in events)
    assert project.provenance(case, "human", 1)["source"] == "unknown"  # recovered, not invented
    assert project.provenance(case, "human", 1)["matches_file"]
    assert not list(project.root.rglob(f"{atomic.TMP_PREFIX}*"))
    assert (project.root / "alseg.lock").read_text() == ""  # released cleanly this time
    with project.lock("again"):
        pass
    assert sum(e["event"] == "lock_recovered" for e in project.events()) == 1  # a clean release is not stale


def test_concurrent_writers_are_serialised_without_lost_updates(project, phantom_dir):
    result = reliability.concurrent_trial(project.root, 9, phantom_dir / "labels")
    assert result["lost_updates"] == []
    assert len(result["accepted"]) == 9 and len(project.events()) > 9


def test_label_table_updates_from_two_open_projects_both_survive(project):
    """Two writers that opened the project before either wrote (two Slicer sessions, or a
    script and the CLI): each change is applied to the table as stored, not as opened."""
    first, second = Project.open(project.root), Project.open(project.root)
    first.update_labels(colors={"organ": (1, 0, 0)})
    second.update_labels(rename={"vessel": "artery"})
    table = {c.name: c.color for c in Project.open(project.root).labels.classes}
    assert table["organ"] == (1, 0, 0) and "artery" in table and "vessel" not in table


def test_labels_command_renames_and_recolors_keeping_values(project, run_cli):
    code, out, err = run_cli("labels", project.root, "--rename", "organ=liver", "--color", "vessel=#ff0000", "--json")
    assert code == 0, err
    table = {c["name"]: c for c in json.loads(out)}
    assert table["liver"]["value"] == 1 and table["vessel"]["color"] == [1.0, 0.0, 0.0]
    assert Project.open(project.root).labels.mapping == {"liver": 1, "vessel": 2, "lesion": 3}
    before = tree_hash(project.root)
    for args, problem in ((["--rename", "spleen=x"], "no label named 'spleen'"),
                          (["--rename", "liver=vessel"], "duplicate label name 'vessel'"),
                          (["--color", "liver=red"], "must look like #RRGGBB"),
                          (["--rename", "liver"], "expected NAME=VALUE")):
        code, _, err = run_cli("labels", project.root, *args)
        assert code == 2 and problem in err, err
    assert tree_hash(project.root) == before


@pytest.fixture
def small_disk(tmp_path):
    """A real 3 MiB file system (tmpfs), so that 'disk full' and 'read-only' are the kernel's
    own answers; needs the right to mount (root in a container), skipped otherwise."""
    disk = tmp_path / "disk"
    disk.mkdir()
    try:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(disk)], capture_output=True)
    except OSError as exc:  # no mount command at all
        pytest.skip(f"cannot mount a small file system here: {exc}")
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small file system here: {done.stderr.decode(errors='replace').strip()}")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


def _fill(disk, leave):
    """Fill the file system, then free ``leave`` bytes."""
    filler = disk / "filler"
    with open(filler, "wb", buffering=0) as fh:
        try:
            while True:
                fh.write(b"\xff" * 4096)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))


def test_full_disk_gives_a_clear_error_and_tears_nothing(small_disk, phantom_dir, table, run_cli):
    project = Project.create(small_disk / "project", table, "CT")
    project.add_cases([phantom_dir / "images" / "phantom_ct_000.nii.gz"], reference_dir=phantom_dir / "labels")
    case = project.cases()[0]
    ref = project.read_label(case, "reference")
    project.add_human_label(case, ref, source="simulated")
    rng = np.random.default_rng(0)
    noisy = sitk.GetImageFromArray(rng.integers(0, 4, sitk.GetArrayViewFromImage(ref).shape).astype(np.uint8))
    noisy.CopyInformation(ref)  # incompressible enough not to fit in what is left
    _fill(small_disk, leave=12 * 1024)
    before = tree_hash(project.root)
    with pytest.raises(InputError) as err:
        project.add_human_label(case, noisy, source="simulated")
    message = str(err.value)
    assert "no space left on device" in message and "the label was not stored" in message, message
    assert tree_hash(project.root) == before  # v0001 whole, no v0002, no temporary, no event
    assert project.human_versions(case) == [1]
    sitk.WriteImage(noisy, str(small_disk.parent / f"{case}.nii.gz"))
    code, _, err_text = run_cli("import-labels", project.root, small_disk.parent / f"{case}.nii.gz", "--kind", "pseudo")
    assert code == 2 and "no space left on device" in err_text, err_text
    assert tree_hash(project.root) == before
    (small_disk / "filler").unlink()  # space again: the same call now works
    assert project.add_human_label(case, noisy, source="simulated") == 2


def test_read_only_folder_gives_a_clear_error(small_disk, phantom_dir, table, run_cli):
    project = Project.create(small_disk / "project", table, "CT")
    project.add_cases([phantom_dir / "images" / "phantom_ct_000.nii.gz"], reference_dir=phantom_dir / "labels")
    before = tree_hash(project.root)
    subprocess.run(["mount", "-o", "remount,ro", str(small_disk)], check=True)
    case = project.cases()[0]
    with pytest.raises(InputError) as err:
        project.add_human_label(case, project.read_label(case, "reference"), source="simulated")
    assert "alseg.lock" in str(err.value) and "read-only file system" in str(err.value)
    code, out, err_text = run_cli("labels", project.root, "--rename", "organ=liver")
    assert code == 2 and "read-only file system" in err_text and out == "", err_text
    code, out, _ = run_cli("status", project.root)  # reading still works
    assert code == 0 and "Cases     1" in out
    assert tree_hash(project.root) == before


def test_event_log_on_a_full_disk_is_a_clear_error(project, monkeypatch):
    """The one write that is not replace-by-rename (the append to events.jsonl) reports a
    full disk by name too (fault injected: the append's write fails)."""
    import builtins

    real_open = builtins.open

    class Full:
        def __init__(self, fh):
            self.fh = fh

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.fh.close()

        def __getattr__(self, name):
            return getattr(self.fh, name)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    def opener(path, mode="r", *a, **k):
        fh = real_open(path, mode, *a, **k)
        return Full(fh) if str(path).endswith("events.jsonl") and "a" in mode else fh

    monkeypatch.setattr(builtins, "open", opener)
    with pytest.raises(InputError, match=r"events\.jsonl: cannot write: no space left on device"):
        project.update_labels(colors={"organ": (1, 0, 0)})
