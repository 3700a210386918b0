"""Update spectra of a run in a bucket: the base checkpoint's GETs and read time per analysis.

    python bench/bench_base_copies.py [--tensors 8] [--dim 1024] [--checkpoints 4]
                                      [--format safetensors|pickle] [--deltas init|prev]

Starts a real S3 API on 127.0.0.1 (moto's server mode, every request counted by key), uploads
``--checkpoints`` bf16 Hugging Face-style checkpoints (``--tensors`` matrices of dim x dim, in
``model.safetensors`` or, with ``--format pickle``, a torch pickle ``pytorch_model.bin``) and
analyses them in step order with ``--deltas`` "init" (the base: the first checkpoint) or
"prev" (the base: the checkpoint before), as the worker's analysis process does
(``analyze_checkpoint``, traps off), twice: with the base read at every analysis
(``ALPHAWATCH_BASE_CACHE_MB=0``: safetensors by ranged GETs, pickles spooled whole), and with
local copies (the default). Reports, per analysis, the GETs of the base's objects, the MB they
carried, the seconds spent reading the base (``Analysis.base_read_s``), the MB of GETs of the
checkpoint in hand (``own_mb``) and the analysis's wall time. With "init" the first
checkpoint's own analysis makes the copy; with "prev" each analysis copies the checkpoint in
hand, which the next one reads as its base.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


WEIGHTS = {"safetensors": "model.safetensors", "pickle": "pytorch_model.bin"}
UNCOPIED = {"safetensors": "ranged", "pickle": "spooled"}  # how a base without a copy is read


def _write(folder: Path, tensors: int, dim: int, checkpoints: int, fmt: str) -> None:
    import torch
    from safetensors.torch import save_file

    g = torch.Generator().manual_seed(0)
    base = [torch.randn(dim, dim, generator=g) / dim**0.5 for _ in range(tensors)]
    for c in range(checkpoints):
        path = folder / f"checkpoint-{c * 100}"
        path.mkdir(parents=True)
        weights = {
            f"model.layers.{i}.mlp.up_proj.weight": (
                w + c * 0.05 * torch.randn(dim, dim, generator=g) / dim**0.5
            ).to(torch.bfloat16)
            for i, w in enumerate(base)
        }
        if fmt == "pickle":
            torch.save(weights, path / WEIGHTS[fmt])
        else:
            save_file(weights, str(path / WEIGHTS[fmt]))
        (path / "trainer_state.json").write_text(json.dumps({"global_step": c * 100}))


def _carried(server: Any, prefix: str) -> tuple[int, float]:
    """GETs of the objects under ``prefix`` since the last reset, and the MB they carried."""
    gets = [r for kind, key, r in server.log if kind == "GET" and key.startswith(prefix)]
    carried = 0
    for rng in gets:
        low, high = (int(x) for x in (rng or "bytes=0-0").removeprefix("bytes=").split("-"))
        carried += high - low + 1
    return len(gets), round(carried / 2**20, 1)


def _pass(server: Any, url: str, steps: list[int], options: Any) -> list[dict[str, float]]:
    from alphawatch.locations import object_url
    from alphawatch.workers.analyst import analyze_checkpoint

    first = object_url(f"{url}/checkpoint-{steps[0]}")
    rows = []
    for i, step in enumerate(steps):
        base = steps[0] if "init" in options.deltas else steps[max(i - 1, 0)]
        prev = object_url(f"{url}/checkpoint-{base}") if options.reads_previous else None
        server.reset()
        started = time.perf_counter()
        analysis = analyze_checkpoint(
            object_url(f"{url}/checkpoint-{step}"), first, options, prev=prev
        )
        wall = time.perf_counter() - started
        gets, carried = _carried(server, f"/bench/run/checkpoint-{base}/")
        _, own = _carried(server, f"/bench/run/checkpoint-{step}/")
        rows.append(
            {
                "step": step,
                "base_gets": gets if base != step else 0,
                "base_mb": carried if base != step else 0.0,
                "base_read_s": round(analysis.base_read_s, 3),
                "own_mb": own,
                "analysis_s": round(wall, 3),
            }
        )
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=8)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--checkpoints", type=int, default=4)
    parser.add_argument("--format", choices=sorted(WEIGHTS), default="safetensors")
    parser.add_argument("--deltas", choices=["init", "prev"], default="init")
    args = parser.parse_args()
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    from alphawatch.settings import Settings
    from alphawatch.workers.analyst import AnalysisOptions
    from alphawatch.workers.checkpoints import UNCONFINED
    from tests.objectstore import (
        CountingServer,
        client_fs,
        environment,
        make_bucket,
        upload,
        variables,
    )

    server = CountingServer()
    with variables(environment(server)), tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _write(work / "run", args.tensors, args.dim, args.checkpoints, args.format)
        make_bucket(server, "bench")
        url = "s3://bench/run"
        upload(client_fs(server), work / "run", url)
        settings = Settings(device="cpu", deltas=args.deltas, check_traps=False)
        ranged = AnalysisOptions.from_settings(settings, confine=UNCONFINED)
        copied = replace(ranged, base_copies=work / "copies")
        steps = [c * 100 for c in range(args.checkpoints)]
        result = {
            "format": args.format,
            "deltas": args.deltas,
            "base_mb": round(
                (work / "run/checkpoint-0" / WEIGHTS[args.format]).stat().st_size / 2**20, 1
            ),
            f"{UNCOPIED[args.format]} (ALPHAWATCH_BASE_CACHE_MB=0)": _pass(
                server, url, steps, ranged
            ),
            "local copies (default)": _pass(server, url, steps, copied),
        }
        server.stop()
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
