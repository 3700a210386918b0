"""What a read asks for: the query models of the trend, per-block, heatmap, compare and gate
routes.

A route receives its query string as one of these models (FastAPI's query-parameter models,
so the OpenAPI schema lists each field as a parameter) and passes it whole to its query in
:mod:`alphawatch.service.api.queries`. The field types are the API's validation: the schema a
client (or a fuzzer) reads is built from them.
"""

from __future__ import annotations

import functools
from typing import Annotated, Any, Literal

from pydantic import BaseModel, Field
from sqlalchemy import Float, Integer

from alphawatch.service.db.layers import LayerSelection
from alphawatch.service.db.models import LayerMetric
from alphawatch.vocabulary import (
    DEFAULT_FILTER,
    DEFAULT_OUTLIER_RULE,
    DEFAULT_STATISTIC,
    DEFAULT_VARIANT,
    MAX_STEP,
    VARIANT_PATTERN,
    LayerFilter,
    LayerOrder,
    OutlierRule,
    Statistic,
)


@functools.cache
def numeric_metrics() -> list[str]:
    """Layer metric columns a trend or history can be asked for."""
    skip = {"id", "checkpoint_id", "block", "rows", "cols"}
    return [
        a.key
        for a in LayerMetric.__mapper__.column_attrs
        if isinstance(a.columns[0].type, Float | Integer) and a.key not in skip
    ]


# The largest 32-bit id or block: a larger one is a bad request, not a database error.
INT32 = 2**31 - 1

# The schema lists the metrics, so a client (or a fuzzer) knows which names are valid.
MetricName = Literal[tuple(numeric_metrics())]  # type: ignore[valid-type]
Metric = Annotated[MetricName, Field(description="a numeric layer metric")]  # type: ignore[valid-type]
Variant = Annotated[
    str,
    Field(
        max_length=16,
        pattern=VARIANT_PATTERN,
        description="weight (default), exp_avg (gradients), an update spectrum delta, "
        "delta_init or delta_prev, or a nested width w<k>; variants are never mixed",
    ),
]
# The gate bands a level of alpha: its schema offers the statistics that are levels, only.
LevelName = Literal[tuple(s.value for s in Statistic if s.is_level)]  # type: ignore[valid-type]
KindList = Annotated[
    str | None, Field(max_length=200, description="comma-separated kinds: q,k,v,o,...")
]
BlockBound = Annotated[int | None, Field(ge=0, le=INT32)]
MaxPoints = Annotated[int | None, Field(ge=2, le=100_000, description="downsample to N steps")]


def kinds_of(kind: str | None) -> tuple[str, ...]:
    """The kinds a comma-separated ``kind`` parameter names; () for every kind."""
    return tuple(k.strip() for k in (kind or "").split(",") if k.strip())


class TrendQuery(BaseModel):
    """A model-level robust trend: one statistic of a metric over the selected layers."""

    metric: Metric = "alpha"
    stat: Statistic = DEFAULT_STATISTIC
    filter: LayerFilter = DEFAULT_FILTER
    kind: KindList = None
    block_min: BlockBound = None
    block_max: BlockBound = None
    outliers: OutlierRule = DEFAULT_OUTLIER_RULE
    mad_k: Annotated[
        float | None, Field(gt=0, le=100, description="default: the server's trust.mad_k")
    ] = None
    max_points: MaxPoints = None
    variant: Variant = DEFAULT_VARIANT

    def layers(self, method: str) -> LayerSelection:
        """The layer rows this trend is over."""
        return _within_blocks(method, self.variant, self.kind, self.block_min, self.block_max)


def _within_blocks(
    method: str, variant: str, kind: str | None, block_min: int | None, block_max: int | None
) -> LayerSelection:
    """The layers of ``kind`` (a comma list, or all) between two blocks, of one method."""
    return LayerSelection(
        method=method,
        variant=variant,
        kinds=kinds_of(kind),
        block_min=block_min,
        block_max=block_max,
    )


class BlockQuery(BaseModel):
    """One robust trend per block, over the layers of that block the query selects."""

    metric: Metric = "alpha"
    stat: Statistic = DEFAULT_STATISTIC
    filter: LayerFilter = DEFAULT_FILTER
    kind: KindList = None
    variant: Variant = DEFAULT_VARIANT
    outliers: OutlierRule = DEFAULT_OUTLIER_RULE
    mad_k: Annotated[float | None, Field(gt=0, le=100)] = None
    order: LayerOrder = LayerOrder.BLOCK_DESC
    max_points: MaxPoints = 500

    def layers(self, method: str) -> LayerSelection:
        """The layer rows the blocks' trends are over."""
        return LayerSelection(method=method, variant=self.variant, kinds=kinds_of(self.kind))


class HeatmapQuery(BaseModel):
    """A layer x step matrix of one metric."""

    metric: Metric = "alpha"
    max_points: MaxPoints = 500
    variant: Variant = DEFAULT_VARIANT
    kind: KindList = None
    block_min: BlockBound = None
    block_max: BlockBound = None
    order: LayerOrder = LayerOrder.BLOCK
    digits: Annotated[
        int | None,
        Field(
            ge=0,
            le=15,
            description="round z to this many decimals (default: as stored); at 3, what a "
            "colour or a hover can show, a long run's matrix is half the bytes",
        ),
    ] = None

    def layers(self, method: str) -> LayerSelection:
        """The layer rows that make the matrix's rows."""
        return _within_blocks(method, self.variant, self.kind, self.block_min, self.block_max)


