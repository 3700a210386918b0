"""weightwatcher itself at run time: the live cross-check and ``analyze --engine weightwatcher``.

The worker (its real analysis child) re-analyses a share of layers with weightwatcher 0.7.7,
stores the relative alpha difference, and the API's run detail reports it.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from alphawatch.service.api import create_app
from alphawatch.settings import CrossCheck, Settings
from alphawatch.workers.spectral import crosscheck
from alphawatch.workers.watcher import Watcher
from tests.db import rows

ROOT = Path(__file__).resolve().parents[2]


def test_choice_is_stable_and_near_the_share() -> None:
    keys = [f"checkpoint-{s}/model.layers.{i}.mlp.up_proj" for s in range(10) for i in range(100)]
    picked = [k for k in keys if crosscheck.chosen(k, 0.1)]
    assert 60 <= len(picked) <= 140
    assert picked == [k for k in keys if crosscheck.chosen(k, 0.1)]
    assert not any(crosscheck.chosen(k, 0.0) for k in keys)
    assert all(crosscheck.chosen(k, 1.0) for k in keys)


def test_unavailable_says_why() -> None:
    assert "no option" in (crosscheck.unavailable("ks2") or "")
    if importlib.util.find_spec("weightwatcher") is None:
        assert "install alphawatch[crosscheck]" in (crosscheck.unavailable("ww") or "")
        return
    assert crosscheck.unavailable("ww") is None  # installed with the dev extra
    # The dev environment has powerlaw 2: weightwatcher's fix_fingers cannot run with it.
    assert "powerlaw 1.x" in (crosscheck.unavailable("xmin_peak") or "")


@pytest.mark.slow
def test_worker_cross_checks_a_share_and_the_api_reports_it(
    tiny_run: Path, db_url: str, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(tiny_run / "checkpoint-30", run / "checkpoint-30")
    settings = Settings(
        database_url=db_url, device="cpu", settle_s=0.0, crosscheck=CrossCheck(share=0.5)
    )
    assert Watcher(settings, [run]).run_once() == 1
    found = rows(db_url, "SELECT name, alpha, crosscheck_diff FROM layer_metric ORDER BY name")
    checked = [r for r in found if r[2] is not None]
    expected = [r for r in found if crosscheck.chosen(f"checkpoint-30/{r[0]}", 0.5)]
    assert 0 < len(checked) == len(expected) < len(found)
    assert max(r[2] for r in checked) < 1e-3  # the ww method is weightwatcher's fit
    with TestClient(create_app(settings)) as client:
        (listed,) = client.get("/api/v1/runs").json()["runs"]
        report = client.get(f"/api/v1/runs/{listed['id']}").json()["crosscheck"]
    assert report["layers"] == len(checked)
    assert report["max_diff"] == pytest.approx(max(r[2] for r in checked))
    assert report["over_tolerance"] == 0 and report["tolerance"] == 1e-3
    assert report["share"] == 0.5


def _analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "alphawatch", "analyze", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
    )


def test_engine_weightwatcher_gives_the_same_document(tiny_run: Path) -> None:
    ckpt = str(tiny_run / "checkpoint-20")
    ours = _analyze(ckpt, "--format", "json", "--device", "cpu")
    theirs = _analyze(ckpt, "--format", "json", "--device", "cpu", "--engine", "weightwatcher")
    assert ours.returncode == 0 and theirs.returncode == 0, theirs.stderr
    a, b = json.loads(ours.stdout), json.loads(theirs.stdout)  # stdout is JSON only
    assert a["engine"] == "alphawatch" and b["engine"] == "weightwatcher"
    assert a["step"] == b["step"] == 20 and set(a["summary"]) == set(b["summary"])
    by_name = {x["name"]: x for x in a["layers"]}
    assert [x["name"] for x in b["layers"]] == [x["name"] for x in a["layers"]]
    for layer in b["layers"]:
        mine = by_name[layer["name"]]
        assert {
            "name",
            "shape",
            "alpha",
            "D",
            "xmin",
            "num_pl_spikes",
            "fit_status",
            "trusted",
            "method",
        } <= set(layer)
        if mine["alpha"] is not None and layer.get("alpha") is not None:
            assert layer["alpha"] == pytest.approx(mine["alpha"], rel=1e-3)
            assert layer["num_pl_spikes"] == mine["num_pl_spikes"]


def test_engine_weightwatcher_refuses_methods_it_lacks(tiny_run: Path) -> None:
    result = _analyze(
        str(tiny_run / "checkpoint-20"), "--engine", "weightwatcher", "--method", "ks2"
    )
    assert result.returncode == 2
    assert "no option equal to fit method 'ks2'" in result.stderr
