"""Confinement: every file the worker reads lies under an allowed root after symlinks.

Registration checks a run's path once, but the files of a run change afterwards: a checkpoint
folder or weight file can be a symlink out of the root, a shard index or a PEFT adapter config
can name ``../../etc`` or an absolute path, a run folder can be swapped for a symlink after it
was registered. So the check is made where files are opened, by one object every reader
receives: :class:`Confinement`.

Rules (each refusal names the path and the rule):

- a path is allowed when its real path (every symlink resolved) is an allowed root or lies
  below one; roots are resolved once, when the confinement is made, so swapping a root for a
  symlink later cannot move it;
- a file is opened first and the real path of the opened descriptor (``/proc/self/fd/N``) is
  checked, so a symlink swapped in between the check and the open is caught (where ``/proc``
  is missing, the path is checked just before it is opened);
- names taken from inside a checkpoint (shard-index entries, adapter configs) must be relative
  and free of ``..`` before they are even resolved.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import BinaryIO

from alphawatch.workers.checkpoints.errors import CheckpointError, shown

_PROC_FD = Path("/proc/self/fd")
# JSON side files (configs, shard indexes, trainer_state.json with a long log history) stay far
# below this; a larger one is refused rather than read whole into memory.
SIDE_FILE_MAX = 64 * 1024 * 1024


class OutsideRootError(CheckpointError):
    """A path that resolves outside every allowed root: refused, never read."""


@dataclass(frozen=True)
class Confinement:
    """The folders this process may read checkpoints from.

    Args:
        roots: resolved allowed roots; ``None`` allows every path (``alphawatch analyze`` on a
            path its user names, and library use), an empty tuple allows none.

    Example:
        >>> confine = Confinement.to([Path("/runs")])
        >>> with confine.open(Path("/runs/a/checkpoint-10/model.safetensors")) as handle:
        ...     handle.read(8)
    """

    roots: tuple[Path, ...] | None

    @classmethod
    def to(cls, roots: Iterable[Path]) -> Confinement:
        """Confine to ``roots``, each resolved now (later symlink swaps cannot move a root)."""
        resolved = list(dict.fromkeys(Path(os.path.realpath(Path(r).expanduser())) for r in roots))
        # A root inside another adds nothing, and would only lengthen every refusal message.
        return cls(tuple(r for r in resolved if not any(o in r.parents for o in resolved)))

    def describe(self) -> str:
        if self.roots is None:
            return "anywhere"
        return ", ".join(map(str, self.roots)) if self.roots else "none (no allowed root is set)"

    def allows(self, path: Path | str) -> bool:
        """Whether ``path`` resolves (after every symlink) under an allowed root."""
        if self.roots is None:
            return True
        return self._under_root(Path(os.path.realpath(path)))

    def _under_root(self, real: Path) -> bool:
        assert self.roots is not None
        return any(real == root or root in real.parents for root in self.roots)

    def check(self, path: Path | str, what: str = "file") -> Path:
        """``path`` itself when it resolves under an allowed root.

        Raises:
            OutsideRootError: it resolves elsewhere; the message names both paths and the rule.
        """
        path = Path(path)
        if self.roots is None:
            return path
        real = Path(os.path.realpath(path))
        if not self._under_root(real):
            raise OutsideRootError(path, self._refusal(path, real, what))
        return path

    def _refusal(self, path: Path, real: Path, what: str) -> str:
        via = "" if real == path else f" resolves to {shown(real)}, which"
        return (
            f"refused: {what} {shown(path)}{via} is outside the allowed roots "
            f"({self.describe()}); every file alphawatch reads must lie under an allowed "
            "root after symlinks are resolved (ALPHAWATCH_ALLOWED_ROOTS)"
        )

    @contextlib.contextmanager
    def open(self, path: Path | str, what: str = "file") -> Iterator[BinaryIO]:
        """``path`` opened for binary reading, after its descriptor was checked.

        Raises:
            OutsideRootError: the opened file lies outside every allowed root.
            CheckpointError: it is not a regular file (checked without blocking on a FIFO).
            OSError: as ``open`` does (FileNotFoundError when it is gone).
        """
        path = Path(path)
        if self.roots is not None and not _PROC_FD.is_dir():
            self.check(path, what)
        # Non-blocking open: opening a FIFO for reading would otherwise wait for a writer
        # forever (and a worker with it). Only regular files are read past this point.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            mode = os.fstat(fd).st_mode
            if not stat.S_ISREG(mode):
                raise CheckpointError(
                    path,
                    f"refused: {what} {shown(path)} is not a regular "
                    "file (a FIFO, device or socket is never read)",
                )
            os.set_blocking(fd, True)
            handle = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with handle:
            if self.roots is not None:
                real = opened_path(handle)
                if real is not None and not self._under_root(real):
                    raise OutsideRootError(path, self._refusal(path, real, what))
            yield handle

    def read_bytes(self, path: Path | str, what: str = "file", limit: int = SIDE_FILE_MAX) -> bytes:
        """The whole of a small file (a JSON config, an index, a tracker), at most ``limit``.

        Raises:
            CheckpointError: the file is larger than ``limit`` bytes (not read).
        """
        with self.open(path, what) as handle:
            data = handle.read(limit + 1)
        if len(data) > limit:
            raise CheckpointError(
                path,
                f"{shown(path)}: {what} is larger than {limit} bytes; "
                "refused rather than read into memory",
            )
        return data

    def read_text(self, path: Path | str, what: str = "file", limit: int = SIDE_FILE_MAX) -> str:
        """:meth:`read_bytes` decoded as UTF-8 (UnicodeDecodeError is a ValueError)."""
        return self.read_bytes(path, what, limit).decode("utf-8")

    def member(self, folder: Path, name: str, what: str) -> Path:
        """``folder / name`` for a name read from inside a checkpoint, checked as such.

        Raises:
            OutsideRootError: ``name`` is absolute or has ``..`` (a checkpoint's own files are
                named relative to it), or the joined path resolves outside the roots.
        """
        pure = PurePath(name)
        if pure.is_absolute() or ".." in pure.parts or "\x00" in name:
            raise OutsideRootError(
                folder / name if not pure.is_absolute() else Path(name),
                f"refused: {what} {name!r} in {shown(folder)} is not a plain relative name "
                "(absolute paths and '..' are not allowed: a checkpoint names only its own "
                "files)",
            )
        return self.check(folder / name, what)


UNCONFINED = Confinement(None)


def opened_path(handle: BinaryIO) -> Path | None:
    """Real path of an open file, from its descriptor; None where ``/proc`` is missing."""
    try:
        target = os.readlink(_PROC_FD / str(handle.fileno()))
    except OSError:
        return None
    # A file unlinked after it was opened (checkpoint rotation) reads "<path> (deleted)".
    return Path(target.removesuffix(" (deleted)"))


def descriptor_path(handle: BinaryIO, fallback: Path) -> str:
    """A name that reopens exactly this open file (``/proc/self/fd/N``), for APIs that need a
    path (a memory map): no symlink swapped in since the check can redirect it."""
    proc = _PROC_FD / str(handle.fileno())
    return str(proc) if _PROC_FD.is_dir() else str(fallback)
