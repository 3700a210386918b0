"""Checkpoint discovery and reading: complete checkpoints only, one tensor at a time, safely."""

from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement, OutsideRootError
from alphawatch.workers.checkpoints.discovery import CheckpointRef, Survey, discover, survey
from alphawatch.workers.checkpoints.errors import (
    CheckpointError,
    CheckpointVanished,
    UnsafeCheckpointError,
)
from alphawatch.workers.checkpoints.files import LayerMatrix
from alphawatch.workers.checkpoints.fingerprints import fingerprint, unchanged
from alphawatch.workers.checkpoints.layers import iter_layers

__all__ = [
    "UNCONFINED",
    "CheckpointError",
    "CheckpointRef",
    "CheckpointVanished",
    "Confinement",
    "LayerMatrix",
    "OutsideRootError",
    "Survey",
    "UnsafeCheckpointError",
    "discover",
    "fingerprint",
    "iter_layers",
    "survey",
    "unchanged",
]
