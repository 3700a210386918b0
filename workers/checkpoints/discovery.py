"""Finding the checkpoints of a training run, their steps, and whether they are complete.

A checkpoint is analysed only once its producer says it is complete: Hugging Face writes
``trainer_state.json`` last, sharded safetensors are complete when the index exists and every
shard's size equals 8 + header + largest data offset, DeepSpeed and Megatron write a tracker file
(``latest``, ``latest_checkpointed_iteration.txt``) after the step folder, torch DCP writes
``.metadata`` last. Anything else is complete once its files stop changing for ``settle_s``.

:func:`survey` is :func:`discover` for a caller that remembers earlier passes: entries it
passes as settled (same name, same inode) are taken as they were instead of being read again,
and it returns the stamp of every folder it listed, so that the next pass can skip a run
whose folders did not change (:func:`unchanged`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement, OutsideRootError
from alphawatch.workers.checkpoints.errors import CheckpointError, printable, shown
from alphawatch.workers.checkpoints.readers import HeaderTooLarge, safetensors_header
from alphawatch.workers.checkpoints.tree import files_below, walk

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# fullmatch, never match + "$": "$" also matches before a trailing newline, and a folder named
# "checkpoint-5\n" must not pass for checkpoint-5.
_HF = re.compile(r"checkpoint-(\d+)")
_DEEPSPEED = re.compile(r"global_step(\d+)")
_MEGATRON = re.compile(r"iter_(\d+)")
_STEP_IN_NAME = re.compile(r"(?:step[=_-]?|iter[=_-]?|checkpoint[=_-]?|ckpt[=_-]?)(\d+)",
                           re.IGNORECASE)
# Steps are stored as BIGINT: a step beyond it (or below 0) is refused, never wrapped.
MAX_STEP = 2**63 - 1
_TRACKER_MAX = 4096
# A folder modified this recently may be modified again within the same timestamp tick (or
# the file system's attribute cache): its stamp is not trusted, so it is listed again.
_RACY_S = 2.0


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


class StepError(CheckpointError):
    """A step number that is no step: negative, beyond 64 bits, or not an integer."""


# A folder's identity and last change: (inode, mtime in ns); None when not to be trusted.
Stamp = tuple[int, int] | None


@dataclass(frozen=True)
class _Scan:
    """What every step of one discovery pass needs: when, how patient, and where it may read.

    ``settled`` holds entries known from an earlier pass (by path: the inode they had and the
    ref they gave); ``listed`` and ``inodes`` are filled as folders are listed.
    """

    settle_s: float
    now: float
    confine: Confinement
    settled: Mapping[Path, tuple[int, CheckpointRef]] = field(default_factory=dict)
    listed: dict[Path, Stamp] = field(default_factory=dict)
    inodes: dict[Path, int] = field(default_factory=dict)
    shapes: dict[Path, Shape] = field(default_factory=dict)
    notes: dict[Path, tuple[str, ...]] = field(default_factory=dict)


def _print(path: Path, scan: _Scan) -> str:
    """``path``'s fingerprint; its shape is kept in ``scan.shapes`` when it has one, what its
    walk passed over in ``scan.notes``."""
    digest, shape, notes = _fingerprint(path, scan.confine)
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
            below it); see :func:`unchanged`.
        inodes: the inode of every entry listed, by path, for the caller's ``settled``.
        shapes: the :class:`Shape` of every checkpoint fingerprinted in this pass that has
            one, by path: what a later :func:`restat` compares with.
    """

    refs: list[CheckpointRef]
    listed: dict[Path, Stamp]
    inodes: dict[Path, int]
    shapes: dict[Path, Shape] = field(default_factory=dict)


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


def parse_step(value: object, where: Path | str) -> int:
    """A step number from a folder name's digits or a JSON value, in 0..2**63-1.

    Raises:
        StepError: anything else (the message names ``where`` and the value).
    """
    step: int | None = None
    if isinstance(value, str) and value.isdigit() and value.isascii():
        digits = value.lstrip("0") or "0"
        # Past 19 digits it is out of range anyway: never hand int() thousands of digits.
        step = int(digits) if len(digits) <= 19 else MAX_STEP + 1
    elif isinstance(value, int) and not isinstance(value, bool):
        step = value
    elif isinstance(value, float) and math.isfinite(value) and value.is_integer():
        step = int(value)
    if step is None or not 0 <= step <= MAX_STEP:
        text = printable(repr(value))
        raise StepError(where, f"{where}: step {text[:40]}{'...' if len(text) > 40 else ''} "
                               f"is not a step number (an integer from 0 to 2**63-1)")
    return step


