"""Errors of checkpoint reading; every message names the file."""

from __future__ import annotations

from pathlib import Path


class CheckpointError(Exception):
    """A checkpoint that cannot be read; ``path`` is the file or folder at fault."""

    def __init__(self, path: Path | str, message: str) -> None:
        super().__init__(printable(message))
        self.path = Path(path)


class CheckpointVanished(CheckpointError):
    """The checkpoint was deleted (e.g. rotation by ``save_total_limit``) while being read."""


class UnsafeCheckpointError(CheckpointError):
    """A pickle that needs code to load; refused and never executed."""


def printable(text: str) -> str:
    """``text`` with bytes that are not UTF-8 and control characters escaped.

    File names may hold newlines or bytes that are not UTF-8: in an error message they are
    shown escaped, never raw, so a message cannot forge log lines or break the database's text
    encoding.
    """
    if text.isprintable():
        return text
    text = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def shown(path: Path | str) -> str:
    """A path as error messages show it (see :func:`printable`)."""
    return printable(str(path))
