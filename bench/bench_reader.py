"""Checkpoint reading: peak memory and throughput on a multi-GB sharded safetensors checkpoint.

    python bench/bench_reader.py [--tensors 16] [--dim 8192] [--shards 4]

A child process writes a bf16 Hugging Face-style sharded checkpoint (default 16 tensors of
8192x8192, 2 GiB) into a temporary folder; this process then reads it layer by layer through
``workers.checkpoints.iter_layers`` (each tensor upcast to float32) and reports the peak resident
memory (VmHWM) over the process baseline against the largest float32 tensor, and the read
throughput. The promise: peak <= 3x the largest tensor + baseline, whatever the model size.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

_WRITER = r"""
import json, sys, torch
from pathlib import Path
from safetensors.torch import save_file
folder, n, dim, shards = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
folder.mkdir(parents=True)
per = -(-n // shards)
weight_map = {}
g = torch.Generator().manual_seed(0)
for s in range(shards):
    name = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
    part = {}
    for i in range(s * per, min(n, (s + 1) * per)):
        key = f"model.layers.{i}.mlp.up_proj.weight"
        part[key] = torch.randn(dim, dim, generator=g, dtype=torch.bfloat16)
        weight_map[key] = name
    save_file(part, str(folder / name))
    del part
(folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
(folder / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
"""


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=16)
    parser.add_argument("--dim", type=int, default=8192)
    parser.add_argument("--shards", type=int, default=4)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="alphawatch-reader-"))
    folder = work / "checkpoint-1"
    try:
        subprocess.run(
            [
                sys.executable,
                "-c",
                _WRITER,
                str(folder),
                str(args.tensors),
                str(args.dim),
                str(args.shards),
            ],
            check=True,
        )
        size = sum(p.stat().st_size for p in folder.iterdir())
        # Imported after the write so that the baseline holds torch and alphawatch, nothing else.
        from alphawatch.workers.checkpoints import discover, iter_layers

        (ref,) = discover(work, settle_s=0)
        assert ref.complete, ref.reason
        baseline = _kib("VmRSS")
        t0 = time.perf_counter()
        count = 0
        for matrix in iter_layers(ref):
            count += 1
            del matrix
        elapsed = time.perf_counter() - t0
        peak = _kib("VmHWM")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    largest = args.dim * args.dim * 4 / 1024  # KiB, float32
    over = (peak - baseline) / largest
    print(
        json.dumps(
            {
                "checkpoint_gib": round(size / 2**30, 2),
                "tensors": count,
                "read_s": round(elapsed, 2),
                "gib_per_s": round(size / 2**30 / elapsed, 2),
                "baseline_mib": baseline // 1024,
                "peak_mib": peak // 1024,
                "largest_fp32_mib": int(largest // 1024),
                "peak_over_baseline_in_largest_tensors": round(over, 2),
            }
        )
    )
    print(
        f"| {size / 2**30:.2f} GiB bf16, {count} x {args.dim}² in {args.shards} shards | "
        f"{size / 2**30 / elapsed:.2f} GiB/s | {(peak - baseline) / 1024:.0f} MiB over a "
        f"{baseline / 1024:.0f} MiB baseline = {over:.2f}x the largest fp32 tensor "
        f"({largest / 1024:.0f} MiB) | {'within' if over <= 3 else 'OVER'} 3x |"
    )
    return 0 if over <= 3 else 1


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "2")
    raise SystemExit(main())
