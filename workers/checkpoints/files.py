"""What a checkpoint's weights are made of: the weight files, the model config, the matrices.

The bottom of the checkpoint readers: ``layers`` (whole checkpoints) and ``lora`` (adapters on
top of a base model) both build on it, so neither has to import the other to find files.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alphawatch.vocabulary import VARIANT_SEPARATOR
from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement
from alphawatch.workers.checkpoints.errors import CheckpointError, CheckpointVanished, printable
from alphawatch.workers.checkpoints.naming import classify

if TYPE_CHECKING:
    import torch

# Files a Trainer writes beside the weights; training_args.bin is a pickle of a class and would
# (rightly) be refused, the others hold no model weights.
_NOT_WEIGHTS = re.compile(
    r"^(training_args\.bin|optimizer.*|scheduler.*|scaler.*|rng_state.*|"
    r"adapter_model\..*|.*optim.*)$"
)
_TORCH_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")


@dataclass(frozen=True)
class LayerMatrix:
    """One weight matrix to analyse: float32 on CPU, with where and how it was stored.

    Read from safetensors, ``weight`` is a numpy array and ``stored_dtype`` the stored dtype's
    name (``bfloat16``): no torch is needed. Read from a torch pickle or DCP, or made by a
    transformation done in torch, they are a tensor and a ``torch.dtype``.
    """

    name: str
    kind: str
    block: int | None
    weight: torch.Tensor | np.ndarray
    stored_dtype: torch.dtype | str
    source: str


def model_config(folder: Path, confine: Confinement = UNCONFINED) -> dict[str, object]:
    """``config.json`` (or SAT's ``model_config.json``) of a checkpoint folder or its parent.

    The parent is consulted only when it lies under an allowed root itself: it is optional,
    and a checkpoint watched on its own must not reach out of its folder for it.
    """
    for base in (folder, folder.parent):
        if base != folder and not confine.allows(base):
            continue
        for name, extra in (("config.json", {}), ("model_config.json", {"model_type": "sat"})):
            try:
                loaded = json.loads(confine.read_text(base / name, "model config"))
            except (OSError, ValueError):
                continue
            if isinstance(loaded, dict):
                if isinstance(loaded.get("args"), dict):  # SAT nests its arguments
                    loaded = {**loaded["args"], **loaded}
                return {**loaded, **extra}
    return {}


def _index_files(index: Path, folder: Path, confine: Confinement) -> list[Path]:
    try:
        mapping = json.loads(confine.read_text(index, "shard index"))["weight_map"]
        names = sorted(set(mapping.values()))
        if not all(isinstance(name, str) for name in names):
            raise ValueError("shard names must be strings")
    except FileNotFoundError as exc:
        raise CheckpointVanished(index, f"{index} disappeared while being read") from exc
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise CheckpointError(index, f"{index}: unreadable index: {exc}") from exc
    return [confine.member(folder, name, f"shard-index entry of {index.name}") for name in names]


def weight_files(path: Path, confine: Confinement = UNCONFINED) -> list[Path]:
    """The files holding a single-rank checkpoint's weights, in reading order.

    Raises:
        CheckpointError: a folder with no weight file in it.
    """
    if path.is_file():
        return [path]
    for pattern in ("*.safetensors.index.json", "*.bin.index.json"):
        index = sorted(path.glob(pattern))
        if index:
            return _index_files(index[0], path, confine)
    try:
        entries = sorted(p for p in path.iterdir() if p.is_file())
    except FileNotFoundError as exc:
        raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
    files = [p for p in entries if p.suffix == ".safetensors" and not _NOT_WEIGHTS.match(p.name)]
    if not files:
        files = [
            p for p in entries if p.suffix in _TORCH_SUFFIXES and not _NOT_WEIGHTS.match(p.name)
        ]
    if not files:
        raise CheckpointError(path, f"{path}: no weight files (safetensors, .bin, .pt, .ckpt)")
    return files


MAX_NAME = 400
"""Longest layer name kept whole: the database holds 512 characters, and rows append suffixes
such as ``@exp_avg`` or ``@w<k>``."""


ESCAPED_SEPARATOR = "\\x40"
"""How a tensor key's own ``@`` is stored: escaped as :func:`printable` escapes a control
character, since ``@`` separates a layer's name from the variants alphawatch derives."""


def storable_name(name: str) -> str:
    """``name`` as a layer is named: control characters escaped (a NUL byte is not text to the
    database, a newline would forge log lines), ``@`` escaped as ``\\x40`` (it separates the
    variants alphawatch derives, ``<layer>@exp_avg``, ``<layer>@w<k>``: a key such as
    ``q@exp_avg.weight`` must not pass for a gradient, nor ``x@bogus!`` for a variant the API
    refuses), and a name longer than :data:`MAX_NAME` (a hostile or generated key) cut, with a
    hash of the whole so that two such names stay two."""
    name = printable(name).replace(VARIANT_SEPARATOR, ESCAPED_SEPARATOR)
    if len(name) <= MAX_NAME:
        return name
    digest = hashlib.sha256(name.encode("utf-8", "surrogateescape")).hexdigest()[:16]
    return f"{name[: MAX_NAME - len(digest) - 1]}~{digest}"


def make_layer(
    name: str, weight: torch.Tensor | np.ndarray, dtype: torch.dtype | str, source: str
) -> LayerMatrix:
    """A :class:`LayerMatrix` named (:func:`storable_name`) and classified from its tensor key."""
    kind, block = classify(name)
    dense = np.ascontiguousarray(weight) if isinstance(weight, np.ndarray) else weight.contiguous()
    return LayerMatrix(storable_name(name), kind, block, dense, dtype, source)
