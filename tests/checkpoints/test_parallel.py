"""Tensor-parallel shards written here reassemble to the unsharded matrices, exactly."""

from __future__ import annotations

import argparse
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from alphawatch.workers.checkpoints import CheckpointError, discover, iter_layers

HEADS, GROUPS, HEAD_DIM, HIDDEN, FFN, VOCAB = 8, 4, 4, 32, 48, 64


def read(path: Path) -> dict[str, torch.Tensor]:
    return {m.name: m.weight for m in iter_layers(path)}


def megatron_model(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "q": torch.randn(HEADS * HEAD_DIM, HIDDEN, generator=g),
        "k": torch.randn(GROUPS * HEAD_DIM, HIDDEN, generator=g),
        "v": torch.randn(GROUPS * HEAD_DIM, HIDDEN, generator=g),
        "proj": torch.randn(HIDDEN, HEADS * HEAD_DIM, generator=g),
        "gate": torch.randn(FFN, HIDDEN, generator=g),
        "up": torch.randn(FFN, HIDDEN, generator=g),
        "fc2": torch.randn(HIDDEN, FFN, generator=g),
        "embed": torch.randn(VOCAB, HIDDEN, generator=g),
        "output": torch.randn(VOCAB, HIDDEN, generator=g),
    }


def grouped_qkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, groups: range) -> torch.Tensor:
    """Megatron's linear_qkv rows for the given KV groups: [q heads of g; k_g; v_g] per group."""
    per_group = HEADS // GROUPS
    rows = []
    for gi in groups:
        rows.append(q[gi * per_group * HEAD_DIM : (gi + 1) * per_group * HEAD_DIM])
        rows.append(k[gi * HEAD_DIM : (gi + 1) * HEAD_DIM])
        rows.append(v[gi * HEAD_DIM : (gi + 1) * HEAD_DIM])
    return torch.cat(rows)


def write_megatron(run: Path, model: dict[str, torch.Tensor], ranks: int, with_args: bool) -> Path:
    step = run / "iter_0000100"
    p = "decoder.layers.0."
    for r in range(ranks):
        groups = range(r * GROUPS // ranks, (r + 1) * GROUPS // ranks)
        shard = {
            p + "self_attention.linear_qkv.weight": grouped_qkv(
                model["q"], model["k"], model["v"], groups
            ),
            p + "self_attention.linear_qkv._extra_state": io.BytesIO(b"te-fp8-meta"),
            p + "self_attention.linear_proj.weight": model["proj"].chunk(ranks, 1)[r].clone(),
            p + "mlp.linear_fc1.weight": torch.cat(
                [model["gate"].chunk(ranks, 0)[r], model["up"].chunk(ranks, 0)[r]]
            ),
            p + "mlp.linear_fc2.weight": model["fc2"].chunk(ranks, 1)[r].clone(),
            p + "mlp.linear_fc1.layer_norm_weight": torch.ones(HIDDEN),
            "embedding.word_embeddings.weight": model["embed"].chunk(ranks, 0)[r].clone(),
            "output_layer.weight": model["output"].chunk(ranks, 0)[r].clone(),
        }
        state: dict[str, object] = {
            "model": shard,
            "iteration": 100,
            "checkpoint_version": 3.0,
            "rng_state": [{"np_rng_state": np.random.get_state()}],
        }
        if with_args:
            state["args"] = argparse.Namespace(
                num_attention_heads=HEADS,
                group_query_attention=True,
                num_query_groups=GROUPS,
                kv_channels=HEAD_DIM,
                swiglu=True,
                tensor_model_parallel_size=ranks,
            )
        (step / f"mp_rank_{r:02d}").mkdir(parents=True)
        torch.save(state, step / f"mp_rank_{r:02d}" / "model_optim_rng.pt")
    return step


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_megatron_gqa_shards_reassemble_exactly(tmp_path: Path, ranks: int) -> None:
    model = megatron_model(ranks)
    write_megatron(tmp_path, model, ranks, with_args=True)
    assert discover(tmp_path, settle_s=0)[0].complete is False
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("100")
    (ref,) = discover(tmp_path, settle_s=0)
    assert (ref.complete, ref.step, ref.format) == (True, 100, "megatron")
    got = {m.name: m for m in iter_layers(ref)}
    p = "decoder.layers.0."
    want = {
        p + "self_attention.linear_qkv.q": model["q"],
        p + "self_attention.linear_qkv.k": model["k"],
        p + "self_attention.linear_qkv.v": model["v"],
        p + "self_attention.linear_proj": model["proj"],
        p + "mlp.gate_proj": model["gate"],
        p + "mlp.up_proj": model["up"],
        p + "mlp.linear_fc2": model["fc2"],
        "embedding.word_embeddings": model["embed"],
        "output_layer": model["output"],
    }
    assert set(got) == set(want)  # no shard ever comes out as a layer
    for name, tensor in want.items():
        assert torch.equal(got[name].weight, tensor), name
    kinds = {name: (m.kind, m.block) for name, m in got.items()}
    assert kinds[p + "self_attention.linear_qkv.k"] == ("k", 0)
    assert kinds[p + "mlp.gate_proj"] == ("gate", 0)
    assert kinds[p + "self_attention.linear_proj"] == ("o", 0)
    assert kinds["output_layer"][0] == "lm_head"


@pytest.mark.parametrize("ranks", [2, 4])
def test_megatron_without_arguments_keeps_fused_qkv_whole(tmp_path: Path, ranks: int) -> None:
    model = megatron_model(10 + ranks)
    step = write_megatron(tmp_path, model, ranks, with_args=False)
    got = read(step)
    p = "decoder.layers.0."
    # Without head counts the grouped layout cannot be split: analyse the whole, not a guess.
    assert torch.equal(
        got[p + "self_attention.linear_qkv"],
        grouped_qkv(model["q"], model["k"], model["v"], range(GROUPS)),
    )
    # fc1 has twice the rows fc2 has columns: gated, split per rank.
    assert torch.equal(got[p + "mlp.gate_proj"], model["gate"])
    assert torch.equal(got[p + "mlp.up_proj"], model["up"])


def sat_lora_model(seed: int, rank: int = 2) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "qkv": torch.randn(3 * HIDDEN, HIDDEN, generator=g),
        "dense": torch.randn(HIDDEN, HIDDEN, generator=g),
        **{f"qkv_A{j}": torch.randn(rank, HIDDEN, generator=g) for j in range(3)},
        **{f"qkv_B{j}": torch.randn(HIDDEN, rank, generator=g) for j in range(3)},
        "dense_A0": torch.randn(rank, HIDDEN, generator=g),
        "dense_B0": torch.randn(HIDDEN, rank, generator=g),
    }


