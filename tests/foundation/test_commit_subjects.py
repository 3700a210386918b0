"""scripts/check_commits.py flags a branch's commit subjects over 72 characters, in a real
git repository."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "check_commits.py"


def _git(repo: Path, *args: str) -> str:
    return subprocess.run(
        [
            "git",
            "-c",
            "user.name=t",
            "-c",
            "user.email=t@example.invalid",
            "-c",
            "commit.gpgsign=false",
            *args,
        ],
        cwd=repo,
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()


def _commit(repo: Path, subject: str) -> None:
    _git(
        repo,
        "commit",
        "-q",
        "--allow-empty",
        "-m",
        subject,
        "-m",
        "A body of any length "
        "is fine: only the subject line is held to the limit, as git log --oneline shows.",
    )


def _check(repo: Path, revisions: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), revisions],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=30,
    )


def test_only_subjects_over_72_characters_in_the_range_are_flagged(tmp_path: Path) -> None:
    _git(tmp_path, "init", "-q", "-b", "main")
    _commit(tmp_path, "Old: " + "x" * 80)  # before the range: not this branch's to fix
    base = _git(tmp_path, "rev-parse", "HEAD")
    _commit(tmp_path, "Area: " + "y" * 66)  # 72 exactly
    assert _check(tmp_path, f"{base}..HEAD").returncode == 0

    _commit(tmp_path, "Area: " + "z" * 67)  # 73
    long = _git(tmp_path, "rev-parse", "--short", "HEAD")
    result = _check(tmp_path, f"{base}..HEAD")
    assert result.returncode == 1
    assert result.stdout.splitlines() == [
        f"{long}: subject of 73 characters (at most 72): Area: {'z' * 67}"
    ]
