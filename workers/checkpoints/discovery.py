"""Finding the checkpoints of a training run: their paths, steps and producers.

A run folder is listed a few levels deep; each entry is named by its producer's convention
(``checkpoint-<step>``, ``global_step<N>``, ``iter_<N>``, a ``.metadata`` folder, a weight file
with a step in its name) and judged complete by that producer's rule
(:mod:`~alphawatch.workers.checkpoints.completeness`); each checkpoint carries its fingerprint
(:mod:`~alphawatch.workers.checkpoints.fingerprints`). An entry that cannot be accepted comes
back refused, with the reason, and never stops the listing.

:func:`survey` is :func:`discover` for a caller that remembers earlier passes: entries it
passes as settled are taken as they were instead of being read again, and it returns the stamp
of every folder it listed, so that the next pass can skip a run whose folders did not change
(:func:`~alphawatch.workers.checkpoints.fingerprints.unchanged`). An entry settled by an earlier
pass of the same process is the same while its inode is; one settled before the process started
(registered with its fingerprint: a restarted worker) while its fingerprint is, which takes a
``stat`` of each of its files and reads none of them (on object storage: no request beyond the
listing).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from alphawatch.workers.checkpoints.completeness import (
    NO_TRACKERS,
    StepError,
    Trackers,
    dcp_completion,
    files_settled,
    hf_completion,
    parse_step,
    tracker_steps,
)
from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement
from alphawatch.workers.checkpoints.errors import CheckpointError, printable, shown
from alphawatch.workers.checkpoints.fingerprints import Shape, Stamp, fingerprint_walk, stamp

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# fullmatch, never match + "$": "$" also matches before a trailing newline, and a folder named
# "checkpoint-5\n" must not pass for checkpoint-5.
_HF = re.compile(r"checkpoint-(\d+)")
_DEEPSPEED = re.compile(r"global_step(\d+)")
_MEGATRON = re.compile(r"iter_(\d+)")
_STEP_IN_NAME = re.compile(
    r"(?:step[=_-]?|iter[=_-]?|checkpoint[=_-]?|ckpt[=_-]?)(\d+)", re.IGNORECASE
)


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run: where it is, its step, its producer, and whether it is complete.

    ``error`` is set when discovery refused the entry (outside the allowed roots, a step that
    is no BIGINT, a name that is not printable UTF-8, unreadable producer files): such a ref
    is never analysed, and ``step`` is None when the entry could not even be given a step.
    ``notes`` name what was passed over below an accepted checkpoint (a folder nested too deep,
    one that cannot be listed): the checkpoint goes on without it, the run shows why.
    """

    path: Path
    step: int | None
    format: str
    complete: bool
    reason: str
    fingerprint: str
    error: str | None = None
    notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class _Scan:
    """What every step of one discovery pass needs: when, how patient, and where it may read.

    ``settled`` holds entries known from an earlier pass (by path: the inode they had, None
    when that pass was another process's, and the ref they gave); ``listed`` and ``inodes``
    are filled as folders are listed.
    """

    settle_s: float
    now: float
    confine: Confinement
    settled: Mapping[Path, tuple[int | None, CheckpointRef]] = field(default_factory=dict)
    listed: dict[Path, Stamp] = field(default_factory=dict)
    inodes: dict[Path, int] = field(default_factory=dict)
    shapes: dict[Path, Shape] = field(default_factory=dict)
    notes: dict[Path, tuple[str, ...]] = field(default_factory=dict)


def _print(path: Path, scan: _Scan) -> str:
    """``path``'s fingerprint; its shape is kept in ``scan.shapes`` when it has one, what its
    walk passed over in ``scan.notes``."""
    digest, shape, notes = fingerprint_walk(path, scan.confine)
    if shape is not None:
        scan.shapes[path] = shape
    if notes:
        scan.notes[path] = notes
    return digest


