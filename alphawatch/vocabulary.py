"""The names every part of alphawatch shares: statistics, layer filters, outlier rules, layer kinds.

Each is declared here once and received everywhere else: the checkpoint reader labels layers
with :class:`Kind`, the service validates queries, precomputes and orders with these enums, and
the dashboard is served them by ``GET /api/v1/vocabulary`` instead of copying them. The module
imports only the standard library, so every layer may import it without crossing an import
contract (the checkpoint reader may not import the service, nor the service the workers).
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import StrEnum


class Statistic(StrEnum):
    """A robust statistic of one metric over the selected layers of a checkpoint."""

    MEDIAN = "median"  # the headline number: a few odd layers do not move it
    MEAN = "mean"  # moves with outliers; next to the median it shows when a few layers stray
    TRIMMED_MEAN = "trimmed_mean"  # mean of the middle 80 % (10 % cut at each end)
    P10 = "p10"  # 10th percentile: the low tail, where over-trained layers show first
    P25 = "p25"  # lower quartile; the dashboard's band starts here
    P75 = "p75"  # upper quartile; the dashboard's band ends here
    P90 = "p90"  # 90th percentile: the high tail, where layers that learned little sit
    IQR = "iqr"  # p75 - p25: a spread, not a level, so no α band can gate it

    @property
    def label(self) -> str:
        """How people read the statistic's name."""
        return _STATISTIC_LABELS[self]

    @property
    def is_level(self) -> bool:
        """Whether the statistic is a level of the metric (comparable with an α band)."""
        return self is not Statistic.IQR


DEFAULT_STATISTIC = Statistic.MEDIAN
"""What every query assumes when it names no statistic."""

_STATISTIC_LABELS = {
    Statistic.MEDIAN: "median",
    Statistic.MEAN: "mean",
    Statistic.TRIMMED_MEAN: "10 % trimmed mean",
    Statistic.P10: "10th percentile",
    Statistic.P25: "25th percentile",
    Statistic.P75: "75th percentile",
    Statistic.P90: "90th percentile",
    Statistic.IQR: "interquartile range",
}


class LayerFilter(StrEnum):
    """Which layers a statistic may use, besides the rules that always apply."""

    TRUSTED = "trusted"  # only layers whose fit is trusted: the default everywhere
    ALL = "all"  # every layer with a value, trusted or not

    @property
    def label(self) -> str:
        """How people read the filter's name."""
        return "trusted only" if self is LayerFilter.TRUSTED else "all layers"


DEFAULT_FILTER = LayerFilter.TRUSTED
"""What every query assumes when it names no layer filter."""


class OutlierRule(StrEnum):
    """Which selected values a statistic leaves out as outliers."""

    NONE = "none"  # keep every value (α above the trust settings' alpha_max is dropped anyway)
    MAD = "mad"  # drop values farther than mad_k scaled median absolute deviations

    @property
    def label(self) -> str:
        """How people read the rule's name."""
        return "none (α > alpha_max dropped)" if self is OutlierRule.NONE else "MAD outliers"


DEFAULT_OUTLIER_RULE = OutlierRule.NONE
"""What every query assumes when it names no outlier rule."""


class FitStatus(StrEnum):
    """Whether a layer's fitted alpha can be believed; stored as text."""

    OK = "ok"  # enough eigenvalues, long tail, good and stable fit, alpha in range
    TOO_FEW_EVALS = "too_few_evals"  # fewer eigenvalues than thresholds.min_evals
    TAIL_TOO_SHORT = "tail_too_short"  # the power-law tail has fewer than min_tail values
    POOR_FIT = "poor_fit"  # KS distance D above thresholds.max_ks_distance
    ALPHA_OUT_OF_RANGE = "alpha_out_of_range"  # alpha <= alpha_min or alpha > alpha_max
    UNSTABLE = "unstable"  # alpha moves more than max_alpha_delta under resampling
    NON_FINITE = "non_finite"  # NaN or Inf among the weights
    DEGENERATE = "degenerate"  # zero or constant matrix: no spectrum to fit
    NOT_POWER_LAW = "not_power_law"  # a truncated power law or lognormal explains the tail
    # significantly better (thresholds.not_power_law_p; off by default)
    FAILED = "failed"  # an unexpected error; see LayerResult.error


class FitMethod(StrEnum):
    """How a layer's power-law tail is fitted; every alpha is stored and trended per method."""

    WW = "ww"  # weightwatcher 0.7.7's default fit: the reference numbers
    WW_RELFLOOR = "ww_relfloor"  # the same above 1e-6·λmax instead of an absolute 1e-5 floor
    KS2 = "ks2"  # two-sided KS distance picks xmin
    XMIN_PEAK = "xmin_peak"  # weightwatcher's fix_fingers='xmin_peak': xmin near the ESD's peak
    CLIP_XMAX = "clip_xmax"  # weightwatcher's fix_fingers='clip_xmax': outlying top values clipped
    TPL = "tpl"  # truncated power law x^-α·e^(-Λx) at the ww fit's xmin (weightwatcher fit='TPL')

    @property
    def label(self) -> str:
        """How people read the method's name."""
        return _FIT_METHOD_LABELS[self]


DEFAULT_FIT_METHOD = FitMethod.WW
"""The ``fit_method`` setting's default. A server's worker computes, and its requests that name
no method read, the method of its settings, which is this one unless ALPHAWATCH_FIT_METHOD
names another."""

_FIT_METHOD_LABELS = {
    FitMethod.WW: "weightwatcher 0.7.7",
    FitMethod.WW_RELFLOOR: "relative floor",
    FitMethod.KS2: "two-sided KS",
    FitMethod.XMIN_PEAK: "xmin at the ESD peak (fingers)",
    FitMethod.CLIP_XMAX: "clipped fingers",
    FitMethod.TPL: "truncated power law",
}


