"""Update spectra and layer distances: the cost of reading a second checkpoint.

    python bench/bench_deltas.py [--tensors 8] [--dim 2048] [--traps]

Writes two bf16 Hugging Face-style checkpoints (``--tensors`` matrices of dim x dim, the second
the first plus a small update) and analyses the later one in a fresh process per mode, as the
worker does (``analyze_checkpoint``):

- ``weights``: the weights alone (ALPHAWATCH_DELTAS unset);
- ``distances``: + the layer distances against the checkpoint before (a second read);
- ``prev``: + the ``@delta_prev`` update spectra and the distances;
- ``init,prev``: + the ``@delta_init`` update spectra against a third read.

Reports wall time, the seconds spent reading the base checkpoints, and the peak resident memory
(VmHWM) over the process baseline against the largest float32 matrix: a base is read one matrix
at a time, so the peak grows by a few matrices, not by a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = ("weights", "distances", "prev", "init,prev")


def _write(folder: Path, tensors: int, dim: int) -> list[Path]:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = {
        f"model.layers.{i}.mlp.up_proj.weight": torch.randn(dim, dim, generator=g) / dim**0.5
        for i in range(tensors)
    }
    paths = []
    for step in (0, 100, 200):
        path = folder / f"checkpoint-{step}"
        path.mkdir(parents=True)
        update = {
            k: (v + (step / 100) * 0.05 * torch.randn(dim, dim, generator=g) / dim**0.5).to(
                torch.bfloat16
            )
            for k, v in base.items()
        }
        save_file(update, str(path / "model.safetensors"))
        (path / "trainer_state.json").write_text(json.dumps({"global_step": step}))
        paths.append(path)
    return paths


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _child(folder: Path, mode: str, traps: bool) -> dict[str, float]:
    from alphawatch.settings import Settings
    from alphawatch.workers.analyst import AnalysisOptions, analyze_checkpoint
    from alphawatch.workers.checkpoints import UNCONFINED

    deltas = [] if mode == "weights" else mode.split(",")
    settings = Settings(device="cpu", deltas=deltas, check_traps=traps)
    options = AnalysisOptions.from_settings(settings, confine=UNCONFINED)
    baseline = _kib("VmRSS")
    start = time.perf_counter()
    analysis = analyze_checkpoint(
        folder / "checkpoint-200", folder / "checkpoint-0", options, prev=folder / "checkpoint-100"
    )
    elapsed = time.perf_counter() - start
    return {
        "seconds": elapsed,
        "base_read_s": analysis.base_read_s,
        "rows": len(analysis.layers),
        "peak_over_baseline_mib": (_kib("VmHWM") - baseline) / 1024,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--dim", type=int, default=2048)
    parser.add_argument("--traps", action="store_true", help="also the trap check (default off)")
    parser.add_argument("--child", nargs=2, metavar=("FOLDER", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(_child(Path(args.child[0]), args.child[1], args.traps)))
        return 0
    folder = Path(tempfile.mkdtemp(prefix="bench-deltas-"))
    try:
        _write(folder, args.tensors, args.dim)
        matrix_mib = args.dim * args.dim * 4 / 2**20
        print(
            f"{args.tensors} bf16 matrices of {args.dim}x{args.dim} per checkpoint "
            f"({args.tensors * args.dim * args.dim * 2 / 2**20:.0f} MiB on disk; a float32 "
            f"matrix is {matrix_mib:.0f} MiB); traps {'on' if args.traps else 'off'}"
        )
        print(f"{'mode':<11} {'rows':>5} {'seconds':>8} {'base read s':>11} {'peak MiB':>9}")
        first = None
        for mode in MODES:
            command = [sys.executable, __file__, "--child", str(folder), mode]
            if args.traps:
                command.append("--traps")
            out = subprocess.run(command, check=True, capture_output=True, text=True).stdout
            result = json.loads(out.strip().splitlines()[-1])
            first = first or result["seconds"]
            print(
                f"{mode:<11} {result['rows']:>5} {result['seconds']:>8.2f} "
                f"{result['base_read_s']:>11.2f} {result['peak_over_baseline_mib']:>9.0f}"
                f"   x{result['seconds'] / first:.2f} time, "
                f"{result['peak_over_baseline_mib'] / matrix_mib:.1f} matrices peak"
            )
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