DistanceName = Literal["change_fro", "change_spectral", "subspace_overlap"]
# The layer x step matrices of a distances answer.
DISTANCE_MATRICES = ("change_fro", "change_spectral", "subspace_overlap", "ref_steps", "alpha")
_MATRIX = "(" + "|".join(DISTANCE_MATRICES) + ")"
MATRICES_PATTERN = f"^{_MATRIX}(,{_MATRIX}){{0,4}}$"


class DistanceQuery(BaseModel):
    """Layer distances between consecutive checkpoints as layer x step matrices, and between
    two chosen steps a ranking of the layers by how much they changed."""

    max_points: MaxPoints = 500
    kind: KindList = None
    block_min: BlockBound = None
    block_max: BlockBound = None
    order: LayerOrder = LayerOrder.BLOCK
    from_step: Annotated[
        int | None,
        Field(
            ge=0,
            le=MAX_STEP,
            description="rank the layers by their change from this step (default: the analysed "
            "step before to_step)",
        ),
    ] = None
    to_step: Annotated[
        int | None,
        Field(ge=0, le=MAX_STEP, description="... to this step (default: the latest analysed)"),
    ] = None
    rank_by: Annotated[DistanceName, Field(description="the change the ranking is ordered by")] = (
        "change_fro"
    )
    matrices: Annotated[
        str | None,
        Field(
            pattern=MATRICES_PATTERN,
            description="comma-separated layer x step matrices to send, of change_fro, "
            "change_spectral, subspace_overlap, ref_steps, alpha (default: all); the others "
            "are null. The ranking is the same either way",
        ),
    ] = None

    def matrix_names(self) -> tuple[str, ...]:
        """The matrices asked for, in the answer's order."""
        asked = set((self.matrices or ",".join(DISTANCE_MATRICES)).split(","))
        return tuple(m for m in DISTANCE_MATRICES if m in asked)

    def layers(self, method: str) -> LayerSelection:
        """The weight rows that make the matrices' rows (distances are the weights')."""
        return _within_blocks(method, DEFAULT_VARIANT, self.kind, self.block_min, self.block_max)


class CompareQuery(BaseModel):
    """Whole-model robust trends of several runs, to overlay."""

    runs: Annotated[
        str,
        Field(
            pattern=r"^\d{1,9}(,\d{1,9}){0,49}$", description="up to 50 run ids, comma-separated"
        ),
    ]
    metric: Metric = "alpha"
    stat: Statistic = DEFAULT_STATISTIC
    filter: LayerFilter = DEFAULT_FILTER
    max_points: MaxPoints = 500

    @property
    def run_ids(self) -> list[int]:
        """The runs named, each once, in the order named."""
        return list(dict.fromkeys(int(r) for r in self.runs.split(",")))

    def trend(self) -> TrendQuery:
        """The whole-model trend drawn for each run."""
        return TrendQuery(
            metric=self.metric, stat=self.stat, filter=self.filter, max_points=self.max_points
        )


# The longest one gate request may wait: a proxy's idle timeout is often 60 s; clients loop.
MAX_GATE_WAIT_S = 60


class GateQuery(BaseModel):
    """The CI gate's question: at which step, on which variant, under which rules.

    A rule left out (None) is the run's stored rule, else the server's default.
    """

    stat: Annotated[
        LevelName | None,  # type: ignore[valid-type]
        Field(
            description="a level of alpha (a spread cannot be gated); default: the run's gate rules"
        ),
    ] = None
    filter: Annotated[LayerFilter | None, Field(description="default: the run's gate rules")] = None
    step: Annotated[
        int | None, Field(ge=0, le=MAX_STEP, description="default: the latest analysed")
    ] = None
    min_alpha: Annotated[
        float | None,
        Field(
            allow_inf_nan=False,
            description="default: the run's gate rules (server: 2, over-trained)",
        ),
    ] = None
    max_alpha: Annotated[
        float | None,
        Field(
            allow_inf_nan=False,
            description="default: the run's gate rules (server: 6, under-trained)",
        ),
    ] = None
    max_untrusted_share: Annotated[float | None, Field(ge=0, le=1)] = None
    ref_step: Annotated[int | None, Field(ge=0, le=MAX_STEP)] = None
    max_delta: Annotated[
        float | None,
        Field(
            ge=0,
            allow_inf_nan=False,
            description="without ref_step: since the analysed checkpoint before",
        ),
    ] = None
    strict: Annotated[bool, Field(description="answer 409 when the gate fails")] = False
    variant: Variant = DEFAULT_VARIANT
    wait_s: Annotated[
        float,
        Field(
            ge=0,
            le=MAX_GATE_WAIT_S,
            allow_inf_nan=False,
            description="wait up to this long for the step to be analysed (long poll); when it "
            "runs out the verdict says pending: true",
        ),
    ] = 0

    def rules(self) -> dict[str, Any]:
        """The rules the query names, over the run's: those it leaves out are not here."""
        return self.model_dump(exclude={"step", "strict", "variant", "wait_s"}, exclude_none=True)
