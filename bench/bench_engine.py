"""Whole-process engine speed against weightwatcher, and checkpoint throughput through the worker.

    python bench/bench_engine.py [--quick] [--widths 1024,2048,4096] [--repeats 3]

For each width, one Llama-shaped decoder layer (q, k, v, o: width²; gate, up: ffn × width;
down: width × ffn; seeded Gaussian + Student-t(3) weights, bench_spectral's) is written to one
safetensors file. Then, alternated in the same run and repeated:

- weightwatcher: a fresh ``python`` that imports weightwatcher 0.7.7, loads the file into
  ``nn.Linear`` modules and runs its default ``analyze()``;
- alphawatch, traps on: ``alphawatch analyze FILE --device cpu --format json`` (the default:
  trap check and bootstrap stability check on);
- alphawatch, traps off: the same with ``ALPHAWATCH_CHECK_TRAPS=false``.

Each is timed as a whole process (start to exit, wall clock; CPU seconds of the child too).
Medians are reported with the ratio weightwatcher / alphawatch and the largest relative alpha
difference. Then a 1024-wide 8-layer model's checkpoints go through one worker (SQLite, the
budgeted analysis child, distance from init on) for checkpoints per minute.

``--baseline DIR``: also runs another checkout's ``alphawatch analyze`` (its own ``.venv``),
traps on, in the same alternation: this code against that one in the same minutes.

``--worker-baseline DIR``: only the worker, this checkout against another one's code on this
interpreter (``git worktree add /tmp/base 0c22f52``: the code issue 14 measured its 4.9
ckpt/min on), alternated on the same run: the throughput ratio on one machine.

``--quick``: widths 1024 and 2048, two repeats, three checkpoints (a few minutes on a quiet
2-core machine). ``--ww-blas-threads 1`` runs weightwatcher with one BLAS thread: on a busy
machine its threaded OpenBLAS SVD slows down 10-30x, which would flatter the ratio. Prints
markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(ROOT))

FFN = {1024: 2752, 2048: 5504, 4096: 11008}
NAMES = {
    "q": "self_attn.q_proj",
    "k": "self_attn.k_proj",
    "v": "self_attn.v_proj",
    "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj",
    "up": "mlp.up_proj",
    "down": "mlp.down_proj",
}

_WW_CHILD = """
import json, logging, sys, warnings
import weightwatcher as ww
from safetensors.torch import load_file
from torch import nn
logging.getLogger("weightwatcher").setLevel(logging.ERROR)
state = load_file(sys.argv[1])
names = sorted(state)
modules = []
for name in names:
    w = state[name]
    layer = nn.Linear(w.shape[1], w.shape[0], bias=False)
    layer.weight.data = w
    modules.append(layer)
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    frame = ww.WeightWatcher(model=nn.Sequential(*modules)).analyze()
print(json.dumps(dict(zip(names, map(float, frame.alpha)))))
"""


# The worker on one run, in a fresh process whose PYTHONPATH picks the code: this checkout or
# another one (``--worker-baseline``), on this interpreter.
_WORKER_CHILD = """
import json, sys, tempfile, time
from pathlib import Path
from alphawatch.service.db.migrations import upgrade
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
with tempfile.TemporaryDirectory() as tmp:
    url = f"sqlite:///{tmp}/worker.db"
    upgrade(url)
    watcher = Watcher(Settings(database_url=url, device="cpu", settle_s=0.0), [Path(sys.argv[1])])
    t0 = time.perf_counter()
    count = watcher.run_once()
    print(json.dumps({"count": count, "seconds": time.perf_counter() - t0}))
"""


def write_layer(width: int, path: Path) -> None:
    import torch
    from bench_spectral import layer_weights
    from safetensors.torch import save_file

    torch.manual_seed(0)
    weights = layer_weights(width, FFN[width])
    save_file(
        {f"model.layers.0.{NAMES[k]}.weight": v.contiguous() for k, v in weights.items()}, str(path)
    )


def timed(cmd: list[str], env: dict[str, str], cwd: Path | None = None) -> tuple[float, float, str]:
    """Wall seconds, CPU seconds (user + system) of the child, and its stdout."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t0 = time.perf_counter()
    done = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise RuntimeError(f"{cmd[:3]} failed ({done.returncode}): {done.stderr[-2000:]}")
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return wall, cpu, done.stdout


