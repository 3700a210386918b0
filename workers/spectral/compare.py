"""Is the tail a power law? powerlaw's likelihood-ratio tests against a truncated power law and a
lognormal, on the fitted tail (same xmin), and the truncated-power-law fit of method ``tpl``.

This is what powerlaw 2.0.0 computes for ``Fit(tail, xmin=xmin, parameter_ranges=RANGES)
.distribution_compare("power_law", alternative, normalized_ratio=True)`` — the same maximum
likelihood fits (scipy's bounded Nelder–Mead from the same start, same bounds and tolerance,
step for step, on the same densities and floors), with the per-value densities computed on
whole arrays and without the per-evaluation object overhead. tests/spectral/test_compare.py
holds it to powerlaw itself. Neither scipy nor mpmath is imported for it: the optimiser, erfc,
the incomplete gamma function and the p-values are computed here in float64 (mpmath only where
float64 underflows, in the flat valleys of some fits).

The sign is powerlaw's: R > 0 favours the power law, R < 0 the alternative. R is the normalised
ratio R / √(n·var) (weightwatcher's reading); p is powerlaw's: for the nested truncated power
law 1 − χ²₁(|2R_raw|), for the lognormal erfc(|R_raw| / √(2·n·var)) (Vuong's test). A tail is
significantly better explained by the alternative when R < 0 and p < the threshold.

Parameter ranges: powerlaw caps α at 3 by default, far below the α of many weight matrices;
here α may lie in (0, 50) for both laws (``RANGES``), Λ > 0, σ > 0.
"""

from __future__ import annotations

import math
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

import numpy as np

from alphawatch.trust import Thresholds
from alphawatch.vocabulary import FitStatus
from alphawatch.workers.spectral.types import PowerLawFit

ALPHA_RANGE = (0.0, 50.0)
RANGES: dict[str, list[float]] = {"alpha": list(ALPHA_RANGE)}
"""The ``parameter_ranges`` these tests equal powerlaw's under."""
_FLOOR = 10.0**sys.float_info.min_10_exp  # powerlaw's likelihood of an impossible value
_LOG_FLOOR = float(np.log(10.0**sys.float_info.min_10_exp))
_TOL = 1e-4
_ALPHA_LO, _ALPHA_HI = ALPHA_RANGE
_NORMAL = 1e-300  # above this, libm's erfc keeps its full precision


@dataclass(frozen=True)
class Comparison:
    """The likelihood-ratio tests of one tail and the fitted alternatives."""

    n: int
    pl_alpha: float
    tpl_alpha: float
    tpl_lambda: float
    lognormal_mu: float
    lognormal_sigma: float
    pl_vs_tpl_R: float
    pl_vs_tpl_p: float
    pl_vs_lognormal_R: float
    pl_vs_lognormal_p: float

    def not_power_law(self, p_threshold: float) -> bool:
        """Whether an alternative explains the tail significantly better (R < 0, p < threshold)."""
        return any(
            r < 0 and p < p_threshold
            for r, p in (
                (self.pl_vs_tpl_R, self.pl_vs_tpl_p),
                (self.pl_vs_lognormal_R, self.pl_vs_lognormal_p),
            )
        )


def _continued_fraction(a: float, x: float) -> float:
    """Γ(a, x) for x ≥ 1 by its continued fraction (modified Lentz), any real a."""
    tiny = 1e-300
    b = x + 1.0 - a
    c, d = 1.0 / tiny, 1.0 / b
    h = d
    for i in range(1, 500):
        an = -i * (i - a)
        b += 2.0
        d = an * d + b
        d = tiny if abs(d) < tiny else d
        c = b + an / c
        c = tiny if abs(c) < tiny else c
        d = 1.0 / d
        delta = d * c
        h *= delta
        if abs(delta - 1.0) < 1e-16:
            value = math.exp(-x + a * math.log(x)) * h
            return value if value != 0 and math.isfinite(value) else _mp_gamma(a, x)
    return _mp_gamma(a, x)


def _mp_gamma(a: float, x: float) -> float:
    import mpmath  # only where float64 would cancel, overflow or underflow

    return float(mpmath.gammainc(a, x))


