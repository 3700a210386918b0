"""Build the wheel, install it in a fresh venv and use it from an unrelated folder.

What a user does after ``pip install alphawatch``: migrate a database, make a small real
training run, analyse one checkpoint, and run ``alphawatch up`` (API, dashboard, plotly.js,
worker) until the run's checkpoints are served. Fails loudly on the first thing that does not
work, and when the wheel would put anything but ``alphawatch`` into site-packages.

    python3 scripts/wheel_smoke.py            # torch pinned as in the Makefile (CPU build)
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = os.environ.get("TORCH_PIN", "torch==2.13.0")


def run(*args: str | Path, cwd: Path, **kw: object) -> subprocess.CompletedProcess[str]:
    print("+", " ".join(map(str, args)), flush=True)
    return subprocess.run([str(a) for a in args], cwd=cwd, check=True, text=True, **kw)  # type: ignore[call-overload]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=10) as response:
        return bytes(response.read())


def check_record(venv: Path) -> None:
    """Everything the wheel installed lies under alphawatch/ (or is its metadata or script)."""
    records = list(venv.glob("lib/python*/site-packages/alphawatch-*.dist-info/RECORD"))
    assert len(records) == 1, records
    tops = {line.split(",")[0].split("/")[0] for line in records[0].read_text().splitlines()}
    allowed = {"alphawatch", records[0].parent.name, ".."}
    assert tops <= allowed, f"the wheel installs top-level names {sorted(tops - allowed)}"
    site = records[0].parents[1]
    for name in ("migrations/env.py", "migrations/script.py.mako", "dashboard/static/index.html"):
        assert (site / "alphawatch" / name).is_file(), f"{name} is missing from the wheel"
    assert list((site / "alphawatch" / "migrations" / "versions").glob("*.py")), "no migrations"


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="alphawatch-wheel-"))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["ALPHAWATCH_DEVICE"] = "cpu"
    server: subprocess.Popen[bytes] | None = None
    try:
        venv = work / "venv"
        run(sys.executable, "-m", "venv", venv, cwd=work)
        pip = [venv / "bin" / "python", "-m", "pip", "install", "-q"]
        run(*pip, "--upgrade", "pip", cwd=work, env=env)
        run(*pip, TORCH_PIN, cwd=work, env=env)
        run(
            venv / "bin" / "python",
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "-w",
            work / "dist",
            ROOT,
            cwd=work,
            env=env,
        )
        (wheel,) = (work / "dist").glob("alphawatch-*.whl")
        run(*pip, wheel, cwd=work, env=env)
        check_record(venv)

        # From a folder that is not the repository: nothing may come from the clone.
        here = work / "elsewhere"
        here.mkdir()
        aw = venv / "bin" / "alphawatch"
        run(aw, "db", "upgrade", "--db", f"sqlite:///{here / 'migrated.db'}", cwd=here, env=env)
        run(
            venv / "bin" / "python",
            "-m",
            "alphawatch.workers.demo_run",
            here / "runs" / "demo",
            "--steps",
            "20",
            "--save-every",
            "10",
            cwd=here,
            env=env,
        )
        out = run(
            aw,
            "analyze",
            here / "runs" / "demo" / "checkpoint-20",
            "--format",
            "json",
            cwd=here,
            env=env,
            capture_output=True,
        ).stdout
        doc = json.loads(out)
        assert doc["step"] == 20 and len(doc["layers"]) > 0, doc
        assert all(layer["alpha"] is not None for layer in doc["layers"]), "a layer has no alpha"

        port = free_port()
        server = subprocess.Popen(
            [
                str(aw),
                "up",
                str(here / "runs" / "demo"),
                "--port",
                str(port),
                "--db",
                f"sqlite:///{here / 'up.db'}",
            ],
            cwd=here,
            env=env,
        )
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                runs = json.loads(get(f"{base}/api/v1/runs"))["runs"]
                if runs and runs[0]["n_done"] == 2:
                    break
            except OSError:
                pass
            assert server.poll() is None, "alphawatch up exited"
            assert time.monotonic() < deadline, "alphawatch up did not analyse the demo run"
            time.sleep(1)
        page = get(f"{base}/").decode()
        assert "<html" in page.lower(), page[:200]
        assert len(get(f"{base}/static/vendor/plotly.min.js")) > 1_000_000
        trend = json.loads(get(f"{base}/api/v1/runs/{runs[0]['id']}/trend?filter=all"))
        assert [p["step"] for p in trend["points"]] == [10, 20], trend
        print(f"wheel smoke test passed: {wheel.name}", flush=True)
        return 0
    finally:
        if server is not None:
            server.terminate()
            try:
                server.wait(timeout=60)
            except subprocess.TimeoutExpired:
                server.kill()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
