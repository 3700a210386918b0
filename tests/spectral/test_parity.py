"""Our default fit is weightwatcher 0.7.7's fit: same alpha, D, xmin and tail size.

Matrices are seeded and varied: square and rectangular both ways, min dimension 20..512,
Gaussian, Student-t, low rank + noise, planted spikes, and Conv2d kernels. weightwatcher takes
a different path for fewer than 20 eigenvalues above its floor (a small-N fit), which we do not
copy; those shapes are left out here and documented in docs/SPECTRAL.md.
"""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from alphawatch.workers.spectral import analyze_matrix

SHAPES = [
    (20, 20),
    (64, 20),
    (20, 64),
    (128, 128),
    (200, 96),
    (96, 200),
    (300, 128),
    (128, 300),
    (512, 256),
    (256, 512),
    (512, 512),
]
KINDS = ["gaussian", "student_t", "low_rank", "spikes", "mixed"]
RTOL = 1e-6


def make_matrix(kind: str, rows: int, cols: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    gauss = torch.randn(rows, cols, generator=g) / np.sqrt(cols)
    if kind == "gaussian":
        return gauss
    if kind == "student_t":
        t = torch.distributions.StudentT(torch.tensor(2.5))
        torch.manual_seed(seed)
        return t.sample((rows, cols)) / np.sqrt(cols)
    if kind == "low_rank":
        r = max(2, min(rows, cols) // 8)
        a = torch.randn(rows, r, generator=g)
        b = torch.randn(r, cols, generator=g)
        return (a @ b) / np.sqrt(cols * r) + 0.05 * gauss
    if kind == "spikes":
        u = torch.randn(rows, 3, generator=g)
        v = torch.randn(3, cols, generator=g)
        return gauss + (u * torch.tensor([8.0, 5.0, 3.0])) @ v / np.sqrt(rows * cols)
    torch.manual_seed(seed)
    heavy = torch.distributions.StudentT(torch.tensor(3.0)).sample((rows, cols))
    return gauss + 0.5 * heavy / np.sqrt(cols)


def ww_row(module: nn.Module) -> dict[str, float]:
    ww = pytest.importorskip("weightwatcher")

    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        frame = ww.WeightWatcher(model=module).analyze()
    row = frame.iloc[0]
    return {k: float(row[k]) for k in ("alpha", "D", "xmin", "num_pl_spikes")}


# A 20x20 rank-2 matrix puts eigenvalues at weightwatcher's 1e-5 floor, where its float32 SVD
# and our float64 one keep different counts and it switches to its small-N fit: ill-conditioned.
CASES = [
    (kind, shape, seed)
    for seed, (kind, shape) in enumerate((k, s) for k in KINDS for s in SHAPES)
    if (kind, shape) != ("low_rank", (20, 20))
]


@pytest.mark.parametrize(
    ("kind", "shape", "seed"), CASES, ids=[f"{k}-{s[0]}x{s[1]}" for k, s, _ in CASES]
)
def test_dense_matches_weightwatcher(kind: str, shape: tuple[int, int], seed: int) -> None:
    weight = make_matrix(kind, *shape, seed)
    layer = nn.Linear(shape[1], shape[0], bias=False)
    layer.weight.data = weight.clone()
    expected = ww_row(nn.Sequential(layer))
    ours = analyze_matrix(weight, check_traps=False)
    assert ours.alpha == pytest.approx(expected["alpha"], rel=RTOL)
    assert pytest.approx(expected["D"], rel=RTOL, abs=1e-12) == ours.D
    assert ours.xmin == pytest.approx(expected["xmin"], rel=RTOL)
    assert ours.num_pl_spikes == int(expected["num_pl_spikes"])


@pytest.mark.parametrize("seed", [0, 1])
def test_conv2d_pooled_matches_weightwatcher(seed: int) -> None:
    torch.manual_seed(seed)
    conv = nn.Conv2d(48, 64, kernel_size=3, bias=False)
    expected = ww_row(nn.Sequential(conv))
    ours = analyze_matrix(conv.weight.data, check_traps=False)
    assert ours.num_evals == 48 * 9
    assert ours.alpha == pytest.approx(expected["alpha"], rel=RTOL)
    assert pytest.approx(expected["D"], rel=RTOL) == ours.D
    assert ours.num_pl_spikes == int(expected["num_pl_spikes"])


def test_at_least_fifty_parity_cases() -> None:
    assert len(CASES) + 2 >= 50
