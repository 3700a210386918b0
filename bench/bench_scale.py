"""Real-size checkpoints through the worker's analysis process, and a cost model fitted to them.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_scale.py \
        [--only tinyllama-1.1b,llama-2-7b,...] [--skip-70b] [--quick] [--keep] \
        [--work DIR] [--max-minutes 15] [--no-shapes] [--json FILE]
    python bench/bench_scale.py --report FILE   # the tables of a --json file, printed again

Writes, one at a time, sharded bf16 safetensors checkpoints with the shapes of real models (a
``model.safetensors.index.json`` as Hugging Face writes it, ``config.json``, shards of at most
``--shard-gb``, 5 GB as ``save_pretrained``): a whole TinyLlama-1.1B, and one decoder block of
Llama-2-7B, Llama-3-8B and Llama-3-70B, each with its embedding and ``lm_head`` (the 32k /
128k vocabulary matrices).
Weights are seeded Gaussian (numpy's PCG64, float32 rounded to bf16, streamed to disk a chunk
at a time: the writer holds no tensor whole). Each checkpoint is then:

- read alone in a fresh process (``iter_layers``, every tensor decoded to float32), page cache
  dropped first (``posix_fadvise(DONTNEED)`` after ``fsync``): read throughput from disk;
- analysed by the worker's own analysis process (``workers.budget.AnalysisChild`` with
  ``AnalysisOptions.from_settings(Settings())``: the defaults, every check on, the worker's
  budget), page cache dropped again: wall and CPU seconds of the child, its peak RSS (VmHWM,
  polled) and peak anonymous memory (the worker's own watchdog figure), against its idle RSS
  and the largest float32 tensor; the child is stopped after each checkpoint.

Before that, one matrix of each distinct shape is analysed alone (``analyze_matrix``, traps
on, one BLAS thread, in a fresh process) for CPU seconds per shape (shapes past
``--shape-max-gflop`` m·n² are not analysed whole: their two Gram products are timed on an
eighth of their rows, which is linear in the rows); a cost model

    cpu(m, n) = c1·m·n² + c2·n³ + c3·m·n + c0     (n ≤ m; one core, every check on)

is fitted to those by least squares on relative error (the Gram products, W's float64 and the
shuffle's float32, the two eigendecompositions, the per-entry passes: shuffle permutation,
gather, moments; the fits), checked on held-out shapes and on the measured checkpoints, and
extrapolated to whole 7B / 8B / 70B checkpoints on N cores and, from spec sheets, one H100.
A checkpoint the model predicts longer than ``--max-minutes`` on a quiet 2-core machine is
not run (nor is one that would not fit on the disk): its figures are the model's, labelled as
predictions. ``--skip-70b`` leaves out the largest (5.9 GB on disk, ~20 CPU minutes).

``--quick``: TinyLlama cut to 2 blocks and the Llama-2-7B block, shapes up to 4096 wide
(a few minutes on a quiet 2-core machine). Prints markdown for BENCHMARKS.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from scale_model import (  # noqa: E402
    H100,
    MODELS,
    WHOLE,
    Machine,
    ModelShape,
    checkpoint_cpu,
    cpu_wall,
    fit_costs,
    gpu_wall,
    oriented,
    predict_cpu,
)

# -- writing checkpoints ----------------------------------------------------------------------
CHUNK_ENTRIES = 8 * 2**20  # entries drawn at a time: 32 MiB of float32


def bf16_bits(values: np.ndarray) -> np.ndarray:
    """float32 → bfloat16 bit patterns (uint16), rounded to nearest even as torch does."""
    bits = values.view(np.uint32)
    rounded = bits + np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    out: np.ndarray = (rounded >> np.uint32(16)).astype(np.uint16)
    return out


def _shards(
    tensors: list[tuple[str, tuple[int, ...]]], shard_bytes: int
) -> list[list[tuple[str, tuple[int, ...]]]]:
    """Tensors split as ``save_pretrained`` does: a new shard when the next would overflow."""
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in tensors:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_checkpoint(
    folder: Path, model: ModelShape, blocks: int, seed: int, shard_bytes: int
) -> int:
    """A sharded bf16 safetensors checkpoint of ``model`` with ``blocks`` decoder blocks.

    Returns its size in bytes. Matrices are N(0, 1/in) entries, vectors (norms) ones; each
    tensor has its own seed, so a tensor's values do not depend on the shard size.
    """
    folder.mkdir(parents=True)
    tensors = model.tensors(blocks)
    seeds = {name: i for i, (name, _) in enumerate(tensors)}
    shards = _shards(tensors, shard_bytes)
    weight_map: dict[str, str] = {}
    total = 0
    for k, shard in enumerate(shards):
        file = f"model-{k + 1:05d}-of-{len(shards):05d}.safetensors"
        # Within a file, the safetensors writer lays tensors out (and lists them) sorted by
        # name: lm_head.weight before model.embed_tokens.weight, both first in a file
        # that holds both; the shards themselves follow the state dict (save_pretrained).
        shard = sorted(shard)
        header: dict[str, object] = {"__metadata__": {"format": "pt"}}
        offset = 0
        for name, shape in shard:
            nbytes = 2 * math.prod(shape)
            header[name] = {
                "dtype": "BF16",
                "shape": list(shape),
                "data_offsets": [offset, offset + nbytes],
            }
            offset += nbytes
            weight_map[name] = file
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)  # the safetensors writer aligns the data to 8 bytes
        with open(folder / file, "wb") as out:
            out.write(len(raw).to_bytes(8, "little"))
            out.write(raw)
            for name, shape in shard:
                _write_tensor(out, shape, np.random.default_rng([seed, seeds[name]]))
            out.flush()
            os.fsync(out.fileno())
        total += offset
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (folder / "config.json").write_text(json.dumps(model.config(), indent=2))
    return sum(p.stat().st_size for p in folder.iterdir())


def _write_tensor(out: object, shape: tuple[int, ...], rng: np.random.Generator) -> None:
    write = out.write  # type: ignore[attr-defined]
    if len(shape) == 1:
        write(np.full(shape, 0x3F80, dtype=np.uint16).tobytes())  # bf16 1.0
        return
    rows, cols = shape
    scale = np.float32(1.0 / math.sqrt(cols))
    step = max(1, CHUNK_ENTRIES // cols)
    for start in range(0, rows, step):
        block = rng.standard_normal((min(step, rows - start), cols), dtype=np.float32)
        block *= scale
        write(bf16_bits(block).tobytes())


def drop_cache(folder: Path) -> None:
    """Evict the checkpoint's pages from the page cache (written and synced: clean pages)."""
    for path in folder.iterdir():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


