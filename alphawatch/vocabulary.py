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
    Statistic.MEDIAN: "median", Statistic.MEAN: "mean",
    Statistic.TRIMMED_MEAN: "10 % trimmed mean", Statistic.P10: "10th percentile",
    Statistic.P25: "25th percentile", Statistic.P75: "75th percentile",
    Statistic.P90: "90th percentile", Statistic.IQR: "interquartile range",
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
    KindGroup("mlp", "mlp gate/up/down",
              (Kind.GATE, Kind.UP, Kind.DOWN, Kind.FC_IN, Kind.FC_OUT)),
    KindGroup("embeddings", "embeddings", (Kind.EMBED, Kind.LM_HEAD)),
)
