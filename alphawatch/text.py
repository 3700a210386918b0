"""How text named by users is shown in errors and logs: escaped, one line, valid UTF-8.

Run folders, checkpoint and file names are chosen by whoever writes into a watched directory.
They reach error messages (stored in the database, served by the API) and log lines: a name
holding a newline must not forge a log line, bytes that are not UTF-8 must not break the
database's text encoding. Standard library only, so every layer (and the CLI's logging set-up)
may use it.
"""

from __future__ import annotations

import logging
import traceback
from pathlib import Path
from types import TracebackType


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


# The parts of a formatted traceback that Python writes itself (frames of Python source files,
# the chaining sentences); everything else is an exception's text, which may quote any name.
_FRAMES = (
    "Traceback (most recent call last):",
    "  File ",
    "\nThe above exception",
    "\nDuring handling of the above",
)

_ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None] | tuple[None, None, None]


class EscapingFormatter(logging.Formatter):
    """A log formatter that shows every record through :func:`printable`.

    The message is escaped whole, whatever the call site passed (a run folder, a checkpoint
    path, an exception quoting a file name), so no argument can print a line of its own. Of a
    traceback, the frames are kept as Python writes them and each exception's text is escaped.

    Example:
        >>> handler = logging.StreamHandler()
        >>> handler.setFormatter(EscapingFormatter("%(levelname)s %(message)s"))
    """

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)

    def formatException(self, ei: _ExcInfo) -> str:
        chunks = traceback.format_exception(*ei)
        return "".join(
            c if c.startswith(_FRAMES) else printable(c.rstrip("\n")) + "\n" for c in chunks
        ).rstrip("\n")