_EULER = 0.5772156649015329
_ZETA = (
    1.6449340668482264,
    1.2020569031595942,
    1.0823232337111381,
    1.03692775514337,
    1.0173430619844492,
    1.008349277381923,
    1.0040773561979444,
    1.0020083928260821,
    1.000994575127818,
    1.0004941886041194,
    1.000246086553308,
    1.0001227133475785,
    1.0000612481350588,
    1.000030588236307,
    1.0000152822594086,
    1.0000076371976379,
    1.000003817293265,
    1.0000019082127165,
    1.0000009539620338,
    1.0000004769329869,
    1.0000002384505027,
    1.000000119219926,
    1.000000059608189,
    1.0000000298035034,
)
"""ζ(2), ..., ζ(25)."""


def _lgamma1p(b: float) -> float:
    """ln Γ(1 + b), to full relative precision also for small b (libm's loses it near 0)."""
    if b >= 0.2:
        return math.lgamma(1.0 + b)
    # ln Γ(1 + b) = −γ·b + Σ_{k≥2} ζ(k)·(−b)^k / k; |b| < 0.2: ζ(25)·0.2^25 / 25 < 2e-19
    total, power = 0.0, -b
    for k, zeta in enumerate(_ZETA, start=2):
        power *= -b
        total += zeta * power / k
    return -_EULER * b + total


def _series(b: float, x: float) -> float:
    """Γ(b, x) for b ∈ (0, 1], 0 < x < 1: Γ(b) − γ(b, x) without the cancellation of 1/b.

    Γ(b) − x^b/b = ((Γ(1 + b) − 1) − (x^b − 1)) / b, each bracket by expm1 (exact to rounding
    for small b), less x^b·Σ_{n≥1} (−x)^n / (n!·(b + n)), which converges fast for x < 1.
    """
    head = (math.expm1(_lgamma1p(b)) - math.expm1(b * math.log(x))) / b
    term, total = 1.0, 0.0
    for n in range(1, 60):
        term *= -x / n
        part = term / (b + n)
        total += part
        if abs(part) <= 1e-17 * abs(total):
            break
    return float(head - math.pow(x, b) * total)


def upper_gamma(a: float, x: float) -> float:
    """The upper incomplete gamma function Γ(a, x), x > 0, a ≤ 1, in float64.

    What powerlaw evaluates with mpmath's ``gammainc`` (~0.3 ms a call), ~100× faster and within
    1e-11 relative of it (tests/spectral/test_compare.py): the continued fraction for x ≥ 1;
    below, a series at a + k ∈ (0, 1] and the recurrence Γ(b − 1, x) = (Γ(b, x) − x^(b−1)·e^(−x))
    / (b − 1) down to a. Where the recurrence would cancel, overflow or underflow, and for
    a > 1 below x = 1 (the laws here never ask), mpmath.
    """
    if x >= 1.0:
        return _continued_fraction(a, x)
    if a > 1:
        return _mp_gamma(a, x)
    if a > 0:
        return _series(a, x)
    k = math.floor(-a) + 1
    b = a + k
    g = _series(b, x)
    try:
        for _ in range(k):
            b -= 1.0
            term = x**b * math.exp(-x)
            diff = g - term
            if (
                b == 0
                or not math.isfinite(diff)
                or diff == 0
                or abs(diff) < 1e-3 * max(abs(g), abs(term))
            ):
                return _mp_gamma(a, x)
            g = diff / b
    except OverflowError:
        return _mp_gamma(a, x)
    return g if math.isfinite(g) and g != 0 else _mp_gamma(a, x)


class _TooManyCalls(Exception):
    pass


def _nan_last(value: float) -> tuple[bool, float]:
    return (True, 0.0) if value != value else (False, value)


def _argsort(values: list[float]) -> list[int]:
    """``np.argsort(values)``, as scipy sorts the simplex: NaN last, equal values in order.

    For the 2 or 3 vertices of these fits numpy's sort keeps equal values in their order, as
    Python's stable sort does (tests/spectral/test_compare.py checks every pattern of ties);
    numpy itself for larger simplices.
    """
    if len(values) <= 3:
        return sorted(range(len(values)), key=lambda i: _nan_last(values[i]))
    return [int(i) for i in np.argsort(np.array(values, dtype=np.float64))]


def _clip(x: list[float], lo: list[float], hi: list[float]) -> list[float]:
    # np.clip: NaN passes through
    return [
        lo_ if v < lo_ else (hi_ if v > hi_ else v) for v, lo_, hi_ in zip(x, lo, hi, strict=True)
    ]


