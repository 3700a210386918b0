"""Runs in a bucket: requests and time per discovery poll, idle and with a new checkpoint.

Starts a real S3 API on 127.0.0.1 (moto's server mode, counting every request it answers),
uploads ``--runs`` x ``--checkpoints`` small real Hugging Face checkpoints (a safetensors file
and trainer_state.json each), points one worker (``Watcher``, SQLite) at every run's URL, and
measures:

* the first pass: requests by kind (LIST, HEAD, GET) and seconds;
* ``--polls`` idle passes: requests by kind per pass, and seconds per pass;
* one new checkpoint in one run: requests of the pass that registers it.

    python bench/bench_objects.py --runs 20 --checkpoints 50        # ~1 minute
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--checkpoints", type=int, default=50)
    parser.add_argument("--polls", type=int, default=5)
    args = parser.parse_args()

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
            },
            indent=2,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
