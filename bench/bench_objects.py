"""Runs in a bucket: requests and time per discovery poll, idle and with a new checkpoint.

Starts a real S3 API on 127.0.0.1 (moto's server mode, counting every request it answers),
uploads ``--runs`` x ``--checkpoints`` small real Hugging Face checkpoints (a safetensors file
and trainer_state.json each), points one worker (``Watcher``, SQLite) at every run's URL, and
measures:

* the first pass: requests by kind (LIST, HEAD, GET) and seconds;
* ``--polls`` idle passes: requests by kind per pass, and seconds per pass;
* one new checkpoint in one run: requests of the pass that registers it;
* a restarted worker (a new ``Watcher`` on the same database, no memory of the passes above):
  requests and seconds of its first discovery pass, after ``--settled``'s marking when given.

With ``--settled`` the registered checkpoints are then marked analysed in the database (their
checkpoints and jobs ``done``: analysing 20,000 would take hours and is no part of what a poll
costs), and ``--polls`` idle passes of the whole worker (``Watcher.run_once``: discovery, then
the queue, which has nothing to give) are measured too: what a settled fleet of runs costs
per poll. ``--tiny`` makes each checkpoint a 2 x 2 float32 ``model.safetensors`` (88 bytes)
and ``trainer_state.json``, put straight into moto's store rather than through HTTP (setup
only: every request measured still goes through the S3 API), so the issue's figure fits in
memory and minutes:

    python bench/bench_objects.py --runs 20 --checkpoints 50        # ~1 minute
    python bench/bench_objects.py --runs 100 --checkpoints 200 --tiny --settled
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--checkpoints", type=int, default=50)
    parser.add_argument("--polls", type=int, default=5)
    parser.add_argument(
        "--tiny", action="store_true", help="88-byte weights, put into moto's store directly"
    )
    parser.add_argument(
        "--settled",
        action="store_true",
        help="mark every checkpoint analysed, then time idle polls of the whole worker",
    )
    args = parser.parse_args()
    # moto's server logs every request it answers; tens of thousands of lines are no result.
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    from tests.factories import worker_settings
    from tests.objectstore import (
        CountingServer,
        client_fs,
        environment,
        make_bucket,
        upload,
        variables,
    )
    from tests.workers.small import write_checkpoint

    server = CountingServer()
    with variables(environment(server)), tempfile.TemporaryDirectory() as tmp:
        from alphawatch.cli.common import prepare_database
        from alphawatch.workers.watcher import Watcher

        work = Path(tmp)
        fs = client_fs(server)
        make_bucket(server, "bench")
        started = time.perf_counter()
        if args.tiny:
            _put_tiny(args.runs, args.checkpoints)
        else:
            for r in range(args.runs):
                run = work / f"run-{r}"
                for c in range(1, args.checkpoints + 1):
                    write_checkpoint(run, c * 10, seed=c)
                upload(fs, run, f"s3://bench/runs/run-{r}")
        upload_s = time.perf_counter() - started
        urls = [f"s3://bench/runs/run-{r}" for r in range(args.runs)]
        settings = worker_settings(f"sqlite:///{work / 'bench.db'}")
        prepare_database(settings, migrate=True)
        watcher = Watcher(settings, urls)

        server.reset()
        started = time.perf_counter()
        found = watcher.discover_once()
        first = {"seconds": round(time.perf_counter() - started, 3), **server.snapshot()}
        assert found == args.runs * args.checkpoints, found

        idle: list[dict[str, int]] = []
        seconds: list[float] = []
        for _ in range(args.polls):
            server.reset()
            started = time.perf_counter()
            assert watcher.discover_once() == 0
            seconds.append(time.perf_counter() - started)
            idle.append(server.snapshot())

        settled: dict[str, object] = {}
        if args.settled:
            settled = _settled_polls(watcher, server, settings.database_url, urls, args.polls)
        restarted = _restarted_pass(settings, urls, server)

        write_checkpoint(work / "new", 99_999, seed=7)
        upload(fs, work / "new", urls[0])
        server.reset()
        assert watcher.discover_once() == 1
        new = server.snapshot()
        server.stop()

    print(
        json.dumps(
            {
                "runs": args.runs,
                "checkpoints_per_run": args.checkpoints,
                "objects": args.runs * args.checkpoints * 2,
                "upload_s": round(upload_s, 1),
                "first_pass": first,
                "idle_pass_requests": idle,
                "idle_pass_s_median": round(statistics.median(seconds), 3),
                "new_checkpoint_pass": new,
                **settled,
                "restarted_first_pass": restarted,
            },
            indent=2,
        )
    )
    return 0


def _put_tiny(runs: int, checkpoints: int) -> None:
    """``runs`` x ``checkpoints`` tiny HF checkpoints put into moto's own store (no HTTP)."""
    import struct

    from moto.core import DEFAULT_ACCOUNT_ID
    from moto.s3.models import s3_backends

    header = json.dumps(
        {"model.layers.0.mlp.up_proj.weight": {"dtype": "F32", "shape": [2, 2],
                                               "data_offsets": [0, 16]}}
    ).encode()  # fmt: skip
    header += b" " * (-len(header) % 8)
    weights = struct.pack("<Q", len(header)) + header + bytes(16)
    backend = s3_backends[DEFAULT_ACCOUNT_ID]["global"]
    for r in range(runs):
        for c in range(1, checkpoints + 1):
            folder = f"runs/run-{r}/checkpoint-{c * 10}"
            backend.put_object("bench", f"{folder}/model.safetensors", weights)
            state = json.dumps({"global_step": c * 10}).encode()
            backend.put_object("bench", f"{folder}/trainer_state.json", state)


