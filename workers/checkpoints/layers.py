"""From a checkpoint to a stream of analysable weight matrices, one tensor at a time.

Handles: safetensors (single, sharded), torch pickles (HF ``pytorch_model.bin``, sharded ``.bin``,
Lightning ``.ckpt``, plain ``.pt``), torch DCP folders, DeepSpeed/Megatron/SAT tensor-parallel
``mp_rank_XX`` shards (reassembled first), GPT-2 Conv1D (stored transposed), fused QKV (split into
Q, K, V), tied embeddings (analysed once), PEFT and SAT LoRA.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from alphawatch.workers.checkpoints.discovery import CheckpointRef
from alphawatch.workers.checkpoints.errors import CheckpointError, CheckpointVanished
from alphawatch.workers.checkpoints.fused import split_fused
from alphawatch.workers.checkpoints.naming import classify, is_weight_matrix, layer_name
from alphawatch.workers.checkpoints.parallel import (
    ROOT_KEYS,
    Tensors,
    iter_tensor_parallel,
    rank_files,
    training_config,
)
from alphawatch.workers.checkpoints.readers import iter_safetensors, iter_torch, upcast

# Files a Trainer writes beside the weights; training_args.bin is a pickle of a class and would
# (rightly) be refused, the others hold no model weights.
_NOT_WEIGHTS = re.compile(r"^(training_args\.bin|optimizer.*|scheduler.*|scaler.*|rng_state.*|"
                          r"adapter_model\..*|.*optim.*)$")
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")
_CONV1D = re.compile(r"(c_attn|c_proj|c_fc)$")


@dataclass(frozen=True)
class LayerMatrix:
    """One weight matrix to analyse: float32 on CPU, with where and how it was stored."""

    name: str
    kind: str
    block: int | None
    weight: torch.Tensor
    stored_dtype: torch.dtype
    source: str


def model_config(folder: Path) -> dict[str, object]:
    """``config.json`` (or SAT's ``model_config.json``) of a checkpoint folder or its parent."""
    for base in (folder, folder.parent):
        for name, extra in (("config.json", {}), ("model_config.json", {"model_type": "sat"})):
            try:
                loaded = json.loads((base / name).read_text())
            except (OSError, ValueError):
                continue
            if isinstance(loaded, dict):
                if isinstance(loaded.get("args"), dict):  # SAT nests its arguments
                    loaded = {**loaded["args"], **loaded}
                return {**loaded, **extra}
    return {}


def _index_files(index: Path, folder: Path) -> list[Path]:
    try:
        mapping = json.loads(index.read_text())["weight_map"]
        return [folder / name for name in sorted(set(mapping.values()))]
    except FileNotFoundError as exc:
        raise CheckpointVanished(index, f"{index} disappeared while being read") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(index, f"{index}: unreadable index: {exc}") from exc


def weight_files(path: Path) -> list[Path]:
    """The files holding a single-rank checkpoint's weights, in reading order.

    Raises:
        CheckpointError: a folder with no weight file in it.
    """
    if path.is_file():
        return [path]
    for pattern in ("*.safetensors.index.json", "*.bin.index.json"):
        index = sorted(path.glob(pattern))
        if index:
            return _index_files(index[0], path)
    try:
        entries = sorted(p for p in path.iterdir() if p.is_file())
    except FileNotFoundError as exc:
        raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
    files = [p for p in entries if p.suffix == ".safetensors" and not _NOT_WEIGHTS.match(p.name)]
    if not files:
        files = [p for p in entries
                 if p.suffix in _TORCH_SUFFIXES and not _NOT_WEIGHTS.match(p.name)]
    if not files:
        raise CheckpointError(path, f"{path}: no weight files (safetensors, .bin, .pt, .ckpt)")
    return files


def _iter_torch_file(path: Path) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    tensors = dict(iter_torch(path, ROOT_KEYS))
    for key, tensor in tensors.items():
        if key.endswith("_scale_inv") or not is_weight_matrix(key, tensor.dim()):
            continue
        yield key, tensor, tensors.get(key + "_scale_inv")


def raw_tensors(path: Path) -> Tensors:
    """(key, stored tensor, fp8 scale, source file) of a single-rank checkpoint."""
    if not path.exists():
        raise CheckpointVanished(path, f"{path} disappeared before it was read")
    for file in weight_files(path):
        stream = (iter_safetensors(file, is_weight_matrix) if file.suffix == ".safetensors"
                  else _iter_torch_file(file))
        for key, tensor, scale in stream:
            yield key, tensor, scale, file


def _digest(weight: torch.Tensor) -> str:
    """Content hash: tied embeddings are recognised without keeping the first one in memory."""
    data = weight.detach().contiguous().numpy()
    return hashlib.blake2b(data.data.cast("B"), digest_size=16).hexdigest()


def _source(path: Path, config: dict[str, object]) -> tuple[Tensors, dict[str, object]]:
    if path.is_dir() and (path / ".metadata").exists():
        from alphawatch.workers.checkpoints.dcp import iter_dcp

        return iter_dcp(path), config
    ranks = rank_files(path)
    if ranks:
        merged = {**training_config(ranks[0]), **config}
        return iter_tensor_parallel(ranks, merged), merged
    return raw_tensors(path), config


def iter_layers(ref: CheckpointRef | Path, *, base: Path | None = None) -> Iterator[LayerMatrix]:
    """Analysable weight matrices of one checkpoint, one tensor at a time.

    Args:
        ref: a discovered checkpoint, or the path of a checkpoint folder or file.
        base: for a LoRA adapter, the folder of the base model's weights; by default the
            adapter's ``base_model_name_or_path`` when it is a local folder. Without base
            weights only the updates s·B·A are yielded.

    Yields:
        LayerMatrix: float32 CPU matrices (out, in), each released before the next is read.

    Raises:
        CheckpointError: unreadable file (the message names it); CheckpointVanished when the
            checkpoint was deleted while being read; UnsafeCheckpointError for a pickle with code.
    """
    path = ref.path if isinstance(ref, CheckpointRef) else Path(ref)
    if path.is_dir() and (path / "adapter_config.json").exists():
        from alphawatch.workers.checkpoints.lora import iter_peft_lora

        yield from iter_peft_lora(path, base)
        return
    from alphawatch.workers.checkpoints.lora import SatLora

    config = model_config(path if path.is_dir() else path.parent)
    source, config = _source(path, config)
    is_gpt2 = config.get("model_type") == "gpt2"
    sat = SatLora(config)
    vocab_digests: set[str] = set()
    seen = 0
    for key, stored, scale, file in source:
        name = layer_name(key)
        if sat.takes(key):
            for lora_name, lora_weight, lora_dtype, lora_file in sat.add(key, stored, str(file)):
                seen += 1
                yield _layer(lora_name, lora_weight, lora_dtype, lora_file)
            continue
        weight = upcast(stored, scale)
        if is_gpt2 and _CONV1D.search(name) and weight.dim() == 2:
            weight = weight.T  # GPT-2 Conv1D stores (in, out)
        kind, _ = classify(name)
        if kind in ("embed", "lm_head"):
            digest = _digest(weight)
            if digest in vocab_digests:
                continue  # tied input and output embeddings: analysed once
            vocab_digests.add(digest)
        pieces = split_fused(name, weight, config) if kind == "qkv" else [(name, weight)]
        for piece_name, piece in pieces:
            seen += 1
            yield _layer(piece_name, piece, stored.dtype, str(file))
        # Drop this tensor before the next is read: peak memory stays ~ one tensor's worth.
        del stored, weight, pieces
    for lora_name, lora_weight, lora_dtype, lora_file in sat.finish():
        seen += 1
        yield _layer(lora_name, lora_weight, lora_dtype, lora_file)
    if seen == 0:
        if path.is_dir() and any(path.glob("*zero_pp_rank_*")):
            # ZeRO-3 keeps only placeholders in the model states; the weights are flat fp32
            # partitions inside every rank's optimizer states.
            raise CheckpointError(path, f"{path}: DeepSpeed ZeRO-3 checkpoint, its weights are "
                                        "partitioned across the optimizer states of every rank; "
                                        "consolidate it with the zero_to_fp32.py script "
                                        "DeepSpeed writes beside it, or save with "
                                        "stage3_gather_16bit_weights_on_model_save")
        raise CheckpointError(path, f"{path}: no weight matrices found")


def _layer(name: str, weight: torch.Tensor, dtype: torch.dtype, source: str) -> LayerMatrix:
    kind, block = classify(name)
    return LayerMatrix(name, kind, block, weight.contiguous(), dtype, source)
