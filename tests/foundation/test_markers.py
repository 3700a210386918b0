"""tests/conftest.py marks the tests that train a model, so `make quick` can leave them out."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _collected(marks: str, *paths: str) -> set[str]:
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "--collect-only",
            "-q",
            "-p",
            "no:cacheprovider",
            "-m",
            marks,
            *paths,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    return {line.split("::", 1)[1] for line in out.splitlines() if "::" in line}


def test_a_test_that_trains_is_marked_whatever_way_it_trains() -> None:
    trains = _collected(
        "trains",
        "tests/test_cli.py",
        "tests/workers/test_pipeline.py",
        "tests/integrations/test_continuous.py",
    )
    # tiny_run (directly, and through the live_api fixture), demo_run.train called in the
    # test, and everything of the training-loop callbacks.
    assert {
        "test_analyze_json_csv_table_agree",
        "test_gate_exit_codes",
        "test_killed_worker_job_is_finished_once_by_another",
        "test_a_tracker_calling_sys_exit_never_ends_the_export",
    } <= trains
    assert "test_help_explains_how_to_start" not in trains
    assert "test_analyze_missing_path_exits_2" not in trains


def test_quick_keeps_the_tests_that_train_nothing() -> None:
    quick = _collected("not browser and not slow and not trains", "tests/test_cli.py")
    assert "test_help_explains_how_to_start" in quick
    assert "test_analyze_json_csv_table_agree" not in quick