# -- measuring --------------------------------------------------------------------------------
_READ_CHILD = """
import json, sys, time
from pathlib import Path
from alphawatch.workers.checkpoints import iter_layers
t0 = time.perf_counter()
count = 0
for matrix in iter_layers(Path(sys.argv[1])):
    count += 1
    del matrix
elapsed = time.perf_counter() - t0
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
print(json.dumps({"seconds": elapsed, "matrices": count, "peak_mib": hwm / 1024}))
"""

# One matrix of each shape, alone, one BLAS thread, every check on: CPU seconds of the process
# (the BLAS runs in the calling thread). The permutation cache is emptied before each, so each
# shape pays its shuffle draw, as the first matrix of its size in a checkpoint does.
_SHAPE_CHILD = """
import json, resource, sys, time
import numpy as np
from threadpoolctl import threadpool_limits
from alphawatch.workers.spectral import analyze_matrix
from alphawatch.workers.spectral import traps

def cpu():
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime

def matrix(m, n, seed):
    w = np.random.default_rng(seed).standard_normal((m, n), dtype=np.float32)
    w *= np.float32(1 / np.sqrt(n))
    bits = w.view(np.uint32)
    bits += np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))
    bits &= np.uint32(0xFFFF0000)
    return w

with threadpool_limits(limits=1):
    rng = np.random.Generator(np.random.PCG64(0))
    c0, t0 = cpu(), time.perf_counter()
    traps.random_permutation(rng, 4096 * 4096)
    print(json.dumps({"perm_entries": 4096 * 4096, "cpu_s": cpu() - c0,
                      "wall_s": time.perf_counter() - t0}), flush=True)
    for arg in sys.argv[1:]:
        if arg.startswith("gram:"):
            # The two Gram products alone, on a slice of rows of a matrix too large to run
            # whole: summed over 512-row blocks, their cost is linear in the rows.
            from alphawatch.workers.spectral import lapack
            m, n, rows = map(int, arg[5:].split(":"))
            w = matrix(rows, n, rows)
            out = {"gram": [m, n], "rows": rows}
            for name, dtype in (("float64", np.float64), ("float32", np.float32)):
                c0, t0 = cpu(), time.perf_counter()
                lapack.gram_upper(lambda i, j: w[i:j], rows, n, dtype)
                out[name] = {"cpu_s": cpu() - c0, "wall_s": time.perf_counter() - t0}
            print(json.dumps(out), flush=True)
            del w
            continue
        m, n = map(int, arg.split("x"))
        w = matrix(m, n, m * 100003 + n)
        traps._PERMS.clear()
        c0, t0 = cpu(), time.perf_counter()
        result = analyze_matrix(w, stored_dtype="bfloat16", check_traps=True)
        print(json.dumps({"shape": [m, n], "cpu_s": cpu() - c0,
                          "wall_s": time.perf_counter() - t0,
                          "status": str(result.fit_status.value)}), flush=True)
        del w, result
"""