def _ignored(name: str) -> bool:
    return ".tmp" in name or name.startswith(("tmp-checkpoint-", "tmp_", ".")) or name.endswith(
        (".tmp", ".partial", ".incomplete"))


def _files(path: Path) -> list[Path]:
    # The shared bounded walk (workers.checkpoints.tree): symlinked folders are not entered,
    # symlinked files are kept and judged by the callers.
    return [path] if path.is_file() else [Path(p) for p in files_below(str(path))]


def _escapes(file: Path, confine: Confinement) -> bool:
    # The walk never enters a symlinked folder, so within a checked folder only a file that
    # is itself a symlink can lead elsewhere.
    return file.is_symlink() and not confine.allows(file)


def fingerprint(path: Path, confine: Confinement = UNCONFINED) -> str:
    """Changes when any file of the checkpoint changes (names, sizes, modification times).

    A file that resolves outside the allowed roots counts by its name only: its target is not
    looked at. The files are those of :func:`_files`, in the same order (by path parts), read
    with ``os.scandir``.
    """
    return _fingerprint(path, confine)[0]


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
    digest, shape, _ = _fingerprint(path, confine)
    return digest, shape


def _fingerprint(path: Path, confine: Confinement) -> tuple[str, Shape | None, tuple[str, ...]]:
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
        if (file.is_symlink() if entry is None else entry.is_symlink()):
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


def _settled(path: Path, scan: _Scan) -> bool:
    files = _files(path)
    try:
        # A symlink out of the roots is judged by its own time, its target is not looked at.
        newest = max(((f.lstat() if _escapes(f, scan.confine) else f.stat()).st_mtime
                      for f in files), default=scan.now)
    except FileNotFoundError:
        return False
    return scan.now - newest >= scan.settle_s


PARSE_MAX = 16 * 1024 * 1024
"""The most JSON discovery parses from one file: a safetensors header (a shard's completeness
needs its largest data offset), a shard index, ``trainer_state.json``. Discovery runs in the
worker's own process, beside the API under ``up``: a 95 MB header took 1.25 GB and held the API
up for seconds, and JSON of small objects takes ~25 times its size in memory. Real files are
far smaller: a 70B model's header (723 tensors) about 90 KB, 94,000 tensors (a DeepSeek-V3-
sized MoE in one file) about 13 MB. A larger header or index is refused; a larger
``trainer_state.json`` is not parsed (the checkpoint counts complete once its files settled)."""


@dataclass
class _Checked:
    stamp: tuple[int, int, int, int]  # device, inode, size, mtime in ns
    problem: str | None  # None: complete
    at: float  # when it was parsed (the pass's clock)


class HeaderChecks:
    """Completeness of safetensors shards, parsed once per version of the file.

    A shard whose (device, inode, size, mtime) is the one last parsed is not parsed again; one
    that changed since is parsed again only once ``settle_s`` has passed since the last parse,
    so a file that keeps changing (a byte every few seconds) costs one parse per settle period,
    not one per poll. ``parsed`` counts the parses.
    """

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.parsed = 0
        self._seen: dict[str, _Checked] = {}

    def problem(self, shard: Path, confine: Confinement, now: float, settle_s: float
                ) -> str | None:
        """Why ``shard`` is not whole yet, or None when it is.

        Raises:
            OutsideRootError: it resolves outside the roots; HeaderTooLarge: its header
                declares more than :data:`PARSE_MAX`; CheckpointVanished: it is gone.
        """
        confine.check(shard, "weight file")
        try:
            st = os.stat(shard)
        except FileNotFoundError:
            return f"{shown(shard)} is missing"
        key = str(shard)
        stamp_ = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        last = self._seen.get(key)
        if last is not None and last.stamp == stamp_:
            return last.problem
        if last is not None and 0 <= now - last.at < settle_s:
            return f"{shown(shard)} is still changing"
        self.parsed += 1
        try:
            safetensors_header(shard, confine, PARSE_MAX)
            problem = None
        except (OutsideRootError, HeaderTooLarge):
            raise
        except CheckpointError as exc:
            problem = str(exc)
        self._seen.pop(key, None)
        if len(self._seen) >= self.size:
            del self._seen[next(iter(self._seen))]  # the oldest entry
        self._seen[key] = _Checked(stamp_, problem, now)
        return problem