def nelder_mead(
    cost: Callable[[list[float]], float],
    x0: list[float],
    bounds: tuple[tuple[float | None, float | None], ...],
) -> list[float]:
    """``scipy.optimize.minimize(cost, x0, bounds=bounds, method="Nelder-Mead", tol=1e-4).x``.

    scipy 1.x's bounded Nelder–Mead step for step (the same simplex, the same arithmetic on the
    same floats, the same order of equal values, the same limit of 200·N calls), on Python
    floats: for the one or two parameters of these laws its per-step array overhead, not the
    likelihood, was most of the cost. tests/spectral/test_compare.py holds it to scipy.
    """
    n = len(x0)
    lo = [-math.inf if b[0] is None else float(b[0]) for b in bounds]
    hi = [math.inf if b[1] is None else float(b[1]) for b in bounds]
    start = _clip([float(v) for v in x0], lo, hi)
    sim = [start]
    for k in range(n):
        y = list(start)
        y[k] = (1 + 0.05) * y[k] if y[k] != 0 else 0.00025
        sim.append(y)
    # a simplex beyond an upper bound is reflected into the interior, then clipped
    sim = [
        _clip([2 * h - v if v > h else v for v, h in zip(row, hi, strict=True)], lo, hi)
        for row in sim
    ]
    limit = 200 * n
    calls = 0

    def f(x: list[float]) -> float:
        nonlocal calls
        if calls >= limit:
            raise _TooManyCalls
        calls += 1
        return float(cost(list(x)))

    fsim = [math.inf] * (n + 1)
    try:
        for k in range(n + 1):
            fsim[k] = f(sim[k])
    except _TooManyCalls:
        pass
    for _ in range(2):  # scipy sorts twice here; an unstable sort may reorder equal values
        order = _argsort(fsim)
        sim, fsim = [sim[i] for i in order], [fsim[i] for i in order]
    iterations = 1
    while calls < limit and iterations < limit:
        try:
            best, worst = sim[0], sim[-1]
            if all(
                abs(v - b) <= _TOL for row in sim[1:] for v, b in zip(row, best, strict=True)
            ) and all(abs(fsim[0] - v) <= _TOL for v in fsim[1:]):
                break
            xbar = [
                sum_ / n
                for sum_ in ([sum(col) for col in zip(*sim[:-1], strict=True)] if n > 1 else sim[0])
            ]
            xr = _clip([2 * m - w for m, w in zip(xbar, worst, strict=True)], lo, hi)
            fxr = f(xr)
            if fxr < fsim[0]:
                xe = _clip([3 * m - 2 * w for m, w in zip(xbar, worst, strict=True)], lo, hi)
                fxe = f(xe)
                sim[-1], fsim[-1] = (xe, fxe) if fxe < fxr else (xr, fxr)
            elif fxr < fsim[-2]:
                sim[-1], fsim[-1] = xr, fxr
            else:
                shrink = False
                if fxr < fsim[-1]:  # outside contraction
                    xc = _clip(
                        [1.5 * m - 0.5 * w for m, w in zip(xbar, worst, strict=True)], lo, hi
                    )
                    fxc = f(xc)
                    if fxc <= fxr:
                        sim[-1], fsim[-1] = xc, fxc
                    else:
                        shrink = True
                else:  # inside contraction
                    xcc = _clip(
                        [0.5 * m + 0.5 * w for m, w in zip(xbar, worst, strict=True)], lo, hi
                    )
                    fxcc = f(xcc)
                    if fxcc < fsim[-1]:
                        sim[-1], fsim[-1] = xcc, fxcc
                    else:
                        shrink = True
                if shrink:
                    for j in range(1, n + 1):
                        sim[j] = _clip(
                            [b + 0.5 * (v - b) for v, b in zip(sim[j], sim[0], strict=True)], lo, hi
                        )
                        fsim[j] = f(sim[j])
            iterations += 1
        except _TooManyCalls:
            pass
        order = _argsort(fsim)
        sim, fsim = [sim[i] for i in order], [fsim[i] for i in order]
    return sim[0]


def _floored_log(likelihoods: np.ndarray) -> np.ndarray:
    likelihoods = np.where(likelihoods == 0, _FLOOR, likelihoods)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.asarray(np.log(likelihoods), dtype=np.float64)


