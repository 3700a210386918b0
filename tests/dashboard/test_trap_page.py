"""The layer drill-down says where a correlation trap sits, and both MP readings of the layer.

A real checkpoint written here (a trap planted on known neurons of one layer, a clean layer
beside it), analysed by the real worker, served, and opened in the browser.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from alphawatch.service.api import create_app
from alphawatch.settings import Settings
from alphawatch.workers.watcher import Watcher
from tests.dashboard import test_dashboard as dashboard
from tests.live import serve
from tests.spectral.test_localise import PLANTED_COLS, PLANTED_ROWS, planted

browser, expected_console, page = dashboard.browser, dashboard.expected_console, dashboard.page

pytestmark = pytest.mark.browser

TRAPPED = "model.layers.0.mlp.up_proj"
CLEAN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def trapped_run(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    from alphawatch.service.db.migrations import upgrade

    base = tmp_path_factory.mktemp("trap")
    run = base / "runs" / "trap"
    run.mkdir(parents=True)
    clean = np.random.default_rng(5).normal(0.0, 0.05, (200, 300))
    save_file(
        {
            f"{TRAPPED}.weight": torch.from_numpy(planted().astype(np.float32)),
            f"{CLEAN}.weight": torch.from_numpy(clean.astype(np.float32)),
        },
        str(run / "model-step100.safetensors"),
    )
    url = f"sqlite:///{base / 'dash.db'}"
    upgrade(url)
    settings = Settings(database_url=url, device="cpu", settle_s=0.0, allowed_roots=[base / "runs"])
    Watcher(settings, [run]).run_once()
    with serve(create_app(settings)) as base_url:
        (listed,) = httpx.get(f"{base_url}/api/v1/runs").json()["runs"]
        yield base_url, int(listed["id"])


def _trap_table(page: Any) -> list[list[str]]:
    rows: list[list[str]] = page.evaluate(
        "() => Array.from(document.querySelectorAll('#layer-trap tbody tr')).map((tr) =>"
        " Array.from(tr.querySelectorAll('td')).map((td) => td.innerText))"
    )
    return rows


def test_the_drill_down_names_the_trapped_neurons(page: Any, trapped_run: tuple[str, int]) -> None:
    url, run_id = trapped_run
    esd = httpx.get(f"{url}/api/v1/runs/{run_id}/checkpoints/100/layers/{TRAPPED}/esd").json()
    assert esd["correlation_trap"] and esd["trap_localisation"]["shape"] == [300, 200]
    page.goto(f"{url}/#/runs/{run_id}?layer={TRAPPED}")
    page.wait_for_function("() => document.querySelectorAll('#layer-trap tbody tr').length > 0")
    rows = _trap_table(page)
    assert len(rows) == len(esd["trap_localisation"]["vectors"])
    sigma, out_neurons, in_neurons = rows[0]
    assert float(sigma) == pytest.approx(esd["trap_localisation"]["vectors"][0]["sigma"], abs=1e-3)

    def shown(cell: str, count: int) -> set[int]:
        # "PR 3.0 of 300: 7 (41%), 42 (32%), ...": the first ``count`` neurons named
        listed = cell.split(":", 1)[1].split(",")
        return {int(item.split("(")[0]) for item in listed[:count]}

    assert shown(out_neurons, len(PLANTED_ROWS)) == set(PLANTED_ROWS)
    assert shown(in_neurons, len(PLANTED_COLS)) == set(PLANTED_COLS)
    assert out_neurons.startswith("PR ") and "of 300" in out_neurons and "of 200" in in_neurons
    fit = page.inner_text("#layer-fit")
    assert "weightwatcher's fit" in fit and "W's entry variance" in fit
    assert "(correlation trap)" in fit
    # a clean layer has no trap table
    page.goto(f"{url}/#/runs/{run_id}?layer={CLEAN}")
    page.wait_for_function(
        f"() => document.getElementById('layer-name')?.textContent === '{CLEAN}'"
        " && document.getElementById('layer-fit')?.innerText.includes('Power law')"
        " && !document.getElementById('layer-fit').innerText.includes('(correlation trap)')"
    )
    assert _trap_table(page) == []
