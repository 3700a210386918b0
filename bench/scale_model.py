"""Model shapes and the cost model of bench/bench_scale.py: pure functions, no I/O.

The model, per matrix (n ≤ m; one core, every check on; fitted to measured shapes):

    cpu(m, n) = c1·m·n² + c2·n³ + c3·m·n + c0

c1: the Gram products (W's float64 ``syrk``, the shuffle's float32 one); c2: the two
eigendecompositions (float64 and float32); c3: the passes over every entry (the shuffle's
permutation draw and gather, moments, the float32 decode); c0: the fits, the bootstrap and the
distribution tests. A checkpoint is the sum over its matrices, less the permutation draws that
the engine's cache saves (``permutation_hits``), spread over the analysis workers
(``cpu_wall``) or run on one GPU from spec-sheet rates (``gpu_wall``).
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np


# -- model shapes -----------------------------------------------------------------------------
@dataclass(frozen=True)
class ModelShape:
    """A Llama-family decoder: the shapes of its weight matrices, per block and in all."""

    name: str
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    vocab: int
    blocks: int  # decoder blocks of the real model

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def block_matrices(self) -> list[tuple[str, tuple[int, int]]]:
        """The seven matrices of one decoder block, (out, in) as PyTorch stores them."""
        h, kv = self.hidden, self.kv_heads * self.head_dim
        return [
            ("self_attn.q_proj", (h, h)),
            ("self_attn.k_proj", (kv, h)),
            ("self_attn.v_proj", (kv, h)),
            ("self_attn.o_proj", (h, h)),
            ("mlp.gate_proj", (self.ffn, h)),
            ("mlp.up_proj", (self.ffn, h)),
            ("mlp.down_proj", (h, self.ffn)),
        ]

    def tensors(self, blocks: int | None = None) -> list[tuple[str, tuple[int, ...]]]:
        """Every tensor of a checkpoint with ``blocks`` decoder blocks, in state-dict order."""
        out: list[tuple[str, tuple[int, ...]]] = [
            ("model.embed_tokens.weight", (self.vocab, self.hidden))
        ]
        for b in range(self.blocks if blocks is None else blocks):
            out += [(f"model.layers.{b}.{n}.weight", s) for n, s in self.block_matrices()]
            out += [
                (f"model.layers.{b}.input_layernorm.weight", (self.hidden,)),
                (f"model.layers.{b}.post_attention_layernorm.weight", (self.hidden,)),
            ]
        out += [
            ("model.norm.weight", (self.hidden,)),
            ("lm_head.weight", (self.vocab, self.hidden)),
        ]
        return out

    def matrices(self, blocks: int | None = None) -> list[tuple[int, int]]:
        """The analysed matrices' shapes, in reading order."""
        return [s for _, s in self.tensors(blocks) if len(s) == 2]  # type: ignore[misc]

    def config(self) -> dict[str, object]:
        return {
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_hidden_layers": self.blocks,
            "vocab_size": self.vocab,
            "tie_word_embeddings": False,
            "torch_dtype": "bfloat16",
            "hidden_act": "silu",
            "rms_norm_eps": 1e-5,
        }


MODELS = {
    m.name: m
    for m in (
        ModelShape("tinyllama-1.1b", 2048, 5632, 32, 4, 32000, 22),
        ModelShape("llama-2-7b", 4096, 11008, 32, 32, 32000, 32),
        ModelShape("llama-3-8b", 4096, 14336, 32, 8, 128256, 32),
        ModelShape("llama-3-70b", 8192, 28672, 64, 8, 128256, 80),
    )
}
WHOLE = {"tinyllama-1.1b"}  # written whole; the others as one decoder block + vocabulary


def oriented(shape: tuple[int, int]) -> tuple[int, int]:
    """(m, n) with n ≤ m: the Gram matrix is n × n whatever the stored orientation."""
    return max(shape), min(shape)


# -- the cost model ---------------------------------------------------------------------------
def features(m: int, n: int) -> np.ndarray:
    """The cost model's terms for an m × n matrix (n ≤ m): m·n², n³, m·n, 1."""
    return np.array([m * n * n, n**3, m * n, 1.0], dtype=np.float64)


def fit_costs(shapes: Sequence[tuple[int, int]], seconds: Sequence[float]) -> np.ndarray:
    """Non-negative c1..c4 of ``cpu(m, n) = c1·m·n² + c2·n³ + c3·m·n + c4``, least squares on
    the relative error (each row divided by its measured time, so small shapes count as much as
    large ones)."""
    from scipy.optimize import nnls

    a = np.array([features(*oriented(s)) for s in shapes])
    t = np.asarray(seconds, dtype=np.float64)
    scale = a.max(axis=0)  # columns of order 1e12 and 1 side by side: nnls wants them alike
    coef, _ = nnls(a / scale / t[:, None], np.ones_like(t))
    out: np.ndarray = coef / scale
    return out


def predict_cpu(costs: np.ndarray, shape: tuple[int, int]) -> float:
    """CPU seconds the model gives one matrix (one core, every check on, permutation drawn)."""
    return float(features(*oriented(shape)) @ costs)


PERMS_MAX_BYTES = 256 * 2**20  # workers/spectral/traps.py's cache of shuffle permutations