def _status(pid: int) -> dict[str, int]:
    """VmHWM, VmRSS, RssAnon (KiB) of a process; {} when it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            return {
                k: int(v.split()[0])
                for k, v in (line.split(":", 1) for line in f)
                if k in ("VmHWM", "VmRSS", "RssAnon")
            }
    except OSError:
        return {}


def _children_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_CHILDREN)
    return u.ru_utime + u.ru_stime


def _self_cpu() -> float:
    u = resource.getrusage(resource.RUSAGE_SELF)
    return u.ru_utime + u.ru_stime


def _self_hwm_mib() -> float:
    return _status(os.getpid()).get("VmHWM", 0) / 1024


def measure_shapes(
    shapes: list[tuple[int, int]], probes: list[tuple[int, int]], grams: list[dict[str, object]]
) -> tuple[float, list[dict[str, object]]]:
    """Per-shape CPU seconds (see _SHAPE_CHILD) and the permutation's seconds per entry; the
    Gram products of ``probes`` (too large to analyse whole) on an eighth of their rows, into
    ``grams``."""
    cmd = [
        sys.executable,
        "-c",
        _SHAPE_CHILD,
        *(f"{m}x{n}" for m, n in shapes),
        *(f"gram:{m}:{n}:{-(-m // 8)}" for m, n in probes),
    ]
    rows: list[dict[str, object]] = []
    perm = 0.0
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, cwd=ROOT) as proc:
        assert proc.stdout is not None
        for line in proc.stdout:
            row = json.loads(line)
            if "perm_entries" in row:
                perm = row["cpu_s"] / row["perm_entries"]
                continue
            if "gram" in row:
                grams.append(row)
                print(f"  gram probe: {row}", file=sys.stderr, flush=True)
                continue
            rows.append(row)
            m, n = row["shape"]
            print(f"  {m}x{n}: {row['cpu_s']:.1f} CPU s", file=sys.stderr, flush=True)
    if proc.returncode:
        raise RuntimeError(f"the per-shape process failed ({proc.returncode})")
    return perm, rows


@dataclass
class Run:
    """One checkpoint's measurements."""

    model: str
    blocks: int
    matrices: int
    size_bytes: int
    largest_fp32_bytes: int
    write_s: float = 0.0
    read_s: float = 0.0
    read_peak_mib: float = 0.0
    wall_s: float = 0.0
    cpu_s: float = 0.0
    child_idle_mib: float = 0.0
    child_peak_mib: float = 0.0  # VmHWM, polled
    child_peak_anon_mib: float = 0.0  # the worker's own watchdog figure
    per_shape_ms: dict[str, list[float]] = field(default_factory=dict)
    statuses: dict[str, int] = field(default_factory=dict)
    load: tuple[float, float] = (0.0, 0.0)


