"""bench/bench_scale.py's pure parts: the cost-model fit, the permutation cache it mirrors, the
bf16 rounding and the sharded checkpoint it writes (read back by the worker's reader)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from alphawatch.workers.checkpoints import iter_layers
from alphawatch.workers.spectral import traps

_BENCH = Path(__file__).resolve().parents[1] / "bench"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, _BENCH / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


model = _load("scale_model")
bench = _load("bench_scale")

SHAPES = [
    (2048, 256),
    (2048, 2048),
    (5632, 2048),
    (32000, 2048),
    (4096, 1024),
    (4096, 4096),
    (11008, 4096),
    (32000, 4096),
    (128256, 4096),
    (8192, 8192),
]


def test_fit_recovers_known_constants_from_noisy_times() -> None:
    truth = np.array([2.2e-11, 9.0e-11, 4.0e-8, 0.03])
    rng = np.random.default_rng(0)
    times = [model.predict_cpu(truth, s) * (1 + 0.01 * rng.standard_normal()) for s in SHAPES]
    got = model.fit_costs(SHAPES, times)
    # the two cubic terms carry the large shapes: within a few % at 1 % noise
    assert got[0] == pytest.approx(truth[0], rel=0.05)
    assert got[1] == pytest.approx(truth[1], rel=0.1)
    for shape, seconds in zip(SHAPES, times, strict=True):
        assert model.predict_cpu(got, shape) == pytest.approx(seconds, rel=0.05)


def test_fit_is_orientation_free_and_non_negative() -> None:
    truth = np.array([1e-11, 5e-11, 0.0, 0.01])
    times = [model.predict_cpu(truth, s) for s in SHAPES]
    transposed = [(n, m) for m, n in SHAPES]
    got = model.fit_costs(transposed, times)
    assert (got >= 0).all()
    assert got[0] == pytest.approx(truth[0], rel=1e-3)


def test_permutation_hits_follow_the_engines_cache() -> None:
    # 4096² (64 MiB of int32) and 11008×4096 (172 MiB) fit the 256 MiB cache together: after a
    # block's first matrices every q/k/v/o/gate/up/down of a 7B model finds its permutation
    block = model.MODELS["llama-2-7b"].matrices(2)[1:-1]
    hits = model.permutation_hits(block)
    assert hits == [False, True, True, True, False, True, True] + [True] * 7
    # a 70B MLP matrix (940 MiB) is larger than the cache: drawn every time
    mlp = (28672, 8192)
    assert model.permutation_hits([mlp, mlp]) == [False, False]
    assert model.PERMS_MAX_BYTES == traps._PERMS_MAX_BYTES


def test_bf16_rounding_matches_round_to_nearest_even() -> None:
    values = np.array([1.0, -2.5, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.14159], dtype=np.float32)
    bits = bench.bf16_bits(values.copy())
    back = (bits.astype(np.uint32) << 16).view(np.float32)
    assert bits[0] == 0x3F80
    assert back[1] == -2.5
    assert back[2] == 1.0  # a tie rounds to the even mantissa
    assert back[3] == 1.0 + 4 * 2**-8
    assert abs(back[4] - 3.14159) < 2**-7 * 4


def test_written_checkpoint_is_read_back_by_the_worker(tmp_path: Path) -> None:
    tiny = model.ModelShape("tiny", 64, 160, 4, 2, 300, 3)
    folder = tmp_path / "run" / "checkpoint-1"
    size = bench.write_checkpoint(folder, tiny, blocks=2, seed=0, shard_bytes=60_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and sorted(set(index["weight_map"].values())) == shards
    assert index["metadata"]["total_size"] == sum(2 * int(np.prod(s)) for _, s in tiny.tensors(2))
    assert size == sum(p.stat().st_size for p in folder.iterdir())
    layers = list(iter_layers(folder))
    assert sorted(tuple(m.weight.shape) for m in layers) == sorted(tiny.matrices(2))
    # shards follow the state dict: the embedding first, lm_head in the last shard
    assert layers[0].name.startswith("model.embed_tokens")
    assert next(m for m in layers if m.name == "lm_head").source.endswith(shards[-1])
    embed = next(m.weight for m in layers if m.name.startswith("model.embed_tokens"))
    # N(0, 1/in) entries, rounded to bf16
    assert float(np.std(embed)) == pytest.approx(1 / np.sqrt(64), rel=0.05)
    again = tmp_path / "again" / "checkpoint-1"
    bench.write_checkpoint(again, tiny, blocks=2, seed=0, shard_bytes=10**9)
    one_file = list(iter_layers(again))
    # sorted by name within a file, as safetensors writes: lm_head before the embedding
    assert [m.name for m in one_file[:2]] == ["lm_head", "model.embed_tokens"]
    first = {m.name: m.weight for m in one_file}
    assert all(np.array_equal(first[m.name], m.weight) for m in layers)
