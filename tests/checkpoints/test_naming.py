"""Layer names, kinds, blocks and fused-QKV layouts of the model families alphawatch knows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from alphawatch.workers.checkpoints import iter_layers
from alphawatch.workers.checkpoints.fused import split_fused
from alphawatch.workers.checkpoints.naming import classify, is_weight_matrix, layer_name

transformers = pytest.importorskip("transformers")


@pytest.mark.parametrize(
    ("key", "kind", "block"),
    [
        ("model.layers.3.self_attn.q_proj.weight", "q", 3),
        ("model.layers.3.self_attn.o_proj.weight", "o", 3),
        ("model.layers.0.mlp.gate_proj.weight", "gate", 0),
        ("model.layers.0.mlp.down_proj.weight", "down", 0),
        ("model.embed_tokens.weight", "embed", None),
        ("lm_head.weight", "lm_head", None),
        ("transformer.h.2.attn.c_attn.weight", "qkv", 2),
        ("transformer.h.2.attn.c_proj.weight", "o", 2),
        ("transformer.h.2.mlp.c_fc.weight", "fc_in", 2),
        ("transformer.h.2.mlp.c_proj.weight", "fc_out", 2),
        ("gpt_neox.layers.1.attention.query_key_value.weight", "qkv", 1),
        ("gpt_neox.layers.1.attention.dense.weight", "o", 1),
        ("gpt_neox.layers.1.mlp.dense_h_to_4h.weight", "fc_in", 1),
        ("gpt_neox.layers.1.mlp.dense_4h_to_h.weight", "fc_out", 1),
        ("gpt_neox.embed_in.weight", "embed", None),
        ("embed_out.weight", "lm_head", None),
        ("bert.encoder.layer.4.attention.self.key.weight", "k", 4),
        ("bert.encoder.layer.4.attention.output.dense.weight", "o", 4),
        ("bert.encoder.layer.4.intermediate.dense.weight", "fc_in", 4),
        ("bert.encoder.layer.4.output.dense.weight", "fc_out", 4),
        ("vit.encoder.layer.0.attention.attention.value.weight", "v", 0),
        ("vit.embeddings.patch_embeddings.projection.weight", "embed", None),
        ("blocks.5.attn.qkv.weight", "qkv", 5),
        ("blocks.5.attn.proj.weight", "o", 5),
        ("decoder.layers.7.self_attention.linear_qkv.weight", "qkv", 7),
        ("decoder.layers.7.self_attention.linear_proj.weight", "o", 7),
        ("decoder.layers.7.mlp.linear_fc2.weight", "fc_out", 7),
        ("embedding.word_embeddings.weight", "embed", None),
        ("output_layer.weight", "lm_head", None),
        ("module.language_model.encoder.layers.2.self_attention.query_key_value.weight", "qkv", 2),
    ],
)
def test_classification(key: str, kind: str, block: int | None) -> None:
    assert classify(layer_name(key)) == (kind, block)


@pytest.mark.parametrize(
    ("key", "ndim"),
    [
        ("model.layers.0.input_layernorm.weight", 1),
        ("model.norm.weight", 2),
        ("transformer.h.0.ln_1.weight", 1),
        ("transformer.h.0.attn.c_attn.bias", 1),
        ("model.layers.0.self_attn.rotary_emb.inv_freq", 1),
        ("transformer.h.0.attn.bias", 4),
        ("bert.encoder.layer.0.attention.output.LayerNorm.weight", 2),
    ],
)
def test_norms_biases_and_buffers_are_skipped(key: str, ndim: int) -> None:
    assert not is_weight_matrix(key, ndim)


def test_gpt_neox_per_head_interleave_matches_the_attention(tmp_path: Path) -> None:
    config = transformers.GPTNeoXConfig(
        hidden_size=32,
        num_attention_heads=4,
        num_hidden_layers=1,
        intermediate_size=64,
        vocab_size=100,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    model = transformers.GPTNeoXForCausalLM(config)
    model.save_pretrained(tmp_path / "neox")
    got = {m.name: m for m in iter_layers(tmp_path / "neox")}
    fused = model.gpt_neox.layers[0].attention.query_key_value.weight.detach()
    x = torch.randn(5, 32)
    # What GPTNeoXAttention does with the fused output: view (heads, 3·head_dim), then chunk.
    q_ref, k_ref, v_ref = (x @ fused.T).view(5, 4, 24).chunk(3, dim=-1)
    p = "gpt_neox.layers.0.attention.query_key_value"
    for part, ref in zip("qkv", (q_ref, k_ref, v_ref), strict=True):
        torch.testing.assert_close(
            x @ torch.as_tensor(got[f"{p}.{part}"].weight).T, ref.reshape(5, 32)
        )
        assert got[f"{p}.{part}"].kind == part
    assert p not in got
    want = {
        k.removesuffix(".weight")
        for k, v in model.state_dict().items()
        if v.dim() == 2 and "query_key_value" not in k and k != "lm_head.weight"
    }
    assert want <= set(got)
    # transformers saves NeoX's head under its original name, embed_out.
    assert got["embed_out"].kind == "lm_head"


@pytest.mark.parametrize("family", ["bert", "vit"])
def test_bert_and_vit_save_pretrained(tmp_path: Path, family: str) -> None:
    torch.manual_seed(0)
    if family == "bert":
        config = transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=100,
            max_position_embeddings=32,
        )
        model = transformers.BertModel(config)
    else:
        config = transformers.ViTConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            image_size=16,
            patch_size=4,
        )
        model = transformers.ViTModel(config)
    model.save_pretrained(tmp_path / family)
    got = {m.name: m for m in iter_layers(tmp_path / family)}
    # transformers may rename modules on save (v5 keeps the published key names): compare with
    # what was written, and check that the model's own matrices are all in it.
    saved = load_file(str(tmp_path / family / "model.safetensors"))
    for key, value in saved.items():
        name = key.removesuffix(".weight")
        if value.dim() in (2, 4) and key.endswith(".weight") and "LayerNorm" not in key:
            assert torch.equal(torch.as_tensor(got[name].weight), value), name
    own = sorted(v.sum().item() for v in model.state_dict().values() if v.dim() in (2, 4))
    assert sorted(m.weight.sum().item() for m in got.values()) == pytest.approx(own)
    kinds = {(m.kind, m.block) for m in got.values()}
    assert {("q", 1), ("k", 1), ("v", 1), ("o", 1), ("fc_in", 1), ("fc_out", 1)} <= kinds
    assert any(m.kind == "embed" for m in got.values())


def test_block_layout_with_grouped_kv_heads() -> None:
    # Phi-3 / ChatGLM: [Q; K; V] with K and V of num_key_value_heads heads each.
    config = {
        "model_type": "phi3",
        "num_attention_heads": 8,
        "num_key_value_heads": 2,
        "hidden_size": 32,
    }
    q, k, v = torch.randn(32, 32), torch.randn(8, 32), torch.randn(8, 32)
    parts = dict(split_fused("model.layers.0.self_attn.qkv_proj", torch.cat([q, k, v]), config))
    assert torch.equal(parts["model.layers.0.self_attn.qkv_proj.q"], q)
    assert torch.equal(parts["model.layers.0.self_attn.qkv_proj.k"], k)
    assert torch.equal(parts["model.layers.0.self_attn.qkv_proj.v"], v)


def test_unknown_fused_layout_stays_whole(tmp_path: Path) -> None:
    weight = torch.randn(96, 32)
    assert split_fused("x.layers.0.attention.query_key_value", weight, {}) == [
        ("x.layers.0.attention.query_key_value", weight)
    ]
    (tmp_path / "config.json").write_text(
        json.dumps({"model_type": "gpt_neox", "num_attention_heads": 4})
    )
    names = [
        n
        for n, _ in split_fused(
            "x.layers.0.attention.query_key_value",
            weight,
            json.loads((tmp_path / "config.json").read_text()),
        )
    ]
    assert names == [f"x.layers.0.attention.query_key_value.{p}" for p in "qkv"]