def analyse(folder: Path, run: Run) -> None:
    """The checkpoint through the worker's analysis process, every default option on."""
    from alphawatch.settings import Settings
    from alphawatch.workers.analyst import AnalysisOptions
    from alphawatch.workers.budget import AnalysisChild, budget_of
    from alphawatch.workers.checkpoints import Confinement

    settings = Settings()  # device "auto": the GPU where there is one, as a worker's default
    options = AnalysisOptions.from_settings(settings, confine=Confinement.to([folder.parent]))
    child = AnalysisChild(options, budget_of(settings))
    child.start()
    pid = child.pid
    assert pid is not None
    idle = _status(pid)
    peak = {"VmHWM": idle.get("VmHWM", 0)}
    done = threading.Event()

    def poll() -> None:
        while not done.wait(0.1):
            peak["VmHWM"] = max(peak["VmHWM"], _status(pid).get("VmHWM", 0))

    watcher = threading.Thread(target=poll, daemon=True)
    cpu0 = _children_cpu()
    load0 = os.getloadavg()[0]
    watcher.start()
    try:
        # The run's first checkpoint is itself, as for a worker's first job of a run.
        outcome = child.analyze(folder, folder)
        peak["VmHWM"] = max(peak["VmHWM"], _status(pid).get("VmHWM", 0))
    finally:
        done.set()
        watcher.join()
        child.close()  # reaped: its CPU seconds are in RUSAGE_CHILDREN now
    run.wall_s = outcome.elapsed_s
    run.cpu_s = _children_cpu() - cpu0
    run.load = (load0, os.getloadavg()[0])
    run.child_idle_mib = idle.get("VmRSS", 0) / 1024
    run.child_peak_mib = peak["VmHWM"] / 1024
    run.child_peak_anon_mib = outcome.peak_mb
    for layer in outcome.analysis.layers:
        if layer.shape is not None:
            key = "x".join(map(str, layer.shape))
            run.per_shape_ms.setdefault(key, []).append(layer.result.elapsed_ms)
        status = str(layer.result.fit_status.value)
        run.statuses[status] = run.statuses.get(status, 0) + 1


def read_alone(folder: Path, run: Run) -> None:
    out = subprocess.run(
        [sys.executable, "-c", _READ_CHILD, str(folder)],
        capture_output=True,
        text=True,
        check=True,
        cwd=ROOT,
    )
    got = json.loads(out.stdout.strip().splitlines()[-1])
    run.read_s, run.read_peak_mib = got["seconds"], got["peak_mib"]


# -- reporting --------------------------------------------------------------------------------
def _blas_info() -> str:
    from threadpoolctl import threadpool_info

    import alphawatch.workers.spectral  # noqa: F401  (loads numpy's OpenBLAS as the engine does)

    parts = []
    for pool in threadpool_info():
        parts.append(
            f"{pool.get('internal_api')} {pool.get('version')} "
            f"({pool.get('threading_layer', '?')}, {pool.get('architecture', '?')}, "
            f"{pool.get('num_threads')} threads)"
        )
    return "; ".join(parts)


