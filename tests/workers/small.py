"""Small real checkpoints, quick to analyse: a few Gaussian matrices in HF Trainer layout."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

MATRICES = (
    "model.layers.0.mlp.up_proj",
    "model.layers.0.mlp.down_proj",
    "model.layers.0.self_attn.q_proj",
)


def write_checkpoint(run: Path, step: int, *, seed: int) -> Path:
    """``run/checkpoint-<step>/`` with ``model.safetensors`` (the :data:`MATRICES`, 64 x 48,
    float32) and ``trainer_state.json``, which marks it complete."""
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {f"{name}.weight": torch.randn(64, 48, generator=generator) for name in MATRICES},
        str(folder / "model.safetensors"),
    )
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def write_busy_checkpoint(run: Path, step: int, *, seed: int, matrices: int = 10) -> Path:
    """``run/checkpoint-<step>/`` with ``matrices`` Gaussian 512 x 384 MLP matrices: about a
    second of analysis on a CPU, so that a signal sent while it is claimed lands mid-analysis."""
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    save_file(
        {
            f"model.layers.{i}.mlp.up_proj.weight": torch.randn(512, 384, generator=generator)
            for i in range(matrices)
        },
        str(folder / "model.safetensors"),
    )
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder
