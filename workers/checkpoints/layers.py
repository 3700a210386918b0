"""From a checkpoint to a stream of analysable weight matrices, one tensor at a time.

Handles: safetensors (single, sharded), torch pickles (HF ``pytorch_model.bin``, sharded ``.bin``,
Lightning ``.ckpt``, plain ``.pt``), torch DCP folders, DeepSpeed/Megatron/SAT tensor-parallel
``mp_rank_XX`` shards (reassembled first), GPT-2 Conv1D (stored transposed), fused QKV (split into
Q, K, V), tied embeddings (analysed once), PEFT and SAT LoRA.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement
from alphawatch.workers.checkpoints.discovery import CheckpointRef
from alphawatch.workers.checkpoints.errors import CheckpointError, CheckpointVanished
from alphawatch.workers.checkpoints.files import LayerMatrix, make_layer, model_config, weight_files
from alphawatch.workers.checkpoints.fused import split_fused
from alphawatch.workers.checkpoints.lora import SatLora, iter_peft_lora
from alphawatch.workers.checkpoints.naming import (
    classify,
    is_float_dtype,
    is_weight_matrix,
    layer_name,
)
from alphawatch.workers.checkpoints.parallel import (
    ROOT_KEYS,
    Tensors,
    iter_tensor_parallel,
    rank_files,
    training_config,
)
from alphawatch.workers.checkpoints.readers import (
    StoredArray,
    is_scale_key,
    iter_safetensors_arrays,
    iter_torch,
    scale_key_of,
    upcast,
)

if TYPE_CHECKING:
    import torch

_CONV1D = re.compile(r"(c_attn|c_proj|c_fc)$")


def _iter_torch_file(
    path: Path, confine: Confinement
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    tensors = dict(iter_torch(path, ROOT_KEYS, confine))
    for key, tensor in tensors.items():
        if is_scale_key(key) or not is_weight_matrix(key, tensor.dim()):
            continue
        scale_key = scale_key_of(key, tensors)
        yield key, tensor, None if scale_key is None else tensors[scale_key]


def raw_tensors(path: Path, confine: Confinement = UNCONFINED) -> Tensors:
    """(key, stored tensor, fp8 scale, source file) of a single-rank checkpoint."""
    if not path.exists():
        raise CheckpointVanished(path, f"{path} disappeared before it was read")
    for file in weight_files(path, confine):
        # safetensors are read with numpy alone: torch is imported only for a pickle.
        stream: Iterator[tuple[str, StoredArray | torch.Tensor, StoredArray | torch.Tensor | None]]
        stream = (
            iter_safetensors_arrays(file, is_weight_matrix, confine)
            if file.suffix == ".safetensors"
            else _iter_torch_file(file, confine)
        )
        for key, tensor, scale in stream:
            yield key, tensor, scale, file
            # Not held while the next is read: it would be a third tensor beside the next
            # one's file bytes and float32 values (bench/bench_scale.py measured 3.7x).
            del tensor, scale


def _digest(weight: torch.Tensor | np.ndarray) -> str:
    """Content hash: tied embeddings are recognised without keeping the first one in memory."""
    data = (
        np.ascontiguousarray(weight)
        if isinstance(weight, np.ndarray)
        else weight.detach().contiguous().numpy()
    )
    return hashlib.blake2b(data.data.cast("B"), digest_size=16).hexdigest()


def _source(
    path: Path, config: dict[str, object], confine: Confinement
) -> tuple[Tensors, dict[str, object]]:
    if path.is_dir() and (path / ".metadata").exists():
        # Imported here, not at the top: torch.distributed costs seconds to import, and only a
        # DCP folder needs it (no cycle is dodged).
        from alphawatch.workers.checkpoints.dcp import iter_dcp

        return iter_dcp(path, confine), config
    ranks = rank_files(path)
    if ranks:
        merged = {**training_config(ranks[0], confine), **config}
        return iter_tensor_parallel(ranks, merged, confine), merged
    return raw_tensors(path, confine), config


def iter_layers(
    ref: CheckpointRef | Path, *, base: Path | None = None, confine: Confinement = UNCONFINED
) -> Iterator[LayerMatrix]:
    """Analysable weight matrices of one checkpoint, one tensor at a time.

    Args:
        ref: a discovered checkpoint, or the path of a checkpoint folder or file.
        base: for a LoRA adapter, the folder of the base model's weights; by default the
            adapter's ``base_model_name_or_path`` when it is a local folder. Without base
            weights only the updates s·B·A are yielded.
        confine: the roots every file read must resolve under; anywhere by default (a
            watcher always passes its own).

    Yields:
        LayerMatrix: float32 CPU matrices (out, in), each released before the next is read.

    Raises:
        CheckpointError: unreadable file (the message names it); CheckpointVanished when the
            checkpoint was deleted while being read; UnsafeCheckpointError for a pickle with code;
            OutsideRootError for a file that resolves outside ``confine``'s roots.
    """
    path = ref.path if isinstance(ref, CheckpointRef) else Path(ref)
    confine.check(path, "checkpoint")
    if path.is_dir() and (path / "adapter_config.json").exists():
        yield from iter_peft_lora(path, base, confine)
        return
    config = model_config(path if path.is_dir() else path.parent, confine)
    source, config = _source(path, config, confine)
    sat = SatLora(config)
    vocab_digests: set[str] = set()
    seen = skipped = 0
    for key, stored, scale, file in source:
        if not is_float_dtype(stored.dtype):
            skipped += 1  # quantized (integer), boolean or complex: not a real weight matrix
            continue
        if sat.takes(key):
            # SAT LoRA merges in torch: only these tensors are handed to it.
            if isinstance(stored, StoredArray):
                stored = stored.to_torch()
            for lora_name, lora_weight, lora_dtype, lora_file in sat.add(key, stored, str(file)):
                seen += 1
                yield make_layer(lora_name, lora_weight, lora_dtype, lora_file)
            continue
        for matrix in _matrices(key, stored, scale, str(file), config, vocab_digests):
            seen += 1
            yield matrix
            del matrix  # the consumer's reference is the only one while the next is read
        # Drop this tensor before the next is read: peak memory stays ~ one tensor's worth.
        del stored
    for lora_name, lora_weight, lora_dtype, lora_file in sat.finish():
        seen += 1
        yield make_layer(lora_name, lora_weight, lora_dtype, lora_file)
    if seen == 0:
        raise _nothing_found(path, skipped)


def _matrices(
    key: str,
    stored: torch.Tensor | StoredArray,
    scale: torch.Tensor | StoredArray | None,
    source: str,
    config: dict[str, object],
    vocab_digests: set[str],
) -> Iterator[LayerMatrix]:
    """The matrices one stored tensor holds: upcast, un-transposed, split when fused.

    ``vocab_digests`` remembers the embeddings seen so far: tied input and output embeddings
    are one matrix and are analysed once.
    """
    name = layer_name(key)
    weight: torch.Tensor | np.ndarray = upcast(stored, scale)
    if config.get("model_type") == "gpt2" and _CONV1D.search(name) and weight.ndim == 2:
        weight = weight.T  # GPT-2 Conv1D stores (in, out)
    kind, _ = classify(name)
    if kind in ("embed", "lm_head"):
        digest = _digest(weight)
        if digest in vocab_digests:
            return
        vocab_digests.add(digest)
    pieces = split_fused(name, weight, config) if kind == "qkv" else [(name, weight)]
    for piece_name, piece in pieces:
        yield make_layer(piece_name, piece, stored.dtype, source)


def _nothing_found(path: Path, skipped: int = 0) -> CheckpointError:
    """The error for a checkpoint without a weight matrix, saying why when it can."""
    if skipped:
        tensors = "1 weight tensor" if skipped == 1 else f"{skipped} weight tensors"
        return CheckpointError(
            path,
            f"{path}: no floating-point weight matrices found; "
            f"{tensors} of integer, boolean or complex dtype not "
            "analysed (a quantized checkpoint stores its weights as "
            "integers: analyse the model it was quantized from)",
        )
    if path.is_dir() and any(path.glob("*zero_pp_rank_*")):
        # ZeRO-3 keeps only placeholders in the model states; the weights are flat fp32
        # partitions inside every rank's optimizer states.
        return CheckpointError(
            path,
            f"{path}: DeepSpeed ZeRO-3 checkpoint, its weights are "
            "partitioned across the optimizer states of every rank; "
            "consolidate it with the zero_to_fp32.py script "
            "DeepSpeed writes beside it, or save with "
            "stage3_gather_16bit_weights_on_model_save",
        )
    return CheckpointError(path, f"{path}: no weight matrices found")