class _Law:
    """A continuous law on [xmin, ∞) as powerlaw 2.0.0 fits it: its densities and its MLE.

    The per-value densities are powerlaw's expressions on whole arrays, float for float; what
    does not depend on the parameters (1/x, ln x) is computed once per tail.
    """

    bounds: ClassVar[tuple[tuple[float | None, float | None], ...]]

    def __init__(self, data: np.ndarray, xmin: float) -> None:
        self.data, self.xmin = data, xmin
        self.floor = np.full(data.size, _LOG_FLOOR)
        self.floor_cost = -float(self.floor.sum())
        self.params = self.initial()

    def initial(self) -> list[float]:
        raise NotImplementedError

    def likelihoods(self, params: list[float]) -> np.ndarray | None:
        """The densities at every value, for parameters in range (floating-point errors off);
        None: every value at the floor."""
        raise NotImplementedError

    def loglikelihoods(self, params: list[float]) -> np.ndarray:
        """powerlaw's log-likelihood of every value: a zero density, or parameters out of
        range, count as the floor 10^−307."""
        if not self.in_range(params):
            return self.floor
        with np.errstate(all="ignore"):
            densities = self.likelihoods(params)
            return self.floor if densities is None else _floored_log(densities)

    def in_range(self, params: list[float]) -> bool:
        return all(
            (lo is None or v > lo) and (hi is None or v < hi)
            for v, (lo, hi) in zip(params, self.bounds, strict=True)
        )

    def minimise(self) -> None:
        def cost(params: list[float]) -> float:
            densities = self.likelihoods(params) if self.in_range(params) else None
            if densities is None:
                return self.floor_cost
            total = np.log(densities).sum()
            if not math.isfinite(total):  # a zero density: powerlaw's floor in its place
                total = _floored_log(densities).sum()
            return -float(total)

        with warnings.catch_warnings(), np.errstate(all="ignore"):
            warnings.simplefilter("ignore")
            self.params = nelder_mead(cost, self.params, self.bounds)


class _PowerLaw(_Law):
    bounds = (ALPHA_RANGE,)

    def initial(self) -> list[float]:
        alpha = 1 + self.data.size / np.sum(np.log(self.data / self.xmin))
        return [max(float(alpha), 1.0)]

    def fit(self) -> None:
        # powerlaw uses the closed-form MLE for 1.5 < α ≤ 3 and a numerical fit otherwise.
        if not 1.5 < self.params[0] <= 3:
            self.minimise()

    def in_range(self, params: list[float]) -> bool:
        return _ALPHA_LO < params[0] < _ALPHA_HI

    def likelihoods(self, params: list[float]) -> np.ndarray:
        (alpha,) = params
        f = self.data ** (-alpha)
        if alpha <= 1:  # powerlaw then normalises on [xmin, max(data)]
            top = float(self.data[-1])
            c = (1 - alpha) / (top ** (1 - alpha) - self.xmin ** (1 - alpha))
        else:
            c = (alpha - 1) * self.xmin ** (alpha - 1)
        return np.asarray(f * c)


class _TruncatedPowerLaw(_Law):
    bounds = (ALPHA_RANGE, (0.0, None))

    def initial(self) -> list[float]:
        alpha = 1 + self.data.size / np.sum(np.log(self.data / self.xmin))
        return [float(alpha), float(1 / np.mean(self.data))]

    def in_range(self, params: list[float]) -> bool:
        return _ALPHA_LO < params[0] < _ALPHA_HI and params[1] > 0.0

    def likelihoods(self, params: list[float]) -> np.ndarray:
        alpha, lam = params
        f = self.data ** (-alpha) * np.exp(-lam * self.data)
        c = lam ** (1 - alpha) / upper_gamma(1 - alpha, lam * self.xmin)
        return np.asarray(f * c)


class _Lognormal(_Law):
    bounds = ((None, None), (0.0, None))

    def __init__(self, data: np.ndarray, xmin: float) -> None:
        self.inverse, self.logs, self.log_xmin = 1 / data, np.log(data), np.log(xmin)
        super().__init__(data, xmin)

    def initial(self) -> list[float]:
        return [float(np.mean(self.logs)), float(np.std(self.logs))]

    def in_range(self, params: list[float]) -> bool:
        return params[1] > 0.0

    def likelihoods(self, params: list[float]) -> np.ndarray | None:
        mu, sigma = params
        f = self.inverse * np.exp(-((self.logs - mu) ** 2) / (2 * sigma**2))
        c = _lognormal_norm(sigma, -(mu - self.log_xmin) / (sigma * np.sqrt(2)))
        if not c > 0:  # powerlaw: every value at the floor
            return None
        return np.asarray(f / c)