def permutation_hits(shapes: Iterable[tuple[int, int]]) -> list[bool]:
    """Which matrices find their shuffle permutation in the engine's cache (same entry count,
    kept while the recent ones fit in ``PERMS_MAX_BYTES``, as workers/spectral/traps.py does):
    those skip the draw that the per-shape measurements paid."""
    cache: OrderedDict[int, int] = OrderedDict()
    hits = []
    for shape in shapes:
        numel = shape[0] * shape[1]
        if numel in cache:
            cache.move_to_end(numel)
            hits.append(True)
            continue
        hits.append(False)
        cache[numel] = numel * (4 if numel < 2**31 else 8)
        while cache and sum(cache.values()) > PERMS_MAX_BYTES:
            cache.popitem(last=False)
    return hits


def checkpoint_cpu(
    costs: np.ndarray, perm_s_per_entry: float, shapes: list[tuple[int, int]]
) -> float:
    """CPU seconds of a checkpoint's matrices, less the permutation draws the cache saves."""
    return sum(
        predict_cpu(costs, s) - (perm_s_per_entry * s[0] * s[1] if hit else 0.0)
        for s, hit in zip(shapes, permutation_hits(shapes), strict=True)
    )


@dataclass(frozen=True)
class Machine:
    """What the wall-clock prediction assumes of a CPU machine."""

    cores: int
    workers: int  # matrices at once (the engine's default: one per core, at most 4)
    efficiency: float  # measured on this machine: CPU s / (wall s · workers) of the whole run
    gram_threads_efficiency: float = 0.85  # syrk over T BLAS threads (assumed)


def cpu_wall(
    costs: np.ndarray,
    perm_s_per_entry: float,
    shapes: list[tuple[int, int]],
    machine: Machine,
    read_s: float,
) -> float:
    """Predicted wall seconds of a checkpoint on a CPU machine.

    Each of ``workers`` threads runs one task at a time with ``cores // workers`` BLAS threads:
    the Gram term divides by the threads (times an assumed efficiency), the eigenvalue term by
    their square root (half of the tridiagonal reduction is memory-bound BLAS-2), the per-entry
    and per-matrix terms not at all. The tasks spread over the workers at the efficiency
    measured here, and reading overlaps the analysis; the wall is the larger of the two, and
    never less than the largest matrix's own-spectrum half.
    """
    threads = max(1, machine.cores // machine.workers)
    gram_speedup = 1.0 if threads == 1 else threads * machine.gram_threads_efficiency
    total = largest = 0.0
    for s, hit in zip(shapes, permutation_hits(shapes), strict=True):
        m, n = oriented(s)
        c1, c2, c3, c0 = costs
        t = c1 * m * n * n / gram_speedup + c2 * n**3 / math.sqrt(threads) + c3 * m * n + c0
        if hit:
            t -= perm_s_per_entry * m * n
        total += t
        largest = max(largest, t / 2)
    return max(total / (machine.workers * machine.efficiency), largest, read_s)


@dataclass(frozen=True)
class Accelerator:
    """Spec-sheet figures of one GPU (dense, no sparsity)."""

    name: str
    fp64_tensor_flops: float  # the Gram products (cuBLAS DGEMM on tensor cores)
    fp64_vector_flops: float  # the BLAS-3 half of the eigenvalue reduction
    fp32_flops: float  # the shuffle's Gram (TF32 off)
    memory_bytes_per_s: float  # the BLAS-2 half of the reduction is bound by this
    efficiency: float = 0.7  # of peak on large GEMMs (assumed)


H100 = Accelerator("H100 SXM", 60e12, 34e12, 67e12, 3.35e12)


def gpu_wall(
    costs: np.ndarray,
    perm_s_per_entry: float,
    shapes: list[tuple[int, int]],
    gpu: Accelerator,
    read_bytes_per_s: float,
) -> tuple[float, float]:
    """Predicted wall seconds of a checkpoint on one GPU, and the part spent on the host.

    The accelerator path analyses one matrix at a time: read and decode (host), the shuffle's
    permutation drawn by numpy on the host (the cache as on a CPU), W's float64 Gram as a full
    GEMM (2·m·n² flops; torch has no syrk), the shuffle's float32 Gram, and two ``eigvalsh``
    whose tridiagonal reduction does ~(4/3)·n³ flops, half of them BLAS-2 at memory speed (8
    bytes per 2 flops in float64, 4 in float32); the fits stay on the host (``c0``). A lower
    bound: cuSOLVER's ``syevd`` seldom reaches these rates.
    """
    c0 = float(costs[3])
    gpu_s = host_s = 0.0
    for s, hit in zip(shapes, permutation_hits(shapes), strict=True):
        m, n = oriented(s)
        gemm = 2.0 * m * n * n
        gpu_s += gemm / (gpu.fp64_tensor_flops * gpu.efficiency)
        gpu_s += gemm / (gpu.fp32_flops * gpu.efficiency)
        half = (2.0 / 3.0) * n**3
        gpu_s += half * 4 / gpu.memory_bytes_per_s + half / gpu.fp64_vector_flops  # float64
        gpu_s += half * 2 / gpu.memory_bytes_per_s + half / gpu.fp32_flops  # float32
        host_s += c0 + (0.0 if hit else perm_s_per_entry * m * n)
        host_s += 2.0 * m * n / read_bytes_per_s  # bf16 bytes read and decoded
    return gpu_s + host_s, host_s