def bench_width(
    width: int, repeats: int, work: Path, ww_threads: int | None, baseline: Path | None = None
) -> list[dict[str, object]]:
    path = work / f"layer{width}.safetensors"
    write_layer(width, path)
    env = dict(os.environ)
    ww_env = dict(env)
    if ww_threads:
        ww_env.update(
            {
                k: str(ww_threads)
                for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
            }
        )
    alphawatch = [
        sys.executable,
        "-m",
        "alphawatch",
        "analyze",
        str(path),
        "--device",
        "cpu",
        "--format",
        "json",
    ]
    variants: dict[str, tuple[list[str], dict[str, str], Path | None]] = {
        traps: (alphawatch, {**env, "ALPHAWATCH_CHECK_TRAPS": str(traps == "on")}, None)
        for traps in ("on", "off")
    }
    if baseline is not None:
        # the other checkout's own interpreter and package, traps on
        other = {k: v for k, v in env.items() if k != "PYTHONPATH"}
        variants["baseline on"] = (
            [str(baseline / ".venv/bin/python"), *alphawatch[1:]],
            {**other, "ALPHAWATCH_CHECK_TRAPS": "True"},
            baseline,
        )
    runs: dict[str, list[tuple[float, float]]] = {"ww": [], **{k: [] for k in variants}}
    alphas: dict[str, dict[str, float]] = {}
    for _ in range(repeats):
        wall, cpu, out = timed([sys.executable, "-c", _WW_CHILD, str(path)], ww_env)
        runs["ww"].append((wall, cpu))
        alphas["ww"] = json.loads(out)
        for traps, (cmd, traps_env, cwd) in variants.items():
            wall, cpu, out = timed(cmd, traps_env, cwd)
            runs[traps].append((wall, cpu))
            alphas[traps] = {
                layer["name"] + ".weight": layer["alpha"] for layer in json.loads(out)["layers"]
            }
    ww_wall = statistics.median(w for w, _ in runs["ww"])
    ww_cpu = statistics.median(c for _, c in runs["ww"])
    rows = []
    for traps in variants:
        wall = statistics.median(w for w, _ in runs[traps])
        cpu = statistics.median(c for _, c in runs[traps])
        diff = max(abs(alphas[traps][k] - a) / abs(a) for k, a in alphas["ww"].items())
        rows.append(
            {
                "width": width,
                "traps": traps,
                "ww_s": ww_wall,
                "ours_s": wall,
                "ratio": ww_wall / wall,
                "ww_cpu": ww_cpu,
                "ours_cpu": cpu,
                "cpu_ratio": ww_cpu / cpu,
                "diff": diff,
                "n": repeats,
            }
        )
    return rows


def wide_run(checkpoints: int, work: Path) -> Path:
    """The worker benchmark's run: a 1024-wide 8-layer model, a checkpoint per step."""
    from alphawatch.workers.demo_run import train

    wide = work / "wide"
    train(
        wide,
        steps=checkpoints,
        save_every=1,
        d_model=1024,
        n_layers=8,
        ffn=2752,
        seq_len=16,
        batch_size=2,
        n_heads=8,
    )
    return wide


def worker_against(
    baseline: Path, checkpoints: int, repeats: int, work: Path
) -> dict[str, list[float]]:
    """ckpt/min of this checkout's worker and of ``baseline``'s, alternated, same run."""
    wide = wide_run(checkpoints, work)
    rates: dict[str, list[float]] = {"baseline": [], "this checkout": []}
    for _ in range(repeats):
        for label, code in (("baseline", baseline), ("this checkout", ROOT)):
            env = {**os.environ, "PYTHONPATH": str(code)}
            _, _, out = timed([sys.executable, "-c", _WORKER_CHILD, str(wide)], env, code)
            done = json.loads(out.strip().splitlines()[-1])
            rates[label].append(60 * done["count"] / done["seconds"])
    return rates


