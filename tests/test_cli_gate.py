"""`alphawatch gate` finds a run by name on any page of GET /runs, with the callbacks' client."""

from __future__ import annotations

import json

import pytest
from sqlalchemy import insert, select

from alphawatch.cli import main
from alphawatch.integrations.link import Client
from alphawatch.service.api import create_app
from alphawatch.service.db.models import Run
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.settings import Settings
from tests.live import serve

# More than the API's largest page (GET /runs?limit=1000).
RUNS = 1050


@pytest.mark.slow
def test_gate_finds_a_run_past_the_first_page(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with session_scope(make_engine(pg_url)) as session:
        session.execute(
            insert(Run),
            [{"name": f"run-{i:04d}", "path": f"/runs/run-{i:04d}"} for i in range(RUNS)],
        )
    with session_scope(make_engine(pg_url)) as session:
        last = session.scalar(select(Run.id).where(Run.name == f"run-{RUNS - 1:04d}"))
    with serve(create_app(Settings(database_url=pg_url, api_cache_mb=0))) as url:
        capsys.readouterr()
        # Found: the gate answers for that run (nothing analysed yet: it fails, exit 1, not 2).
        assert main(["gate", "--url", url, "--run", f"run-{RUNS - 1:04d}"]) == 1
        verdict = json.loads(capsys.readouterr().out)
        assert verdict["run_id"] == last
        assert [v["rule"] for v in verdict["violations"]] == ["no_data"]
        assert main(["gate", "--url", url, "--run", "run-missing"]) == 2
        assert "no run named 'run-missing'" in capsys.readouterr().err
        # Small pages read every page too, and stop when the runs are all seen.
        client = Client(url)
        found = client.find(f"run-{RUNS - 1:04d}", page=400)
        assert found is not None and found.id == last
        assert client.find("run-missing", page=400) is None