@dataclass(frozen=True)
class Survey:
    """One pass over a run folder: its checkpoints and what the next pass compares with.

    Attributes:
        refs: every checkpoint found, as :func:`discover` returns them.
        listed: the stamp of every folder listed (the run folder and the folders searched
            below it); see :func:`~alphawatch.workers.checkpoints.fingerprints.unchanged`.
        inodes: the inode of every entry listed, by path, for the caller's ``settled``.
        shapes: the :class:`~alphawatch.workers.checkpoints.fingerprints.Shape` of every
            checkpoint fingerprinted in this pass that has one, by path: what a later
            :func:`~alphawatch.workers.checkpoints.fingerprints.restat` compares with.
    """

    refs: list[CheckpointRef]
    listed: dict[Path, Stamp]
    inodes: dict[Path, int]
    shapes: dict[Path, Shape] = field(default_factory=dict)


def _ignored(name: str) -> bool:
    return (
        ".tmp" in name
        or name.startswith(("tmp-checkpoint-", "tmp_", "."))
        or name.endswith((".tmp", ".partial", ".incomplete"))
    )


def _settled(path: Path, scan: _Scan) -> bool:
    return files_settled(path, scan.confine, scan.now, scan.settle_s)


def _hf_ref(folder: Path, step: int | None, scan: _Scan) -> CheckpointRef:
    step, complete, reason = hf_completion(folder, step, scan.confine, scan.now, scan.settle_s)
    fmt = "peft" if (folder / "adapter_config.json").exists() else "hf"
    return CheckpointRef(folder, step, fmt, complete, reason, _print(folder, scan))


def _has_weights(folder: Path) -> bool:
    return (
        any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file())
        or (folder / "adapter_config.json").exists()
    )


def _dir_ref(child: Path, trackers: Trackers, scan: _Scan) -> CheckpointRef | None:
    """The checkpoint a folder holds, judged by its name and its producer's marker, if any."""
    name = child.name
    if m := _HF.fullmatch(name):
        return _hf_ref(child, parse_step(m.group(1), child), scan)
    if m := _DEEPSPEED.fullmatch(name):
        step, latest = parse_step(m.group(1), child), trackers["deepspeed"]
        done = latest is not None and latest >= step
        return CheckpointRef(
            child,
            step,
            "deepspeed",
            done,
            "in `latest`" if done else "not yet in `latest`",
            _print(child, scan),
        )
    if m := _MEGATRON.fullmatch(name):
        step, latest = parse_step(m.group(1), child), trackers["megatron"]
        done = latest is not None and latest >= step
        return CheckpointRef(
            child,
            step,
            "megatron",
            done,
            "tracker file reached it" if done else "tracker file not there yet",
            _print(child, scan),
        )
    if (child / ".metadata").exists():
        match = _STEP_IN_NAME.search(name)
        complete, reason = dcp_completion(child, scan.confine, scan.now, scan.settle_s)
        return CheckpointRef(
            child,
            parse_step(match.group(1), child) if match else None,
            "dcp",
            complete,
            reason,
            _print(child, scan),
        )
    return None


def _name_step(name: str) -> int | None:
    """The step a name claims, when it claims a valid one (for a refused entry's record)."""
    match = (
        _HF.fullmatch(name)
        or _DEEPSPEED.fullmatch(name)
        or _MEGATRON.fullmatch(name)
        or _STEP_IN_NAME.search(name)
    )
    try:
        return parse_step(match.group(1), name) if match else None
    except StepError:
        return None


def refused(path: Path, exc: BaseException, step: int | None = None) -> CheckpointRef:
    """A ref for an entry discovery could not accept; the error names the path."""
    message = (
        str(exc)
        if isinstance(exc, CheckpointError)
        else (f"{shown(path)}: {type(exc).__name__}: {printable(str(exc))}")
    )
    return CheckpointRef(path, step, "", False, "refused", "", error=message)