def throughput(checkpoints: int, work: Path) -> tuple[int, float]:
    from bench_e2e import _throughput

    from alphawatch.service.db.migrations import upgrade
    from alphawatch.settings import Settings

    wide = wide_run(checkpoints, work)
    url = f"sqlite:///{work / 'wide.db'}"
    upgrade(url)
    settings = Settings(database_url=url, device="cpu", settle_s=0.0)
    return _throughput(settings, wide)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1024 and 2048 only, 2 repeats")
    parser.add_argument("--widths", type=str, help="comma-separated, of 1024,2048,4096")
    parser.add_argument("--repeats", type=int, help="runs of each process per width")
    parser.add_argument("--checkpoints", type=int, help="checkpoints through the worker")
    parser.add_argument(
        "--baseline", type=Path, help="another checkout (with its .venv) to time in the same runs"
    )
    parser.add_argument(
        "--ww-blas-threads",
        type=int,
        help="BLAS threads of weightwatcher's process (default: its own); 1 "
        "spares it the collapse of threaded OpenBLAS on a busy machine",
    )
    parser.add_argument(
        "--worker-baseline",
        type=Path,
        help="only the worker: another checkout's code (run on this "
        "interpreter, e.g. a `git worktree` of the commit an issue was filed "
        "at) against this one, alternated on the same run",
    )
    args = parser.parse_args()
    if args.worker_baseline is not None:
        return worker_baseline(args.worker_baseline, args.checkpoints or 5, args.repeats or 4)
    widths = (
        [int(w) for w in args.widths.split(",")]
        if args.widths
        else [1024, 2048]
        if args.quick
        else [1024, 2048, 4096]
    )
    repeats = args.repeats or (2 if args.quick else 3)
    checkpoints = args.checkpoints if args.checkpoints is not None else (3 if args.quick else 5)
    work = Path(tempfile.mkdtemp(prefix="alphawatch-bench-engine-"))
    load = [os.getloadavg()[0]]
    rows: list[dict[str, object]] = []
    try:
        for width in widths:
            rows += bench_width(width, repeats, work, args.ww_blas_threads, args.baseline)
            load.append(os.getloadavg()[0])
            print(f"  {width}: done, load {load[-1]:.1f}", file=sys.stderr, flush=True)
        count, seconds = throughput(checkpoints, work) if checkpoints else (0, 0.0)
        load.append(os.getloadavg()[0])
    finally:
        shutil.rmtree(work, ignore_errors=True)

    import torch
    import weightwatcher

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; python "
        f"{platform.python_version()}, torch {torch.__version__}, weightwatcher "
        f"{weightwatcher.__version__}; load average during the run "
        f"{min(load):.1f}..{max(load):.1f}; weightwatcher's BLAS threads: "
        f"{args.ww_blas_threads or 'its default'}"
    )
    print(
        "| layer | traps | weightwatcher s | alphawatch s | ratio | CPU s (ww / ours) "
        "| CPU ratio | max rel. Δα | runs |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['width']}-wide (ffn {FFN[int(str(r['width']))]}) | {r['traps']} | "
            f"{r['ww_s']:.1f} | {r['ours_s']:.1f} | **{r['ratio']:.2f}x** | "
            f"{r['ww_cpu']:.1f} / {r['ours_cpu']:.1f} | {r['cpu_ratio']:.2f}x | "
            f"{r['diff']:.1e} | {r['n']} |"
        )
    if count:
        print(
            f"\n| 1024-wide 8-layer checkpoint through the worker | {60 * count / seconds:.2f} "
            f"ckpt/min ({seconds / count:.1f} s per checkpoint, {count} checkpoints) |"
        )
    return 0


def worker_baseline(baseline: Path, checkpoints: int, repeats: int) -> int:
    work = Path(tempfile.mkdtemp(prefix="alphawatch-bench-worker-"))
    try:
        rates = worker_against(baseline.resolve(), checkpoints, repeats, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores; python "
        f"{platform.python_version()}; 1024-wide 8-layer run, {checkpoints} checkpoints, "
        f"fresh SQLite each time; load average {os.getloadavg()[0]:.1f} at the end"
    )
    print("| worker code | ckpt/min, alternated runs | median |\n|---|---|---|")
    for label, values in rates.items():
        print(
            f"| {label} | {', '.join(f'{v:.2f}' for v in values)} | "
            f"{statistics.median(values):.2f} |"
        )
    ratio = statistics.median(rates["this checkout"]) / statistics.median(rates["baseline"])
    print(f"\nratio of the medians: **{ratio:.2f}x**")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
