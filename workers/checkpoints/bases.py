"""A second checkpoint read alongside the one analysed: its matrices one at a time, by name.

Update spectra (``<layer>@delta``, ``@delta_init``, ``@delta_prev``) and layer distances need,
for each matrix of the checkpoint in hand, the same matrix of a base checkpoint. Keeping the
base whole in memory would break the "a few times the largest matrix" promise; reading each
matrix by name would re-read shard files (and redo fused splits, tensor-parallel merges) once
per layer. :class:`BaseMatrices` walks the base's own matrix stream in step with the caller:
two checkpoints written by one program list their tensors in one order, so the matrix asked
for is the next one read and nothing is held but it. Matrices read ahead of their turn (another
order) are held up to ``max_ahead_bytes``; beyond that the oldest are dropped and read again by
a new pass when asked for, so memory stays bounded whatever the order.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement
from alphawatch.workers.checkpoints.errors import CheckpointError
from alphawatch.workers.checkpoints.files import LayerMatrix
from alphawatch.workers.checkpoints.layers import iter_layers

if TYPE_CHECKING:
    import torch

MAX_AHEAD_BYTES = 256 * 1024 * 1024
"""Base matrices read ahead of their turn that are held at most (bytes of float32)."""


class BaseMatrices:
    """The matrices of a base checkpoint, handed out by name in the order they are asked for.

    A base that cannot be read (vanished, refused, corrupt) is only a reference: :meth:`take`
    answers None from then on and :attr:`error` says why; the checkpoint in hand is analysed
    without it.
    """

    def __init__(
        self,
        path: Path,
        confine: Confinement = UNCONFINED,
        *,
        max_ahead_bytes: int = MAX_AHEAD_BYTES,
    ) -> None:
        self.path = path
        self.confine = confine
        self.max_ahead_bytes = max_ahead_bytes
        self.error: str | None = None
        self.passes = 0  # passes over the base: 1 when its order matches the checkpoint's
        self.read_s = 0.0  # seconds spent reading the base
        self.matrices_read = 0
        self._stream: Iterator[LayerMatrix] | None = None
        self._ahead: OrderedDict[str, torch.Tensor | np.ndarray] = OrderedDict()
        self._ahead_bytes = 0
        self._names: set[str] | None = None  # every name, once a pass has ended
        self._seen: set[str] = set()  # names met by the first pass so far
        self._taken: set[str] = set()  # names handed out

    def take(self, name: str) -> torch.Tensor | np.ndarray | None:
        """The base's matrix named ``name`` (released by the base: each is handed out once);
        None when the base has none of that name or cannot be read."""
        if self.error is not None:
            return None
        if name in self._ahead:
            weight = self._ahead.pop(name)
            self._ahead_bytes -= _nbytes(weight)
            self._taken.add(name)
            return weight
        if name in self._taken or (self._names is not None and name not in self._names):
            return None
        try:
            return self._find(name)
        except CheckpointError as exc:
            self._fail(str(exc))
        except Exception as exc:  # a broken base fails no checkpoint analysed against it
            self._fail(f"{type(exc).__name__}: {exc}")
        return None

    def _find(self, name: str) -> torch.Tensor | np.ndarray | None:
        restarted = False
        while True:
            if self._stream is None:
                self._stream = iter_layers(self.path, confine=self.confine)
                self.passes += 1
            start = time.perf_counter()
            matrix = next(self._stream, None)
            self.read_s += time.perf_counter() - start
            if matrix is None:  # a pass ended: every name is known now
                self._stream = None
                if self._names is None:
                    self._names = set(self._seen)
                if name not in self._names or name in self._taken or restarted:
                    return None
                restarted = True  # read ahead, then dropped: one more pass finds it
                continue
            self.matrices_read += 1
            if self._names is None:
                self._seen.add(matrix.name)
            if matrix.name == name:
                self._taken.add(name)
                return matrix.weight
            if matrix.name not in self._ahead and matrix.name not in self._taken:
                self._hold(matrix)

    def _hold(self, matrix: LayerMatrix) -> None:
        self._ahead[matrix.name] = matrix.weight
        self._ahead_bytes += _nbytes(matrix.weight)
        while self._ahead_bytes > self.max_ahead_bytes and len(self._ahead) > 1:
            _, weight = self._ahead.popitem(last=False)
            self._ahead_bytes -= _nbytes(weight)

    def _fail(self, error: str) -> None:
        self.error = error
        self._stream = None
        self._ahead.clear()
        self._ahead_bytes = 0

    def close(self) -> None:
        """Release what is held and stop the pass in progress."""
        self._stream = None
        self._ahead.clear()
        self._ahead_bytes = 0


def _nbytes(weight: torch.Tensor | np.ndarray) -> int:
    if isinstance(weight, np.ndarray):
        return int(weight.nbytes)
    return int(weight.numel() * weight.element_size())
