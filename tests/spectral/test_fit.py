"""The power-law fit on known inputs: a golden vector, Pareto samples, powerlaw 2.0.0."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from alphawatch.vocabulary import FitMethod
from alphawatch.workers.spectral import FIT_METHODS, fit_power_law


def golden(alpha: float = 2.5, n: int = 1000) -> np.ndarray:
    i = np.arange(1, n + 1)
    return (1 - (i - 0.5) / n) ** (-1 / (alpha - 1))


def test_golden_vector() -> None:
    fit = fit_power_law(golden())
    assert fit is not None
    assert fit.alpha == pytest.approx(2.501271, abs=1e-6)
    assert fit.xmin == pytest.approx(1.000333, abs=1e-6)
    assert pytest.approx(0.000673, abs=1e-6) == fit.D
    assert fit.n == 1000


def test_golden_vector_agrees_with_powerlaw_package() -> None:
    powerlaw = pytest.importorskip("powerlaw")

    data = golden()
    ours = fit_power_law(data)
    assert ours is not None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        # powerlaw caps alpha at 3 by default; widen the range as its docs describe.
        ref = powerlaw.Fit(
            data,
            xmin=ours.xmin,
            verbose=False,
            fit_method="likelihood",
            parameter_ranges={"alpha": [1.0, 20.0]},
        )
        alpha = ref.power_law.alpha
    assert alpha == pytest.approx(ours.alpha, rel=1e-3)


@pytest.mark.parametrize("alpha", [2.0, 2.5, 3.0, 4.0, 5.0, 6.0])
def test_recovers_alpha_of_pareto_samples(alpha: float) -> None:
    # 5000 Pareto samples: the MLE's standard error is (α−1)/√n ≈ 0.07 at α=6; we allow 4σ
    # plus the bias of choosing xmin by KS distance.
    rng = np.random.default_rng(int(alpha * 10))
    samples = (1 - rng.random(5000)) ** (-1 / (alpha - 1))
    fit = fit_power_law(samples)
    assert fit is not None
    tolerance = 4 * (alpha - 1) / np.sqrt(fit.n) + 0.05
    assert abs(fit.alpha - alpha) < tolerance, (fit.alpha, fit.n)
    assert fit.D < 0.05


def test_scaling_leaves_alpha_unchanged() -> None:
    data = golden(3.0, 500)
    a, b = fit_power_law(data), fit_power_law(data * 1000.0)
    assert a is not None and b is not None
    assert b.alpha == pytest.approx(a.alpha, rel=1e-10)
    assert pytest.approx(a.D, rel=1e-8) == b.D


def test_methods_are_named_and_differ_where_they_should() -> None:
    data = golden(3.0, 500)
    fits = {m: fit_power_law(data, m) for m in FIT_METHODS}
    assert set(fits) == {m.value for m in FitMethod}
    assert set(fits) >= {"ww", "ww_relfloor", "ks2", "xmin_peak", "clip_xmax", "tpl"}
    assert all(f is not None and f.method == m for m, f in fits.items())
    assert fits["ks2"].D >= fits["ww"].D  # type: ignore[union-attr]
    with pytest.raises(ValueError, match="unknown fit method"):
        fit_power_law(data, "nope")


def test_too_little_data_gives_no_fit() -> None:
    assert fit_power_law(np.array([1.0])) is None
    assert fit_power_law(np.zeros(10)) is None


def test_bootstrap_stability_is_small_for_a_clean_tail() -> None:
    fit = fit_power_law(golden(2.5, 2000), bootstrap_samples=64)
    assert fit is not None and fit.alpha_delta < 0.1