_SPLIT = 134217729.0  # 2^27 + 1: Dekker's split of a float64 into two 26-bit halves
_LN2_HI, _LN2_LO = 6.93147180369123816490e-01, 1.90821492927058770002e-10  # fdlibm's ln 2
_ROUNDING = 4e-15  # relative error bound of the product below, mpmath's own roundings included


def _subnormal_product(scale: float, z: float) -> float | None:
    """scale·erfc(z) for z > 20, rounded to float64 as mpmath's value of it is, where that
    is a subnormal float; None where it is not, or where the rounding is too close to call.

    erfc(z) = e^(−z²)·erfcx(z): z² exactly as two floats (Dekker), e^(−z²) as 2^−J·e^r with
    r = J·ln 2 − z² small, erfcx by its asymptotic series (z > 20: six terms reach 1e-17).
    The product, in units of the smallest subnormal 2^−1074, is then known to 4e-15 relative;
    rounded to the nearest unit unless it lies that close to a half.
    """
    c = _SPLIT * z
    hi = c - (c - z)
    lo = z - hi
    square = z * z
    square_lo = ((hi * hi - square) + 2.0 * hi * lo) + lo * lo
    j = round(square / _LN2_HI)
    r = (j * _LN2_HI - square) + (j * _LN2_LO - square_lo)
    inv = 1.0 / (2.0 * square)
    series, term = 1.0, 1.0
    for k in range(1, 12):
        term *= -(2 * k - 1) * inv
        series += term
        if abs(term) < 1e-18:
            break
    mantissa = scale * math.exp(r) * series / (z * math.sqrt(math.pi))
    units = math.ldexp(mantissa, 1074 - j)
    if not 0.0 <= units < 2.0**52:
        return None
    whole = math.floor(units)
    fraction = units - whole
    if abs(fraction - 0.5) <= units * _ROUNDING + 1e-300:
        return None
    return math.ldexp(whole + (1.0 if fraction > 0.5 else 0.0), -1074)


def _lognormal_norm(sigma: float, z: float) -> np.float64:
    """σ·√(π/2)·erfc(z), the lognormal's normaliser on [xmin, ∞), as powerlaw computes it.

    powerlaw evaluates erfc with mpmath (~40 µs a call), correctly rounded; libm's erfc is
    within 3 ulps of it wherever erfc(z) is a normal float (tests/spectral/test_compare.py),
    which moves the lognormal test's R by ~1e-10 relative at most where R is near 0. Where
    erfc(z) is not normal (z > 26.5: the flat valley μ → −∞ of lognormal fits of power-law
    tails, where float64 erfc loses its digits to underflow and the optimiser follows them),
    mpmath as powerlaw.
    """
    scale = sigma * np.sqrt(np.pi / 2)
    value = scale * math.erfc(z)
    if value > _NORMAL:
        return np.float64(value)
    if z > 20.0 and math.isfinite(scale) and scale > 0:
        rounded = _subnormal_product(float(scale), float(z))
        if rounded is not None:
            return np.float64(rounded)
    import mpmath

    return np.float64(scale * mpmath.erfc(z))


def loglikelihood_ratio(ll1: np.ndarray, ll2: np.ndarray, *, nested: bool) -> tuple[float, float]:
    """powerlaw's normalised log-likelihood ratio R and its p-value (R > 0 favours ``ll1``)."""
    n = float(ll1.size)
    if n == 0:
        return 0.0, 1.0
    ll1 = np.where(ll1 == -np.inf, _LOG_FLOOR, ll1)
    ll2 = np.where(ll2 == -np.inf, _LOG_FLOOR, ll2)
    diff = ll1 - ll2
    raw = float(np.sum(diff))
    variance = float(np.sum((diff - (np.mean(ll1) - np.mean(ll2))) ** 2) / n)
    with np.errstate(divide="ignore", invalid="ignore"):
        if nested:
            # = 1 − scipy.stats.chi2.cdf(|2R|, 1): χ²₁'s CDF at |2R| is erf(√|R|)
            p = 1.0 - math.erf(math.sqrt(abs(raw)))
        else:
            p = math.erfc(abs(raw) / np.sqrt(2 * n * variance))
        return float(raw / np.sqrt(n * variance)), p


def _fitted(law: Callable[[np.ndarray, float], _Law], data: np.ndarray, xmin: float) -> _Law:
    model = law(data, xmin)
    if isinstance(model, _PowerLaw):
        model.fit()
    else:
        model.minimise()
    return model


