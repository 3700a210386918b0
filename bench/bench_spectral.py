"""Spectral engine vs weightwatcher 0.7.7 on the same matrices, in the same run.

    python bench/bench_spectral.py [--width 1024] [--ffn 2752] [--device cpu|cuda] [--no-traps]

Builds one Llama-shaped decoder layer (q, k, v, o: width x width; gate, up: ffn x width;
down: width x ffn) with heavy-tailed seeded weights, analyses it with weightwatcher's
``analyze()`` and with ``workers.spectral.analyze_matrix`` (default method ``ww``), and prints
a markdown row: seconds for each, the ratio, and the largest alpha difference. A 7B layer is
``--width 4096 --ffn 11008``.
"""

from __future__ import annotations

import argparse
import logging
import os
import platform
import sys
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np
import torch
from torch import nn

from alphawatch.workers.spectral import analyze_matrix


def layer_weights(width: int, ffn: int, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "q": (width, width),
        "k": (width, width),
        "v": (width, width),
        "o": (width, width),
        "gate": (ffn, width),
        "up": (ffn, width),
        "down": (width, ffn),
    }
    out = {}
    for name, (rows, cols) in shapes.items():
        gauss = torch.randn(rows, cols, generator=g) / np.sqrt(cols)
        heavy = torch.distributions.StudentT(torch.tensor(3.0)).sample((rows, cols))
        out[name] = gauss + 0.3 * heavy / np.sqrt(cols)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=int, default=1024)
    parser.add_argument("--ffn", type=int, default=2752)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--no-traps",
        action="store_true",
        help="skip the shuffled-matrix spectrum (weightwatcher skips it too)",
    )
    args = parser.parse_args()
    torch.manual_seed(0)
    weights = layer_weights(args.width, args.ffn)

    import weightwatcher as ww

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    model = nn.Sequential(
        *[nn.Linear(w.shape[1], w.shape[0], bias=False) for w in weights.values()]
    )
    for module, w in zip(model, weights.values(), strict=True):
        module.weight.data = w.clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        t0 = time.perf_counter()
        frame = ww.WeightWatcher(model=model).analyze()
        ww_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    ours = [
        analyze_matrix(w, device=args.device, check_traps=not args.no_traps)
        for w in weights.values()
    ]
    ours_s = time.perf_counter() - t0
    diff = max(
        abs(r.alpha - float(a)) / float(a)
        for r, a in zip(ours, frame.alpha, strict=True)
        if r.alpha is not None
    )
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, torch {torch.__version__}, "
        f"weightwatcher {ww.__version__}, python {platform.python_version()}"
    )
    print("| layer | weightwatcher s | alphawatch s | ratio | max rel. Δα | traps |")
    print("|---|---|---|---|---|---|")
    print(
        f"| {args.width}-wide (ffn {args.ffn}), 7 matrices, {args.device} | {ww_s:.2f} | "
        f"{ours_s:.2f} | {ww_s / ours_s:.2f}x | {diff:.1e} | "
        f"{'off' if args.no_traps else 'on'} |"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
