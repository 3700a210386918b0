"""The trust thresholds: the one definition every part of alphawatch receives.

Settings read them (``ALPHAWATCH_TRUST__<NAME>``), the spectral engine turns them into each
layer's verdict, the worker stores the per-checkpoint statistics with them, and the API applies
and reports them for trends, the gate and the dashboard. Nothing else declares a default of its
own, so a changed threshold reaches every answer. Dependency-free but for pydantic: the bottom
layer, importable by the engine, which may not import the settings.
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field


class Thresholds(BaseModel):
    """Thresholds of the trust verdict and of the robust statistics; immutable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    min_evals: int = Field(10, ge=1, description="fewer eigenvalues than this: too_few_evals")
    min_tail: int = Field(10, ge=2, description="power-law tail shorter than this: tail_too_short")
    max_ks_distance: float = Field(0.1, gt=0, le=1, description="KS distance D above: poor_fit")
    alpha_min: float = Field(1.0, description="alpha at or below this: alpha_out_of_range")
    alpha_max: float = Field(
        8.0, description="alpha above this: alpha_out_of_range, and left out of every statistic"
    )
    max_alpha_delta: float = Field(
        0.5, gt=0, description="alpha moving more than this under bootstrap: unstable"
    )
    rank_loss_fraction: float = Field(
        0.1, gt=0, le=1, description="share of zero singular values that flags rank collapse"
    )
    over_trained_below: float = Field(2.0, description="weightwatcher's over-trained label")
    under_trained_above: float = Field(6.0, description="weightwatcher's under-trained label")
    trap_seed: int = Field(0, description="seed of the shuffle used to find correlation traps")
    bootstrap_samples: int = Field(32, ge=0, description="tail bootstrap resamples for stability")
    not_power_law_p: float = Field(
        0.0,
        ge=0,
        le=1,
        description="a tail that a truncated power law or a lognormal explains better (R < 0) "
        "with p below this: not_power_law; 0 turns the rule off",
    )
    mad_k: float = Field(
        3.0,
        gt=0,
        le=100,
        description="MAD outlier rule: |alpha - median| > mad_k scaled MADs is an outlier",
    )