def _md_shape(s: tuple[int, int]) -> str:
    return f"{s[0]}×{s[1]}"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated, of {','.join(MODELS)}")
    parser.add_argument("--skip-70b", action="store_true", help="leave out llama-3-70b")
    parser.add_argument("--quick", action="store_true", help="TinyLlama cut to 2 blocks, 7B block")
    parser.add_argument("--keep", action="store_true", help="keep the written checkpoints")
    parser.add_argument("--work", type=Path, help="where to write (default: a folder in /tmp)")
    parser.add_argument(
        "--shard-gb", type=float, default=5.0, help="largest shard (GB; save_pretrained's 5GB)"
    )
    parser.add_argument(
        "--max-minutes",
        type=float,
        default=15.0,
        help="extrapolate a checkpoint the model predicts longer than this",
    )
    parser.add_argument("--no-shapes", action="store_true", help="skip the per-shape pass")
    parser.add_argument(
        "--shape-max-gflop",
        type=float,
        default=600.0,
        help="per-shape pass: shapes with m·n² above this are left to the model",
    )
    parser.add_argument("--json", type=Path, help="also write every figure as JSON here")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--report", type=Path, help="print the tables of a --json file again")
    args = parser.parse_args()
    if args.report:
        return reprint(json.loads(args.report.read_text()))

    names = args.only.split(",") if args.only else list(MODELS)
    if args.quick and not args.only:
        names = ["tinyllama-1.1b", "llama-2-7b"]
    if args.skip_70b:
        names = [n for n in names if n != "llama-3-70b"]
    unknown = [n for n in names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model(s) {unknown}; known: {', '.join(MODELS)}")
    models = [MODELS[n] for n in names]

    started = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    load_start = os.getloadavg()
    cpu_start = _self_cpu()
    blas = _blas_info()

    # Per-shape pass: every distinct (m, n), smallest first
    # (of every model: the cost model needs the wide ones even when their checkpoints are not run)
    shapes = sorted(
        {oriented(s) for model in MODELS.values() for s in model.matrices(1)},
        key=lambda s: s[0] * s[1] ** 2,
    )
    if args.quick:
        shapes = [s for s in shapes if s[1] <= 4096 and s[0] <= 32000]
    measured = [s for s in shapes if s[0] * s[1] ** 2 / 1e9 <= args.shape_max_gflop]
    grams: list[dict[str, object]] = []
    probes = [s for s in shapes if s not in measured]
    perm_s, shape_rows = (0.0, []) if args.no_shapes else measure_shapes(measured, probes, grams)
    fitted = {tuple(r["shape"]): float(r["cpu_s"]) for r in shape_rows}  # type: ignore[arg-type]
    costs = fit_costs(list(fitted), list(fitted.values())) if len(fitted) >= 4 else None

    work = args.work or Path(tempfile.mkdtemp(prefix="alphawatch-scale-"))
    work.mkdir(parents=True, exist_ok=True)
    runs: list[Run] = []
    skipped: list[tuple[str, str]] = []
    for model in models:
        blocks = (2 if args.quick else model.blocks) if model.name in WHOLE else 1
        tensors = model.tensors(blocks)
        size = sum(2 * math.prod(s) for _, s in tensors)
        free = shutil.disk_usage(work).free
        if size + 2 * 2**30 > free:
            skipped.append((model.name, f"needs {size / 1e9:.1f} GB, {free / 1e9:.1f} GB free"))
            continue
        mats = model.matrices(blocks)
        if costs is not None:
            guess = cpu_wall(costs, perm_s, mats, Machine(2, 2, 0.8), 0.0)
            if guess > 60 * args.max_minutes:
                skipped.append((model.name, f"predicted {guess / 60:.0f} min > --max-minutes"))
                continue
        run = Run(model.name, blocks, len(mats), size, max(4 * s[0] * s[1] for s in mats))
        folder = work / model.name / "checkpoint-1000"
        print(f"{model.name}: writing {size / 1e9:.2f} GB", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        run.size_bytes = write_checkpoint(
            folder, model, blocks, args.seed, int(args.shard_gb * 1e9)
        )
        run.write_s = time.perf_counter() - t0
        try:
            drop_cache(folder)
            read_alone(folder, run)
            drop_cache(folder)
            print(f"{model.name}: analysing", file=sys.stderr, flush=True)
            analyse(folder, run)
        finally:
            if not args.keep:
                shutil.rmtree(folder.parent, ignore_errors=True)
        runs.append(run)
        print(
            f"{model.name}: {run.wall_s:.1f} s wall, {run.cpu_s:.1f} CPU s, "
            f"peak {run.child_peak_mib:.0f} MiB, load {run.load[0]:.1f}..{run.load[1]:.1f}",
            file=sys.stderr,
            flush=True,
        )
    if not args.keep and args.work is None:
        shutil.rmtree(work, ignore_errors=True)

    report = {
        "started": started,
        "load_start": load_start,
        "load_end": os.getloadavg(),
        "blas": blas,
        "bench_cpu_s": _self_cpu() - cpu_start,
        "bench_peak_mib": _self_hwm_mib(),
        "perm_s_per_entry": perm_s,
        "shapes": shape_rows,
        "gram_probes": grams,
        "costs": None if costs is None else costs.tolist(),
        "runs": [r.__dict__ for r in runs],
        "skipped": skipped,
    }
    print_report(report, runs, costs, perm_s, fitted, shapes)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2, default=str))
    return 0


