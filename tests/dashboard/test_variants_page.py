"""Gradients and nested widths end to end: a real Trainer run of a nested-width Llama, analysed
by a real worker with optimizer state on, shown by the run page in a real browser."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest

from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
from tests.checkpoints.training import trainer_run
from tests.dashboard import test_dashboard as dashboard
from tests.live import serve

# The dashboard tests' browser and page, with their check that the page logs no error.
browser, expected_console, page = dashboard.browser, dashboard.expected_console, dashboard.page
_data, _shot = dashboard._data, dashboard._shot

pytestmark = [pytest.mark.browser, pytest.mark.slow]


@dataclass
class Served:
    url: str
    run_id: int


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    from alphawatch.service.db.migrations import upgrade

    base = tmp_path_factory.mktemp("variants")
    run = base / "runs" / "matformer"
    trainer_run(run, steps=4, save_every=2, nested_widths=[32, 64])
    url = f"sqlite:///{base / 'v.db'}"
    upgrade(url)
    settings = Settings(
        database_url=url,
        device="cpu",
        settle_s=0.0,
        max_attempts=1,
        allowed_roots=[base / "runs"],
        optimizer_state=True,
    )
    watcher = Watcher(settings, [run])
    try:
        assert watcher.run_once() == 2
    finally:
        watcher.close()
    with serve(create_app(settings)) as base_url:
        runs = httpx.get(f"{base_url}/api/v1/runs").json()["runs"]
        yield Served(base_url, runs[0]["id"])


def _api(served: Served, path: str) -> Any:
    response = httpx.get(f"{served.url}/api/v1{path}", timeout=30)
    response.raise_for_status()
    return response.json()


def test_the_worker_stores_gradient_and_nested_rows_beside_the_weights(served: Served) -> None:
    variants = {
        v["name"]: v["n_layers"]
        for v in _api(served, f"/runs/{served.run_id}/variants")["variants"]
    }
    # 16 weight matrices (embeddings, 2 blocks of 7, head), their 16 moments, and gate/up/down
    # of 2 blocks at 2 widths.
    assert variants == {"weight": 16, "exp_avg": 16, "w32": 6, "w64": 6}
    checkpoint = _api(served, f"/runs/{served.run_id}/checkpoints")["checkpoints"][0]
    assert checkpoint["n_layers"] == 16 and checkpoint["status"] == "done"


def test_run_page_shows_variants_side_by_side_and_blocks_last_first(
    page: Any, served: Served
) -> None:
    # Every layer: a tiny model's fits are too short to be trusted.
    page.goto(f"{served.url}/#/runs/{served.run_id}?filter=all")
    page.wait_for_function("() => document.getElementById('variant-trend')?.data?.length === 4")
    lines = {t["name"]: t for t in _data(page, "variant-trend")}
    assert set(lines) == {
        "weights",
        "gradients (Adam exp_avg)",
        "nested width 32",
        "nested width 64",
    }
    for name, variant in (
        ("weights", "weight"),
        ("gradients (Adam exp_avg)", "exp_avg"),
        ("nested width 64", "w64"),
    ):
        trend = _api(served, f"/runs/{served.run_id}/trend?variant={variant}&filter=all")
        assert lines[name]["x"] == [2, 4]
        assert lines[name]["y"] == pytest.approx([p["value"] for p in trend["points"]])
        assert all(isinstance(v, float) for v in lines[name]["y"])
    page.wait_for_function("() => document.getElementById('block-trend')?.dataset.blocks")
    assert page.eval_on_selector("#block-trend", "el => el.dataset.blocks") == "1,0"
    # The heatmap's rows: gradients, last block first.
    page.select_option("#variant-pick", "exp_avg")
    page.wait_for_function(
        "() => (document.getElementById('heatmap')?.data?.[0]?.y || [])"
        ".every((n) => n.endsWith('@exp_avg'))"
    )
    page.select_option("#order-pick", "block_desc")
    page.wait_for_function(
        "() => document.getElementById('heatmap')?.data?.[0]?.y?.[0] === 'lm_head@exp_avg'"
    )
    rows = _data(page, "heatmap")[0]["y"]
    heat = _api(served, f"/runs/{served.run_id}/heatmap?variant=exp_avg&order=block_desc")
    assert rows == heat["layers"]
    assert rows[1] == "model.layers.1.self_attn.q_proj@exp_avg"
    _shot(page, "run-variants")
