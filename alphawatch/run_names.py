"""What a run may be called, and how its name becomes a folder: one rule for the API, discovery
and the exporters.

A run's name is also a path component: TensorBoard export writes under ``<logdir>/<run name>/``.
``.`` and ``..`` (and any name made only of dots) are refused where names are chosen, and
discovery never derives one; a name stored before that rule (or one that is no single path
component for another reason) still gets a folder of its own under the logdir
(:func:`folder_name`), never one outside it. Standard library only: every layer imports it.
"""

from __future__ import annotations

import hashlib
import re

MAX_LENGTH = 255
"""The database's ``run.name`` holds 255 characters."""

PATTERN = r"^[\w.\-]+$"
"""Characters a name given through the API may use; see :func:`refusal` for the dots."""

FALLBACK = "run"
"""The name of a run whose folder's name cannot be one (``/``, a folder named ``...``)."""

_ONE_COMPONENT = re.compile(r"^[^/\\\x00]+$")


def only_dots(name: str) -> bool:
    """Whether ``name`` is ``.``, ``..`` or any other string of dots (or empty)."""
    return not name.strip(".")


def refusal(name: str) -> str | None:
    """Why ``name`` cannot be a run's name, or None when it can (the pattern aside)."""
    if only_dots(name):
        return (
            f"a run name cannot be only dots ({name!r}): it names the run's folder in "
            "exports, where '.' and '..' are this folder and its parent"
        )
    return None


def derived(folder: str) -> str:
    """The name discovery gives a run found in a folder called ``folder``."""
    return FALLBACK if only_dots(folder) else folder[:MAX_LENGTH]


def folder_name(name: str) -> str:
    """``name`` as one path component under an export's logdir: itself when it is one (not only
    dots, no ``/``, ``\\`` or NUL, at most 255 bytes), else ``run-`` and a hash of it (stable,
    so that a second export finds the folder of the first)."""
    if (
        not only_dots(name)
        and _ONE_COMPONENT.match(name)
        and len(name.encode("utf-8", "surrogateescape")) <= MAX_LENGTH
    ):
        return name
    return f"{FALLBACK}-{hashlib.sha256(name.encode('utf-8', 'surrogateescape')).hexdigest()[:16]}"
