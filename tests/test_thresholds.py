"""Every trust threshold travels from the settings to the answers: one definition, no fallback.

Each case sets one threshold, runs the real worker over a real checkpoint into PostgreSQL, then
asks the API. The trend must equal the robust statistic of the engine's own verdicts under the
same threshold, must differ from the answer under the default (so the threshold did act), and
must come from the statistics stored at analysis time: the layer rows are deleted before the
API is asked, so a trend that fell back to recomputing from layer rows would find nothing.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load_file, save_file
from sqlalchemy import create_engine, text

from alphawatch.cli import analyze_path
from alphawatch.service import robust
from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from alphawatch.trust import Thresholds
from alphawatch.workers.watcher import Watcher

# (threshold, value, trend query): the value is chosen to change this checkpoint's answer.
TREND_CASES: list[tuple[str, float, dict[str, str]]] = [
    ("alpha_max", 4.0, {"filter": "all"}),
    ("min_evals", 1000, {}),
    ("min_tail", 1000, {"filter": "trusted"}),
    ("max_ks_distance", 0.05, {}),
    ("alpha_min", 3.5, {}),
    ("max_alpha_delta", 100.0, {}),
    ("bootstrap_samples", 0, {}),
    ("rank_loss_fraction", 0.5, {}),
    ("mad_k", 0.5, {"filter": "all", "outliers": "mad"}),
    ("trap_seed", 7, {}),
    # p < 1 whenever the truncated law fits at all better: every ok layer is demoted.
    ("not_power_law_p", 1.0, {}),
]
# Labels that do not select layers: they reach the layer rows and the gate's defaults.
LABEL_CASES: list[tuple[str, float]] = [("over_trained_below", 3.0), ("under_trained_above", 3.5)]


def test_every_threshold_has_a_case() -> None:
    covered = {name for name, _, _ in TREND_CASES} | {name for name, _ in LABEL_CASES}
    assert covered == set(Thresholds.model_fields)


@pytest.fixture(scope="module")
def checkpoint(tiny_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run's last checkpoint, with 20 input columns of one matrix zeroed (rank loss)."""
    run = tmp_path_factory.mktemp("thresholds") / "run"
    shutil.copytree(tiny_run / "checkpoint-30", run / "checkpoint-30")
    weights = run / "checkpoint-30" / "model.safetensors"
    tensors = load_file(weights)
    name = "model.layers.0.mlp.gate_proj.weight"
    collapsed = tensors[name].clone()
    collapsed[:, :20] = 0.0
    tensors[name] = collapsed
    save_file(tensors, weights, metadata={"format": "pt"})
    return run / "checkpoint-30"


def _settings(url: str, **trust: Any) -> Settings:
    return Settings(database_url=url, device="cpu", settle_s=0.0, trust=Thresholds(**trust))


_DEFAULT_LAYERS: dict[Path, list[dict[str, Any]]] = {}


def _layers(checkpoint: Path, settings: Settings) -> list[dict[str, Any]]:
    """The engine's verdicts on ``checkpoint`` (those under the default thresholds kept)."""
    if settings.trust != Thresholds():
        return list(analyze_path(checkpoint, settings)["layers"])
    if checkpoint not in _DEFAULT_LAYERS:
        _DEFAULT_LAYERS[checkpoint] = analyze_path(checkpoint, settings)["layers"]
    return _DEFAULT_LAYERS[checkpoint]


def _expected(checkpoint: Path, settings: Settings, query: dict[str, str]) -> dict[str, Any]:
    layers = _layers(checkpoint, settings)
    chosen = robust.select(
        layers,
        metric="alpha",
        filter=query.get("filter", "trusted"),
        outliers=query.get("outliers", "none"),
        alpha_max=settings.trust.alpha_max,
        mad_k=settings.trust.mad_k,
    )
    return {
        "value": robust.statistic(chosen.values, "median"),
        "n_used": chosen.n_used,
        "excluded": chosen.excluded,
    }


def _analyse_then_drop_layer_rows(checkpoint: Path, settings: Settings) -> None:
    assert Watcher(settings, [checkpoint.parent]).run_once() == 1
    engine = create_engine(settings.database_url)
    with engine.begin() as conn:
        assert conn.execute(text("SELECT count(*) FROM checkpoint_stat")).scalar_one() > 0
        conn.execute(text("DELETE FROM layer_metric"))
    engine.dispose()


@pytest.mark.slow
@pytest.mark.parametrize(("name", "value", "query"), TREND_CASES, ids=[c[0] for c in TREND_CASES])
def test_threshold_reaches_the_stored_trend(
    checkpoint: Path, pg_url: str, name: str, value: float, query: dict[str, str]
) -> None:
    settings = _settings(pg_url, **{name: value})
    expected = _expected(checkpoint, settings, query)
    default = _expected(checkpoint, _settings(pg_url), query)
    assert expected != default, f"{name}={value} does not change this checkpoint's answer"

    _analyse_then_drop_layer_rows(checkpoint, settings)
    with TestClient(create_app(settings)) as client:
        (run,) = client.get("/api/v1/runs").json()["runs"]
        (point,) = client.get(f"/api/v1/runs/{run['id']}/trend", params=query).json()["points"]
        applied = client.get(f"/api/v1/runs/{run['id']}").json()["thresholds"]
    assert applied[name] == value
    assert point["n_used"] == expected["n_used"]
    assert point["excluded"] == expected["excluded"]
    if expected["value"] is None:
        assert point["value"] is None
    else:
        assert point["value"] == pytest.approx(expected["value"], rel=1e-12)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "value"), LABEL_CASES, ids=[c[0] for c in LABEL_CASES])
def test_label_threshold_reaches_layers_and_gate(
    checkpoint: Path, pg_url: str, name: str, value: float
) -> None:
    settings = _settings(pg_url, **{name: value})
    field = "over_trained" if name == "over_trained_below" else "under_trained"
    direct = {layer["name"]: layer[field] for layer in _layers(checkpoint, settings)}
    default = {layer["name"]: layer[field] for layer in _layers(checkpoint, _settings(pg_url))}
    assert direct != default

    assert Watcher(settings, [checkpoint.parent]).run_once() == 1
    with TestClient(create_app(settings)) as client:
        (run,) = client.get("/api/v1/runs").json()["runs"]
        layers = client.get(f"/api/v1/runs/{run['id']}/checkpoints/30/layers").json()["layers"]
        verdict = client.get(f"/api/v1/runs/{run['id']}/gate").json()
    assert {layer["name"]: layer[field] for layer in layers} == direct
    # The gate's default bound on the robust alpha is the label threshold.
    rule = "min_alpha" if name == "over_trained_below" else "max_alpha"
    median = verdict["value"]
    crossed = median < value if rule == "min_alpha" else median > value
    assert crossed == any(v["rule"] == rule for v in verdict["violations"])
    assert any(v["threshold"] == value for v in verdict["violations"]) or not crossed
