"""Layer names, kinds and block indices from tensor keys of common model families."""

from __future__ import annotations

import re

from alphawatch.vocabulary import Kind

_BLOCK = re.compile(
    r"(?:^|\.)(?:layers|layer|h|blocks|block|decoder\.layers|encoder\.layer)\.(\d+)\."
)
# Order matters: the first pattern that matches the key's tail wins.
_KINDS: tuple[tuple[Kind, re.Pattern[str]], ...] = tuple(
    (kind, re.compile(pattern))
    for kind, pattern in (
        (Kind.LORA_UPDATE, r"lora_update$"),
        (Kind.QKV, r"(query_key_value|c_attn|qkv_proj|Wqkv|linear_qkv|\.qkv)$"),
        (Kind.Q, r"(q_proj|\.query|\.q|wq|q_lin)$"),
        (Kind.K, r"(k_proj|\.key|\.k|wk|k_lin)$"),
        (Kind.V, r"(v_proj|\.value|\.v|wv|v_lin)$"),
        (
            Kind.O,
            r"(o_proj|out_proj|attn\.c_proj|attention\.dense|attention\.output\.dense|"
            r"self_attention\.dense|linear_proj|\.wo|attn\.proj|out_lin)$",
        ),
        (Kind.GATE, r"(gate_proj|w1|\.gate)$"),
        (Kind.UP, r"(up_proj|w3)$"),
        (Kind.DOWN, r"(down_proj|w2)$"),
        (Kind.FC_IN, r"(c_fc|fc1|dense_h_to_4h|intermediate\.dense|linear_fc1|mlp\.fc_in|lin1)$"),
        (
            Kind.FC_OUT,
            r"(mlp\.c_proj|fc2|dense_4h_to_h|output\.dense|linear_fc2|mlp\.fc_out|lin2)$",
        ),
        (
            Kind.EMBED,
            r"(embed_tokens|wte|wpe|word_embeddings|position_embeddings|embed_in|"
            r"token_type_embeddings|patch_embed.*|tok_embeddings|embedding.*)$",
        ),
        (Kind.LM_HEAD, r"(lm_head|embed_out|output_layer|^output)$"),
    )
)
_SKIP = re.compile(
    r"(norm|ln_|layernorm|\.ln\d*$|bias$|rotary|inv_freq|position_ids|"
    r"masked_bias|attn\.bias$|_scale_inv$|_scale$|\.scale$)",
    re.IGNORECASE,
)


FLOAT_DTYPES = frozenset(
    {
        "float64",
        "float32",
        "float16",
        "bfloat16",
        "float8_e4m3fn",
        "float8_e5m2",
        "float8_e4m3fnuz",
        "float8_e5m2fnuz",
    }
)
"""Stored dtypes that hold real floating-point weights (as torch spells them)."""


def is_float_dtype(dtype: object) -> bool:
    """Whether a stored dtype (torch's, numpy's, or its name) holds real floating-point weights.

    Integer tensors (a quantized checkpoint's packed weights, whose spectrum says nothing of the
    model's), booleans and complex tensors (whose real part alone is not the matrix) are not
    analysed as weight matrices.
    """
    return str(dtype).removeprefix("torch.") in FLOAT_DTYPES


def layer_name(key: str) -> str:
    """Canonical layer name: the tensor key without ``.weight`` (and PEFT/DeepSpeed prefixes)."""
    name = key.removesuffix(".weight")
    for prefix in ("module.", "_orig_mod.", "base_model.model."):
        name = name.removeprefix(prefix)
    return name


def classify(name: str) -> tuple[str, int | None]:
    """(kind, block index) of a canonical layer name; kind ``other`` when unknown."""
    match = _BLOCK.search(name)
    block = int(match.group(1)) if match else None
    for kind, pattern in _KINDS:
        if pattern.search(name):
            return kind.value, block
    return Kind.OTHER.value, block


def is_weight_matrix(key: str, ndim: int) -> bool:
    """Whether a tensor is analysed: 2-D or 4-D weights, not norms, biases or buffers."""
    if ndim not in (2, 4):
        return False
    return not _SKIP.search(key.removesuffix(".weight"))
