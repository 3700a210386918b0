"""Response and request bodies of the REST API, separate from the ORM rows they are read from.

Declared models also make FastAPI serialise through pydantic-core instead of walking plain
dicts in Python, which matters for histories and trends of thousands of points.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    JsonValue,
    field_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import from_json

from alphawatch import run_names
from alphawatch.gate_rules import PRESETS, GateRules, preset_rules
from alphawatch.locations import URL_PATTERN
from alphawatch.trust import Thresholds
from alphawatch.vocabulary import LayerFilter, Statistic


def _utc(moment: datetime) -> datetime:
    # SQLite returns timestamps without their zone; alphawatch writes them in UTC, and RFC 3339
    # (the OpenAPI date-time format) needs the offset.
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


UtcDatetime = Annotated[datetime, AfterValidator(_utc)]


class ErrorRead(BaseModel):
    """The body of every 4xx and 5xx answer."""

    detail: str = Field(description="what went wrong, and how to fix it when the caller can")


class HealthRead(BaseModel):
    status: str = Field(description="ok")


class HealthDegraded(ErrorRead):
    """/health while the embedded worker is down: an error body that also says why."""

    status: str = Field("degraded", description="degraded")
    reason: str = Field(description="what is down, e.g. the worker loop being restarted")


def _run_name(name: str) -> str:
    problem = run_names.refusal(name)
    if problem is not None:
        raise ValueError(problem)
    return name


class RunCreate(BaseModel):
    name: Annotated[str, AfterValidator(_run_name)] = Field(
        min_length=1,
        max_length=run_names.MAX_LENGTH,
        pattern=run_names.PATTERN,
        description="letters, digits, '_', '.' and '-'; not only dots ('.', '..'): the name is "
        "also the run's folder in exports",
    )
    path: str = Field(
        max_length=4096,
        pattern=r"^(/[^/\x00]{1,255})+/?$|^/$|" + URL_PATTERN,
        description="absolute path of the run directory, under one of ALPHAWATCH_ALLOWED_ROOTS "
        "once symlinks are followed; at most 255 characters per component. Or an object-store "
        "URL (s3://bucket/prefix/run, gs://…) under a URL prefix among the allowed roots",
        examples=["/data/runs/llama-7b-sft", "s3://training/runs/llama-7b-sft"],
    )


class ScanRequested(BaseModel):
    """A "scan now" request, recorded: the discovering worker scans the run within a second."""

    run_id: int
    requested_at: UtcDatetime = Field(description="when the request was recorded (UTC)")


class RunRead(BaseModel):
    id: int
    name: str
    path: str
    created_at: UtcDatetime
    n_checkpoints: int
    n_done: int
    n_failed: int
    n_pending: int
    n_skipped: int = Field(
        0,
        description="checkpoints the keep-up policy passed over (ALPHAWATCH_KEEP_UP): not "
        "analysed, not waiting, and not counted in n_pending or the lag",
    )
    last_step: int | None
    latest_alpha: float | None = Field(description="median alpha of trusted layers, latest step")
    untrusted_share: float | None
    discovery_error: str | None = Field(
        None,
        description="why the latest discovery pass could not list the run, or the "
        "entries it refused that have no step (null when all is well)",
    )
    lag_checkpoints: int = Field(
        0,
        description="checkpoints waiting for analysis (queued or being analysed; skipped "
        "ones are not waiting)",
    )
    lag_oldest_seconds: float | None = Field(
        None,
        description="seconds the longest-waiting checkpoint has waited since it was queued "
        "(discovered, or rewritten and queued again); null when none waits",
    )
    last_analysis_lag_seconds: float | None = Field(
        None,
        description="seconds from queued to analysed of the most recently finished analysis; "
        "null when nothing is analysed",
    )


class CrossCheckRead(BaseModel):
    """The live cross-check with weightwatcher over a run's layer rows (every method)."""

    layers: int = Field(description="layer rows re-analysed with weightwatcher")
    max_diff: float | None = Field(description="largest relative alpha difference")
    over_tolerance: int = Field(description="layer rows whose difference exceeds the tolerance")
    tolerance: float = Field(description="the tolerance (settings.crosscheck.tolerance)")
    share: float = Field(description="share of layers this server's workers cross-check")


