"""Real checkpoint files written here, read back as the matrices of the model they came from."""

from __future__ import annotations

import argparse
import json
import os
import pickle
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from alphawatch.workers.checkpoints import (
    CheckpointError,
    CheckpointVanished,
    UnsafeCheckpointError,
    discover,
    iter_layers,
)
from alphawatch.workers.checkpoints.naming import classify


def tiny_state(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {"model.embed_tokens.weight": torch.randn(100, 32, generator=g)}
    for i in range(2):
        p = f"model.layers.{i}."
        for name, shape in (
            ("self_attn.q_proj", (32, 32)),
            ("self_attn.k_proj", (32, 32)),
            ("self_attn.v_proj", (32, 32)),
            ("self_attn.o_proj", (32, 32)),
            ("mlp.gate_proj", (64, 32)),
            ("mlp.up_proj", (64, 32)),
            ("mlp.down_proj", (32, 64)),
        ):
            state[p + name + ".weight"] = torch.randn(*shape, generator=g)
        state[p + "input_layernorm.weight"] = torch.ones(32)
    state["model.norm.weight"] = torch.ones(32)
    state["lm_head.weight"] = torch.randn(100, 32, generator=g)
    return {k: v.to(dtype) for k, v in state.items()}


def matrices(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.removesuffix(".weight"): v.float() for k, v in state.items() if v.dim() == 2}


def read(path: Path) -> dict[str, torch.Tensor]:
    # safetensors are read as numpy arrays, pickles as tensors: compared as tensors here.
    return {m.name: torch.as_tensor(m.weight) for m in iter_layers(path)}


def hf_checkpoint(run: Path, step: int, state: dict[str, torch.Tensor]) -> Path:
    folder = run / f"checkpoint-{step}"
    folder.mkdir(parents=True)
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": step}))
    return folder


def assert_same(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, tensor in want.items():
        assert torch.equal(got[name], tensor), name


def test_hf_safetensors_bf16_roundtrip(tmp_path: Path) -> None:
    state = tiny_state(dtype=torch.bfloat16)
    folder = hf_checkpoint(tmp_path, 10, state)
    layers = list(iter_layers(folder))
    assert {m.stored_dtype for m in layers} == {"bfloat16"}  # a name: read without torch
    assert all(isinstance(m.weight, np.ndarray) and m.weight.dtype == np.float32 for m in layers)
    assert_same(read(folder), matrices(state))
    q = next(m for m in layers if m.name == "model.layers.1.self_attn.q_proj")
    assert (q.kind, q.block) == ("q", 1)


def test_sharded_safetensors_with_index(tmp_path: Path) -> None:
    state = tiny_state()
    folder = tmp_path / "checkpoint-5"
    folder.mkdir()
    keys = sorted(state)
    shards = {
        "model-00001-of-00002.safetensors": keys[: len(keys) // 2],
        "model-00002-of-00002.safetensors": keys[len(keys) // 2 :],
    }
    weight_map = {}
    for name, part in shards.items():
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (folder / "trainer_state.json").write_text("{}")
    assert_same(read(folder), matrices(state))
    (ref,) = discover(tmp_path, settle_s=0)
    assert ref.complete and ref.step == 5


def test_pytorch_bin_lightning_and_plain_files(tmp_path: Path) -> None:
    state = tiny_state(1)
    folder = tmp_path / "checkpoint-7"
    folder.mkdir()
    torch.save(state, folder / "pytorch_model.bin")
    (folder / "trainer_state.json").write_text("{}")
    assert_same(read(folder), matrices(state))
    ckpt = tmp_path / "epoch=0-step=20.ckpt"
    torch.save({"state_dict": state, "global_step": 20}, ckpt)
    assert_same(read(ckpt), matrices(state))
    plain = tmp_path / "model_step_30.safetensors"
    save_file(state, str(plain))
    refs = {r.step: r for r in discover(tmp_path, settle_s=0)}
    assert set(refs) == {7, 20, 30}
    assert refs[20].format == "lightning"


def test_transformers_gpt2_conv1d_and_fused_qkv(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=64)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "gpt2")
    got = read(tmp_path / "gpt2")
    c_attn = model.transformer.h[0].attn.c_attn.weight.detach().T  # Conv1D stores (in, out)
    q, k, v = c_attn.chunk(3, dim=0)
    assert torch.equal(got["transformer.h.0.attn.c_attn.k"], k)
    assert torch.equal(got["transformer.h.0.attn.c_attn.q"], q)
    assert torch.equal(got["transformer.h.0.attn.c_attn.v"], v)
    assert torch.equal(got["transformer.h.0.mlp.c_fc"], model.transformer.h[0].mlp.c_fc.weight.T)
    assert classify("transformer.h.0.attn.c_attn.k") == ("k", 0)
    assert classify("transformer.h.1.mlp.c_proj") == ("fc_out", 1)
    # lm_head is tied to wte in GPT-2: analysed once.
    assert "lm_head" not in got and "transformer.wte" in got


def test_transformers_llama_save_pretrained(tmp_path: Path) -> None:
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        vocab_size=100,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(tmp_path / "llama")
    want = {k.removesuffix(".weight"): v for k, v in model.state_dict().items() if v.dim() == 2}
    assert_same(read(tmp_path / "llama"), want)


def test_incomplete_checkpoints_are_not_analysed(tmp_path: Path) -> None:
    state = tiny_state()
    folder = hf_checkpoint(tmp_path, 10, state)
    (tmp_path / "tmp-checkpoint-20").mkdir()
    save_file(state, str(tmp_path / "tmp-checkpoint-20" / "model.safetensors"))
    writing = tmp_path / "checkpoint-30"
    writing.mkdir()
    save_file(state, str(writing / "model.safetensors"))  # trainer_state.json not yet
    truncated = hf_checkpoint(tmp_path, 40, state)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    missing_index = tmp_path / "checkpoint-50"
    missing_index.mkdir()
    save_file(state, str(missing_index / "model-00001-of-00002.safetensors"))
    (missing_index / "trainer_state.json").write_text("{}")
    refs = {r.step: r for r in discover(tmp_path, settle_s=60)}
    assert 20 not in refs
    assert refs[10].complete
    assert not refs[30].complete and not refs[40].complete and not refs[50].complete
    assert "incomplete" in refs[40].reason or "truncated" in refs[40].reason
    assert folder.exists()


def test_unsafe_pickle_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (os.system, (f"touch {marker}",))

    path = tmp_path / "model_step_1.pt"
    torch.save({"model.layers.0.q_proj.weight": Exploit()}, path)
    # Megatron's argparse.Namespace is allowed as data; code hidden inside it still is not.
    nested = tmp_path / "iter_step_3.pt"
    torch.save({"model": {}, "args": argparse.Namespace(hook=Exploit())}, nested)
    legacy = tmp_path / "legacy_step_2.pt"
    with legacy.open("wb") as handle:
        pickle.dump({"model.layers.0.q_proj.weight": Exploit()}, handle, protocol=2)
    for bad in (path, legacy, nested):
        with pytest.raises(UnsafeCheckpointError, match="refused"):
            list(iter_layers(bad))
    time.sleep(0.1)
    assert not marker.exists()


def test_bad_files_give_clear_errors_naming_the_file(tmp_path: Path) -> None:
    empty = tmp_path / "empty_step_1.safetensors"
    empty.write_bytes(b"")
    magic = tmp_path / "magic_step_2.pt"
    magic.write_bytes(b"this is not a checkpoint at all")
    nothing = tmp_path / "checkpoint-3"
    nothing.mkdir()
    (nothing / "notes.txt").write_text("no weights")
    for path in (empty, magic, nothing):
        with pytest.raises(CheckpointError) as info:
            list(iter_layers(path))
        assert str(path) in str(info.value)


def test_nan_weights_pass_through_for_the_engine_to_flag(tmp_path: Path) -> None:
    state = tiny_state()
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    folder = hf_checkpoint(tmp_path, 1, state)
    got = read(folder)
    assert torch.isnan(got["model.layers.0.mlp.up_proj"]).any()


def test_checkpoint_deleted_mid_read_is_vanished(tmp_path: Path) -> None:
    state = tiny_state()
    folder = tmp_path / "checkpoint-9"
    folder.mkdir()
    keys = sorted(state)
    weight_map = {}
    for i, part in enumerate((keys[:8], keys[8:])):
        name = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({k: state[k] for k in part}, str(folder / name))
        weight_map.update(dict.fromkeys(part, name))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    stream = iter_layers(folder)
    next(stream)
    shutil.rmtree(folder)  # save_total_limit rotation
    with pytest.raises(CheckpointVanished):
        list(stream)


def test_torch_distributed_checkpoint(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dcp

    state = tiny_state(2)
    folder = tmp_path / "step_40"
    with pytest.warns(UserWarning, match="torch.distributed"):
        dcp.save({"model": state}, checkpoint_id=str(folder), no_dist=True)
    (ref,) = discover(tmp_path, settle_s=0)
    assert (ref.format, ref.step, ref.complete) == ("dcp", 40, True)
    got = read(folder)
    want = {f"model.{k}": v for k, v in matrices(state).items()}
    assert_same(got, want)


def test_deepspeed_global_step_with_two_ranks(tmp_path: Path) -> None:
    state = tiny_state(3)
    step = tmp_path / "global_step12"
    step.mkdir()
    for r in range(2):
        shard = {}
        for key, value in state.items():
            if value.dim() != 2:
                continue
            kind, _ = classify(key.removesuffix(".weight"))
            dim = 1 if kind in ("o", "down") else 0
            shard[key] = value.chunk(2, dim=dim)[r].clone()
        torch.save({"module": shard}, step / f"mp_rank_{r:02d}_model_states.pt")
    assert not discover(tmp_path, settle_s=0)[0].complete
    (tmp_path / "latest").write_text("global_step12")
    (ref,) = discover(tmp_path, settle_s=0)
    assert (ref.format, ref.step, ref.complete) == ("deepspeed", 12, True)
    assert_same(read(step), matrices(state))


def test_fp8_weights_are_scaled_back(tmp_path: Path) -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 32, generator=g)
    scale = weight.abs().max() / 448.0
    stored = (weight / scale).to(torch.float8_e4m3fn)
    path = tmp_path / "model_step_3.safetensors"
    save_file(
        {
            "model.layers.0.mlp.up_proj.weight": stored,
            "model.layers.0.mlp.up_proj.weight_scale_inv": scale.reshape(1),
        },
        str(path),
    )
    (layer,) = list(iter_layers(path))
    assert layer.stored_dtype == "float8_e4m3fn"
    got = torch.as_tensor(layer.weight)
    assert torch.equal(got, stored.float() * scale)
    assert torch.allclose(got, weight, rtol=0.07, atol=0.02)


@pytest.mark.parametrize("dtype", ["float8_e4m3fnuz", "float8_e5m2fnuz"])
def test_amd_fp8_weights_are_read_and_scaled_back(tmp_path: Path, dtype: str) -> None:
    """ROCm's fnuz float8 formats (torch pickles) are float weights like the OCP ones: read,
    scaled back by their inverse scale, with their own dtype kept for the rank tolerance."""
    fp8 = getattr(torch, dtype, None)
    if fp8 is None:
        pytest.skip(f"this torch has no {dtype}")
    weight = torch.randn(64, 32, generator=torch.Generator().manual_seed(2))
    scale = weight.abs().max() / 57.0
    stored = (weight / scale).to(fp8)
    path = tmp_path / "model_step_5.pt"
    torch.save(
        {
            "model.layers.0.mlp.up_proj.weight": stored,
            "model.layers.0.mlp.up_proj.weight_scale_inv": scale.reshape(1),
        },
        path,
    )
    (layer,) = list(iter_layers(path))
    assert str(layer.stored_dtype).removeprefix("torch.") == dtype
    assert torch.equal(torch.as_tensor(layer.weight), stored.float() * scale)


@pytest.mark.parametrize("per", ["tensor", "row", "flat row"])
def test_compressed_tensors_fp8_weight_scales_are_applied(tmp_path: Path, per: str) -> None:
    """vLLM's FP8 checkpoints (compressed-tensors) store ``<weight>_scale``, one per tensor or
    per output row, beside ``input_scale`` scalars: the weight is scaled back by it, and
    neither scale is analysed as a layer of its own."""
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(64, 32, generator=g) * torch.logspace(-2, 1, 64).reshape(-1, 1)
    scale = (
        weight.abs().amax(dim=1, keepdim=True) if per != "tensor" else weight.abs().max().reshape(1)
    ) / 448.0
    stored = (weight / scale).to(torch.float8_e4m3fn)
    state = {
        "model.layers.0.mlp.up_proj.weight": stored,
        "model.layers.0.mlp.up_proj.weight_scale": scale.reshape(-1)
        if per == "flat row"
        else scale,
        "model.layers.0.mlp.up_proj.input_scale": torch.tensor(0.5),
    }
    for path in (tmp_path / "model_step_3.safetensors", tmp_path / "model_step_4.pt"):
        if path.suffix == ".pt":
            torch.save(state, path)
        else:
            save_file(state, str(path))
        (layer,) = list(iter_layers(path))
        assert layer.name == "model.layers.0.mlp.up_proj"
        got = torch.as_tensor(layer.weight)
        assert torch.equal(got, stored.float() * scale.reshape(-1, 1))
        assert torch.allclose(got, weight, rtol=0.07, atol=0.02 * float(weight.abs().max()))


@pytest.mark.parametrize("scale_shape", [[7], [0, 4], [65, 4], [2, 2, 2]])
def test_an_inverse_scale_that_fits_no_block_is_refused(
    tmp_path: Path, scale_shape: list[int]
) -> None:
    if not hasattr(torch, "float8_e4m3fn"):
        pytest.skip("this torch has no float8")
    stored = torch.randn(64, 32, generator=torch.Generator().manual_seed(1)).to(torch.float8_e4m3fn)
    path = tmp_path / "model_step_4.safetensors"
    save_file(
        {
            "model.layers.0.mlp.up_proj.weight": stored,
            "model.layers.0.mlp.up_proj.weight_scale_inv": torch.ones(scale_shape),
        },
        str(path),
    )
    with pytest.raises(CheckpointError, match="not one scale per block"):
        list(iter_layers(path))
    # one per 32x16 block is a reading, and is scaled back block by block
    save_file(
        {
            "model.layers.0.mlp.up_proj.weight": stored,
            "model.layers.0.mlp.up_proj.weight_scale_inv": torch.tensor([[1.0, 2.0], [3.0, 4.0]]),
        },
        str(path),
    )
    (layer,) = list(iter_layers(path))
    got = torch.as_tensor(layer.weight)
    assert torch.equal(got[:32, 16:], stored.float()[:32, 16:] * 2.0)
    assert torch.equal(got[32:, :16], stored.float()[32:, :16] * 3.0)


def test_settle_time_fallback_for_plain_files(tmp_path: Path) -> None:
    path = tmp_path / "weights_step_8.pt"
    torch.save(tiny_state(), path)
    now = time.time()
    (fresh,) = discover(tmp_path, settle_s=30, now=now)
    assert not fresh.complete
    (settled,) = discover(tmp_path, settle_s=30, now=now + 31)
    assert settled.complete and settled.step == 8
    # A file that changes gets a new fingerprint: results are tied to what was read.
    torch.save(tiny_state(1), path)
    (changed,) = discover(tmp_path, settle_s=0)
    assert changed.fingerprint != settled.fingerprint


def test_integer_and_complex_weights_are_skipped_not_misread(tmp_path: Path) -> None:
    """A quantized layer's integers and a complex layer are not analysed as if they were real
    float weights (the real part alone, or packed integers), and do not fail the file."""
    g = torch.Generator().manual_seed(3)
    state = tiny_state()
    others = {
        "model.layers.0.mlp.q8.weight": torch.randint(
            -128, 127, (64, 32), generator=g, dtype=torch.int8
        ),
        "model.layers.0.mlp.packed.weight": torch.randint(
            0, 2**16, (64, 32), generator=g, dtype=torch.int32
        ).to(torch.uint16),
        "model.layers.0.spectral.weight": torch.randn(32, 32, generator=g, dtype=torch.complex64),
        "model.layers.0.mask.weight": torch.rand(32, 32, generator=g) > 0.5,
    }
    folder = hf_checkpoint(tmp_path / "st", 1, {**state, **others})
    pickled = tmp_path / "pt" / "model_step_1.pt"
    pickled.parent.mkdir()
    torch.save({**state, **others}, pickled)
    plain = read(hf_checkpoint(tmp_path / "plain", 1, state))
    assert len(plain) >= 5
    for path in (folder, pickled):
        got = read(path)
        assert set(got) == set(plain), path
        for name, tensor in plain.items():
            torch.testing.assert_close(got[name], tensor)
    # only such tensors: the error says why nothing was analysed
    quantized = hf_checkpoint(tmp_path / "q", 2, others)
    with pytest.raises(CheckpointError, match=r"4 weight tensors of integer, boolean") as err:
        read(quantized)
    assert str(quantized) in str(err.value)


def test_deepspeed_zero3_placeholders_say_how_to_consolidate(tmp_path: Path) -> None:
    step = tmp_path / "global_step5"
    step.mkdir()
    # ZeRO-3 model states hold empty placeholders; the weights are flat partitions per rank.
    torch.save(
        {"module": {k: torch.empty(0) for k in tiny_state(0)}}, step / "mp_rank_00_model_states.pt"
    )
    for r in range(2):
        torch.save(
            {"optimizer_state_dict": {"fp32_flat_groups": [torch.randn(64)]}},
            step / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt",
        )
    with pytest.raises(CheckpointError, match=r"ZeRO-3.*zero_to_fp32") as err:
        read(step)
    assert str(step) in str(err.value)
