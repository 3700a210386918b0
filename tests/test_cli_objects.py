"""`alphawatch analyze` and `alphawatch up` on a run in a bucket, as a user runs them.

Real processes of the command line against a real S3 API on 127.0.0.1 (moto's server mode),
pointed at it by the standard AWS variables only; a real training run's checkpoints; a real
PostgreSQL.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")

from alphawatch.cli import analyze_path
from alphawatch.settings import Settings
from tests.db import rows, wait_until
from tests.objectstore import SECRET, CountingServer, client_fs, environment, upload
from tests.pg import free_port

ROOT = Path(__file__).resolve().parents[1]


def _env(s3: CountingServer) -> dict[str, str]:
    return {
        **os.environ,
        **environment(s3),
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
        "ALPHAWATCH_SETTLE_S": "0",
    }


def _alphas(layers: list[dict[str, Any]]) -> dict[str, float | None]:
    return {layer["name"]: layer["alpha"] for layer in layers}


def _same(ours: dict[str, float | None], theirs: dict[str, float | None]) -> None:
    assert set(ours) == set(theirs) and ours
    for name, alpha in theirs.items():
        if alpha is None:
            assert ours[name] is None, name
        else:
            assert ours[name] is not None and math.isclose(ours[name], alpha, rel_tol=1e-12), name


def test_analyze_reads_a_checkpoint_in_a_bucket_from_the_command_line(
    s3: CountingServer, bucket: str, tiny_run: Path
) -> None:
    url = f"s3://{bucket}/team/tiny"
    upload(client_fs(s3), tiny_run, url)
    args = ["analyze", "--format", "json", "--device", "cpu"]
    remote = subprocess.run(
        [sys.executable, "-m", "alphawatch", *args, f"{url}/checkpoint-20"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=_env(s3),
    )  # fmt: skip
    assert remote.returncode == 0, remote.stderr
    doc = json.loads(remote.stdout)
    assert doc["step"] == 20
    local = analyze_path(tiny_run / "checkpoint-20", Settings(device="cpu"))
    _same(_alphas(doc["layers"]), _alphas(local["layers"]))
    assert SECRET not in remote.stdout + remote.stderr

    missing = subprocess.run(
        [sys.executable, "-m", "alphawatch", *args, f"{url}/checkpoint-99"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, env=_env(s3),
    )  # fmt: skip
    assert missing.returncode == 2, missing.stdout + missing.stderr
    assert "checkpoint-99" in missing.stderr and SECRET not in missing.stderr


def _get(base: str, path: str) -> Any:
    with urllib.request.urlopen(f"{base}/api/v1{path}", timeout=10) as response:
        return json.load(response)


def _steps_done(base: str, url: str) -> list[int]:
    try:
        runs = [r for r in _get(base, "/runs")["runs"] if r["path"] == url]
    except OSError:
        return []  # not listening yet
    if not runs:
        return []
    checkpoints = _get(base, f"/runs/{runs[0]['id']}/checkpoints")["checkpoints"]
    return sorted(c["step"] for c in checkpoints if c["status"] == "done")


def test_up_watches_a_run_in_a_bucket_and_serves_its_layers(
    s3: CountingServer, bucket: str, tiny_run: Path, pg_url: str, tmp_path: Path
) -> None:
    url = f"s3://{bucket}/team/tiny"
    fs = client_fs(s3)
    upload(fs, tiny_run, url)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "up.log"
    with log.open("wb") as sink:
        proc = subprocess.Popen(
            [sys.executable, "-m", "alphawatch", "up", url, "--db", pg_url, "--port", str(port),
             "--device", "cpu", "--poll", "0.3"],
            stdout=sink, stderr=subprocess.STDOUT, cwd=ROOT, env=_env(s3),
        )  # fmt: skip
    try:
        wait_until(lambda: _steps_done(base, url) == [10, 20, 30], 240, "steps 10-30 served")
        [run] = _get(base, "/runs")["runs"]
        assert (run["name"], run["path"]) == ("tiny", url)
        served = _get(base, f"/runs/{run['id']}/checkpoints/30/layers")["layers"]
        local = analyze_path(tiny_run / "checkpoint-30", Settings(device="cpu"))
        _same(_alphas(served), _alphas(local["layers"]))

        # A checkpoint uploaded while it runs is found at a following poll and served.
        later = tmp_path / "later"
        shutil.copytree(tiny_run / "checkpoint-20", later / "checkpoint-40")
        (later / "checkpoint-40" / "trainer_state.json").write_text('{"global_step": 40}')
        upload(fs, later, url)
        wait_until(lambda: _steps_done(base, url) == [10, 20, 30, 40], 120, "step 40 served")
        again = _get(base, f"/runs/{run['id']}/checkpoints/40/layers")["layers"]
        _same(
            _alphas(again),
            _alphas(_get(base, f"/runs/{run['id']}/checkpoints/20/layers")["layers"]),
        )
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert "Traceback" not in text, text[-3000:]
    # The credentials came from the environment: not in the log or the database.
    assert SECRET not in text
    stored = rows(pg_url, "SELECT name, path, coalesce(discovery_error, '') FROM run")
    stored += rows(pg_url, "SELECT path, coalesce(error, '') FROM checkpoint")
    assert stored and SECRET not in str(stored)
