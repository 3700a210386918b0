"""A checkpoint's config.json never reaches the network, whatever it says.

With ``--optimizer-state`` the model's skeleton is built from config.json; a ``backbone`` named
``"some/repo"`` (DPT, UperNet) made transformers ask the model hub (``HF_ENDPOINT``) for that
repository's config. Here ``HF_ENDPOINT`` is a real HTTP server on 127.0.0.1 that records every
request, and the analysis runs in a fresh process (the hub reads ``HF_ENDPOINT`` on import):
the server must see nothing, and each checkpoint is analysed or says clearly why its gradients
are not.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from alphawatch.settings import Settings
from alphawatch.workers.checkpoints.skeleton import (
    NetworkRefused,
    SkeletonRefused,
    offline,
    skeleton_config,
)
from alphawatch.workers.watcher import Watcher
from tests.checkpoints.training import trainer_run
from tests.db import rows

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]


@dataclass
class Hub:
    url: str
    requests: list[str] = field(default_factory=list)


@pytest.fixture
def hub() -> Iterator[Hub]:
    """A stand-in model hub that records every request and answers 404."""
    seen: list[str] = []

    class Recorder(BaseHTTPRequestHandler):
        def _record(self) -> None:
            seen.append(f"{self.command} {self.path}")
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_HEAD = do_POST = _record

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield Hub(f"http://127.0.0.1:{server.server_address[1]}", seen)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return trainer_run(tmp_path_factory.mktemp("trainer"))[0]


def _with_config(trained: Path, folder: Path, **changes: Any) -> Path:
    import shutil

    checkpoint = Path(shutil.copytree(trained, folder / trained.name))
    config = json.loads((checkpoint / "config.json").read_text())
    config.update(changes)
    (checkpoint / "config.json").write_text(json.dumps(config))
    return checkpoint


def _hub_env(hub: Hub) -> dict[str, str]:
    env = {
        k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    }
    return {
        **env,
        "HF_ENDPOINT": hub.url,
        "HF_HUB_ETAG_TIMEOUT": "5",
        "HF_HUB_DOWNLOAD_TIMEOUT": "5",
    }


def _analyze(checkpoint: Path, hub: Hub) -> list[dict[str, Any]]:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "alphawatch",
            "analyze",
            str(checkpoint),
            "--optimizer-state",
            "--format",
            "json",
            "--device",
            "cpu",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=180,
        env=_hub_env(hub),
    )
    assert result.returncode == 0, result.stderr
    layers: list[dict[str, Any]] = json.loads(result.stdout)["layers"]
    assert sum("@" not in row["name"] for row in layers) == 16, "the weights are analysed"
    return layers


def _refusal(layers: list[dict[str, Any]]) -> str:
    (refused,) = [row for row in layers if row["name"] == "optimizer_state@exp_avg"]
    assert refused["fit_status"] == "failed"
    return str(refused["error"])


DPT = {
    "architectures": ["DPTForDepthEstimation"],
    "model_type": "dpt",
    "is_hybrid": False,
    "backbone": "some/repo",
    "use_pretrained_backbone": False,
}


def test_a_backbone_named_by_a_hub_repository_is_never_fetched(
    trained: Path, tmp_path: Path, hub: Hub
) -> None:
    checkpoint = _with_config(trained, tmp_path, **DPT)
    message = _refusal(_analyze(checkpoint, hub))
    assert "'some/repo'" in message and "never fetches from the model hub" in message
    assert hub.requests == []


def test_a_described_backbone_is_built_offline(trained: Path, tmp_path: Path, hub: Hub) -> None:
    # UperNet with its backbone described locally, and named as well: built from the
    # description, the name never looked up. The skeleton is no Llama, so the gradients are
    # refused for a layout that does not match, not for the network.
    checkpoint = _with_config(
        trained,
        tmp_path,
        architectures=["UperNetForSemanticSegmentation"],
        model_type="upernet",
        backbone="some/repo",
        use_pretrained_backbone=True,
        hidden_size=16,
        auxiliary_in_channels=32,
        backbone_config={
            "model_type": "convnext",
            "depths": [1, 1, 1, 1],
            "hidden_sizes": [8, 16, 32, 64],
            "out_features": ["stage1", "stage2", "stage3", "stage4"],
        },
    )
    message = _refusal(_analyze(checkpoint, hub))
    assert "no parameter layout matches it exactly" in message
    assert hub.requests == []


def test_auto_map_and_hub_names_are_ignored(trained: Path, tmp_path: Path, hub: Hub) -> None:
    checkpoint = _with_config(
        trained,
        tmp_path,
        _name_or_path="some/repo",
        trust_remote_code=True,
        auto_map={
            "AutoConfig": "some/repo--configuration.Evil",
            "AutoModelForCausalLM": "some/repo--modeling.Evil",
        },
    )
    layers = _analyze(checkpoint, hub)
    assert sum(row["name"].endswith("@exp_avg") for row in layers) == 16
    assert hub.requests == []


def test_the_worker_records_why_and_asks_no_hub(
    trained: Path, tmp_path: Path, hub: Hub, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in _hub_env(hub).items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    checkpoint = _with_config(trained, tmp_path / "runs" / "dpt", **DPT)
    url = f"sqlite:///{tmp_path / 'w.db'}"
    from alphawatch.service.db.migrations import upgrade

    upgrade(url)
    settings = Settings(
        database_url=url, device="cpu", settle_s=0.0, max_attempts=1, optimizer_state=True
    )
    watcher = Watcher(settings, [checkpoint.parent])
    try:
        assert watcher.run_once() == 1
    finally:
        watcher.close()
    assert rows(url, "SELECT status FROM checkpoint") == [("done",)]
    (error,) = rows(url, "SELECT error FROM layer_metric WHERE name = 'optimizer_state@exp_avg'")
    assert "never fetches from the model hub" in str(error[0])
    assert hub.requests == []


@pytest.mark.parametrize(
    "config",
    [
        {"backbone": "timm/resnet50"},
        {"backbone_config": "some/repo"},
        {"vision_config": {"backbone": "hf-hub:some/repo"}},
    ],
)
def test_backbones_that_only_a_hub_could_describe_are_refused(config: dict[str, Any]) -> None:
    with pytest.raises(SkeletonRefused, match="model hub"):
        skeleton_config(config)


def test_names_of_things_to_fetch_or_run_are_dropped_at_every_depth() -> None:
    cleaned = skeleton_config(
        {
            "auto_map": {"AutoModel": "x--y.Z"},
            "_name_or_path": "some/repo",
            "hidden_size": 8,
            "text_config": {"_name_or_path": "other/repo", "trust_remote_code": True, "layers": 2},
            "backbone": "some/repo",
            "use_pretrained_backbone": True,
            "backbone_config": {"model_type": "resnet", "backbone_kwargs": {"pretrained": True}},
        }
    )
    assert cleaned == {
        "hidden_size": 8,
        "text_config": {"layers": 2},
        "use_pretrained_backbone": False,
        "backbone_config": {"model_type": "resnet"},
    }


def test_while_a_skeleton_is_built_its_thread_reaches_no_network(hub: Hub) -> None:
    import socket
    import urllib.error
    import urllib.request

    with offline():
        with pytest.raises(urllib.error.URLError) as refused:
            urllib.request.urlopen(hub.url, timeout=5)
        assert isinstance(refused.value.reason, NetworkRefused)
        with pytest.raises(NetworkRefused):
            socket.getaddrinfo("localhost", 80)
        # Local sockets (the analysis process talks to its worker over one) still work.
        left, right = socket.socketpair()
        with left, right:
            left.sendall(b"x")
            assert right.recv(1) == b"x"
    assert hub.requests == []
    # Outside, and in other threads, the network is untouched.
    with pytest.raises(urllib.error.HTTPError):
        urllib.request.urlopen(hub.url, timeout=5)
    assert hub.requests == ["GET /"]
