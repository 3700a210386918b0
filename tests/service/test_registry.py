"""The registered runs as the watcher reads them, on real databases."""

from __future__ import annotations

from alphawatch.service.db import registry
from alphawatch.service.db.session import make_engine, session_scope


def test_registered_runs_come_by_id_with_their_folders(db_url: str) -> None:
    engine = make_engine(db_url)
    with engine.connect() as conn:
        assert registry.registered_runs(conn) == []
    with session_scope(engine) as session:
        second = registry.ensure_run(session, name="b", path="/runs/b")
        first = registry.ensure_run(session, name="a", path="/runs/a")
    with engine.connect() as conn:
        assert registry.registered_runs(conn) == [(second, "/runs/b"), (first, "/runs/a")]


def test_the_first_checkpoint_is_the_lowest_step_registered(db_url: str) -> None:
    with session_scope(make_engine(db_url)) as session:
        run = registry.ensure_run(session, name="r", path="/runs/r")
        other = registry.ensure_run(session, name="o", path="/runs/o")
        assert registry.first_checkpoint(session, run_id=run) is None
        for step in (200, 50, 100):
            registry.register_checkpoint(
                session, run_id=run, step=step, path=f"/runs/r/{step}", fingerprint="f", fmt="hf"
            )
        registry.register_checkpoint(
            session, run_id=other, step=1, path="/runs/o/1", fingerprint="f", fmt="hf"
        )
        assert registry.first_checkpoint(session, run_id=run) == "/runs/r/50"
