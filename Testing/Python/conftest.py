"""Shared fixtures: phantom data, projects, the shared real data, folder hashing, CLI runner."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("ALSEG_PROGRESS", "off")
os.environ.setdefault("ALSEG_LOCK_TIMEOUT", "5")

from reliability import run_until, tree_hash  # noqa: E402,F401 - shared with the tests

from ALSegLib import cli, phantoms  # noqa: E402
from ALSegLib.project import LabelTable, Project  # noqa: E402

REPO = Path(__file__).resolve().parents[2]


def shared_data_dir() -> Path | None:
    """``../shared/data`` beside the checkout (or ALSEG_SHARED_DATA), if present."""
    env = os.environ.get("ALSEG_SHARED_DATA")
    for candidate in ([Path(env)] if env else []) + [REPO.parent / "shared" / "data"]:
        if candidate.is_dir():
            return candidate
    return None


@pytest.fixture(scope="session")
def shared_data() -> Path:
    folder = shared_data_dir()
    if folder is None:
        pytest.skip("../shared/data is not present")
    return folder


@pytest.fixture(scope="session")
def hippocampus(shared_data) -> Path:
    folder = shared_data / "hippocampus"
    if not (folder / "imagesTr").is_dir():
        pytest.skip("shared hippocampus data not present")
    return folder


@pytest.fixture(scope="session")
def phantom_dir(tmp_path_factory) -> Path:
    """Six CT phantoms written as images/ and labels/ (NIfTI), made once per session."""
    folder = tmp_path_factory.mktemp("phantoms")
    phantoms.write_dataset(folder, n=6, modality="CT", seed=0, size=32)
    return folder


@pytest.fixture
def table() -> LabelTable:
    return LabelTable.from_mapping(phantoms.LABELS, phantoms.COLORS)


@pytest.fixture
def project(tmp_path, phantom_dir, table) -> Project:
    """A project holding the six phantoms with their reference labels."""
    p = Project.create(tmp_path / "project", table, "CT")
    p.add_cases([phantom_dir / "images"], reference_dir=phantom_dir / "labels")
    return p


@pytest.fixture
def run_cli(capsys):
    """Run ``alseg`` in-process: returns (exit code, stdout, stderr)."""

    def run(*args) -> tuple[int, str, str]:
        code = cli.main([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return run
