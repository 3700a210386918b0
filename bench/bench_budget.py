"""Cost of analysing each checkpoint in a budgeted child process instead of the worker itself.

    python bench/bench_budget.py [--repeats 7]

Trains the demo model (2 x 128-wide blocks) and a wider one (4 x 512-wide blocks), then times
for each checkpoint: the analysis in this process (``analyst.analyze_checkpoint``, no budget),
the same analysis through a warm child (``budget.AnalysisChild``: request, 20 ms memory polls,
rows back over the pipe), and a cold child started for the one checkpoint (what a child per job
would cost). Also reports the start of a child (spawn + import of torch), the worker's own CPU
time spent watching, and the child's idle memory. Medians of ``--repeats`` runs.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process: less sensitive than wall time to a busy machine."""
    with open(f"/proc/{pid}/stat") as handle:
        fields = handle.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    from alphawatch.settings import Settings
    from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint
    from alphawatch.workers.budget import (
        AnalysisChild,
        AnalysisFailed,
        Budget,
        budget_of,
        resident_mb,
    )
    from alphawatch.workers.checkpoints import Confinement
    from alphawatch.workers.demo_run import train

    settings = Settings(device="cpu")
    options = AnalysisOptions.from_settings(settings, confine=Confinement(None))
    budget = Budget(timeout_s=600, memory_mb=budget_of(settings).memory_mb)
    work = Path(tempfile.mkdtemp(prefix="aw-bench-budget-"))
    demo, wide = work / "demo", work / "wide"
    train(demo, steps=2, save_every=2, seed=0)
    train(wide, steps=2, save_every=2, d_model=512, n_layers=4, ffn=1376, seq_len=16, batch_size=2)

    child = AnalysisChild(options, budget)
    starts = []
    for _ in range(args.repeats):
        child.close()
        started = time.perf_counter()
        child.start()
        starts.append(time.perf_counter() - started)
    start_s = statistics.median(starts)
    assert child.pid is not None
    idle_mb = resident_mb(child.pid) or 0.0

    print(
        f"child start (spawn + import torch), median of {args.repeats}: {start_s:.2f} s; "
        f"idle child anonymous memory {idle_mb:.0f} MB"
    )
    trips = []
    for _ in range(20):
        started = time.perf_counter()
        # A vanished checkpoint is the point here: a job that does no work.
        with contextlib.suppress(AnalysisFailed):
            child.analyze(work / "missing", None)
        trips.append(time.perf_counter() - started)
    print(
        f"round trip of a job that does no work, median of 20: "
        f"{statistics.median(trips) * 1000:.1f} ms"
    )
    print(
        "| checkpoint | in-process s (CPU s) | warm child s (CPU s) | overhead, median of pairs "
        "| cold child s | worker CPU while watching |"
    )
    print("|---|---|---|---|---|---|")
    for name, run in (("demo, 2 x 128-wide", demo), ("4 x 512-wide", wide)):
        path = run / "checkpoint-2"
        analyze_checkpoint(path, None, options)  # warm caches on both sides before timing
        child.analyze(path, None)
        # Interleaved, so that load from other processes on a shared machine hits both alike.
        local, warm, cold, watch, local_cpu, child_cpu = [], [], [], [], [], []
        for i in range(args.repeats):
            started, cpu = time.perf_counter(), _cpu_s(os.getpid())
            analyze_checkpoint(path, None, options)
            local.append(time.perf_counter() - started)
            local_cpu.append(_cpu_s(os.getpid()) - cpu)
            assert child.pid is not None
            cpu, before = resource.getrusage(resource.RUSAGE_SELF), _cpu_s(child.pid)
            started = time.perf_counter()
            child.analyze(path, None)
            warm.append(time.perf_counter() - started)
            child_cpu.append(_cpu_s(child.pid) - before)
            after = resource.getrusage(resource.RUSAGE_SELF)
            watch.append((after.ru_utime - cpu.ru_utime + after.ru_stime - cpu.ru_stime) / warm[-1])
            if i % 2 == 0:
                child.close()
                started = time.perf_counter()
                child.start()
                child.analyze(path, None)
                cold.append(time.perf_counter() - started)
        in_process, in_child = statistics.median(local), statistics.median(warm)
        overhead = statistics.median(w - loc for w, loc in zip(warm, local, strict=True))
        print(
            f"| {name} | {in_process:.3f} ({statistics.median(local_cpu):.3f}) | "
            f"{in_child:.3f} ({statistics.median(child_cpu):.3f}) | {overhead:+.3f} s "
            f"({overhead / in_process:+.0%}) | {statistics.median(cold):.2f} | "
            f"{statistics.median(watch):.1%} of a core |"
        )
    child.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
