"""Errors of checkpoint reading; every message names the file."""

from __future__ import annotations

from pathlib import Path

# Re-exported: the one definition of how a name is shown lives at the bottom of the layers.
from alphawatch.text import printable, shown

__all__ = ["CheckpointError", "CheckpointVanished", "UnsafeCheckpointError", "printable", "shown"]


class CheckpointError(Exception):
    """A checkpoint that cannot be read; ``path`` is the file or folder at fault."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(printable(message))
        self.path = Path(path)


class CheckpointVanished(CheckpointError):
    """The checkpoint was deleted (e.g. rotation by ``save_total_limit``) while being read."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that needs code to load; refused and never executed."""
