"""Names from a run directory never forge a log line: the worker's log shows them escaped.

A run folder, or a folder inside a run, named ``"a\\nINFO forged"`` printed raw into INFO
lines ("queued a" + a line of its own "INFO forged step 10"). The CLI's logging set-up (and
the analysis process's) formats every record through ``alphawatch.text.printable``.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

from alphawatch.text import EscapingFormatter

ROOT = Path(__file__).resolve().parents[2]
FORGED = "a\nINFO forged"


def _forged_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("INFO forged")]


def test_a_newline_in_a_run_or_folder_name_forges_no_line(tiny_run: Path, tmp_path: Path) -> None:
    named = tmp_path / FORGED  # a run folder named on the command line
    named.mkdir()
    shutil.copytree(tiny_run / "checkpoint-10", named / "checkpoint-10")
    run = tmp_path / "run"  # a run holding such a folder beside a checkpoint
    run.mkdir()
    shutil.copytree(tiny_run / "checkpoint-20", run / "checkpoint-20")
    shutil.copytree(tiny_run / "checkpoint-30", run / FORGED)
    env = {
        **os.environ,
        "ALPHAWATCH_SETTLE_S": "0",
        "ALPHAWATCH_DEVICE": "cpu",
        "ALPHAWATCH_CHECK_TRAPS": "false",
        "ALPHAWATCH_ANALYSIS_WORKERS": "1",
    }
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "alphawatch",
            "watch",
            "--once",
            "--db",
            f"sqlite:///{tmp_path / 'aw.db'}",
            str(named),
            str(run),
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    log = done.stderr
    assert done.returncode == 0, log
    assert "analysed 2 checkpoints" in done.stdout, log
    assert "a\\nINFO forged" in log  # shown, escaped
    assert _forged_lines(log) == [], log


def test_exception_texts_are_escaped_and_frames_kept() -> None:
    records: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(self.format(record))

    handler = Keep()
    handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    log = logging.getLogger("tests.log_lines")
    log.addHandler(handler)
    log.propagate = False
    try:
        try:
            try:
                raise FileNotFoundError(2, "No such file", f"/runs/{FORGED}")
            except OSError as exc:
                raise ValueError(f"cannot read {FORGED}") from exc
        except ValueError:
            log.exception("discovery of %s failed", f"/runs/{FORGED}")
    finally:
        log.removeHandler(handler)
    (text,) = records
    assert _forged_lines(text) == [], text
    lines = text.splitlines()
    assert lines[0] == "ERROR discovery of /runs/a\\nINFO forged failed"
    assert "Traceback (most recent call last):" in lines
    assert any(line.startswith('  File "') for line in lines)
    assert "ValueError: cannot read a\\nINFO forged" in lines
    assert "The above exception was the direct cause of the following exception:" in lines