class RunDetail(RunRead):
    thresholds: Thresholds = Field(description="the trust thresholds this server applies")
    methods: list[str] = Field(description="fit methods of the latest analysed checkpoint")
    crosscheck: CrossCheckRead


class RunList(BaseModel):
    runs: list[RunRead]
    total: int


class CheckpointRead(BaseModel):
    id: int
    step: int
    path: str
    format: str
    status: str = Field(
        description="pending | running | done | failed | vanished | skipped (passed over by "
        "the keep-up policy; error says why)"
    )
    error: str | None
    discovered_at: UtcDatetime
    started_at: UtcDatetime | None
    finished_at: UtcDatetime | None
    analysis_s: float | None
    device: str | None
    n_layers: int | None
    n_trusted: int | None
    attempts: int | None
    discovery_error: str | None = Field(
        None,
        description="why discovery refused it (it is then failed, never read), or what "
        "it found wrong with it after the analysis",
    )
    analysis_count: int = Field(
        0,
        description="completed analyses; more than 1 when its "
        "files were rewritten in place and re-analysed",
    )
    rewritten_at: datetime | None = Field(
        None, description="when its files last changed after an analysis (queued again)"
    )


class CheckpointList(BaseModel):
    run_id: int
    checkpoints: list[CheckpointRead]


class NeuronWeights(BaseModel):
    participation: float = Field(description="(Σx²)²/Σx⁴: 1 = one neuron, length = spread")
    neurons: list[int] = Field(description="row or column indices, the heaviest first")
    weights: list[float] = Field(description="each neuron's share x²/Σx² of the vector")


class TrapVector(BaseModel):
    sigma: float = Field(description="the singular value")
    rows: NeuronWeights = Field(description="left vector: output neurons (W's rows)")
    cols: NeuronWeights = Field(description="right vector: input neurons (W's columns)")


class TrapLocalisation(BaseModel):
    shape: list[int] = Field(description="W as stored: (rows, columns)")
    vectors: list[TrapVector] = Field(description="W's top singular pairs, largest σ first")