def reprint(report: dict[str, Any]) -> int:
    """The tables of a saved run (``--json``), printed by this version of the script."""
    runs = [Run(**{**r, "load": tuple(r["load"])}) for r in report["runs"]]
    costs = None if report["costs"] is None else np.array(report["costs"])
    fitted = {(r["shape"][0], r["shape"][1]): float(r["cpu_s"]) for r in report["shapes"]}
    shapes = sorted(
        {oriented(s) for model in MODELS.values() for s in model.matrices(1)},
        key=lambda s: s[0] * s[1] ** 2,
    )
    print_report(report, runs, costs, report["perm_s_per_entry"], fitted, shapes)
    return 0


def print_report(
    report: dict[str, object],
    runs: list[Run],
    costs: np.ndarray | None,
    perm_s: float,
    fitted: dict[tuple[int, int], float],
    shapes: list[tuple[int, int]],
) -> None:
    import scipy

    ls, le = report["load_start"], report["load_end"]
    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores, "
        f"{os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB; python "
        f"{platform.python_version()}, numpy {np.__version__}, scipy {scipy.__version__}; "
        f"BLAS: {report['blas']}"
    )
    print(
        f"started {report['started']}; load average at start {ls[0]:.2f} / {ls[1]:.2f} / "  # type: ignore[index]
        f"{ls[2]:.2f}, at end {le[0]:.2f} / {le[1]:.2f} / {le[2]:.2f} (1 / 5 / 15 min); "  # type: ignore[index]
        f"benchmark process: {report['bench_cpu_s']:.1f} CPU s, peak RSS "
        f"{report['bench_peak_mib']:.0f} MiB"
    )
    if fitted:
        print("\nPer shape (one matrix alone, one BLAS thread, every check on):\n")
        print("| shape (m×n) | CPU s | wall s | model CPU s | error |")
        print("|---|---|---|---|---|")
        rows = {tuple(r["shape"]): r for r in report["shapes"]}  # type: ignore[attr-defined]
        for s in shapes:
            if s in rows:
                r = rows[s]
                model = predict_cpu(costs, s) if costs is not None else float("nan")
                print(
                    f"| {_md_shape(s)} | {r['cpu_s']:.2f} | {r['wall_s']:.2f} | {model:.2f} | "
                    f"{100 * (model / r['cpu_s'] - 1):+.0f} % |"
                )
            elif costs is not None:
                print(
                    f"| {_md_shape(s)} | not run | | {predict_cpu(costs, s):.1f} (extrapolated) | |"
                )
    if runs:
        print("\nCheckpoints through the worker's analysis process (defaults, every check on):\n")
        print(
            "| checkpoint | matrices | size | read alone (cold) | analysis wall s | CPU s | "
            "s per block | child idle → peak RSS | peak anon | largest fp32 tensor | "
            "peak over idle ÷ largest | load |"
        )
        print("|---|---|---|---|---|---|---|---|---|---|---|---|")
        for r in runs:
            ratio = (r.child_peak_mib - r.child_idle_mib) * 2**20 / r.largest_fp32_bytes
            what = f"whole, {r.blocks} blocks" if r.model in WHOLE else "1 block + vocab"
            print(
                f"| {r.model} ({what}) | {r.matrices} | {r.size_bytes / 1e9:.2f} GB | "
                f"{r.read_s:.1f} s, {r.size_bytes / 1e6 / r.read_s:.0f} MB/s | {r.wall_s:.1f} | "
                f"{r.cpu_s:.1f} | {_block_share(costs, perm_s, r)} | "
                f"{r.child_idle_mib:.0f} → {r.child_peak_mib:.0f} MiB | "
                f"{r.child_peak_anon_mib:.0f} MiB | {r.largest_fp32_bytes / 2**20:.0f} MiB | "
                f"**{ratio:.2f}x** | {r.load[0]:.1f}..{r.load[1]:.1f} |"
            )
        print("\nIn-stream wall ms per matrix (median; two matrices at a time, so overlapping):\n")
        print("| checkpoint | shape: median ms (matrices) |\n|---|---|")
        for r in runs:
            cells = ", ".join(
                f"{k}: {sorted(v)[len(v) // 2]:.0f} ({len(v)})" for k, v in r.per_shape_ms.items()
            )
            print(f"| {r.model} | {cells} |")
        print("\nStatuses: " + "; ".join(f"{r.model}: {r.statuses}" for r in runs))
    for name, why in report["skipped"]:  # type: ignore[attr-defined]
        print(f"\nnot run: {name}: {why}")
    if costs is None:
        return
    print_model(costs, perm_s, fitted, runs, report)


