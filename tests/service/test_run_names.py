"""A run's name is also a folder (TensorBoard writes under ``<logdir>/<run name>/``): a run
named ``..`` wrote its event files into the logdir's parent. Names of only dots are refused by
the API and never derived by discovery; a run stored with one before still exports under the
logdir."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alphawatch.cli import main
from alphawatch.run_names import folder_name
from alphawatch.service.api import create_app
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import create_token
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
from tests.factories import random_run


@pytest.mark.parametrize("name", [".", "..", "...."])
def test_the_api_refuses_run_names_of_only_dots(name: str, pg_url: str, tmp_path: Path) -> None:
    (tmp_path / "root" / "a-run").mkdir(parents=True)
    with session_scope(make_engine(pg_url)) as session:
        token = create_token(session, name="ci")
    auth = {"Authorization": f"Bearer {token}"}
    settings = Settings(database_url=pg_url, allowed_roots=[tmp_path / "root"])
    with TestClient(create_app(settings)) as client:
        body = {"name": name, "path": str(tmp_path / "root" / "a-run")}
        refused = client.post("/api/v1/runs", json=body, headers=auth)
        assert refused.status_code == 422, refused.text
        assert "only dots" in refused.json()["detail"]
        # Dots inside a name are fine.
        body["name"] = "v1.0..rc"
        assert client.post("/api/v1/runs", json=body, headers=auth).status_code == 201
        assert [r["name"] for r in client.get("/api/v1/runs").json()["runs"]] == ["v1.0..rc"]


def test_discovery_never_names_a_run_after_dots(tmp_path: Path, pg_url: str) -> None:
    import torch
    from safetensors.torch import save_file

    checkpoint = tmp_path / "runs" / "..." / "checkpoint-1"
    checkpoint.mkdir(parents=True)
    save_file(
        {"model.layers.0.mlp.up_proj.weight": torch.randn(48, 32)},
        str(checkpoint / "model.safetensors"),
    )
    (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
    settings = Settings(database_url=pg_url, device="cpu", settle_s=0.0, max_attempts=1)
    watcher = Watcher(settings, [checkpoint.parent])
    try:
        assert watcher.run_once() == 1
    finally:
        watcher.close()
    with TestClient(create_app(settings)) as client:
        (run,) = client.get("/api/v1/runs").json()["runs"]
    assert run["name"] == "run" and run["path"] == str(checkpoint.parent)


@pytest.mark.parametrize("name", ["..", "."])
def test_a_stored_run_named_by_dots_exports_inside_the_logdir(
    name: str, pg_url: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    pytest.importorskip("tensorboard")
    random_run(pg_url, name=name)  # stored as it was before names were checked
    logdir = tmp_path / "export" / "tb"
    args = ["export", "tensorboard", "--run", name, "--logdir", str(logdir), "--db", pg_url]
    assert main(args) == 0
    assert "logged" in capsys.readouterr().out
    folder = logdir / folder_name(name)
    assert folder.name.startswith("run-")
    events = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("events.out.tfevents.*"))
    assert events and all(p.parent == folder.relative_to(tmp_path) for p in events)
    # A second export finds the same folder and adds nothing.
    assert main(args) == 0
    assert "logged 0 new values" in capsys.readouterr().out
    assert len(list(folder.glob("events.out.tfevents.*"))) >= 1
    assert {p.name for p in (tmp_path / "export").iterdir()} == {"tb"}


@pytest.mark.parametrize(
    ("name", "kept"),
    [
        ("run-a", True),
        ("v1.0..rc", True),
        ("..", False),
        (".", False),
        ("", False),
        ("a/../../b", False),
        ("a\\b", False),
        ("x" * 300, False),
    ],
)
def test_folder_names_are_one_component_under_the_logdir(name: str, kept: bool) -> None:
    folder = folder_name(name)
    assert (folder == name) is kept
    assert "/" not in folder and folder.strip(".") and len(folder) <= 255
    assert folder == folder_name(name)  # stable: a second export finds the first's folder