class LayerMetricRead(BaseModel):
    """Every metric of one layer at one checkpoint for one fit method (docs/API.md)."""

    model_config = ConfigDict(extra="ignore")

    name: str
    kind: str
    block: int | None = None
    dtype: str | None = None
    method: str
    fit_status: str
    trusted: bool
    error: str | None = None
    rows: int | None = None
    cols: int | None = None
    num_evals: int | None = None
    lambda_max: float | None = None
    alpha: float | None = None
    alpha_weighted: float | None = None
    log_norm: float | None = None
    log_spectral_norm: float | None = None
    stable_rank: float | None = None
    log_alpha_norm: float | None = None
    D: float | None = None
    xmin: float | None = None
    xmax: float | None = None
    num_pl_spikes: int | None = None
    sigma: float | None = None
    entropy: float | None = None
    matrix_rank: int | None = None
    rank_loss: int | None = None
    mp_bulk_max: float | None = Field(None, description="MP edge of W's entry variance")
    mp_sigma: float | None = Field(None, description="√ of W's entry variance")
    num_spikes: int | None = Field(None, description="weightwatcher's: spikes beyond its MP fit")
    mp_softrank: float | None = Field(None, description="weightwatcher's: its MP edge / λmax")
    edge_spikes: int | None = Field(None, description="eigenvalues beyond mp_bulk_max")
    edge_softrank: float | None = Field(None, description="mp_bulk_max / λmax")
    num_traps: int | None = Field(None, description="weightwatcher's: shuffle's MP-fit spikes")
    rand_distance: float | None = Field(
        None, description="weightwatcher's: JS distance of sorted eigenvalues vs the shuffle's"
    )
    shuffle_traps: int | None = Field(
        None, description="shuffle's eigenvalues beyond mp_bulk_max + 5 TW: correlation_trap"
    )
    shuffle_distance: float | None = Field(
        None, description="JS distance of the log-histograms of the ESD and the shuffle's"
    )
    max_rand_eval: float | None = None
    mean_spike: bool
    alpha_delta: float | None = None
    correlation_trap: bool
    rank_collapse: bool
    near_random: bool
    over_trained: bool
    under_trained: bool
    warning: str | None = None
    elapsed_ms: float | None = None
    distance_from_init: float | None = None
    num_fingers: int | None = Field(None, description="clip_xmax: top eigenvalues clipped")
    tpl_alpha: float | None = Field(None, description="truncated power law's exponent")
    tpl_lambda: float | None = Field(None, description="truncated power law's rate Λ")
    pl_vs_tpl_R: float | None = Field(
        None, description="normalised log-likelihood ratio, power law vs truncated (R > 0: PL)"
    )
    pl_vs_tpl_p: float | None = Field(None, description="its p-value (nested: χ²₁)")
    pl_vs_lognormal_R: float | None = Field(
        None, description="normalised log-likelihood ratio, power law vs lognormal (R > 0: PL)"
    )
    pl_vs_lognormal_p: float | None = Field(None, description="its p-value (Vuong)")
    crosscheck_diff: float | None = Field(
        None, description="relative alpha difference from weightwatcher (cross-checked layers)"
    )
    change_fro: float | None = Field(
        None, description="‖W − W_ref‖_F / ‖W‖_F against the checkpoint before (change_ref_step)"
    )
    change_spectral: float | None = Field(None, description="‖W − W_ref‖₂ / ‖W‖₂")
    subspace_overlap: float | None = Field(
        None, description="‖U_refᵀU‖_F²/k of the top-k singular subspaces (1: same directions)"
    )
    overlap_k: int | None = Field(None, description="k of subspace_overlap")
    change_ref_step: int | None = Field(None, description="the step the distances are from")

    trap_localisation: TrapLocalisation | None = Field(
        None, description="trapped layers: which neurons carry the trap (docs/SPECTRAL.md)"
    )

    @field_validator("trap_localisation", mode="before")
    @classmethod
    def _parsed(cls, value: object) -> object:
        # stored as JSON text
        return from_json(value) if isinstance(value, str) else value


class CheckpointLayers(BaseModel):
    run_id: int
    step: int
    method: str
    layers: list[LayerMetricRead]


class HistoryPoint(BaseModel):
    step: int
    value: float | None
    alpha: float | None
    D: float | None
    num_pl_spikes: int | None
    fit_status: str
    trusted: bool


class HistoryRead(BaseModel):
    run_id: int
    layer: str
    metric: str
    points: list[HistoryPoint]


class TrendPoint(BaseModel):
    step: int
    value: float | None = Field(description="the requested statistic")
    n_used: int
    n_excluded: int
    excluded: dict[str, int] = Field(description="excluded layers by reason")
    median: float | None
    mean: float | None
    trimmed_mean: float | None
    p10: float | None
    p25: float | None
    p75: float | None
    p90: float | None
    iqr: float | None


class TrendRead(BaseModel):
    run_id: int
    metric: str
    stat: str
    filter: str
    method: str
    outliers: str
    variant: str = Field(
        description="weight, exp_avg (gradients), delta, delta_init or delta_prev (update "
        "spectra) or a nested width w<k>"
    )
    points: list[TrendPoint]


class BlockTrend(BaseModel):
    block: int
    points: list[TrendPoint]


class BlockTrendRead(BaseModel):
    run_id: int
    metric: str
    stat: str
    filter: str
    variant: str
    order: str
    blocks: list[BlockTrend] = Field(description="one trend per block, in the order asked for")


class VariantRead(BaseModel):
    name: str = Field(description="the value of the variant query parameter")
    source: str = Field(description="weight, exp_avg or nested")
    label: str
    n_layers: int = Field(description="rows of this variant in the latest analysed checkpoint")


class VariantsRead(BaseModel):
    run_id: int
    variants: list[VariantRead]


class FitLine(BaseModel):
    x: list[float]
    y: list[float]