def compare_tail(tail: np.ndarray, xmin: float) -> Comparison | None:
    """The power law against a truncated power law and a lognormal on ``tail`` (values ≥ xmin).

    None for fewer than two values (no test is possible).
    """
    data = np.sort(np.asarray(tail, dtype=np.float64))
    data = data[data >= xmin]
    if data.size < 2:
        return None
    pl = _fitted(_PowerLaw, data, xmin)
    tpl = _fitted(_TruncatedPowerLaw, data, xmin)
    ln = _fitted(_Lognormal, data, xmin)
    ll_pl = pl.loglikelihoods(pl.params)
    r_tpl, p_tpl = loglikelihood_ratio(ll_pl, tpl.loglikelihoods(tpl.params), nested=True)
    r_ln, p_ln = loglikelihood_ratio(ll_pl, ln.loglikelihoods(ln.params), nested=False)
    return Comparison(
        n=int(data.size),
        pl_alpha=pl.params[0],
        tpl_alpha=tpl.params[0],
        tpl_lambda=tpl.params[1],
        lognormal_mu=ln.params[0],
        lognormal_sigma=ln.params[1],
        pl_vs_tpl_R=r_tpl,
        pl_vs_tpl_p=p_tpl,
        pl_vs_lognormal_R=r_ln,
        pl_vs_lognormal_p=p_ln,
    )


def fitted_tail(fit: PowerLawFit, evals: np.ndarray) -> np.ndarray:
    """The eigenvalues a fit used: xmin ≤ λ ≤ xmax (clipped fingers left out)."""
    values = np.asarray(evals, dtype=np.float64)
    return np.sort(values[(values >= fit.xmin) & (values <= fit.xmax)])


def compare_fit(fit: PowerLawFit | None, evals: np.ndarray) -> Comparison | None:
    """:func:`compare_tail` on the tail of ``fit``; None without a fit, or when a test cannot be
    computed (a numerical failure of the tests never fails the layer's analysis)."""
    if fit is None:
        return None
    try:
        return compare_tail(fitted_tail(fit, evals), fit.xmin)
    except (ArithmeticError, ValueError, TypeError):
        return None


def tpl_fit(plain: PowerLawFit, evals: np.ndarray) -> PowerLawFit:
    """Method ``tpl``: the truncated power law fitted at the ``ww`` fit's xmin.

    α is the truncated law's exponent and ``tpl_lambda`` its rate Λ; xmin, D and the tail are
    the ``ww`` fit's (weightwatcher's ``fit='TPL'`` reports the truncated α beside its D).
    """
    data = fitted_tail(plain, evals)
    model = _fitted(_TruncatedPowerLaw, data, plain.xmin)
    alpha, lam = model.params
    return replace(
        plain,
        method="tpl",
        alpha=alpha,
        tpl_lambda=lam,
        sigma=float((alpha - 1.0) / np.sqrt(data.size)),
    )


def apply_rule(status: FitStatus, comparison: Comparison | None, limits: Thresholds) -> FitStatus:
    """The optional ``not_power_law`` rule: an OK fit whose tail an alternative explains
    significantly better (R < 0, p < ``limits.not_power_law_p``) is not trusted; 0 turns it off.
    """
    if (
        status is FitStatus.OK
        and comparison is not None
        and limits.not_power_law_p > 0
        and comparison.not_power_law(limits.not_power_law_p)
    ):
        return FitStatus.NOT_POWER_LAW
    return status


def result_fields(fit: PowerLawFit | None, comparison: Comparison | None) -> dict[str, object]:
    """The layer-result fields of the finger count, the truncated fit and the two tests."""
    out: dict[str, object] = {"num_fingers": None if fit is None else fit.num_fingers}
    if comparison is not None:
        out.update(
            tpl_alpha=comparison.tpl_alpha,
            tpl_lambda=comparison.tpl_lambda,
            pl_vs_tpl_R=_finite(comparison.pl_vs_tpl_R),
            pl_vs_tpl_p=_finite(comparison.pl_vs_tpl_p),
            pl_vs_lognormal_R=_finite(comparison.pl_vs_lognormal_R),
            pl_vs_lognormal_p=_finite(comparison.pl_vs_lognormal_p),
        )
    return out


def _finite(value: float) -> float | None:
    return value if np.isfinite(value) else None