HEADERS = HeaderChecks()


def _index_names(index: Path, confine: Confinement) -> list[str]:
    mapping = json.loads(confine.read_text(index, "shard index", PARSE_MAX))["weight_map"]
    names = sorted(set(mapping.values()))
    if not all(isinstance(n, str) for n in names):
        raise TypeError("shard names must be strings")
    return names


def weights_complete(folder: Path, confine: Confinement = UNCONFINED, *,
                     now: float | None = None, settle_s: float = 0.0) -> tuple[bool, str]:
    """Whether the weight files of a Hugging Face-style folder are whole.

    Each safetensors shard's header is parsed once per version of the file (see
    :class:`HeaderChecks`; ``now`` and ``settle_s`` pace a shard that keeps changing).

    Raises:
        OutsideRootError: a weight file or a shard-index entry resolves outside the roots:
            that is not "incomplete", it is refused; HeaderTooLarge likewise, for a shard
            whose header is larger than discovery parses (:data:`PARSE_MAX`).
    """
    now = time.time() if now is None else now
    index = next((p for p in sorted(folder.glob("*.safetensors.index.json"))), None)
    shards = sorted(folder.glob("*-of-*.safetensors"))
    if index is None and shards:
        return False, f"{folder}: shards without their index json"
    if index is not None:
        try:
            names = _index_names(index, confine)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False, f"{index}: index is not readable yet"
        for name in names:
            shard = confine.member(folder, name, f"shard-index entry of {index.name}")
            if not shard.exists():
                return False, f"{shard} is missing"
            problem = HEADERS.problem(shard, confine, now, settle_s)
            if problem is not None:
                return False, problem
        return True, "index and every shard complete"
    single = folder / "model.safetensors"
    if single.exists():
        problem = HEADERS.problem(single, confine, now, settle_s)
        if problem is not None:
            return False, problem
        return True, "model.safetensors complete"
    bin_shards = sorted(folder.glob("*-of-*.bin"))
    bin_index = next(iter(sorted(folder.glob("*.bin.index.json"))), None)
    if bin_shards or bin_index is not None:
        if bin_index is None:
            return False, f"{folder}: .bin shards without their index json"
        try:
            bin_names = _index_names(bin_index, confine)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False, f"{bin_index}: index is not readable yet"
        entries = [confine.member(folder, n, f"shard-index entry of {bin_index.name}")
                   for n in bin_names]
        missing = [e for e in entries if not e.exists()]
        if missing:
            return False, f"{missing[0]} is missing"
        return True, "index and every .bin shard present"
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.safetensors")):
        return True, "weights present"
    if (folder / "adapter_config.json").exists():
        return True, "adapter present"
    return False, f"{folder}: no weights yet"


def _state_step(parsed: object, state: Path) -> int | None:
    if not isinstance(parsed, dict):
        raise CheckpointError(state, f"{state}: trainer_state.json is not a JSON object")
    value = parsed.get("global_step")
    if value is None or value == 0:
        return None
    return parse_step(value, state)