def _entry(child: Path, trackers: Trackers, scan: _Scan, depth: int) -> list[CheckpointRef]:
    """The checkpoints one entry of a folder holds (nested folders are searched)."""
    name = child.name
    is_dir = child.is_dir()
    if not is_dir and child.suffix not in WEIGHT_SUFFIXES:
        return []
    if not name.isprintable():
        # A newline or bytes that are not UTF-8 in a name: it would break logs and the
        # database's text encoding, and could pose as another checkpoint. It gets no step.
        raise CheckpointError(
            child,
            f"refused: {shown(child)}: the name is not printable "
            "UTF-8 (control characters or undecodable bytes)",
        )
    if is_dir:
        scan.confine.check(child, "checkpoint folder" if _name_step(name) is not None else "folder")
        ref = _dir_ref(child, trackers, scan)
        if ref is not None:
            return [ref]
        # Lightning keeps its files in <run>/lightning_logs/version_0/checkpoints/, other
        # trainers in <run>/checkpoints/: look a few levels down.
        return _scan(child, scan, depth - 1) if depth > 0 else []
    match = _STEP_IN_NAME.search(name)
    if match is None or "-of-" in name:
        return []
    step = parse_step(match.group(1), child)
    scan.confine.check(child, "checkpoint file")
    if not child.exists():
        return []  # a dangling or looping link: nothing to analyse (yet)
    fmt = "lightning" if child.suffix == ".ckpt" else "file"
    done = _settled(child, scan)
    return [
        CheckpointRef(
            child, step, fmt, done, "settled" if done else "still changing", _print(child, scan)
        )
    ]


def _list(folder: Path, scan: _Scan) -> list[Path]:
    """The entries of ``folder``, sorted; records its stamp and their inodes (no stat each)."""
    try:
        # Stamped before listing: an entry added meanwhile changes the folder after the stamp.
        scan.listed[folder] = stamp(folder, scan.now)
        with os.scandir(folder) as entries:
            found = {folder / e.name: e.inode() for e in entries}
    except FileNotFoundError:
        scan.listed[folder] = None
        raise
    scan.inodes.update(found)
    return sorted(found)


def _still(child: Path, known: tuple[int | None, CheckpointRef], scan: _Scan) -> bool:
    """Whether a settled entry is still the one it was: the same inode when this process
    settled it (a folder or file replaced, or swapped for a symlink, has a new inode); else the
    same fingerprint as when it was registered complete (the names, sizes and times of its
    files, taken by ``stat``: none of them is read, and a mirror's placeholders answer from the
    listing).

    Raises:
        OutsideRootError: it now resolves outside the roots (refused, as a new entry is).
    """
    inode, ref = known
    if inode is not None:
        return inode == scan.inodes[child]
    scan.confine.check(child, "checkpoint")
    return _print(child, scan) == ref.fingerprint


def _scan(folder: Path, scan: _Scan, depth: int) -> list[CheckpointRef]:
    try:
        children = _list(folder, scan)
    except FileNotFoundError:
        return []  # removed between listing its parent and listing it
    except OSError as exc:
        raise CheckpointError(folder, f"cannot list {folder}: {exc}") from exc
    refs: list[CheckpointRef] = []
    try:
        trackers = tracker_steps(folder, scan.confine)
    except Exception as exc:  # a hostile tracker must not hide the folder's other checkpoints
        refs.append(refused(folder, exc))
        trackers = NO_TRACKERS
    for child in children:
        if _ignored(child.name):
            continue
        known = scan.settled.get(child)
        try:
            if known is not None and _still(child, known, scan):
                refs.append(known[1])  # settled in an earlier pass: not read again
                continue
            refs += _entry(child, trackers, scan, depth)
        except Exception as exc:  # one entry, whatever it holds, never ends the listing
            step = _name_step(child.name) if child.name.isprintable() else None
            refs.append(refused(child, exc, step))
    return refs


