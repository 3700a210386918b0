"""A checkpoint with a huge (valid) safetensors header under ``alphawatch up``: memory and stall.

Writes ``checkpoint-1/`` (``trainer_state.json`` and a ``model.safetensors`` whose header is
``--header-mb`` MB of tiny tensors, every size consistent), starts ``alphawatch up`` on it
(API, dashboard and worker in one process, SQLite), and while discovery judges the shard,
asks ``GET /health`` every 20 ms. Reports the ``up`` process's peak RSS (VmHWM; the analysis
process is another process, held to its own budget) and the longest answer of the API.

``--grow``: the shard lacks its last byte and grows by one byte every 2 s, so it never becomes
whole while it is watched (a file that keeps changing).

Run it against older code with ``--code DIR`` (a ``git archive`` of that commit), first on
the server's ``PYTHONPATH``:

    python bench/bench_big_header.py --header-mb 95 --seconds 20
    python bench/bench_big_header.py --header-mb 95 --seconds 20 --grow --code /tmp/main
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def write_shard(path: Path, header_mb: float, short: int = 0) -> int:
    """A valid safetensors file of 1-element float32 tensors; returns its header length."""
    entries, offset, size = [], 0, 0
    i = 0
    while size < header_mb * 1e6:
        entry = (
            f'"model.layers.{i}.scale":{{"dtype":"F32","shape":[1],'
            f'"data_offsets":[{offset},{offset + 4}]}}'
        )
        entries.append(entry)
        size += len(entry) + 1
        offset += 4
        i += 1
    raw = ("{" + ",".join(entries) + "}").encode()
    with path.open("wb") as out:
        out.write(struct.pack("<Q", len(raw)) + raw)
        out.write(b"\0" * (offset - short))
    return len(raw)


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _hwm_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--header-mb", type=float, default=95.0)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--grow", action="store_true")
    parser.add_argument("--code", type=Path, help="run this tree's alphawatch instead")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(tmp) / "run"
        folder = run / "checkpoint-1"
        folder.mkdir(parents=True)
        shard = folder / "model.safetensors"
        length = write_shard(shard, args.header_mb, short=1 if args.grow else 0)
        (folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
        port = _port()
        env = {
            **os.environ,
            "PYTHONPATH": str(args.code or ROOT),
            "ALPHAWATCH_SETTLE_S": "30",
            "ALPHAWATCH_POLL_INTERVAL_S": "1",
            "ALPHAWATCH_DEVICE": "cpu",
        }
        log = Path(tmp) / "up.log"
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "alphawatch",
                    "up",
                    str(run),
                    "--db",
                    f"sqlite:///{tmp}/aw.db",
                    "--port",
                    str(port),
                ],
                cwd=tmp,
                env=env,
                stdout=out,
                stderr=out,
            )
        url = f"http://127.0.0.1:{port}/health"
        worst, answers, grown = 0.0, 0, 0
        try:
            while True:  # wait for the API to answer at all
                try:
                    urllib.request.urlopen(url, timeout=30).read()
                    break
                except OSError:
                    if proc.poll() is not None:
                        raise SystemExit(log.read_text(errors="replace")) from None
                    time.sleep(0.1)
            end = next_grow = time.monotonic()
            end += args.seconds
            next_grow += 2.0
            while time.monotonic() < end:
                start = time.monotonic()
                # A 503 (the worker loop restarting) answers too: its wait is measured.
                with contextlib.suppress(OSError):
                    urllib.request.urlopen(url, timeout=60).read()
                worst = max(worst, time.monotonic() - start)
                answers += 1
                if args.grow and time.monotonic() >= next_grow:
                    with shard.open("ab") as out:
                        out.write(b"\0")
                    grown += 1
                    next_grow += 2.0
                time.sleep(0.02)
            peak = _hwm_mib(proc.pid)
        finally:
            proc.terminate()
            proc.wait(timeout=60)
    print(
        json.dumps(
            {
                "code": str(args.code or ROOT),
                "header_bytes": length,
                "grow": args.grow,
                "bytes_appended": grown,
                "seconds": args.seconds,
                "api_answers": answers,
                "api_worst_s": round(worst, 3),
                "up_peak_rss_mib": round(peak, 1),
            }
        )
    )


if __name__ == "__main__":
    main()