def _hf_ref(folder: Path, step: int | None, scan: _Scan) -> CheckpointRef:
    state = folder / "trainer_state.json"
    complete, reason = False, "trainer_state.json not written yet"
    settled = _settled(folder, scan)
    if (state.exists() or state.is_symlink()) and _larger(state, PARSE_MAX, scan.confine):
        # A long log history, or a file made to exhaust the worker: not parsed beside the API.
        # The marker is there; the checkpoint is complete once its files have settled.
        reason = f"trainer_state.json is larger than discovery parses ({PARSE_MAX} bytes)"
        if settled:
            complete, why = weights_complete(folder, scan.confine, now=scan.now,
                                             settle_s=scan.settle_s)
            complete, reason = True, f"{reason}; files settled: {why}"
    elif state.exists() or state.is_symlink():
        try:
            parsed = json.loads(scan.confine.read_text(state, "trainer_state.json", PARSE_MAX))
        except (OSError, ValueError, RecursionError) as exc:
            if settled:
                # Nothing has changed for the settle period: a broken file, not one being
                # written. Refused, visibly, rather than waited for forever.
                raise CheckpointError(state, f"{state}: trainer_state.json does not parse: "
                                             f"{type(exc).__name__}: {exc}") from exc
            reason = "trainer_state.json does not parse yet"
        else:
            named = _state_step(parsed, state)
            step = named if step is None else step
            complete, reason = weights_complete(folder, scan.confine, now=scan.now,
                                                    settle_s=scan.settle_s)
            if not complete and settled:
                # The producer says it is done and nothing has changed since: a broken file,
                # not one being written. Analyse it so it fails with its error, visibly.
                complete, reason = True, f"marker present but {reason}"
    elif settled:
        complete, reason = weights_complete(folder, scan.confine, now=scan.now,
                                                    settle_s=scan.settle_s)
        reason = f"no trainer_state.json; files settled: {reason}"
    fmt = "peft" if (folder / "adapter_config.json").exists() else "hf"
    return CheckpointRef(folder, step, fmt, complete, reason, _print(folder, scan))


def _larger(path: Path, limit: int, confine: Confinement) -> bool:
    """Whether ``path`` (checked under the roots first: a link out is refused, its target's
    size never looked at) holds more than ``limit`` bytes."""
    confine.check(path, path.name)
    try:
        return os.stat(path).st_size > limit
    except OSError:
        return False  # gone, or a looping link: the read that follows says why


def _tracker_step(path: Path, confine: Confinement) -> int | None:
    if not (path.exists() or path.is_symlink()):
        return None
    try:
        text = confine.read_text(path, "tracker file", _TRACKER_MAX).strip()
    except (OSError, ValueError):
        return None  # being written; the step folder waits for it
    digits = re.findall(r"\d+", text)
    return parse_step(digits[-1], path) if digits else None


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file()) or (
        folder / "adapter_config.json").exists()


def _dir_ref(child: Path, trackers: dict[str, int | None], scan: _Scan) -> CheckpointRef | None:
    """The checkpoint a folder holds, judged by its name and its producer's marker, if any."""
    name = child.name
    if m := _HF.fullmatch(name):
        return _hf_ref(child, parse_step(m.group(1), child), scan)
    if m := _DEEPSPEED.fullmatch(name):
        step, latest = parse_step(m.group(1), child), trackers["deepspeed"]
        done = latest is not None and latest >= step
        return CheckpointRef(child, step, "deepspeed", done,
                             "in `latest`" if done else "not yet in `latest`",
                             _print(child, scan))
    if m := _MEGATRON.fullmatch(name):
        step, latest = parse_step(m.group(1), child), trackers["megatron"]
        done = latest is not None and latest >= step
        return CheckpointRef(child, step, "megatron", done,
                             "tracker file reached it" if done else "tracker file not there yet",
                             _print(child, scan))
    if (child / ".metadata").exists():
        match = _STEP_IN_NAME.search(name)
        return CheckpointRef(child, parse_step(match.group(1), child) if match else None, "dcp",
                             True, ".metadata written", _print(child, scan))
    return None


def _trackers(folder: Path, confine: Confinement) -> dict[str, int | None]:
    return {"deepspeed": _tracker_step(folder / "latest", confine),
            "megatron": _tracker_step(folder / "latest_checkpointed_iteration.txt", confine)}


def _name_step(name: str) -> int | None:
    """The step a name claims, when it claims a valid one (for a refused entry's record)."""
    match = (_HF.fullmatch(name) or _DEEPSPEED.fullmatch(name) or _MEGATRON.fullmatch(name)
             or _STEP_IN_NAME.search(name))
    try:
        return parse_step(match.group(1), name) if match else None
    except StepError:
        return None


def refused(path: Path, exc: BaseException, step: int | None = None) -> CheckpointRef:
    """A ref for an entry discovery could not accept; the error names the path."""
    message = str(exc) if isinstance(exc, CheckpointError) else (
        f"{shown(path)}: {type(exc).__name__}: {printable(str(exc))}")
    return CheckpointRef(path, step, "", False, "refused", "", error=message)


