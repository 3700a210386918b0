"""Export to MLflow (SQLite store), TensorBoard and W&B (offline), read back with each library.

The numbers logged must be the ones the API serves, at the checkpoints' steps, and a second
export must add nothing.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from alphawatch.cli import main
from alphawatch.integrations.export.trackers import (
    offline_runs,
    read_offline,
    wandb_run_id,
)
from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from tests.factories import STEPS, random_run

STATS = ("median", "mean", "trimmed_mean", "p10", "p25", "p75", "p90", "iqr")
LAYER = "model.layers.2.down_proj"


@pytest.fixture
def served(pg_url: str) -> Iterator[dict[str, Any]]:
    """A filled run, and what the API serves for it: trend points and untrusted share by step."""
    written = random_run(pg_url)
    with TestClient(create_app(Settings(database_url=pg_url))) as client:
        run_id = client.get("/api/v1/runs").json()["runs"][0]["id"]
        trend = client.get(f"/api/v1/runs/{run_id}/trend").json()["points"]
        shares = {
            s: client.get(f"/api/v1/runs/{run_id}/gate", params={"step": s}).json()[
                "untrusted_share"
            ]
            for s in STEPS
        }
    layer_alpha = {
        step: next(x["alpha"] for x in layers if x["name"] == LAYER)
        for step, layers in written.items()
    }
    yield {
        "url": pg_url,
        "trend": {p["step"]: p for p in trend},
        "shares": shares,
        "layer": layer_alpha,
    }


def _expected(served: dict[str, Any], key: str) -> dict[int, float]:
    if key == "alphawatch/untrusted_share":
        return dict(served["shares"])
    if key.startswith("alphawatch/layers/"):
        return dict(served["layer"])
    stat = key.rsplit("/", 1)[1]
    return {step: point[stat] for step, point in served["trend"].items()}


def _export(capsys: pytest.CaptureFixture[str], *argv: str) -> str:
    assert main(["export", *argv]) == 0
    return capsys.readouterr().out


def test_mlflow_export_is_read_back_and_never_doubled(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("mlflow")
    from mlflow.tracking import MlflowClient

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    args = [
        "mlflow",
        "--run",
        "run-a",
        "--tracking-uri",
        uri,
        "--db",
        served["url"],
        "--experiment",
        "spectra",
    ]
    first = _export(capsys, *args)
    assert "logged" in first and " 0 new" not in first
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("spectra")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_name for r in runs] == ["run-a"]
    run_id = runs[0].info.run_id

    def history(key: str) -> dict[int, float]:
        points = [(m.step, m.value) for m in client.get_metric_history(run_id, key)]
        assert len(points) == len(dict(points)), f"{key}: a step logged twice"
        return dict(points)

    for key in [*(f"alphawatch/alpha/{s}" for s in STATS), "alphawatch/untrusted_share"]:
        expected = _expected(served, key)
        assert sorted(history(key)) == list(STEPS), key
        assert history(key) == pytest.approx(expected), key
    # Layers only when asked; the second export adds them and nothing else.
    assert history(f"alphawatch/layers/{LAYER}/alpha") == {}
    second = _export(capsys, *args, "--layers")
    assert history(f"alphawatch/layers/{LAYER}/alpha") == pytest.approx(served["layer"])
    n_layers = 28
    assert f"logged {n_layers * len(STEPS)} new values" in second
    third = _export(capsys, *args, "--layers")
    assert "logged 0 new values" in third
    assert len(client.search_runs([experiment.experiment_id])) == 1
    assert history("alphawatch/alpha/median") == pytest.approx(
        _expected(served, "alphawatch/alpha/median")
    )


def _tensorboard(folder: Path) -> dict[str, dict[int, float]]:
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})
    events.Reload()
    scalars = {}
    for tag in events.Tags()["scalars"]:
        points = [(e.step, e.value) for e in events.Scalars(tag)]
        assert len(points) == len(dict(points)), f"{tag}: a step logged twice"
        scalars[tag] = dict(points)
    return scalars


def test_tensorboard_export_is_read_back_and_never_doubled(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "tensorboard",
        "--run",
        "run-a",
        "--logdir",
        str(tmp_path / "tb"),
        "--db",
        served["url"],
        "--layers",
    ]
    _export(capsys, *args)
    scalars = _tensorboard(tmp_path / "tb" / "run-a")
    for key in [
        *(f"alphawatch/alpha/{s}" for s in STATS),
        "alphawatch/untrusted_share",
        f"alphawatch/layers/{LAYER}/alpha",
    ]:
        assert sorted(scalars[key]) == list(STEPS), key
        # Event files keep float32.
        assert scalars[key] == pytest.approx(_expected(served, key), rel=1e-6), key
    assert "logged 0 new values" in _export(capsys, *args)
    assert _tensorboard(tmp_path / "tb" / "run-a") == scalars


@pytest.fixture
def wandb_offline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    pytest.importorskip("wandb")
    for name, sub in (
        ("WANDB_CONFIG_DIR", "config"),
        ("WANDB_CACHE_DIR", "cache"),
        ("WANDB_DATA_DIR", "data"),
    ):
        monkeypatch.setenv(name, str(tmp_path / "wandb-home" / sub))
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    return tmp_path / "wandb-files"


def test_wandb_offline_export_is_read_back_and_never_doubled(
    served: dict[str, Any], wandb_offline: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = [
        "wandb",
        "--run",
        "run-a",
        "--project",
        "spectra",
        "--dir",
        str(wandb_offline),
        "--db",
        served["url"],
    ]
    _export(capsys, *args)
    runs = offline_runs(wandb_offline, wandb_run_id("run-a"))
    assert len(runs) == 1
    logged = read_offline(wandb_offline, wandb_run_id("run-a"))
    assert {k for k in logged if k.startswith("alphawatch/alpha/")} == {
        f"alphawatch/alpha/{s}" for s in STATS
    }
    assert all(steps == set(STEPS) for steps in logged.values())
    values = _wandb_values(runs[0])
    for step in STEPS:
        assert values[step]["alphawatch/alpha/median"] == pytest.approx(
            served["trend"][step]["median"]
        )
        assert values[step]["alphawatch/untrusted_share"] == pytest.approx(served["shares"][step])
    assert "logged 0 new values" in _export(capsys, *args)
    again = read_offline(wandb_offline, wandb_run_id("run-a"))
    assert again == logged
    assert offline_runs(wandb_offline, wandb_run_id("run-a")) == runs  # not even an empty run
    # The layers come on top, in a run of the same id that `wandb sync` appends.
    out = _export(capsys, *args, "--layers")
    assert f"logged {28 * len(STEPS)} new values" in out
    assert read_offline(wandb_offline, wandb_run_id("run-a"))[
        f"alphawatch/layers/{LAYER}/alpha"
    ] == set(STEPS)


def _wandb_values(run_dir: Path) -> dict[int, dict[str, float]]:
    import json

    from wandb.proto import wandb_internal_pb2

    from alphawatch.integrations.export.trackers import wandb_records

    rows: dict[int, dict[str, float]] = {}
    for data in wandb_records(next(run_dir.glob("run-*.wandb"))):
        record = wandb_internal_pb2.Record()  # type: ignore[attr-defined]
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            row = {
                "/".join(i.nested_key) or i.key: json.loads(i.value_json)
                for i in record.history.item
            }
            rows[int(row["alphawatch/step"])] = row
    return rows


def test_the_worker_exports_each_analysed_checkpoint_whatever_a_tracker_does(
    small_run: Path,
    tmp_path: Path,
    pg_url: str,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    run = tmp_path / "runs" / "small"
    shutil.copytree(small_run, run)
    logdir = tmp_path / "tb"
    monkeypatch.setenv("ALPHAWATCH_EXPORT__TENSORBOARD_LOGDIR", str(logdir))
    monkeypatch.setenv("ALPHAWATCH_EXPORT__LAYERS", "true")
    # An MLflow store "inside" a plain file cannot be made: that tracker fails every time.
    (tmp_path / "a-file").write_text("not a folder")
    monkeypatch.setenv(
        "ALPHAWATCH_EXPORT__MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}"
    )
    monkeypatch.setenv("ALPHAWATCH_SETTLE_S", "0")
    caplog.set_level(logging.WARNING, logger="alphawatch.export")
    assert main(["watch", str(run), "--db", pg_url, "--device", "cpu", "--once"]) == 0
    assert "analysed 2 checkpoints" in capsys.readouterr().out
    failures = [r.getMessage() for r in caplog.records if r.name == "alphawatch.export"]
    assert failures and all("to mlflow failed" in m for m in failures), failures

    scalars = _tensorboard(logdir / "small")
    assert sorted(scalars["alphawatch/alpha/median"]) == [10, 20]
    assert sorted(scalars["alphawatch/layers/model.layers.1.mlp.down_proj/alpha"]) == [10, 20]
    with TestClient(create_app(Settings(database_url=pg_url))) as client:
        trend = client.get("/api/v1/runs/1/trend").json()["points"]
        checkpoints = client.get("/api/v1/runs/1/checkpoints").json()["checkpoints"]
    assert [c["status"] for c in checkpoints] == ["done", "done"]
    assert scalars["alphawatch/alpha/median"] == pytest.approx(
        {p["step"]: p["value"] for p in trend}, rel=1e-6
    )


def test_wandb_records_larger_than_a_block_are_read_back(wandb_offline: Path) -> None:
    from alphawatch.integrations.export import WandbTarget

    # ~80 KiB of keys in one history record: it spans three 32 KiB blocks of the run file.
    values = {f"alphawatch/layers/model.layers.{i}.mlp.down_proj/alpha": i / 7 for i in range(1500)}
    target = WandbTarget("spectra", directory=wandb_offline)
    tracker = target.open("big-run")
    tracker.log(7, values)
    tracker.log(9, {"alphawatch/alpha/median": 3.5})
    tracker.close()
    target.shutdown()
    run_file = offline_runs(wandb_offline, wandb_run_id("big-run"))[0] / (
        f"run-{wandb_run_id('big-run')}.wandb"
    )
    assert run_file.stat().st_size > 64 * 1024
    logged = read_offline(wandb_offline, wandb_run_id("big-run"))
    assert logged == {**{key: {7} for key in values}, "alphawatch/alpha/median": {9}}
    row = _wandb_values(run_file.parent)[7]
    assert all(row[k] == pytest.approx(v) for k, v in values.items())


def test_export_of_an_unknown_run_or_to_a_broken_store_is_a_clear_error(
    served: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        main(
            [
                "export",
                "tensorboard",
                "--run",
                "no-such-run",
                "--logdir",
                str(tmp_path / "tb"),
                "--db",
                served["url"],
            ]
        )
        == 2
    )
    assert "no run named 'no-such-run'" in capsys.readouterr().err
    (tmp_path / "a-file").write_text("not a folder")
    assert (
        main(
            [
                "export",
                "mlflow",
                "--run",
                "run-a",
                "--db",
                served["url"],
                "--tracking-uri",
                f"sqlite:///{tmp_path / 'a-file' / 'mlflow.db'}",
            ]
        )
        == 2
    )
    assert "export to mlflow failed" in capsys.readouterr().err
    assert not (tmp_path / "tb").exists()