class EsdRead(BaseModel):
    layer: str
    step: int
    method: str
    evals: list[float]
    rand_evals: list[float] | None
    alpha: float | None
    xmin: float | None
    xmax: float | None
    D: float | None
    num_pl_spikes: int | None
    mp_bulk_max: float | None
    fit_status: str
    fit_line: FitLine
    correlation_trap: bool
    trap_localisation: TrapLocalisation | None = Field(
        description="which neurons carry the correlation trap; null without one"
    )


class Violation(BaseModel):
    rule: str
    value: float | None
    threshold: float | None
    message: str


class GateRead(BaseModel):
    run_id: int
    passed: bool
    step: int | None
    stat: str
    filter: str
    value: float | None
    untrusted_share: float | None
    ref_step: int | None = None
    delta: float | None = None
    n_used: int | None = None
    violations: list[Violation]
    pending: bool = Field(
        False,
        description="the step is not analysed yet but may still be (queued, running, or not "
        "registered and not passed by the run): the gate fails for now; ask again",
    )


LevelStatistic = Literal[tuple(s.value for s in Statistic if s.is_level)]  # type: ignore[valid-type]


def _json_integer(value: object) -> object:
    """An integer as JSON Schema has it: 119.0 is one; true and "119" are not."""
    if isinstance(value, bool | str | bytes):
        raise ValueError("Input should be a valid integer")
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


_PRESET_NAMES: list[JsonValue] = []
_PRESET_NAMES.extend(sorted(PRESETS))


def _known_preset(name: str) -> str:
    preset_rules(name)  # raises, naming the presets there are
    return name


class GateRulesWrite(BaseModel):
    """A run's gate rules: a rule left out takes the server's default, null switches it off.

    ``stat`` and ``filter`` cannot be switched off: null is not in their schema.
    """

    model_config = ConfigDict(extra="forbid")

    stat: LevelStatistic | SkipJsonSchema[None] = None  # type: ignore[valid-type]
    filter: LayerFilter | SkipJsonSchema[None] = None
    # strict: true is not 1, nor "3" a number, as the schema says.
    min_alpha: float | None = Field(None, allow_inf_nan=False, strict=True)
    max_alpha: float | None = Field(None, allow_inf_nan=False, strict=True)
    max_untrusted_share: float | None = Field(None, ge=0, le=1, strict=True)
    max_delta: float | None = Field(None, ge=0, allow_inf_nan=False, strict=True)
    # 2**53 - 1: the largest integer every JSON reader (and JSON Schema's maximum) holds exactly.
    ref_step: Annotated[int, Field(ge=0, le=2**53 - 1), BeforeValidator(_json_integer)] | None = (
        None
    )
    preset: Annotated[str, AfterValidator(_known_preset)] | SkipJsonSchema[None] = Field(
        None,
        description="a named set of rules (" + ", ".join(sorted(PRESETS)) + "); expands to "
        "concrete rules, which rules named beside it override",
        json_schema_extra={"enum": _PRESET_NAMES},
    )

    @field_validator("preset", mode="before")
    @classmethod
    def _preset_named(cls, value: object) -> object:
        # Left out is no preset; an explicit null is not in the schema, so it is refused.
        if value is None:
            raise ValueError("preset must name a preset: " + ", ".join(sorted(PRESETS)))
        return value

    def overrides(self) -> dict[str, Any]:
        """The rules to store: the preset's, expanded, then those the body names."""
        named = self.model_dump(mode="json", include=self.model_fields_set - {"preset"})
        if self.preset is None:
            return named
        return {**preset_rules(self.preset), **named}


class VerdictRead(BaseModel):
    passed: bool
    step: int | None
    violations: list[Violation]
    evaluated_at: UtcDatetime | None


class GateRulesRead(BaseModel):
    run_id: int
    rules: GateRules = Field(description="what the gate and its alerts apply to this run")
    overrides: dict[str, Any] = Field(description="the rules stored for this run (null: off)")
    defaults: GateRules = Field(description="the server's rules (ALPHAWATCH_GATE__*)")
    updated_at: UtcDatetime | None
    last_verdict: VerdictRead | None = Field(
        description="the verdict recorded after the latest analysis or rule change"
    )


