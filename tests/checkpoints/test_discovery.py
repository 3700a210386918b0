"""Where checkpoints are found, which file holds the weights, and when they count as complete."""

from __future__ import annotations

import json
import os
from fractions import Fraction
from pathlib import Path

import torch
from safetensors.torch import save_file

from alphawatch.workers.checkpoints import discover, iter_layers


def state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "model.layers.0.mlp.up_proj.weight": torch.randn(16, 8, generator=g),
        "model.layers.0.mlp.down_proj.weight": torch.randn(8, 16, generator=g),
        "model.layers.0.input_layernorm.weight": torch.ones(8),
    }


def read(path: Path) -> dict[str, torch.Tensor]:
    return {m.name: m.weight for m in iter_layers(path)}


def test_trainer_files_beside_pytorch_model_bin_are_not_read(tmp_path: Path) -> None:
    folder = tmp_path / "checkpoint-4"
    folder.mkdir()
    weights = state(0)
    torch.save(weights, folder / "pytorch_model.bin")
    # training_args.bin pickles a class: reading it would (rightly) be refused as unsafe.
    torch.save({"args": Fraction(1, 3)}, folder / "training_args.bin")
    torch.save({"state": {0: {"exp_avg": torch.randn(16, 8)}}}, folder / "optimizer.pt")
    torch.save({"cpu_rng_state": torch.zeros(5, dtype=torch.uint8)}, folder / "rng_state.pth")
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": 4}))
    got = read(folder)
    assert set(got) == {"model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"}
    assert torch.equal(
        got["model.layers.0.mlp.up_proj"], weights["model.layers.0.mlp.up_proj.weight"]
    )


def test_sharded_pytorch_bin_with_index(tmp_path: Path) -> None:
    weights = state(1)
    folder = tmp_path / "checkpoint-3"
    folder.mkdir()
    keys = sorted(weights)
    weight_map = {}
    for i, key in enumerate(keys):
        name = f"pytorch_model-0000{i + 1}-of-0000{len(keys)}.bin"
        torch.save({key: weights[key]}, folder / name)
        weight_map[key] = name
    (folder / "trainer_state.json").write_text("{}")
    assert not discover(tmp_path, settle_s=60)[0].complete  # shards without their index
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (ref,) = discover(tmp_path, settle_s=60)
    assert ref.complete, ref.reason
    got = read(folder)
    assert len(got) == 2
    for key in ("model.layers.0.mlp.up_proj", "model.layers.0.mlp.down_proj"):
        assert torch.equal(got[key], weights[key + ".weight"])


def test_lightning_checkpoints_nested_in_the_run(tmp_path: Path) -> None:
    folder = tmp_path / "lightning_logs" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    for step in (50, 100):
        torch.save(
            {
                "state_dict": {f"model.{k}": v for k, v in state(step).items()},
                "global_step": step,
                "epoch": 0,
            },
            folder / f"epoch=0-step={step}.ckpt",
        )
    refs = discover(tmp_path, settle_s=0)
    assert [(r.step, r.format, r.complete) for r in refs] == [
        (50, "lightning", True),
        (100, "lightning", True),
    ]
    got = read(refs[1].path)
    assert torch.equal(
        got["model.model.layers.0.mlp.up_proj"], state(100)["model.layers.0.mlp.up_proj.weight"]
    )


def test_a_single_checkpoint_folder_and_a_final_model_folder(tmp_path: Path) -> None:
    step_folder = tmp_path / "run" / "checkpoint-70"
    step_folder.mkdir(parents=True)
    save_file(state(2), str(step_folder / "model.safetensors"))
    (step_folder / "trainer_state.json").write_text("{}")
    (ref,) = discover(step_folder, settle_s=0)
    assert (ref.path, ref.step, ref.format, ref.complete) == (step_folder, 70, "hf", True)
    final = tmp_path / "final"
    final.mkdir()
    save_file(state(3), str(final / "model.safetensors"))
    (final / "config.json").write_text(json.dumps({"model_type": "llama"}))
    old = os.stat(final / "model.safetensors").st_mtime - 100
    for file in final.iterdir():
        os.utime(file, (old, old))
    (ref,) = discover(final, settle_s=30)
    assert (ref.path, ref.step, ref.complete) == (final, None, True)
    (fresh,) = discover(final, settle_s=30, now=old + 5)
    assert not fresh.complete


def test_dcp_folder_without_metadata_is_not_a_checkpoint_yet(tmp_path: Path) -> None:
    folder = tmp_path / "step_10"
    folder.mkdir()
    (folder / "__0_0.distcp").write_bytes(b"\0" * 64)
    assert discover(tmp_path, settle_s=0) == []