@pytest.mark.parametrize("ranks", [1, 2, 4])
def test_sat_lora_with_strided_qkv_shards(tmp_path: Path, ranks: int) -> None:
    model = sat_lora_model(ranks)
    step = tmp_path / "1000"
    step.mkdir()
    alpha, r = 4.0, 2
    (tmp_path / "model_config.json").write_text(
        json.dumps({"num_attention_heads": 4, "hidden_size": HIDDEN, "lora_alpha": alpha})
    )
    a = "transformer.layers.0.attention."
    for rk in range(ranks):
        q, k, v = (part.chunk(ranks, 0)[rk] for part in model["qkv"].chunk(3))
        shard = {
            a + "query_key_value.original.weight": torch.cat([q, k, v]),
            a + "query_key_value.original.bias": torch.zeros(3 * HIDDEN // ranks),
            a + "dense.original.weight": model["dense"].chunk(ranks, 1)[rk].clone(),
            a + "dense.matrix_A.0": model["dense_A0"].chunk(ranks, 1)[rk].clone(),
            a + "dense.matrix_B.0": model["dense_B0"],
        }
        for j in range(3):
            shard[a + f"query_key_value.matrix_A.{j}"] = model[f"qkv_A{j}"]
            shard[a + f"query_key_value.matrix_B.{j}"] = model[f"qkv_B{j}"].chunk(ranks, 0)[rk]
        torch.save({"module": shard}, step / f"mp_rank_{rk:02d}_model_states.pt")
    got = {m.name: m for m in iter_layers(step)}
    s = alpha / r
    qkv_updates = [s * model[f"qkv_B{j}"] @ model[f"qkv_A{j}"] for j in range(3)]
    dense_update = s * model["dense_B0"] @ model["dense_A0"]
    merged_qkv = model["qkv"] + torch.cat(qkv_updates)
    assert set(got) == {
        *(a + f"query_key_value.{p}.lora_update" for p in "qkv"),
        a + "dense.lora_update",
        a + "query_key_value.q",
        a + "query_key_value.k",
        a + "query_key_value.v",
        a + "dense",
    }
    for p, update in zip("qkv", qkv_updates, strict=True):
        # One independent (A, B) pair per part: each update is its own rank-r matrix.
        torch.testing.assert_close(got[a + f"query_key_value.{p}.lora_update"].weight, update)
        assert torch.linalg.matrix_rank(got[a + f"query_key_value.{p}.lora_update"].weight) == r
        assert got[a + f"query_key_value.{p}.lora_update"].kind == "lora_update"
    torch.testing.assert_close(got[a + "dense.lora_update"].weight, dense_update)
    torch.testing.assert_close(got[a + "dense"].weight, model["dense"] + dense_update)
    for name, part in zip("qkv", merged_qkv.chunk(3), strict=True):
        torch.testing.assert_close(got[a + f"query_key_value.{name}"].weight, part)
    assert got[a + "dense.lora_update"].kind == "lora_update"
    assert got[a + "query_key_value.k"].kind == "k"


def test_pipeline_parallel_layout_is_refused_not_misread(tmp_path: Path) -> None:
    step = tmp_path / "iter_0000005"
    for pp in range(2):
        folder = step / f"mp_rank_00_{pp:03d}"
        folder.mkdir(parents=True)
        torch.save(
            {"model": {"decoder.layers.0.mlp.linear_fc2.weight": torch.randn(4, 8)}},
            folder / "model_optim_rng.pt",
        )
    with pytest.raises(CheckpointError, match="pipeline-parallel") as info:
        read(step)
    assert "mp_rank_00_000" in str(info.value)
