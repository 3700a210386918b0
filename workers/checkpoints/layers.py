"""From a checkpoint to a stream of analysable weight matrices, one tensor at a time.

Handles: safetensors (single, sharded), torch pickles (HF ``pytorch_model.bin``, Lightning
``.ckpt``, plain ``.pt``), DeepSpeed/Megatron tensor-parallel ``mp_rank_XX`` shards (reassembled:
the spectrum of a shard is not the spectrum of the layer), GPT-2 Conv1D (stored transposed) and
fused QKV (split into Q, K, V), tied embeddings (analysed once), PEFT LoRA adapters.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from workers.checkpoints.discovery import CheckpointRef
from workers.checkpoints.errors import CheckpointError, CheckpointVanished
from workers.checkpoints.naming import classify, is_weight_matrix, layer_name
from workers.checkpoints.readers import iter_safetensors, iter_torch, upcast

_ROOT_KEYS = ("state_dict", "module", "model")
_COLUMN_PARALLEL = {"q", "k", "v", "qkv", "gate", "up", "fc_in", "embed", "lm_head"}
_MP_RANK = re.compile(r"mp_rank_(\d+)")


@dataclass(frozen=True)
class LayerMatrix:
    """One weight matrix to analyse: float32 on CPU, with where and how it was stored."""

    name: str
    kind: str
    block: int | None
    weight: torch.Tensor
    stored_dtype: torch.dtype
    source: str


def _config(folder: Path) -> dict[str, object]:
    for candidate in (folder / "config.json", folder.parent / "config.json"):
        try:
            loaded = json.loads(candidate.read_text())
            if isinstance(loaded, dict):
                return loaded
        except (OSError, ValueError):
            continue
    return {}


def _iter_torch_file(path: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    tensors = dict(iter_torch(path, _ROOT_KEYS))
    for key, tensor in tensors.items():
        if key.endswith("_scale_inv") or not is_weight_matrix(key, tensor.dim()):
            continue
        yield key, tensor, tensors.get(key + "_scale_inv")


def _raw_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None, Path]]:
    """(key, stored tensor, fp8 scale, source file) of a single-rank checkpoint."""
    if not path.exists():
        raise CheckpointVanished(path, f"{path} disappeared before it was read")
    if path.is_file():
        files = [path]
    else:
        index = sorted(path.glob("*.safetensors.index.json"))
        if index:
            try:
                mapping = json.loads(index[0].read_text())["weight_map"]
            except (OSError, ValueError, KeyError) as exc:
                raise CheckpointError(index[0], f"{index[0]}: unreadable index: {exc}") from exc
            files = [path / name for name in sorted(set(mapping.values()))]
        else:
            files = sorted(p for p in path.glob("*.safetensors") if "adapter" not in p.name)
            if not files:
                files = sorted(p for p in path.iterdir() if p.is_file()
                               and p.suffix in (".bin", ".pt", ".pth", ".ckpt")
                               and "optim" not in p.name and "adapter" not in p.name)
        if not files:
            raise CheckpointError(path, f"{path}: no weight files (safetensors, .bin, .pt)")
    for file in files:
        stream = (iter_safetensors(file, is_weight_matrix) if file.suffix == ".safetensors"
                  else _iter_torch_file(file))
        for key, tensor, scale in stream:
            yield key, tensor, scale, file


def _rank_files(path: Path) -> list[Path]:
    if path.is_file():
        return []
    files = sorted(path.glob("mp_rank_*_model_states.pt"))
    files += sorted(path.glob("mp_rank_*/model_optim_rng.pt"))
    return files


def _tensor_parallel(
    files: list[Path],
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None, Path]]:
    """Reassemble Megatron/DeepSpeed tensor-parallel shards into whole layers."""
    ranks = sorted(files, key=lambda f: int(_MP_RANK.search(str(f)).group(1)))  # type: ignore[union-attr]
    states = [dict(iter_torch(f, _ROOT_KEYS)) for f in ranks]
    for key in states[0]:
        parts = [s[key] for s in states if key in s]
        if len(parts) != len(states) or not is_weight_matrix(key, parts[0].dim()):
            continue
        kind, _ = classify(layer_name(key))
        if len(parts) == 1:
            yield key, parts[0], None, ranks[0]
        elif key.endswith("linear_fc1.weight"):
            # SwiGLU: each rank holds [gate_r; up_r]; split per rank before joining.
            gates = [p.chunk(2, dim=0)[0] for p in parts]
            ups = [p.chunk(2, dim=0)[1] for p in parts]
            base = key.removesuffix("linear_fc1.weight")
            yield base + "gate_proj.weight", torch.cat(gates, 0), None, ranks[0]
            yield base + "up_proj.weight", torch.cat(ups, 0), None, ranks[0]
        else:
            dim = 0 if kind in _COLUMN_PARALLEL else 1
            yield key, torch.cat(parts, dim=dim), None, ranks[0]


def _as_int(value: object, default: int) -> int:
    """config.json integers; anything else (missing, null, text) falls back to the default."""
    return value if isinstance(value, int) and value else default


def _split_fused(name: str, weight: torch.Tensor, config: dict[str, object]
                 ) -> list[tuple[str, torch.Tensor]]:
    """Split fused QKV into Q, K, V (GPT-2 blocks, NeoX/BLOOM per-head interleave, [Q;K;V])."""
    model_type = str(config.get("model_type", ""))
    if name.endswith(("query_key_value", "linear_qkv")) and model_type in (
        "gpt_neox", "bloom", "falcon", "megatron", ""
    ) and weight.shape[0] % 3 == 0:
        heads = _as_int(config.get("num_attention_heads"), 0)
        groups = _as_int(config.get("num_key_value_heads"), heads)
        if heads and heads == groups and weight.shape[0] % (3 * heads) == 0:
            head_dim = weight.shape[0] // (3 * heads)
            per_head = weight.reshape(heads, 3, head_dim, weight.shape[1])
            q, k, v = (per_head[:, i].reshape(heads * head_dim, -1) for i in range(3))
            return [(f"{name}.q", q), (f"{name}.k", k), (f"{name}.v", v)]
    if weight.shape[0] % 3 == 0:
        q, k, v = weight.chunk(3, dim=0)
        return [(f"{name}.q", q), (f"{name}.k", k), (f"{name}.v", v)]
    return [(name, weight)]


_CONV1D = re.compile(r"(c_attn|c_proj|c_fc)$")


def iter_layers(ref: CheckpointRef | Path) -> Iterator[LayerMatrix]:
    """Analysable weight matrices of one checkpoint, one tensor at a time.

    Raises:
        CheckpointError: unreadable file (the message names it); CheckpointVanished when the
            checkpoint was deleted while being read; UnsafeCheckpointError for a pickle with code.
    """
    path = ref.path if isinstance(ref, CheckpointRef) else Path(ref)
    if path.is_dir() and (path / "adapter_config.json").exists():
        from workers.checkpoints.lora import iter_lora

        yield from iter_lora(path)
        return
    config = _config(path if path.is_dir() else path.parent)
    rank_files = _rank_files(path)
    if path.is_dir() and (path / ".metadata").exists():
        from workers.checkpoints.dcp import iter_dcp

        source: Iterator[tuple[str, torch.Tensor, torch.Tensor | None, Path]] = iter_dcp(path)
    elif len(rank_files) > 1:
        source = _tensor_parallel(rank_files)
    else:
        source = _raw_tensors(path)
    is_gpt2 = config.get("model_type") == "gpt2"
    vocab_mats: list[torch.Tensor] = []
    seen = 0
    for key, stored, scale, file in source:
        name = layer_name(key)
        weight = upcast(stored, scale)
        if is_gpt2 and _CONV1D.search(name) and weight.dim() == 2:
            weight = weight.T  # GPT-2 Conv1D stores (in, out)
        kind, block = classify(name)
        if kind in ("embed", "lm_head"):
            if any(m.shape == weight.shape and torch.equal(m, weight) for m in vocab_mats):
                continue  # tied input and output embeddings: analysed once
            vocab_mats.append(weight)
        pieces = _split_fused(name, weight, config) if kind == "qkv" else [(name, weight)]
        for piece_name, piece in pieces:
            piece_kind, piece_block = classify(piece_name) if piece_name != name else (kind, block)
            seen += 1
            yield LayerMatrix(piece_name, piece_kind, piece_block, piece.contiguous(),
                              stored.dtype, str(file))
        # Drop this tensor before the next is read: peak memory stays ~ one tensor's worth.
        del stored, weight, pieces
    if seen == 0:
        raise CheckpointError(path, f"{path}: no weight matrices found")
