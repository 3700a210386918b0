"""Checkpoint discovery and reading: complete checkpoints only, one tensor at a time, safely."""

from alphawatch.workers.checkpoints.discovery import CheckpointRef, discover
from alphawatch.workers.checkpoints.errors import (
    CheckpointError,
    CheckpointVanished,
    UnsafeCheckpointError,
)
from alphawatch.workers.checkpoints.layers import LayerMatrix, iter_layers

__all__ = [
    "CheckpointError",
    "CheckpointRef",
    "CheckpointVanished",
    "LayerMatrix",
    "UnsafeCheckpointError",
    "discover",
    "iter_layers",
]
