"""What a checkpoint or a folder looks like on disk, reduced to something cheap to compare.

A checkpoint's :func:`fingerprint` changes when any of its files changes (names, sizes,
modification times): a registered checkpoint whose fingerprint changed is analysed again. The
:class:`Shape` it was computed from lets a later pass ask the same question with one ``stat``
per member (:func:`restat`). A folder's :data:`Stamp` (inode, mtime) changes when an entry is
added, removed or renamed in it: a run whose listed folders all kept theirs is not listed again
(:func:`unchanged`).
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement
from alphawatch.workers.checkpoints.tree import files_below, walk

# A folder modified this recently may be modified again within the same timestamp tick (or
# the file system's attribute cache): its stamp is not trusted, so it is listed again.
_RACY_S = 2.0

# A folder's identity and last change: (inode, mtime in ns); None when not to be trusted.
Stamp = tuple[int, int] | None


def stamp(path: Path, now: float) -> Stamp:
    """``path``'s (inode, mtime) after every symlink; None when too recent to be trusted.

    Raises:
        OSError: it cannot be looked at.
    """
    st = os.stat(path)
    if now - st.st_mtime < _RACY_S:
        return None
    return (st.st_ino, st.st_mtime_ns)


def unchanged(listed: Mapping[Path, Stamp]) -> bool:
    """Whether every folder a survey listed is still the same folder, unmodified since.

    A new entry, a deleted or renamed one, or a folder swapped for a symlink changes its parent
    folder's stamp; a file rewritten in place does not (see the watcher's re-check of settled
    checkpoints). One ``stat`` per folder.
    """
    now = time.time()
    for path, was in listed.items():
        if was is None:
            return False
        try:
            if stamp(path, now) != was:
                return False
        except OSError:
            return False
    return True


def checkpoint_files(path: Path) -> list[Path]:
    """The files of a checkpoint: ``path`` itself when it is a file, else every file below it."""
    # The shared bounded walk (workers.checkpoints.tree): symlinked folders are not entered,
    # symlinked files are kept and judged by the callers.
    return [path] if path.is_file() else [Path(p) for p in files_below(str(path))]


def escapes(file: Path, confine: Confinement) -> bool:
    """Whether ``file`` is a symlink that leads outside the allowed roots."""
    # The walk never enters a symlinked folder, so within a checked folder only a file that
    # is itself a symlink can lead elsewhere.
    return file.is_symlink() and not confine.allows(file)


def fingerprint(path: Path, confine: Confinement = UNCONFINED) -> str:
    """Changes when any file of the checkpoint changes (names, sizes, modification times).

    A file that resolves outside the allowed roots counts by its name only: its target is not
    looked at. The files are those of :func:`checkpoint_files`, in the same order (by path
    parts), read with ``os.scandir``.
    """
    return fingerprint_walk(path, confine)[0]


# Members of a checkpoint, relative to it ("" is the checkpoint itself): one shared tuple per
# layout, so that 100,000 checkpoints of the same trainer hold one between them.
_LAYOUTS: dict[tuple[str, ...], tuple[str, ...]] = {}
_LAYOUTS_MAX = 10_000


@dataclass(frozen=True)
class Shape:
    """What a checkpoint's :func:`fingerprint` was computed from, to be compared by ``stat``.

    ``members``: the checkpoint's folders and files, relative to it ("" is itself), folders
    first; ``stamp``: a hash of (inode, size, mtime in ns) of each, folders stat'ed before they
    were listed. A new, deleted or renamed file changes its folder's mtime; a file rewritten in
    place its own; so while :func:`restat` gives the same stamp, the fingerprint is the same.
    """

    members: tuple[str, ...]
    stamp: int


def _stamp_of(stats: list[os.stat_result]) -> int:
    return hash(tuple((s.st_ino, s.st_size, s.st_mtime_ns) for s in stats))


def restat(path: Path, shape: Shape) -> int | None:
    """The stamp of ``shape``'s members now (one ``stat`` each); None when one is gone."""
    base = str(path)
    try:
        return _stamp_of([os.stat(f"{base}/{m}" if m else base) for m in shape.members])
    except OSError:
        return None


def fingerprint_shape(path: Path, confine: Confinement = UNCONFINED) -> tuple[str, Shape | None]:
    """:func:`fingerprint`, and the :class:`Shape` it was computed from.

    The shape is None where a ``stat`` of the members cannot stand for the fingerprint: a
    checkpoint holding a symlinked file (its target is judged through the allowed roots), a
    folder that could not be listed or lies too deep to be walked, a file gone while it was
    read.
    """
    digest, shape, _ = fingerprint_walk(path, confine)
    return digest, shape


def fingerprint_walk(path: Path, confine: Confinement) -> tuple[str, Shape | None, tuple[str, ...]]:
    """:func:`fingerprint_shape`, and what the walk passed over (see ``tree.Tree.problems``)."""
    digest = hashlib.sha1(usedforsecurity=False)
    dirs: list[tuple[tuple[str, ...], os.stat_result]] = []
    whole = True
    problems: list[str] = []
    if path.is_file():
        files: list[tuple[tuple[str, ...], os.DirEntry[str] | None]] = [((path.name,), None)]
    else:
        try:
            tree = walk(str(path), stat_folders=True)
        except OSError:
            # The folder's own stat failed (gone meanwhile): fingerprinted as before, no shape.
            tree = walk(str(path))
            tree.folders, tree.whole = [], False
        dirs, whole, problems = tree.folders, tree.whole, tree.problems
        files = sorted(tree.files, key=lambda f: f[0])
    stats = [s for _, s in dirs]
    members = ["/".join(rel[1:]) for rel, _ in dirs]
    for parts, entry in files:
        name = os.fsencode("/".join(parts))
        file = path if entry is None else Path(entry.path)
        if file.is_symlink() if entry is None else entry.is_symlink():
            whole = False
            if not confine.allows(file):
                digest.update(name + b":outside\n")
                continue
        try:
            stat = file.stat() if entry is None else entry.stat()
        except OSError:
            # Gone meanwhile, or a symlink looping or past the OS's path limit: nothing to stamp.
            whole = False
            continue
        digest.update(name + f":{stat.st_size}:{stat.st_mtime_ns}\n".encode())
        stats.append(stat)
        members.append("/".join(parts[1:]))
    shape = None
    if whole:
        layout = tuple(members)
        if len(_LAYOUTS) < _LAYOUTS_MAX:
            layout = _LAYOUTS.setdefault(layout, layout)
        shape = Shape(layout, _stamp_of(stats))
    return digest.hexdigest(), shape, tuple(problems)
