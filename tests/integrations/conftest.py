"""A live alphawatch (real uvicorn server, real worker, real PostgreSQL) for the callbacks."""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from alphawatch.service.api import create_app
from alphawatch.service.api.routes import ROUTERS
from alphawatch.service.db.session import make_engine, session_scope
from alphawatch.service.db.tokens import TokenScope, create_token
from alphawatch.settings import Settings
from alphawatch.trust import Thresholds
from alphawatch.workers.watcher import Watcher
from tests.live import serve

# Whether this server can be asked to scan a run now (POST /runs/{id}/scan); without it the
# callbacks' nudge is refused and checkpoints are found at the worker's next poll.
HAS_SCAN_ROUTE = any(
    getattr(r, "path", None) == "/api/v1/runs/{run_id}/scan" and "POST" in getattr(r, "methods", ())
    for api in ROUTERS
    for r in api.routes
)


@pytest.fixture(autouse=True)
def _one_thread(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """One intra-op thread for training here and for the worker's analysis process.

    Two cores shared with the rest of the suite: a tiny model's step takes ~20 ms on one
    thread and ten times longer when two threads fight the other processes for them.
    """
    import torch

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def small_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real small training run (demo_run: checkpoint-10/, checkpoint-20/), on one thread."""
    import torch

    from alphawatch.workers.demo_run import train

    out = tmp_path_factory.mktemp("small-run")
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        train(out, steps=20, save_every=10, seed=0, d_model=64)
    finally:
        torch.set_num_threads(threads)
    return out


@dataclass
class Live:
    """A running server and worker: base URL, a write token, the allowed root, the settings."""

    url: str
    token: str
    root: Path
    settings: Settings
    watcher: Watcher

    def get(self, path: str) -> Any:
        import json
        import urllib.request

        request = urllib.request.Request(f"{self.url}/api/v1{path}")
        with urllib.request.urlopen(request, timeout=10) as response:
            return json.load(response)


def start_live(
    db_url: str,
    root: Path,
    *,
    poll_interval_s: float = 0.3,
    trust: Thresholds | None = None,
    url_roots: tuple[str, ...] = (),
) -> Iterator[Live]:
    """A live server and worker; runs may live under ``root`` and the URL prefixes
    ``url_roots`` (``s3://bucket/team``)."""
    root.mkdir(parents=True, exist_ok=True)
    settings = Settings(
        database_url=db_url,
        allowed_roots=[root, *url_roots],
        device="cpu",
        settle_s=0.0,
        poll_interval_s=poll_interval_s,
        lease_s=60.0,
        heartbeat_s=1.0,
        trust=trust or Thresholds(),
    )
    with session_scope(make_engine(db_url)) as session:
        token = create_token(session, name="trainer", scope=TokenScope.WRITE)
    watcher = Watcher(settings, worker_id="test-worker")
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run_forever, args=(stop,), daemon=True)
    with serve(create_app(settings)) as url:
        thread.start()
        try:
            yield Live(url, token, root, settings, watcher)
        finally:
            stop.set()
            thread.join(timeout=120)


@pytest.fixture
def live(pg_url: str, tmp_path: Path) -> Iterator[Live]:
    """Server and worker over a fresh database; runs may live under ``live.root``."""
    yield from start_live(pg_url, tmp_path / "runs")


@pytest.fixture
def failing_gate(pg_url: str, tmp_path: Path) -> Iterator[Live]:
    """A server whose gate fails every analysed checkpoint: alpha must lie in [50, 60]."""
    yield from start_live(
        pg_url,
        tmp_path / "runs",
        trust=Thresholds(over_trained_below=50.0, under_trained_above=60.0),
    )


def tiny_llama(seed: int = 0) -> Any:
    """A Llama built from a config (nothing downloaded): 2 blocks, width 64."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=160,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=False,
    )
    return LlamaForCausalLM(config)


class Tokens:
    """Random token sequences (a map-style dataset), the same for every run of a seed."""

    def __init__(self, n: int = 512, length: int = 32, seed: int = 0) -> None:
        import torch

        generator = torch.Generator().manual_seed(seed)
        self.data = torch.randint(0, 256, (n, length), generator=generator)

    def __len__(self) -> int:
        return int(self.data.shape[0])

    def __getitem__(self, i: int) -> dict[str, Any]:
        return {"input_ids": self.data[i], "labels": self.data[i]}


def warnings_of(caplog: pytest.LogCaptureFixture) -> list[str]:
    """What the integrations warned about (the callbacks' only way to speak)."""
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "alphawatch.integrations" and r.levelno >= logging.WARNING
    ]


def analysed_steps(live: Live, run_id: int) -> list[int]:
    """Steps of a run's checkpoints the live server serves as analysed."""
    checkpoints = live.get(f"/runs/{run_id}/checkpoints")["checkpoints"]
    return [c["step"] for c in checkpoints if c["status"] == "done"]
