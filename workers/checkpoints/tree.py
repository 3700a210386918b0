"""The one walk over the files of a checkpoint folder: iterative, bounded in depth.

Everything that looks below a checkpoint folder (discovery's "are its files settled", its
fingerprint, the analysis's size of the run's first checkpoint) walks it through :func:`walk`.
A folder is written by whoever can write into the run directory, so the walk holds whatever
they made of it:

- it is iterative (a stack of folders, not recursion), so no nesting can exhaust Python's
  recursion limit: 1,100 nested folders once made every later checkpoint of a run fail with
  ``RecursionError``;
- it enters folders at most :data:`MAX_DEPTH` levels below the checkpoint; a folder deeper
  than that is not listed, and :attr:`Tree.problems` names it and the rule (a real
  checkpoint's files lie one or two levels down);
- symlinked folders are never entered (a link may lead out of the allowed roots, or into a
  loop); symlinked files are listed, for the caller to judge through the allowed roots;
- a folder that cannot be listed (permissions, a path past the OS's length limit) is passed
  over and named in :attr:`Tree.problems`: one bad sibling never fails the checkpoint.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

from alphawatch.workers.checkpoints.errors import shown

MAX_DEPTH = 32
"""Levels of folders below a checkpoint that are walked: files in a folder 32 levels down are
found, a folder below that is not entered."""

Parts = tuple[str, ...]


@dataclass
class Tree:
    """What :func:`walk` found below one folder.

    Attributes:
        files: every regular file (or symlink to one), with its path parts from the walked
            folder's name down, and its directory entry (``entry.path`` reaches it).
        folders: every folder listed, with its parts and its ``stat`` taken before it was
            listed (only when ``stat_folders`` was asked).
        whole: False when some folder could not be listed or was too deep to be: the files
            are then not all there is.
        problems: why, one line per folder passed over, naming it and the rule.
    """

    files: list[tuple[Parts, os.DirEntry[str]]] = field(default_factory=list)
    folders: list[tuple[Parts, os.stat_result]] = field(default_factory=list)
    whole: bool = True
    problems: list[str] = field(default_factory=list)


def walk(folder: str, *, stat_folders: bool = False, max_depth: int = MAX_DEPTH) -> Tree:
    """Every file below ``folder``, at most ``max_depth`` levels of folders down.

    Args:
        folder: the checkpoint folder.
        stat_folders: ``stat`` each folder before listing it (into :attr:`Tree.folders`);
            an ``OSError`` from the stat of ``folder`` itself is raised (it is gone).
        max_depth: levels of folders below ``folder`` that are entered.

    Returns:
        A :class:`Tree`; file order is the listing's, callers sort.
    """
    tree = Tree()
    name = os.path.basename(folder.rstrip("/")) or folder
    stack: list[tuple[str, Parts, int]] = [(folder, (name,), 0)]
    while stack:
        path, parts, depth = stack.pop()
        try:
            if stat_folders:
                tree.folders.append((parts, os.stat(path)))
            with os.scandir(path) as listing:
                entries = list(listing)
        except OSError as exc:
            if depth == 0 and stat_folders and not isinstance(exc, PermissionError):
                raise
            tree.whole = False
            if isinstance(exc, FileNotFoundError):
                continue  # removed while walked (rotation): nothing there to refuse
            tree.problems.append(
                f"refused: {shown(path)} cannot be listed ({exc.strerror}); its files are not read"
            )
            continue
        for entry in entries:
            try:
                is_dir = entry.is_dir(follow_symlinks=False)
                is_file = not is_dir and entry.is_file()
            except OSError:
                continue  # gone meanwhile, or its name is past the OS's limit
            if is_dir:
                if depth < max_depth:
                    stack.append((entry.path, (*parts, entry.name), depth + 1))
                else:
                    tree.whole = False
                    tree.problems.append(
                        f"refused: {shown(entry.path)}: a folder more than {max_depth} levels "
                        f"below {shown(folder)}; alphawatch reads no deeper (a checkpoint's "
                        "files lie a few levels down)"
                    )
            elif is_file:
                tree.files.append(((*parts, entry.name), entry))
    return tree


def files_below(folder: str, max_depth: int = MAX_DEPTH) -> list[str]:
    """The paths of :func:`walk`'s files, sorted by their parts (as ``Path`` objects sort)."""
    files = walk(folder, max_depth=max_depth).files
    return [entry.path for _, entry in sorted(files, key=lambda f: f[0])]