class Kind(StrEnum):
    """The role of a weight matrix in the model; declared in the order a model runs them.

    That order sorts layers inside a block (heatmap rows, layer lists) and the dashboard's panels.
    """

    EMBED = "embed"  # token, position or patch embeddings
    Q = "q"  # attention query projection
    K = "k"  # attention key projection
    V = "v"  # attention value projection
    QKV = "qkv"  # fused query-key-value projection, when its layout cannot be split
    O = "o"  # noqa: E741  attention output projection
    GATE = "gate"  # gate projection of a gated MLP (SwiGLU and kin)
    UP = "up"  # up projection of a gated MLP
    DOWN = "down"  # down projection of a gated MLP
    FC_IN = "fc_in"  # first matrix of a plain MLP (GPT-2 c_fc, BERT intermediate)
    FC_OUT = "fc_out"  # second matrix of a plain MLP
    LORA_UPDATE = "lora_update"  # the low-rank update B·A of a LoRA adapter
    OTHER = "other"  # a weight matrix no naming pattern recognises
    LM_HEAD = "lm_head"  # the output projection onto the vocabulary


KIND_ORDER: tuple[Kind, ...] = tuple(Kind)


@dataclass(frozen=True)
class KindGroup:
    """A named set of kinds that users select together (``kind=attention``)."""

    name: str
    label: str
    kinds: tuple[Kind, ...]


KIND_GROUPS: tuple[KindGroup, ...] = (
    KindGroup("attention", "attention q/k/v/o", (Kind.Q, Kind.K, Kind.V, Kind.O, Kind.QKV)),
    KindGroup("mlp", "mlp gate/up/down", (Kind.GATE, Kind.UP, Kind.DOWN, Kind.FC_IN, Kind.FC_OUT)),
    KindGroup("embeddings", "embeddings", (Kind.EMBED, Kind.LM_HEAD)),
)


VARIANT_SEPARATOR = "@"
"""Separates a layer's name from the variant of its matrix: ``model.layers.3.mlp.up_proj@w1024``."""


class Source(StrEnum):
    """What a layer row's spectrum is of. Weights are the default of every view and statistic:
    a gradient or a nested sub-matrix is never averaged with weights unless asked for by name."""

    WEIGHT = "weight"  # the weight matrix itself; its name has no variant
    EXP_AVG = "exp_avg"  # Adam's first moment: an exponential average of the weight's gradient
    NESTED = "nested"  # an MLP matrix cut to its first k neurons (a MatFormer sub-model)
    DELTA = "delta"  # an update W - W_base against a base checkpoint named to `analyze --base`
    DELTA_INIT = "delta_init"  # the update W - W_0 since the run's first checkpoint
    DELTA_PREV = "delta_prev"  # the update W - W_prev since the checkpoint before, by step

    @property
    def label(self) -> str:
        """How people read the source's name."""
        return _SOURCE_LABELS[self]


_SOURCE_LABELS = {
    Source.WEIGHT: "weights",
    Source.EXP_AVG: "gradients (Adam exp_avg)",
    Source.NESTED: "nested width w<k> (first k MLP neurons)",
    Source.DELTA: "update W - W_base (against a base checkpoint)",
    Source.DELTA_INIT: "update W - W_0 (since the first checkpoint)",
    Source.DELTA_PREV: "update W - W_prev (since the checkpoint before)",
}

DELTA_SOURCES: tuple[Source, ...] = (Source.DELTA, Source.DELTA_INIT, Source.DELTA_PREV)
"""The update spectra: the ESD of a difference of two checkpoints' matrices."""

DEFAULT_VARIANT = Source.WEIGHT.value
"""The variant every query assumes when it names none: the weights themselves."""

VARIANT_PATTERN = r"^(weight|exp_avg|delta|delta_init|delta_prev|w[1-9][0-9]{0,8})$"
"""The variants a query may name: ``weight``, ``exp_avg``, an update ``delta``,
``delta_init`` or ``delta_prev``, or a nested width ``w<k>``."""


def nested_variant(width: int) -> str:
    """The variant of an MLP matrix cut to its first ``width`` neurons: ``w<width>``."""
    return f"w{width}"


def split_variant(name: str) -> tuple[str, str]:
    """(layer name, variant) of a row's name; the variant of a weight is ``weight``."""
    base, sep, variant = name.rpartition(VARIANT_SEPARATOR)
    return (base, variant) if sep else (name, DEFAULT_VARIANT)


def source_of(variant: str) -> Source:
    """The :class:`Source` a variant belongs to (``w1024`` is nested).

    Raises:
        ValueError: ``variant`` names no source (the API's pattern lets none such through).
    """
    if variant.startswith("w") and variant[1:].isdigit():
        return Source.NESTED
    return Source(variant)


class LayerOrder(StrEnum):
    """How layers are ordered in a heatmap or a per-block view."""

    BLOCK = "block"  # embeddings, block 0, 1, ..., the head: the order a model runs them
    BLOCK_DESC = "block_desc"  # the head and the last block first: where gradients arrive first

    @property
    def label(self) -> str:
        """How people read the order's name."""
        return "first block first" if self is LayerOrder.BLOCK else "last block first"


DEFAULT_ORDER = LayerOrder.BLOCK
"""What every query assumes when it names no layer order."""


MAX_STEP = 2**63 - 1
"""The largest training step: ``step`` is a BIGINT column, so every reader (folder names, the
CLI, the API's paths and queries, stored gate rules) accepts 0 .. MAX_STEP and refuses more."""
