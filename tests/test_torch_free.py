"""safetensors checkpoints are read and analysed without importing torch, with the same numbers.

Each side runs in its own process, so ``sys.modules`` says what that process imported: the
``analyze`` command under ``-X importtime`` and the worker's analysis child (``workers.budget``
serving its socket). The same matrices saved as a torch pickle go through torch tensors, the
path torch-free reading replaced: both must give the same rows, bit for bit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from alphawatch.cli import analyze_path
from alphawatch.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
VARIES = {"elapsed_ms"}  # wall time of each matrix


def _state() -> dict[str, torch.Tensor]:
    """A small Llama block: bfloat16, float32, and float8 with a block-wise inverse scale."""
    g = torch.Generator().manual_seed(7)
    state = {
        "model.layers.0.self_attn.q_proj.weight": torch.randn(96, 96, generator=g).bfloat16(),
        "model.layers.0.self_attn.qkv_proj.weight": torch.randn(288, 96, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(96, 160, generator=g).bfloat16(),
        "model.layers.0.mlp.up_proj.weight": (torch.randn(160, 96, generator=g) * 4).to(
            torch.float8_e4m3fn
        ),
        "model.layers.0.mlp.up_proj.weight_scale_inv": torch.tensor([[0.5, 0.25], [2.0, 1.0]]),
        "model.layers.0.input_layernorm.weight": torch.ones(96),
    }
    state["model.layers.0.mlp.gate_proj.weight"] = torch.randn(160, 96, generator=g)
    return state


@pytest.fixture
def checkpoints(tmp_path: Path) -> tuple[Path, Path]:
    """The same state as ``model.safetensors`` and as ``pytorch_model.bin``, in two folders."""
    state = _state()
    config = json.dumps(
        {
            "model_type": "llama",
            "num_attention_heads": 4,
            "num_key_value_heads": 4,
            "hidden_size": 96,
        }
    )
    fast, slow = tmp_path / "safetensors", tmp_path / "pickle"
    for folder in (fast, slow):
        folder.mkdir()
        (folder / "config.json").write_text(config)
    save_file(state, str(fast / "model.safetensors"))
    torch.save(state, slow / "pytorch_model.bin")
    return fast, slow


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT)}


def _imported(importtime: str) -> set[str]:
    """Module names from ``-X importtime``'s stderr lines (``import time: a | b | name``)."""
    return {
        line.rsplit("|", 1)[1].strip()
        for line in importtime.splitlines()
        if line.startswith("import time:") and line.count("|") == 2
    }


def _same(got: Any, want: Any) -> bool:
    """Equal as JSON writes them: NaN equals NaN, floats to the last bit."""
    return json.dumps(got, sort_keys=True, default=str) == json.dumps(
        want, sort_keys=True, default=str
    )


def _rows(layers: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {row["name"]: {k: v for k, v in row.items() if k not in VARIES} for row in layers}


def test_analyze_command_never_imports_torch_and_matches_the_torch_path(
    checkpoints: tuple[Path, Path],
) -> None:
    fast, slow = checkpoints
    done = subprocess.run(
        [
            sys.executable,
            "-X",
            "importtime",
            "-m",
            "alphawatch.cli",
            "analyze",
            str(fast / "model.safetensors"),
            "--device",
            "cpu",
            "--format",
            "json",
        ],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    imported = _imported(done.stderr)
    assert "numpy" in imported and "alphawatch.workers.spectral.analysis" in imported
    assert not {m for m in imported if m == "torch" or m.startswith("torch.")}
    doc = json.loads(done.stdout)
    # The same matrices through torch tensors (the pickle), in this process.
    want = analyze_path(slow / "pytorch_model.bin", Settings(device="cpu"))
    got_rows, want_rows = _rows(doc["layers"]), _rows(want["layers"])
    assert (
        set(got_rows)
        == set(want_rows)
        == {
            "model.layers.0.self_attn.q_proj",
            "model.layers.0.self_attn.qkv_proj.q",
            "model.layers.0.self_attn.qkv_proj.k",
            "model.layers.0.self_attn.qkv_proj.v",
            "model.layers.0.mlp.down_proj",
            "model.layers.0.mlp.up_proj",
            "model.layers.0.mlp.gate_proj",
        }
    )
    for name, row in got_rows.items():
        assert _same(row, want_rows[name]), name
    assert got_rows["model.layers.0.mlp.up_proj"]["dtype"] == "float8_e4m3fn"
    assert got_rows["model.layers.0.self_attn.q_proj"]["dtype"] == "bfloat16"
    assert _same(doc["summary"], want["summary"])
    assert doc["device"] == want["device"] == "cpu"


_CHILD = """
import json, socket, sys, threading
from multiprocessing.connection import Connection
from pathlib import Path
from alphawatch.settings import Settings
from alphawatch.workers import budget
from alphawatch.workers.analyst import Analysis, AnalysisOptions
from alphawatch.workers.checkpoints import UNCONFINED

ours, theirs = socket.socketpair()
conn = Connection(ours.detach())
child = threading.Thread(target=budget.serve, args=(Connection(theirs.detach()),))
child.start()
conn.send(AnalysisOptions.from_settings(Settings(device="cpu"), confine=UNCONFINED))
assert isinstance(conn.recv(), budget.ChildReady)
conn.send(budget.AnalyseRequest(Path(sys.argv[1]), None))
reply = conn.recv()
conn.close()
child.join()
assert isinstance(reply, Analysis), reply
layers = [{**x.result.metrics(), "name": x.name, "kind": x.kind, "block": x.block,
           "dtype": x.dtype, "distance_from_init": x.distance_from_init} for x in reply.layers]
spectra = [{"name": x.name, "evals": x.evals.hex(), "rand_evals": x.rand_evals.hex()}
           for x in reply.layers]
print(json.dumps({"torch": "torch" in sys.modules, "layers": layers, "spectra": spectra},
                 default=str))
"""


def _child(path: Path) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(path)],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        check=True,
        timeout=300,
    )
    out: dict[str, Any] = json.loads(done.stdout.splitlines()[-1])
    return out


@pytest.mark.slow
def test_analysis_child_reads_safetensors_without_torch(checkpoints: tuple[Path, Path]) -> None:
    fast, slow = checkpoints
    got, want = _child(fast), _child(slow)
    assert got["torch"] is False
    assert want["torch"] is True  # the pickle needs torch: the check can see it
    assert len(got["layers"]) == len(want["layers"]) == 7
    got_rows, want_rows = _rows(got["layers"]), _rows(want["layers"])
    for name, row in got_rows.items():
        assert _same(row, want_rows[name]), name
    # Files keep their own tensor order (safetensors sorts its keys): compared by name.
    assert _same({s["name"]: s for s in got["spectra"]}, {s["name"]: s for s in want["spectra"]})


def test_auto_device_asks_torch_only_where_a_gpu_may_be() -> None:
    probe = (
        "import sys; from alphawatch.workers.spectral import resolve_device; "
        "print(resolve_device('auto'), 'torch' in sys.modules)"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe],
        capture_output=True,
        text=True,
        env=_env(),
        cwd=ROOT,
        check=True,
        timeout=120,
    )
    device, imported = done.stdout.split()
    assert device == ("cuda" if torch.cuda.is_available() else "cpu")
    nodes = Path("/dev/kfd").exists() or any(Path("/dev").glob("nvidia[0-9]*"))
    if sys.platform.startswith("linux") and not nodes:
        assert imported == "False"
    else:
        assert imported == "True"
