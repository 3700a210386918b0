"""Splitting fused attention projections into Q, K and V.

Each producer lays the fused rows out differently, and the spectrum of the fused matrix is not
the spectrum of its parts, so the layout must be known:

- GPT-2 ``c_attn`` (after the Conv1D transpose), timm ViT ``qkv``, Phi-3 ``qkv_proj``, MPT
  ``Wqkv``, ChatGLM/SAT ``query_key_value``: blocks ``[Q; K; V]`` (K and V smaller under GQA);
- GPT-NeoX, BLOOM, Falcon (old layout) ``query_key_value``: per head ``[q_h; k_h; v_h]``;
- Megatron ``linear_qkv`` and legacy ``query_key_value``, Falcon's new decoder: per KV group
  ``[q_{g,1} .. q_{g,n}; k_g; v_g]`` (the per-head interleave is the case of one query per group).

Where the layout needs head counts that neither ``config.json`` nor the checkpoint's own
arguments give, the fused matrix is analysed whole (kind ``qkv``) rather than split by guess.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

import numpy as np

if TYPE_CHECKING:
    import torch

# A torch tensor or a numpy array: the splits below only slice and reshape.
_M = TypeVar("_M", "torch.Tensor", np.ndarray)

_BLOCK_MODELS = {"gpt2", "phi3", "mpt", "chatglm", "glm", "vit", "sat"}
_HEAD_INTERLEAVED = {"gpt_neox", "bloom"}


@dataclass(frozen=True)
class _Heads:
    heads: int
    groups: int
    head_dim: int


def _int(config: dict[str, object], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def _heads(config: dict[str, object], rows: int) -> _Heads | None:
    heads = _int(config, "num_attention_heads", "n_head", "n_heads", "num_heads")
    if heads is None:
        return None
    groups = (
        _int(
            config,
            "num_key_value_heads",
            "num_query_groups",
            "multi_query_group_num",
            "num_kv_heads",
            "n_head_kv",
        )
        or heads
    )
    if config.get("multi_query") and not config.get("new_decoder_architecture"):
        groups = 1
    head_dim = _int(config, "head_dim", "kv_channels")
    if head_dim is None:
        if rows % (heads + 2 * groups):
            return None
        head_dim = rows // (heads + 2 * groups)
    if (heads + 2 * groups) * head_dim != rows or heads % groups:
        return None
    return _Heads(heads, groups, head_dim)


def _blocks(weight: _M, heads: _Heads | None) -> tuple[_M, ...] | None:
    if heads is None:
        if weight.shape[0] % 3:
            return None
        third = weight.shape[0] // 3
        return weight[:third], weight[third : 2 * third], weight[2 * third :]
    q = heads.heads * heads.head_dim
    kv = heads.groups * heads.head_dim
    return weight[:q], weight[q : q + kv], weight[q + kv : q + 2 * kv]


def _grouped(weight: _M, heads: _Heads) -> tuple[_M, ...]:
    per_group = heads.heads // heads.groups
    cols = weight.shape[1:]
    grouped = weight.reshape(heads.groups, per_group + 2, heads.head_dim, *cols)
    q = grouped[:, :per_group].reshape(heads.heads * heads.head_dim, *cols)
    k = grouped[:, per_group].reshape(heads.groups * heads.head_dim, *cols)
    v = grouped[:, per_group + 1].reshape(heads.groups * heads.head_dim, *cols)
    return q, k, v


def layout(name: str, config: dict[str, object]) -> str:
    """``blocks``, ``grouped`` (per KV group, per head when groups == heads) or ``unknown``."""
    model_type = str(config.get("model_type", ""))
    if name.endswith("c_attn") or model_type in _BLOCK_MODELS:
        return "blocks"
    if name.endswith("linear_qkv") or model_type == "megatron":
        return "grouped"
    if name.endswith("query_key_value"):
        if model_type in _HEAD_INTERLEAVED:
            return "grouped"
        if model_type == "falcon":
            multi_query = config.get("multi_query") and not config.get("new_decoder_architecture")
            return "blocks" if multi_query else "grouped"
        return "unknown"
    if name.endswith(("qkv_proj", "Wqkv", "qkv")):
        return "blocks"
    return "unknown"


@overload
def split_fused(
    name: str, weight: np.ndarray, config: dict[str, object]
) -> list[tuple[str, np.ndarray]]: ...
@overload
def split_fused(
    name: str, weight: torch.Tensor, config: dict[str, object]
) -> list[tuple[str, torch.Tensor]]: ...
@overload
def split_fused(
    name: str, weight: torch.Tensor | np.ndarray, config: dict[str, object]
) -> list[tuple[str, torch.Tensor | np.ndarray]]: ...
def split_fused(name: str, weight: Any, config: dict[str, object]) -> list[tuple[str, Any]]:
    """``[(name.q, Q), (name.k, K), (name.v, V)]``, or ``[(name, weight)]`` when unknown.

    Args:
        name: canonical layer name of the fused projection.
        weight: (rows, in) matrix, rows = (heads + 2·kv_heads)·head_dim, already (out, in).
        config: ``config.json`` of the model (or the training arguments of the checkpoint):
            ``model_type``, head counts and head size decide the layout.
    """
    heads = _heads(config, weight.shape[0])
    if config.get("model_type") in _HEAD_INTERLEAVED and heads is not None:
        heads = _Heads(heads.heads, heads.heads, heads.head_dim)  # these never group heads
    parts: tuple[Any, ...] | None = None
    kind = layout(name, config)
    if kind == "blocks":
        parts = _blocks(weight, heads)
    elif kind == "grouped" and heads is not None:
        parts = _grouped(weight, heads)
    if parts is None:
        return [(name, weight)]
    return [(f"{name}.{p}", part) for p, part in zip("qkv", parts, strict=True)]