def _restarted_pass(settings: Any, urls: list[str], server: Any) -> dict[str, object]:
    """The first discovery pass of a worker started afresh on the same database: every
    checkpoint it finds is registered, none is new."""
    from alphawatch.workers.watcher import Watcher

    watcher = Watcher(settings, urls)
    try:
        server.reset()
        started = time.perf_counter()
        assert watcher.discover_once() == 0
        return {"seconds": round(time.perf_counter() - started, 3), **server.snapshot()}
    finally:
        watcher.close()


def _settled_polls(
    watcher: Any, server: Any, url: str, urls: list[str], polls: int
) -> dict[str, object]:
    """Every checkpoint marked analysed; ``polls`` idle passes of the whole worker."""
    from sqlalchemy import create_engine, text

    engine = create_engine(url)
    with engine.begin() as connection:
        connection.execute(text("UPDATE analysis_job SET status = 'done'"))
        marked = connection.execute(text("UPDATE checkpoint SET status = 'done'")).rowcount
    engine.dispose()
    requests: list[dict[str, int]] = []
    seconds: list[float] = []
    # The listings alone (the same LIST requests through a plain s3fs client): how much of a
    # poll is the store's answer rather than alphawatch.
    from tests.objectstore import client_fs

    fs = client_fs(server)
    listing: list[float] = []
    for _ in range(polls):
        started = time.perf_counter()
        for run in urls:
            fs.find(run.removeprefix("s3://"), detail=True, withdirs=False)
        listing.append(time.perf_counter() - started)
    for _ in range(polls):
        server.reset()
        started = time.perf_counter()
        assert watcher.run_once() == 0  # nothing new, nothing queued
        seconds.append(time.perf_counter() - started)
        requests.append(server.snapshot())
    return {
        "settled_checkpoints": marked,
        "settled_worker_poll_requests": requests,
        "settled_worker_poll_s_median": round(statistics.median(seconds), 3),
        "settled_worker_poll_s": [round(x, 3) for x in seconds],
        "listing_alone_s_median": round(statistics.median(listing), 3),
    }


if __name__ == "__main__":
    sys.exit(main())
