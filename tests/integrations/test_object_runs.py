"""The callbacks register a run that lives in a bucket (``s3://...``) as that URL, live.

A real server and worker, a real PostgreSQL, a real S3 API on 127.0.0.1 (moto's server mode):
Lightning writes its checkpoints straight into the bucket through fsspec; the Hugging Face
Trainer, which writes locally, has its output uploaded the way a sync job would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

pytest.importorskip("moto")
pytest.importorskip("s3fs")
pytest.importorskip("transformers")
pytest.importorskip("lightning")

from lightning.pytorch.callbacks import ModelCheckpoint
from torch.utils.data import DataLoader

from alphawatch.integrations.hf import AlphaWatchCallback as HFCallback
from alphawatch.integrations.lightning import AlphaWatchCallback as LitCallback
from alphawatch.integrations.link import Client, RunLink, run_name_of
from tests.db import rows, wait_until
from tests.integrations.conftest import (
    HAS_SCAN_ROUTE,
    Live,
    Tokens,
    analysed_steps,
    start_live,
    warnings_of,
)
from tests.integrations.test_hf import _trainer
from tests.integrations.test_lightning import TinyLlamaModule, quiet_trainer
from tests.objectstore import SECRET, CountingServer, client_fs, upload


@pytest.fixture
def live_s3(pg_url: str, tmp_path: Path, s3: CountingServer, bucket: str) -> Iterator[Live]:
    """Server and worker that may watch runs under ``s3://<bucket>/team``."""
    yield from start_live(pg_url, tmp_path / "runs", url_roots=(f"s3://{bucket}/team",))


def _bucket_of(live: Live) -> str:
    [root] = live.settings.allowed_url_roots
    return root


def test_lightning_writing_to_a_bucket_registers_the_url_and_every_save_is_analysed(
    live_s3: Live, s3: CountingServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, pg_url: str
) -> None:
    live = live_s3
    caplog.set_level(logging.DEBUG)
    url = f"{_bucket_of(live)}/lit-llama"
    callback = LitCallback(url=live.url, token=live.token)
    checkpoints = ModelCheckpoint(
        dirpath=url, filename="{step}", save_top_k=-1, every_n_train_steps=10,
        save_weights_only=True,
    )  # fmt: skip
    trainer = quiet_trainer(max_steps=30, callbacks=[callback, checkpoints], root=tmp_path)
    trainer.fit(TinyLlamaModule(), DataLoader(Tokens(), batch_size=8))  # type: ignore[arg-type]
    assert trainer.global_step == 30
    # Lightning wrote into the bucket, nothing locally under the URL's mangled path.
    listed = sorted(k.rpartition("/")[2] for k in client_fs(s3).ls(url.removeprefix("s3://")))
    assert listed == ["step=10.ckpt", "step=20.ckpt", "step=30.ckpt"]
    assert not (tmp_path / "s3:").exists()

    run = callback.link.run
    assert run is not None, "the run was not registered"
    # The URL as written: not "s3:/bucket/..." (a Path), not resolved against the cwd.
    assert (run.name, run.path) == ("lit-llama", url)
    assert rows(pg_url, "SELECT name, path FROM run") == [("lit-llama", url)]
    wait_until(
        lambda: analysed_steps(live, run.id) == [10, 20, 30], 120, "steps 10, 20, 30 analysed"
    )
    layers = live.get(f"/runs/{run.id}/checkpoints/30/layers")["layers"]
    assert any(layer["name"].endswith("layers.1.self_attn.q_proj") for layer in layers)
    assert all(layer["alpha"] is not None for layer in layers if layer["name"].endswith("proj"))
    if HAS_SCAN_ROUTE:
        assert warnings_of(caplog) == []
    assert SECRET not in caplog.text


def test_a_trainer_whose_output_dir_is_a_url_registers_that_url(
    live_s3: Live,
    s3: CountingServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    live = live_s3
    caplog.set_level(logging.DEBUG)
    url = f"{_bucket_of(live)}/hf-llama"
    # The Trainer writes output_dir with os.makedirs: "s3://b/..." lands in ./s3:/b/... here,
    # and a sync job uploads it (what such a team runs beside the Trainer).
    monkeypatch.chdir(tmp_path)
    callback = HFCallback(url=live.url, token=live.token)
    trainer = _trainer(url, [callback])  # type: ignore[arg-type]  # output_dir as text
    assert trainer.args.output_dir == url
    trainer.train()
    run = callback.link.run
    assert run is not None and (run.name, run.path) == ("hf-llama", url)

    local = tmp_path / url.replace("s3://", "s3:/")
    assert sorted(p.name for p in local.glob("checkpoint-*")) == [
        "checkpoint-10",
        "checkpoint-20",
        "checkpoint-30",
    ]
    upload(client_fs(s3), local, url)
    wait_until(
        lambda: analysed_steps(live, run.id) == [10, 20, 30], 120, "steps 10, 20, 30 analysed"
    )
    layers = live.get(f"/runs/{run.id}/checkpoints/20/layers")["layers"]
    assert any(layer["name"].endswith("layers.0.mlp.down_proj") for layer in layers)
    assert SECRET not in caplog.text


def test_a_callback_told_to_watch_a_url_registers_it_with_its_own_name(
    live_s3: Live, tmp_path: Path
) -> None:
    live = live_s3
    url = f"{_bucket_of(live)}/named"
    # The HF callback's path= (the bucket a sync job writes to), and a trailing slash.
    callback = HFCallback(url=live.url, token=live.token, path=url + "/")
    trainer = _trainer(tmp_path / "local-out", [callback], steps=10, save_every=10)
    trainer.train()
    run = callback.link.run
    assert run is not None and (run.name, run.path) == ("named", url)
    # A second process of the same run finds the same run, by name, without a warning.
    again = RunLink(url=live.url, token=live.token)
    found = again.start(url)
    assert found is not None and found.id == run.id


def test_a_url_is_never_a_path_and_a_refused_url_costs_one_warning(
    live_s3: Live, caplog: pytest.LogCaptureFixture
) -> None:
    live = live_s3
    caplog.set_level(logging.WARNING, logger="alphawatch.integrations")
    assert run_name_of("s3://bucket/a/b/my-run/") == "my-run"
    assert run_name_of("gs://bucket") == "bucket"
    assert run_name_of(Path("runs/x y")) == "x-y"
    # Outside the server's URL roots: refused (403), one warning, nothing registered.
    link = RunLink(url=live.url, token=live.token)
    bucket = _bucket_of(live).removeprefix("s3://").partition("/")[0]
    assert link.start(f"s3://{bucket}/elsewhere/run") is None
    warnings = warnings_of(caplog)
    assert len(warnings) == 1 and "403" in warnings[0], warnings
    assert live.get("/runs")["runs"] == []
    # A URL carrying credentials is never sent (nor logged): one warning, nothing registered.
    caplog.clear()
    secret_url = f"s3://AKIA:{SECRET}@{bucket}/team/run"
    assert RunLink(url=live.url, token=live.token).start(secret_url) is None
    assert len(warnings_of(caplog)) == 1 and SECRET not in caplog.text
    assert live.get("/runs")["runs"] == []
    # The client sends a URL as written, never as a local path.
    client = Client(live.url, live.token)
    run = client.register(name="direct", path=f"{_bucket_of(live)}/direct")
    assert run.path == f"{_bucket_of(live)}/direct"
