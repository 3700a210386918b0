"""The distribution tests equal powerlaw 2.0.0's own, within 1e-6, on the same tail and xmin."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from alphawatch.trust import Thresholds
from alphawatch.vocabulary import FitStatus
from alphawatch.workers.spectral import analyze_matrix, fit_power_law
from alphawatch.workers.spectral.compare import RANGES, apply_rule, compare_fit, compare_tail

DATA = Path(__file__).resolve().parent.parent / "data" / "fingers"
TOL = 1e-6


def _samples(kind: str) -> np.ndarray:
    rng = np.random.default_rng(sum(map(ord, kind)))
    if kind == "pareto_2.5":
        return (1 - rng.random(600)) ** (-1 / 1.5)
    if kind == "pareto_4.5":  # α > 3: powerlaw fits it numerically, not in closed form
        return (1 - rng.random(400)) ** (-1 / 3.5)
    if kind == "lognormal":
        return rng.lognormal(0.0, 1.0, 800)
    x = (1 - rng.random(3000)) ** (-1 / 1.2)  # a power law cut off by an exponential
    return x[rng.random(3000) < np.exp(-0.05 * x)]


def _spectrum(name: str) -> np.ndarray:
    weight = load_file(str(DATA / "llama_layer.safetensors"))[name].double()
    return np.asarray(torch.linalg.svdvals(weight).numpy() ** 2)


def _powerlaw(data: np.ndarray, xmin: float) -> dict[str, Any]:
    powerlaw = pytest.importorskip("powerlaw")

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit = powerlaw.Fit(data, xmin=xmin, parameter_ranges=RANGES, verbose=0)
        tpl = fit.distribution_compare("power_law", "truncated_power_law", normalized_ratio=True)
        ln = fit.distribution_compare("power_law", "lognormal", normalized_ratio=True)
        return {
            "pl_vs_tpl_R": tpl[0],
            "pl_vs_tpl_p": tpl[1],
            "pl_vs_lognormal_R": ln[0],
            "pl_vs_lognormal_p": ln[1],
            "tpl_alpha": fit.truncated_power_law.alpha,
            "tpl_lambda": fit.truncated_power_law.Lambda,
        }


CASES = [
    "pareto_2.5",
    "pareto_4.5",
    "lognormal",
    "truncated",
    "model.layers.0.mlp.down_proj.weight",
    "model.layers.0.self_attn.q_proj.weight",
]


@pytest.mark.parametrize("case", CASES)
def test_matches_powerlaw(case: str) -> None:
    data = _spectrum(case) if case.startswith("model.") else _samples(case)
    fit = fit_power_law(data, "xmin_peak" if case.startswith("model.") else "ww")
    assert fit is not None
    ours = compare_tail(data, fit.xmin)
    assert ours is not None
    expected = _powerlaw(data, fit.xmin)
    for key, value in expected.items():
        assert getattr(ours, key) == pytest.approx(float(value), rel=TOL, abs=1e-12), key


def test_sign_convention_and_verdicts() -> None:
    pareto = compare_tail(_samples("pareto_2.5"), 1.0)
    truncated = compare_tail(_samples("truncated"), 1.0)
    assert pareto is not None and truncated is not None
    # A clean power law: no alternative is significantly better.
    assert not pareto.not_power_law(0.05)
    # A power law with an exponential cut-off: the truncated law wins, significantly.
    assert truncated.pl_vs_tpl_R < 0 and truncated.pl_vs_tpl_p < 1e-6
    assert truncated.not_power_law(0.05)
    assert truncated.tpl_lambda == pytest.approx(0.05, rel=0.3)


def test_rule_is_off_by_default_and_only_demotes_ok() -> None:
    truncated = compare_tail(_samples("truncated"), 1.0)
    off, on = Thresholds(), Thresholds(not_power_law_p=0.05)
    assert apply_rule(FitStatus.OK, truncated, off) is FitStatus.OK
    assert apply_rule(FitStatus.OK, truncated, on) is FitStatus.NOT_POWER_LAW
    assert apply_rule(FitStatus.POOR_FIT, truncated, on) is FitStatus.POOR_FIT
    assert apply_rule(FitStatus.OK, None, on) is FitStatus.OK


def test_comparison_uses_the_clipped_tail() -> None:
    data = _spectrum("model.layers.0.self_attn.q_proj.weight")
    fit = fit_power_law(data, "clip_xmax")
    assert fit is not None and fit.num_fingers > 0
    ours = compare_fit(fit, data)
    assert ours is not None
    assert ours.n == int(np.count_nonzero((data >= fit.xmin) & (data <= fit.xmax))) < fit.n


def test_layer_results_carry_the_tests_and_the_rule_demotes() -> None:
    rng = np.random.default_rng(0)
    weight = torch.from_numpy(rng.standard_t(3.0, size=(300, 150)) / np.sqrt(150))
    loose = {"max_alpha_delta": 100.0, "max_ks_distance": 1.0}  # so the fit itself is ok
    plain = analyze_matrix(weight, check_traps=False, thresholds=Thresholds(**loose)).metrics()
    for key in (
        "tpl_alpha",
        "tpl_lambda",
        "pl_vs_tpl_R",
        "pl_vs_tpl_p",
        "pl_vs_lognormal_R",
        "pl_vs_lognormal_p",
    ):
        assert isinstance(plain[key], float), key
    assert plain["num_fingers"] == 0
    assert plain["fit_status"] == "ok" and plain["trusted"]
    strict = analyze_matrix(
        weight, check_traps=False, thresholds=Thresholds(not_power_law_p=1.0, **loose)
    ).metrics()
    assert plain["pl_vs_tpl_R"] < 0  # the nested truncated law never fits worse
    assert strict["fit_status"] == "not_power_law" and not strict["trusted"]
    assert strict["alpha"] == plain["alpha"]


def test_tpl_method_matches_powerlaw_truncated_fit() -> None:
    data = _samples("truncated")
    plain = fit_power_law(data, "ww")
    tpl = fit_power_law(data, "tpl")
    assert plain is not None and tpl is not None
    assert tpl.method == "tpl" and tpl.xmin == plain.xmin and tpl.D == plain.D
    expected = _powerlaw(data, plain.xmin)
    assert tpl.alpha == pytest.approx(expected["tpl_alpha"], rel=TOL)
    assert tpl.tpl_lambda == pytest.approx(expected["tpl_lambda"], rel=TOL)
    result = analyze_matrix(
        torch.from_numpy(_samples("pareto_2.5").reshape(30, 20)), method="tpl", check_traps=False
    ).metrics()
    assert result["method"] == "tpl" and result["alpha"] == pytest.approx(result["tpl_alpha"])


def test_a_tail_without_a_test_gives_none() -> None:
    assert compare_tail(np.array([1.0]), 1.0) is None
    assert compare_tail(np.array([0.5, 0.7]), 1.0) is None  # nothing at or above xmin
    assert compare_fit(None, np.arange(1.0, 10.0)) is None


def test_upper_gamma_equals_mpmath() -> None:
    import mpmath

    from alphawatch.workers.spectral.compare import upper_gamma

    rng = np.random.default_rng(0)
    for _ in range(2000):
        a, x = 1 - rng.uniform(0.01, 49.9), 10 ** rng.uniform(-7, 3)
        expected = float(mpmath.gammainc(a, x))
        if expected != 0:
            assert upper_gamma(a, x) == pytest.approx(expected, rel=1e-11), (a, x)
    for a in (-3.0, -2.0, 0.0, 0.5, 1.0):  # integer orders: the recurrence's special points
        assert upper_gamma(a, 0.3) == pytest.approx(float(mpmath.gammainc(a, 0.3)), rel=1e-12)


def _law_costs() -> list[tuple[str, object, list[float], tuple[Any, ...]]]:
    from alphawatch.workers.spectral import compare

    out = []
    for case in ("pareto_2.5", "pareto_4.5", "lognormal", "truncated"):
        data = np.sort(_samples(case))
        for law in (compare._PowerLaw, compare._TruncatedPowerLaw, compare._Lognormal):
            model = law(data, float(data[0]))

            def cost(params: list[float], model: Any = model) -> float:
                with np.errstate(all="ignore"):
                    return float(-np.sum(model.loglikelihoods([float(p) for p in params])))

            out.append((f"{case}/{law.__name__}", cost, model.params, model.bounds))
    return out


def test_nelder_mead_is_scipys_step_for_step() -> None:
    import scipy.optimize

    from alphawatch.workers.spectral.compare import nelder_mead

    def flat(p: list[float]) -> float:  # ties everywhere: the order of equal values decides
        return float(np.floor(4 * abs(p[0] - 0.3)) + np.floor(4 * abs(p[1] + 2.0)))

    def rosen(p: list[float]) -> float:  # runs out of its 400 calls
        return float(100 * (p[1] - p[0] ** 2) ** 2 + (1 - p[0]) ** 2)

    cases = [
        *_law_costs(),
        ("flat", flat, [1.0, 0.0], ((None, None), (-1.0, 3.0))),
        ("rosen", rosen, [-40.0, 49.99], ((-50.0, 50.0), (0.0, 50.0))),
        ("at the bound", lambda p: (p[0] - 60.0) ** 2, [49.9], ((0.0, 50.0),)),
    ]
    for name, cost, x0, bounds in cases:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            expected = scipy.optimize.minimize(
                cost, x0=x0, bounds=list(bounds), method="Nelder-Mead", tol=1e-4
            ).x
        assert nelder_mead(cost, x0, bounds) == [float(v) for v in expected], name


def test_small_sorts_keep_numpys_order_of_ties() -> None:
    import itertools

    from alphawatch.workers.spectral.compare import _argsort

    values = [0.0, -0.0, 1.0, 2.0, np.nan, np.inf, -np.inf]
    for n in (2, 3):
        for pattern in itertools.product(values, repeat=n):
            assert _argsort(list(pattern)) == np.argsort(np.array(pattern)).tolist(), pattern


def test_lognormal_normaliser_is_mpmaths_to_a_few_ulps() -> None:
    import mpmath

    from alphawatch.workers.spectral.compare import _lognormal_norm

    rng = np.random.default_rng(1)
    for z in np.concatenate([rng.uniform(-6, 27.5, 3000), np.linspace(26.0, 27.4, 200)]):
        sigma = float(10 ** rng.uniform(-2, 2))
        expected = np.float64(sigma * np.sqrt(np.pi / 2) * mpmath.erfc(z))
        ours = _lognormal_norm(sigma, float(z))
        if expected < 0.99e-300:  # denormal or near: mpmath itself, to the last bit
            assert ours == expected, z
        else:  # libm's erfc: measured within 3 ulps of the correctly rounded value
            assert abs(ours - expected) <= 4 * np.spacing(expected), z


def test_importing_the_tests_loads_no_optimiser() -> None:
    import subprocess
    import sys

    code = (
        "import sys, alphawatch.workers.spectral.compare; "
        "print(sorted(m for m in ('scipy.optimize', 'scipy.special', 'mpmath') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"


def test_upper_gamma_near_integer_orders_equals_mpmath() -> None:
    import mpmath

    from alphawatch.workers.spectral.compare import upper_gamma

    # a + k just above 0: the series' 1/b terms, where libm's lgamma loses its digits
    for a in (1e-12, 1e-6, 0.19999, 0.2, 0.9999999, -1 + 1e-10, -2 + 1e-7, -7 + 1e-4):
        for x in (1e-8, 0.01, 0.3, 0.5615, 0.999):
            assert upper_gamma(a, x) == pytest.approx(float(mpmath.gammainc(a, x)), rel=1e-11), (
                a,
                x,
            )