def _entry(child: Path, trackers: dict[str, int | None], scan: _Scan, depth: int
           ) -> list[CheckpointRef]:
    """The checkpoints one entry of a folder holds (nested folders are searched)."""
    name = child.name
    is_dir = child.is_dir()
    if not is_dir and child.suffix not in WEIGHT_SUFFIXES:
        return []
    if not name.isprintable():
        # A newline or bytes that are not UTF-8 in a name: it would break logs and the
        # database's text encoding, and could pose as another checkpoint. It gets no step.
        raise CheckpointError(child, f"refused: {shown(child)}: the name is not printable "
                                     "UTF-8 (control characters or undecodable bytes)")
    if is_dir:
        scan.confine.check(child, "checkpoint folder" if _name_step(name) is not None
                           else "folder")
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
    return [CheckpointRef(child, step, fmt, done, "settled" if done else "still changing",
                          _print(child, scan))]


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


def _scan(folder: Path, scan: _Scan, depth: int) -> list[CheckpointRef]:
    try:
        children = _list(folder, scan)
    except FileNotFoundError:
        return []  # removed between listing its parent and listing it
    except OSError as exc:
        raise CheckpointError(folder, f"cannot list {folder}: {exc}") from exc
    refs: list[CheckpointRef] = []
    try:
        trackers = _trackers(folder, scan.confine)
    except Exception as exc:  # a hostile tracker must not hide the folder's other checkpoints
        refs.append(refused(folder, exc))
        trackers = {"deepspeed": None, "megatron": None}
    for child in children:
        if _ignored(child.name):
            continue
        known = scan.settled.get(child)
        if known is not None and known[0] == scan.inodes[child]:
            # Settled in an earlier pass and still the same entry (a folder or file replaced,
            # or swapped for a symlink, has a new inode): not read again.
            refs.append(known[1])
            continue
        try:
            refs += _entry(child, trackers, scan, depth)
        except Exception as exc:  # one entry, whatever it holds, never ends the listing
            step = _name_step(child.name) if child.name.isprintable() else None
            refs.append(refused(child, exc, step))
    return refs


def discover(run_dir: Path, *, settle_s: float = 30.0, now: float | None = None,
             confine: Confinement = UNCONFINED) -> list[CheckpointRef]:
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


def survey(run_dir: Path, *, settle_s: float = 30.0, now: float | None = None,
           confine: Confinement = UNCONFINED,
           settled: Mapping[Path, tuple[int, CheckpointRef]] | None = None) -> Survey:
    """:func:`discover`, taking the entries in ``settled`` as they were when their inode is.

    Args:
        settled: entries an earlier pass found complete and registered, by path: the inode
            they had then and their ref. Anything else is read as :func:`discover` reads it.

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
        return Survey([CheckpointRef(run_dir, step, fmt, done,
                                     "settled" if done else "still changing",
                                     _print(run_dir, scan))], scan.listed, scan.inodes,
                      scan.shapes)
    refs = _scan(run_dir, scan, depth=3)
    if not refs:
        # run_dir is itself one checkpoint: a step folder, or a model saved at the end.
        try:
            own = _dir_ref(run_dir, _trackers(run_dir.parent, confine)
                           if confine.allows(run_dir.parent) else
                           {"deepspeed": None, "megatron": None}, scan)
            if own is not None:
                refs.append(own)
            elif _has_weights(run_dir) or rank_dirs(run_dir):
                refs.append(_hf_ref(run_dir, None, scan))
        except Exception as exc:  # refused like any other entry, never raised
            refs.append(refused(run_dir, exc, _name_step(run_dir.name)))
    refs = [replace(r, notes=scan.notes[r.path]) if r.path in scan.notes and r.error is None
            else r for r in refs]
    refs.sort(key=lambda r: (r.step is None, r.step or 0, str(r.path)))
    return Survey(refs, scan.listed, scan.inodes, scan.shapes)


def rank_dirs(folder: Path) -> list[Path]:
    """Megatron ``mp_rank_XX`` sub-folders of a step folder."""
    return sorted(p for p in folder.glob("mp_rank_*") if p.is_dir())
