"""Shared fixtures: phantom data, projects, the shared real data, folder hashing, CLI runner."""
from __future__ import annotations

import os
import tempfile
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


# the machine's own timing figures (what follows a training's last epoch, a prediction's work besides its
# tiles) go to a folder of the test session's, not to the user's ~/.cache/alseg
os.environ.setdefault("ALSEG_CACHE_DIR", tempfile.mkdtemp(prefix="alseg-test-cache-"))


# --- make test-fast: the quick tests, by what they do --------------------------------------------
# A test is "slow" (left out of `make test-fast`, run by `make test` and CI) if it uses a fixture that trains
# a model, or is listed here: measured at 3 s or more alone on the 2 cores (pytest --durations, 2026-12-01).
SLOW_FIXTURES = {
    "trained_checkpoint": "trains a tiny SAM on phantom slices (about 90 s)",
    "tiny": "plans and pretrains nnU-Net on phantoms (about 40 s)",
    "timed": "plans nnU-Net on phantoms and probes its training steps (about 40 s)",
}
SLOW_MODULES = {"test_litemedsam.py": "the real LiteMedSAM weights on phantom slices"}
SLOW_TESTS = {
    "test_loop.py": {"test_simulate_sweep_reports_final_dice_against_pseudo_label_dice",
                     "test_oracle_experiment_runs_every_kind_of_arm_and_never_reveals_test_cases",
                     "test_round_killed_at_every_stage_boundary_resumes_without_redoing_finished_stages",
                     "test_rounds_through_the_console_api_with_reports_and_learning_curve",
                     "test_demo_runs_two_simulated_rounds_and_prints_the_table",
                     "test_round_waits_for_review_and_refuses_conflicting_settings"},
    "test_slicer_glue.py": {"test_a_round_from_scene_volumes_then_review_and_accept_in_the_scene",
                            "test_pseudo_label_this_case_now_runs_litemedsam_on_the_stored_prompt"},
    "test_reliability.py": {"test_writers_killed_at_random_moments_leave_every_label_whole",
                            "test_concurrent_writers_are_serialised_without_lost_updates"},
    "test_fuzz.py": {"test_fuzz"},
    "test_sparse.py": {"test_a_training_through_the_ignore_label_takes_no_loss_from_ignored_voxels",
                       "test_simulate_runs_slice_arms_on_the_whole_case_arms_slice_budget",
                       "test_two_slice_level_rounds_through_the_console_api"},
    "test_cli.py": {"test_console_script_help_and_version"},
    "test_bootstrap.py": {"test_a_round_bootstraps_the_cases_its_source_does_not_cover_and_says_which_were_which",
                          "test_bootstrap_off_leaves_the_unprompted_cases_to_the_humans",
                          "test_bootstrap_sam_prompts_litemedsam_with_the_first_model_s_outlines"},
    "test_cluster.py": {"test_prediction_on_ray_stores_what_the_single_machine_path_stores",
                        "test_a_round_with_ray_predicts_on_the_workers_and_stores_in_the_driver",
                        "test_a_worker_killed_mid_run_is_restarted_and_its_task_retried",
                        "test_litemedsam_pseudo_labels_on_ray_are_the_single_machine_path_s",
                        "test_simulate_on_ray_gives_the_sequential_run_s_arms_and_figures",
                        "test_a_prediction_reused_only_where_its_label_too_is_these_weights"},
    "test_nnunet.py": {"test_training_resumes_after_sigkill", "test_checkpoint_of_another_architecture_is_a_clear_error"},
}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.path.name
        if (SLOW_FIXTURES.keys() & set(getattr(item, "fixturenames", ())) or module in SLOW_MODULES
                or getattr(item, "originalname", item.name) in SLOW_TESTS.get(module, ())):
            item.add_marker(pytest.mark.slow)
