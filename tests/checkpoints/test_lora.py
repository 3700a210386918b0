"""PEFT adapters saved here: updates s·B·A, and merged weights equal to merge_and_unload()."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from alphawatch.workers.checkpoints import CheckpointError, iter_layers

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

pytestmark = [
    pytest.mark.filterwarnings("ignore::FutureWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]


def read(path: Path, base: Path | None = None) -> dict[str, torch.Tensor]:
    return {m.name: m.weight for m in iter_layers(path, base=base)}


def randomise_b(model: torch.nn.Module) -> None:
    # PEFT initialises B to zero: the update would be 0 and every check would pass vacuously.
    gen = torch.Generator().manual_seed(1)
    for name, param in model.named_parameters():
        if "lora_B" in name:
            with torch.no_grad():
                param.copy_(torch.randn(param.shape, generator=gen))


def set_base(adapter: Path, base: str) -> dict[str, object]:
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = base
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    return config


def test_llama_lora_merge_equals_merge_and_unload(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=100,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config)
    base.save_pretrained(tmp_path / "base")
    lora = peft.get_peft_model(
        base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    randomise_b(lora)
    lora.save_pretrained(tmp_path / "adapter")
    set_base(tmp_path / "adapter", str(tmp_path / "base"))
    layer = lora.base_model.model.model.layers[0].self_attn
    update_q = (
        layer.q_proj.lora_B["default"].weight @ layer.q_proj.lora_A["default"].weight * 8 / 4
    ).detach()
    merged = lora.merge_and_unload()
    got = {m.name: m for m in iter_layers(tmp_path / "adapter")}
    attn = merged.model.layers[0].self_attn
    for proj in ("q_proj", "v_proj"):
        torch.testing.assert_close(
            got[f"model.layers.0.self_attn.{proj}"].weight,
            getattr(attn, proj).weight.detach(),
            rtol=0,
            atol=1e-6,
        )
    torch.testing.assert_close(got["model.layers.0.self_attn.q_proj.lora_update"].weight, update_q)
    assert got["model.layers.0.self_attn.q_proj.lora_update"].kind == "lora_update"
    assert got["model.layers.0.self_attn.q_proj"].kind == "q"
    assert len(got) == 4  # two updates, two merged weights; nothing else from the adapter


def test_gpt2_conv1d_rslora_and_patterns(tmp_path: Path) -> None:
    config = transformers.GPT2Config(n_layer=2, n_head=4, n_embd=32, vocab_size=100, n_positions=32)
    torch.manual_seed(0)
    base = transformers.GPT2LMHeadModel(config)
    base.save_pretrained(tmp_path / "base")
    lora_config = peft.LoraConfig(
        r=4,
        lora_alpha=8,
        target_modules=["c_attn", "c_fc"],
        fan_in_fan_out=True,
        use_rslora=True,
        rank_pattern={"c_fc": 2},
        alpha_pattern={"h.1.attn.c_attn": 3},
    )
    lora = peft.get_peft_model(base, lora_config)
    randomise_b(lora)
    lora.save_pretrained(tmp_path / "adapter")
    set_base(tmp_path / "adapter", "not-a-local-folder/gpt2")
    merged = lora.merge_and_unload()
    without_base = read(tmp_path / "adapter")
    assert all(name.endswith(".lora_update") for name in without_base)
    got = read(tmp_path / "adapter", base=tmp_path / "base")
    for i in range(2):
        block = merged.transformer.h[i]
        q, k, v = block.attn.c_attn.weight.detach().T.chunk(3)  # Conv1D stores (in, out)
        for part, want in zip("qkv", (q, k, v), strict=True):
            torch.testing.assert_close(
                got[f"transformer.h.{i}.attn.c_attn.{part}"], want, rtol=0, atol=1e-6
            )
        torch.testing.assert_close(
            got[f"transformer.h.{i}.mlp.c_fc"], block.mlp.c_fc.weight.detach().T, rtol=0, atol=1e-6
        )
        assert got[f"transformer.h.{i}.mlp.c_fc.lora_update"].shape == (128, 32)


def test_dora_and_other_adapter_types_are_refused(tmp_path: Path) -> None:
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=50,
    )
    torch.manual_seed(0)
    lora = peft.get_peft_model(
        transformers.LlamaForCausalLM(config),
        peft.LoraConfig(r=2, target_modules=["q_proj"], use_dora=True),
    )
    lora.save_pretrained(tmp_path / "dora")
    with pytest.raises(CheckpointError, match="DoRA") as info:
        read(tmp_path / "dora")
    assert "adapter_config.json" in str(info.value)
    (tmp_path / "dora" / "adapter_model.safetensors").unlink()
    adapter_config = json.loads((tmp_path / "dora" / "adapter_config.json").read_text())
    adapter_config["use_dora"] = False
    (tmp_path / "dora" / "adapter_config.json").write_text(json.dumps(adapter_config))
    with pytest.raises(CheckpointError, match="without adapter weights"):
        read(tmp_path / "dora")
