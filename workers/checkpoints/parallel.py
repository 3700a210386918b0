"""Reassembling Megatron / DeepSpeed / SAT tensor-parallel ``mp_rank_XX`` shards into layers.

The spectrum of a shard is not the spectrum of the layer, so shards are never analysed on their
own: column-parallel layers (Q, K, V, fused QKV, gate, up, fc_in, vocab embeddings and output
layer) are concatenated on the output dimension (0), row-parallel layers (o, down, fc_out) on the
input dimension (1). Megatron's SwiGLU ``linear_fc1`` holds ``[gate_r; up_r]`` on each rank, so it
is split per rank first and the gates and ups are joined separately.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement
from alphawatch.workers.checkpoints.errors import CheckpointError
from alphawatch.workers.checkpoints.fused import layout, split_fused
from alphawatch.workers.checkpoints.naming import classify, is_weight_matrix, layer_name
from alphawatch.workers.checkpoints.readers import StoredArray, iter_torch, load_torch

if TYPE_CHECKING:
    import torch

ROOT_KEYS = ("state_dict", "module", "model")
COLUMN_PARALLEL = {"q", "k", "v", "qkv", "gate", "up", "fc_in", "embed", "lm_head"}
_RANK = re.compile(r"mp_rank_(\d+)(?:_(\d+))?")
_SAT_LORA = re.compile(r"^(.+)\.(?:matrix_([AB])\.\d+|original\.weight)$")

# (key, stored tensor, fp8 inverse scale, file): torch tensors, or numpy arrays from safetensors.
Tensors = Iterator[
    tuple[str, "torch.Tensor | StoredArray", "torch.Tensor | StoredArray | None", Path]
]


def rank_files(path: Path) -> list[Path]:
    """Tensor-parallel rank files of a step folder, in rank order (empty when there are none).

    Raises:
        CheckpointError: the folder also splits the model into pipeline stages
            (``mp_rank_XX_YYY``), whose layer numbering restarts per stage.
    """
    if path.is_file():
        return []
    files = sorted(path.glob("mp_rank_*_model_states.pt"))
    files += sorted(path.glob("mp_rank_*/model_optim_rng.pt"))
    ranks: list[tuple[int, Path]] = []
    for file in files:
        match = _RANK.search(file.name if file.name.startswith("mp_rank") else file.parent.name)
        if match is None:
            continue
        if match.group(2) is not None and file.name == "model_optim_rng.pt":
            raise CheckpointError(
                file,
                f"{file}: pipeline-parallel checkpoints (mp_rank_XX_YYY) "
                "are not supported; convert to tensor-parallel only",
            )
        ranks.append((int(match.group(1)), file))
    return [file for _, file in sorted(ranks)]


def training_config(file: Path, confine: Confinement = UNCONFINED) -> dict[str, object]:
    """Head counts and MLP shape from a Megatron checkpoint's ``args``, in config.json terms."""
    state = load_torch(file, confine)
    args = state.get("args")
    if not isinstance(args, argparse.Namespace):
        return {}
    values = vars(args)
    heads = values.get("num_attention_heads")
    config: dict[str, object] = {"model_type": "megatron", "num_attention_heads": heads}
    if values.get("group_query_attention") and values.get("num_query_groups"):
        config["num_query_groups"] = values["num_query_groups"]
    if values.get("kv_channels"):
        config["kv_channels"] = values["kv_channels"]
    if "swiglu" in values:
        config["swiglu"] = bool(values["swiglu"])
    return config


def _gated(key: str, state: dict[str, torch.Tensor], config: dict[str, object]) -> bool:
    if "swiglu" in config:
        return bool(config["swiglu"])
    # Without arguments: a gated fc1 has twice the rows that fc2 has columns.
    fc2 = state.get(key.replace("linear_fc1", "linear_fc2"))
    fc1 = state[key]
    return fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]


def iter_tensor_parallel(
    files: list[Path], config: dict[str, object], confine: Confinement = UNCONFINED
) -> Tensors:
    """(key, whole tensor, no scale, first rank file) of every weight matrix, reassembled."""
    import torch

    states = [dict(iter_torch(f, ROOT_KEYS, confine)) for f in files]
    for key in states[0]:
        parts = [s.get(key) for s in states]
        first = parts[0]
        if first is None or not is_weight_matrix(key, first.dim()):
            continue
        if any(p is None for p in parts):
            missing = files[next(i for i, p in enumerate(parts) if p is None)]
            raise CheckpointError(missing, f"{missing}: has no {key!r} that rank 0 has")
        shards = [p for p in parts if p is not None]
        sat = _SAT_LORA.match(key)
        kind, _ = classify(layer_name(sat.group(1) if sat else key))
        column = kind in COLUMN_PARALLEL or kind == "other"
        if sat and sat.group(2) is not None:
            # SAT LoRA: A is split like the layer's input, B like its output; else replicated.
            split_dim = {("A", False): 1, ("B", True): 0}.get((sat.group(2), column))
            yield (
                key,
                (first if split_dim is None else torch.cat(shards, split_dim)),
                None,
                files[0],
            )
        elif kind == "qkv" and len(shards) > 1 and layout(layer_name(key), config) == "blocks":
            yield key, _strided_qkv(layer_name(key), shards, config), None, files[0]
        elif key.endswith("linear_fc1.weight") and _gated(key, states[0], config):
            base = key.removesuffix("linear_fc1.weight")
            yield (
                base + "gate_proj.weight",
                torch.cat([p.chunk(2)[0] for p in shards]),
                None,
                files[0],
            )
            yield (
                base + "up_proj.weight",
                torch.cat([p.chunk(2)[1] for p in shards]),
                None,
                files[0],
            )
        elif len(shards) == 1:
            yield key, first, None, files[0]
        elif kind == "other" and all(torch.equal(first, p) for p in shards[1:]):
            yield key, first, None, files[0]  # replicated on every rank
        else:
            yield key, torch.cat(shards, dim=0 if column else 1), None, files[0]


def _strided_qkv(name: str, shards: list[torch.Tensor], config: dict[str, object]) -> torch.Tensor:
    """A [Q; K; V] block projection whose ranks each hold [Q_r; K_r; V_r] (SAT's stride 3)."""
    import torch

    ranks = len(shards)
    per_rank = dict(config)
    for key in (
        "num_attention_heads",
        "num_key_value_heads",
        "num_query_groups",
        "multi_query_group_num",
    ):
        value = config.get(key)
        if isinstance(value, int) and value % ranks == 0:
            per_rank[key] = value // ranks
    split = [split_fused(name, shard, per_rank) for shard in shards]
    if any(len(parts) != 3 for parts in split):
        return torch.cat(shards, dim=0)
    return torch.cat([torch.cat([parts[i][1] for parts in split]) for i in range(3)])