class AlertRead(BaseModel):
    id: int
    step: int | None
    verdict: str = Field(description="pass or fail: the gate's new verdict")
    previous: str | None = Field(description="the verdict before; null for the run's first")
    status: str = Field(
        description="pending, sending, delivered, failed or superseded (never "
        "sent: a newer verdict replaced it, or the verdict came back)"
    )
    attempts: int
    last_status_code: int | None = Field(description="the receiver's last HTTP status")
    last_error: str | None
    created_at: UtcDatetime
    next_attempt_at: UtcDatetime
    finished_at: UtcDatetime | None
    body: dict[str, Any] = Field(description="the JSON body POSTed to the webhook")


class AlertList(BaseModel):
    run_id: int
    alerts: list[AlertRead]


class ComparePoint(BaseModel):
    step: int
    value: float | None
    n_used: int


class CompareRun(BaseModel):
    run_id: int
    name: str
    points: list[ComparePoint]


class HeatmapRead(BaseModel):
    metric: str
    variant: str = "weight"
    steps: list[int]
    layers: list[str] = Field(description="rows: layers by block, then kind")
    blocks: list[int | None] = Field(default_factory=list, description="block of each row")
    z: list[list[float | None]] = Field(description="z[layer][step]; null where not analysed")
    trusted: list[list[bool | None]]


class LayerChange(BaseModel):
    """How much one layer changed between the two steps of a ranking."""

    layer: str
    kind: str | None
    block: int | None
    change_fro: float | None = Field(
        description="‖ΔW‖_F/‖W‖_F; over several steps the sum of each step's (path length)"
    )
    change_spectral: float | None = Field(
        description="‖ΔW‖₂/‖W‖₂; over several steps the sum of each step's"
    )
    subspace_overlap: float | None = Field(
        description="overlap of the top-k singular subspaces (1: same directions); over "
        "several steps the smallest of one step's"
    )
    n_steps: int = Field(description="steps of the interval whose distance was measured")
    complete: bool = Field(
        description="every analysed step of the interval was compared with the one before"
    )
    alpha_from: float | None
    alpha_to: float | None
    delta_alpha: float | None = Field(description="alpha_to - alpha_from")


class DistancesRead(BaseModel):
    """Layer distances between consecutive checkpoints, as layer x step matrices."""

    run_id: int
    steps: list[int]
    layers: list[str] = Field(description="rows: weight layers by block, then kind")
    kinds: list[str | None]
    blocks: list[int | None]
    change_fro: list[list[float | None]] | None = Field(
        description="[layer][step]: ‖W − W_ref‖_F / ‖W‖_F; null where not measured (the whole "
        "matrix null when not asked for: matrices=)"
    )
    change_spectral: list[list[float | None]] | None = Field(
        description="[layer][step]: ‖W − W_ref‖₂ / ‖W‖₂"
    )
    subspace_overlap: list[list[float | None]] | None = Field(
        description="[layer][step]: ‖U_refᵀU‖_F²/k of the top-k singular subspaces, in [0, 1]"
    )
    ref_steps: list[list[int | None]] | None = Field(
        description="[layer][step]: the step compared with (the one before on disk)"
    )
    alpha: list[list[float | None]] | None
    from_step: int | None
    to_step: int | None
    rank_by: str
    ranking: list[LayerChange] = Field(
        description="with from_step: the layers by their change, the most changed first"
    )


class FlagPoint(BaseModel):
    """Layer counts of one analysed checkpoint, by flag and by fit status."""

    step: int
    n_layers: int
    correlation_trap: int
    rank_collapse: int
    near_random: int
    over_trained: int
    under_trained: int
    ok: int
    poor_fit: int
    tail_too_short: int
    unstable: int
    alpha_out_of_range: int
    too_few_evals: int
    non_finite: int
    degenerate: int
    failed: int
    not_power_law: int


class FlagsRead(BaseModel):
    run_id: int
    points: list[FlagPoint]


class CompareRead(BaseModel):
    metric: str
    stat: str
    runs: list[CompareRun]