def _block_share(costs: np.ndarray | None, perm_s: float, r: Run) -> str:
    """Wall seconds of one decoder block and of the two vocabulary matrices, the run's wall
    split by the model's CPU shares (the worker reports one figure per checkpoint)."""
    if costs is None:
        return "?"
    mats = MODELS[r.model].matrices(r.blocks)
    vocab = checkpoint_cpu(costs, perm_s, [mats[0], mats[-1]])
    share = vocab / checkpoint_cpu(costs, perm_s, mats)
    return f"{r.wall_s * (1 - share) / r.blocks:.1f} (vocab {r.wall_s * share:.1f})"


def print_model(
    costs: np.ndarray,
    perm_s: float,
    fitted: dict[tuple[int, int], float],
    runs: list[Run],
    report: dict[str, object],
) -> None:
    c1, c2, c3, c0 = costs
    print(
        "\nCost model, one core, every check on (least squares on relative error, all measured "
        f"shapes): cpu(m, n) = {c1:.3e}·m·n² + {c2:.3e}·n³ + {c3:.3e}·m·n + {c0:.3f} s "
        f"(n ≤ m); i.e. {1e-9 / c1 if c1 else float('inf'):.1f} G m·n²/s, "
        f"{1e-9 / c2 if c2 else float('inf'):.1f} G n³/s; shuffle permutation "
        f"{perm_s * 1e9:.1f} ns per entry (drawn once per size while ≤ 256 MiB are cached)"
    )
    # Held out: fit on the smaller half of the shapes, predict the larger half.
    order = sorted(fitted, key=lambda s: s[0] * s[1] ** 2)
    cut = max(4, len(order) // 2 + 1)
    if len(order) > cut:
        small = fit_costs(order[:cut], [fitted[s] for s in order[:cut]])
        print("\nHeld out (fitted on the smaller shapes, predicting the larger ones):\n")
        print("| shape | measured CPU s | predicted | error |\n|---|---|---|---|")
        for s in order[cut:]:
            p = predict_cpu(small, s)
            print(
                f"| {_md_shape(s)} | {fitted[s]:.1f} | {p:.1f} | "
                f"{100 * (p / fitted[s] - 1):+.0f} % |"
            )
    for probe in report.get("gram_probes", []):  # type: ignore[attr-defined]
        m, n = probe["gram"]
        scale = m / probe["rows"]
        f64, f32 = probe["float64"]["cpu_s"] * scale, probe["float32"]["cpu_s"] * scale
        print(
            f"\nGram products of {m}×{n} (not analysed whole; {probe['rows']} rows measured, "
            f"× {scale:.0f} — linear in the rows by construction): float64 {f64:.0f} CPU s + "
            f"float32 {f32:.0f} CPU s = {f64 + f32:.0f}; the model's c1·m·n² term: "
            f"{c1 * m * n * n:.0f} CPU s ({100 * (c1 * m * n * n / (f64 + f32) - 1):+.0f} %)"
        )
    # Calibration on the checkpoints measured: their CPU seconds against the per-shape sum
    # (reading and decoding, two matrices at once on a shared memory bus, the stream's overhead).
    kappa, read_rate = 1.0, 0.0
    if runs:
        ratios = []
        print(
            "\nThe model against the checkpoints measured (CPU s of the analysis process; the "
            "wall clock of a loaded machine is not the model's, see the load column above):\n"
        )
        print("| checkpoint | measured CPU s | sum of per-shape model CPU s | measured ÷ model |")
        print("|---|---|---|---|")
        for r in runs:
            cpu = checkpoint_cpu(costs, perm_s, MODELS[r.model].matrices(r.blocks))
            ratios.append(r.cpu_s / cpu)
            print(f"| {r.model} | {r.cpu_s:.1f} | {cpu:.1f} | {r.cpu_s / cpu:.2f} |")
        kappa = float(np.median(ratios))
        read_rate = float(np.median([r.size_bytes / r.read_s for r in runs]))
    busy = 0.95  # share of the wall both threads compute, measured on a quiet 2-core VM
    print(
        f"\n**Predictions (model, not measurement)** for whole bf16 checkpoints, every check on. "
        f"CPU: per-matrix model × {kappa:.2f} (measured ÷ model above), workers busy "
        f"{busy:.0%} of the wall (a quiet machine; wall clock grows with other load), Gram "
        "over T BLAS threads at 0.85·T, eigenvalues at √T, at most one matrix at a time per "
        "worker; the engine's default is min(cores, 4) workers, `ALPHAWATCH_ANALYSIS_WORKERS` "
        "sets more (memory: one matrix and its shuffle permutation per worker). H100: from "
        "the spec sheet (FP64 tensor 60 TFLOPS at 70 % for W's Gram, FP32 67 TFLOPS for the "
        "shuffle's, `eigvalsh` half BLAS-3 at 34 TFLOPS FP64 vector, half BLAS-2 at 3.35 TB/s), "
        "one matrix at a time as the accelerator path does, plus the host work this machine "
        "measured (the shuffle permutations numpy draws on the host, the fits). Reading overlaps "
        "the analysis on a CPU and not on the accelerator path; it is a column of its own, at "
        f"{read_rate / 1e6:.0f} MB/s (cold reads measured here, under the load above): no "
        "wall clock is shorter than it.\n"
    )
    print(
        "| model | matrices | bf16 GB | one core, CPU h | 2 cores | 16 cores (4 workers) | "
        "16 cores (16 workers) | 64 cores (4 workers) | 64 cores (64 workers) | "
        "one H100: device + host | reading |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name in ("tinyllama-1.1b", "llama-2-7b", "llama-3-8b", "llama-3-70b"):
        model = MODELS[name]
        mats = model.matrices()
        size = 2 * sum(math.prod(s) for _, s in model.tensors())
        read_s = size / read_rate if read_rate else 0.0
        cells = []
        for cores, workers in ((2, 2), (16, 4), (16, 16), (64, 4), (64, 64)):
            machine = Machine(cores, workers, busy / kappa)
            cells.append(_duration(cpu_wall(costs, perm_s, mats, machine, 0.0)))
        gpu, host = gpu_wall(costs, perm_s, mats, H100, float("inf"))
        print(
            f"| {name} | {len(mats)} | {size / 1e9:.1f} | "
            f"{kappa * checkpoint_cpu(costs, perm_s, mats) / 3600:.2f} | {' | '.join(cells)} | "
            f"{_duration(gpu - host)} + {_duration(host)} | {_duration(read_s)} |"
        )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


if __name__ == "__main__":
    raise SystemExit(main())