def discover(
    run_dir: Path,
    *,
    settle_s: float = 30.0,
    now: float | None = None,
    confine: Confinement = UNCONFINED,
) -> list[CheckpointRef]:
    """Every checkpoint under ``run_dir`` (or ``run_dir`` itself), sorted by step.

    Args:
        run_dir: a training run's output folder, a single checkpoint folder or a weight file.
        settle_s: for producers without a completion marker, how long a checkpoint's files must
            stay unchanged before it counts as complete.
        now: the current time (seconds since the epoch); for tests.
        confine: the roots every file read must resolve under (anywhere by default).

    Returns:
        Every checkpoint found, complete or not (``complete`` and ``reason`` say which and why);
        ``*.tmp*`` and ``tmp-checkpoint-*`` are left out. Entries that cannot be accepted come
        back with ``error`` set (see :class:`CheckpointRef`) instead of stopping the listing.

    Raises:
        CheckpointError: ``run_dir`` does not exist or cannot be listed; OutsideRootError when
            it resolves outside the allowed roots (a run folder swapped for a symlink).
    """
    return survey(run_dir, settle_s=settle_s, now=now, confine=confine).refs


def survey(
    run_dir: Path,
    *,
    settle_s: float = 30.0,
    now: float | None = None,
    confine: Confinement = UNCONFINED,
    settled: Mapping[Path, tuple[int | None, CheckpointRef]] | None = None,
) -> Survey:
    """:func:`discover`, taking the entries in ``settled`` as they were while they are the same.

    Args:
        settled: entries an earlier pass found complete and registered, by path: the inode
            they had then (None: registered by an earlier process, then compared by their
            ref's fingerprint) and their ref. Anything else, and a settled entry that changed,
            is read as :func:`discover` reads it.

    Returns:
        The refs, and the stamps and inodes the next pass compares with (:class:`Survey`).

    Raises:
        CheckpointError: as :func:`discover`.
    """
    scan = _Scan(settle_s, time.time() if now is None else now, confine, settled or {})
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(run_dir, f"{run_dir} does not exist")
    confine.check(run_dir, "run folder")
    if run_dir.is_file():
        scan.listed[run_dir] = stamp(run_dir, scan.now)
        match = _STEP_IN_NAME.search(run_dir.name)
        fmt = "lightning" if run_dir.suffix == ".ckpt" else "file"
        done = _settled(run_dir, scan)
        try:
            step = parse_step(match.group(1), run_dir) if match else None
        except StepError as exc:
            return Survey([refused(run_dir, exc)], scan.listed, scan.inodes, scan.shapes)
        return Survey(
            [
                CheckpointRef(
                    run_dir,
                    step,
                    fmt,
                    done,
                    "settled" if done else "still changing",
                    _print(run_dir, scan),
                )
            ],
            scan.listed,
            scan.inodes,
            scan.shapes,
        )
    refs = _scan(run_dir, scan, depth=3)
    if not refs:
        # run_dir is itself one checkpoint: a step folder, or a model saved at the end.
        try:
            own = _dir_ref(
                run_dir,
                tracker_steps(run_dir.parent, confine)
                if confine.allows(run_dir.parent)
                else NO_TRACKERS,
                scan,
            )
            if own is not None:
                refs.append(own)
            elif _has_weights(run_dir) or rank_dirs(run_dir):
                refs.append(_hf_ref(run_dir, None, scan))
        except Exception as exc:  # refused like any other entry, never raised
            refs.append(refused(run_dir, exc, _name_step(run_dir.name)))
    refs = [
        replace(r, notes=scan.notes[r.path]) if r.path in scan.notes and r.error is None else r
        for r in refs
    ]
    refs.sort(key=lambda r: (r.step is None, r.step or 0, str(r.path)))
    return Survey(refs, scan.listed, scan.inodes, scan.shapes)


def rank_dirs(folder: Path) -> list[Path]:
    """Megatron ``mp_rank_XX`` sub-folders of a step folder."""
    return sorted(p for p in folder.glob("mp_rank_*") if p.is_dir())
