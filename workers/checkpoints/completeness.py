"""Whether a checkpoint is whole, by its producer's rule, and how much discovery may parse.

A checkpoint is analysed only once its producer says it is complete: Hugging Face writes
``trainer_state.json`` last, sharded safetensors are complete when the index exists and every
shard's size equals 8 + header + largest data offset, DeepSpeed and Megatron write a tracker file
(``latest``, ``latest_checkpointed_iteration.txt``) after the step folder, torch DCP writes
``.metadata`` last and is complete when every ``.distcp`` file it records holds at least the
bytes its records reach (:func:`dcp_completion`). Anything else is complete once its files stop
changing for ``settle_s`` (:func:`files_settled`). Every file read here is bounded
(:data:`PARSE_MAX`, tracker files a few kilobytes), and every step number is checked to fit
a BIGINT (:func:`parse_step`).
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import ClassVar

from alphawatch.vocabulary import (
    MAX_STEP,  # BIGINT: beyond it (or below 0) is refused, never wrapped
)
from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement, OutsideRootError
from alphawatch.workers.checkpoints.errors import CheckpointError, printable, shown
from alphawatch.workers.checkpoints.fingerprints import checkpoint_files, escapes
from alphawatch.workers.checkpoints.readers import HeaderTooLarge, safetensors_header

_TRACKER_MAX = 4096


class StepError(CheckpointError):
    """A step number that is no step: negative, beyond 64 bits, or not an integer."""


def parse_step(value: object, where: Path | str) -> int:
    """A step number from a folder name's digits or a JSON value, in 0..MAX_STEP.

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
        raise StepError(
            where,
            f"{where}: step {text[:40]}{'...' if len(text) > 40 else ''} "
            f"is not a step number (an integer from 0 to {MAX_STEP})",
        )
    return step


def files_settled(path: Path, confine: Confinement, now: float, settle_s: float) -> bool:
    """Whether no file of ``path`` has changed for ``settle_s`` seconds before ``now``."""
    files = checkpoint_files(path)
    try:
        # A symlink out of the roots is judged by its own time, its target is not looked at.
        newest = max(
            ((f.lstat() if escapes(f, confine) else f.stat()).st_mtime for f in files), default=now
        )
    except FileNotFoundError:
        return False
    return now - newest >= settle_s


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

    def problem(self, shard: Path, confine: Confinement, now: float, settle_s: float) -> str | None:
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


def weights_complete(
    folder: Path,
    confine: Confinement = UNCONFINED,
    *,
    now: float | None = None,
    settle_s: float = 0.0,
) -> tuple[bool, str]:
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
        entries = [
            confine.member(folder, n, f"shard-index entry of {bin_index.name}") for n in bin_names
        ]
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


def hf_completion(
    folder: Path, step: int | None, confine: Confinement, now: float, settle_s: float
) -> tuple[int | None, bool, str]:
    """A Hugging Face folder's step, whether it is complete, and why.

    ``trainer_state.json`` is the marker the trainer writes last; its ``global_step`` names the
    step when the folder's name does not. A folder without one is complete once its files have
    settled for ``settle_s`` and its weights are whole.

    Raises:
        CheckpointError: ``trainer_state.json`` has settled and does not parse, is no JSON
            object, or its ``global_step`` is no step (:class:`StepError`); OutsideRootError
            and HeaderTooLarge as :func:`weights_complete`.
    """
    state = folder / "trainer_state.json"
    complete, reason = False, "trainer_state.json not written yet"
    quiet = files_settled(folder, confine, now, settle_s)
    if (state.exists() or state.is_symlink()) and _larger(state, PARSE_MAX, confine):
        # A long log history, or a file made to exhaust the worker: not parsed beside the API.
        # The marker is there; the checkpoint is complete once its files have settled.
        reason = f"trainer_state.json is larger than discovery parses ({PARSE_MAX} bytes)"
        if quiet:
            complete, why = weights_complete(folder, confine, now=now, settle_s=settle_s)
            complete, reason = True, f"{reason}; files settled: {why}"
    elif state.exists() or state.is_symlink():
        try:
            parsed = json.loads(confine.read_text(state, "trainer_state.json", PARSE_MAX))
        except (OSError, ValueError, RecursionError) as exc:
            if quiet:
                # Nothing has changed for the settle period: a broken file, not one being
                # written. Refused, visibly, rather than waited for forever.
                raise CheckpointError(
                    state,
                    f"{state}: trainer_state.json does not parse: {type(exc).__name__}: {exc}",
                ) from exc
            reason = "trainer_state.json does not parse yet"
        else:
            named = _state_step(parsed, state)
            step = named if step is None else step
            complete, reason = weights_complete(folder, confine, now=now, settle_s=settle_s)
            if not complete and quiet:
                # The producer says it is done and nothing has changed since: a broken file,
                # not one being written. Analyse it so it fails with its error, visibly.
                complete, reason = True, f"marker present but {reason}"
    elif quiet:
        complete, reason = weights_complete(folder, confine, now=now, settle_s=settle_s)
        reason = f"no trainer_state.json; files settled: {reason}"
    return step, complete, reason


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


Trackers = Mapping[str, int | None]
"""The step each producer's tracker file names in a folder, by producer (None: no tracker)."""

NO_TRACKERS: Trackers = MappingProxyType({"deepspeed": None, "megatron": None})


def tracker_steps(folder: Path, confine: Confinement) -> Trackers:
    """The steps the DeepSpeed and Megatron tracker files of ``folder`` have reached.

    Raises:
        StepError: a tracker names a step that is no step; OutsideRootError: a tracker
            resolves outside the roots.
    """
    return {
        "deepspeed": _tracker_step(folder / "latest", confine),
        "megatron": _tracker_step(folder / "latest_checkpointed_iteration.txt", confine),
    }


class _Record:
    """An object a DCP ``.metadata`` pickle builds, kept as inert data: the arguments it was
    made with and the state it was given. Nothing of torch is imported, no code is run."""

    args: tuple[object, ...] = ()
    state: object = None

    def __init__(self, *args: object) -> None:
        self.args = args

    def __setstate__(self, state: object) -> None:
        self.state = state

    def field(self, name: str) -> object:
        """A dataclass field of the record (a dict state, or slots as ``(None, dict)``)."""
        state = self.state
        if isinstance(state, tuple) and len(state) == 2:
            state = {**(state[0] or {}), **(state[1] or {})}
        return state.get(name) if isinstance(state, dict) else None


_RECORD_MODULES = ("torch", "pathlib", "collections")


class _LayoutUnpickler(pickle.Unpickler):
    """Reads a DCP ``.metadata`` pickle into :class:`_Record` objects: every global a pickle of
    torch's, ``pathlib`` or ``collections`` names is a record type; any other is refused."""

    _types: ClassVar[dict[tuple[str, str], type[_Record]]] = {}

    def find_class(self, module: str, name: str) -> type[_Record]:
        if module.partition(".")[0] not in _RECORD_MODULES:
            raise pickle.UnpicklingError(f"global {module}.{name} is not DCP metadata")
        key = (module, name)
        made = self._types.get(key)
        if made is None:
            made = self._types[key] = type(name, (_Record,), {"__slots__": ()})
        return made


def dcp_layout(data: bytes) -> dict[str, int] | None:
    """From the bytes of a DCP ``.metadata``, the byte each data file must reach: for every
    file its records name, the largest ``offset + length`` among them. None when the metadata
    records no file layout alphawatch knows (another storage writer's): no size to check.

    Raises:
        ValueError: the bytes are no DCP metadata (pickle.UnpicklingError is one).
    """
    try:
        metadata = _LayoutUnpickler(io.BytesIO(data)).load()
    except (pickle.UnpicklingError, EOFError, TypeError, AttributeError, IndexError) as exc:
        raise ValueError(f"not DCP metadata: {type(exc).__name__}: {exc}") from exc
    if not isinstance(metadata, _Record) or type(metadata).__name__ != "Metadata":
        raise ValueError("not DCP metadata: the pickle holds no Metadata record")
    storage = metadata.field("storage_data")
    if not isinstance(storage, dict) or not storage:
        return None
    ends: dict[str, int] = {}
    for info in storage.values():
        if not isinstance(info, _Record):
            return None
        name, offset, length = (info.field(k) for k in ("relative_path", "offset", "length"))
        if not (isinstance(name, str) and isinstance(offset, int) and isinstance(length, int)):
            return None
        if offset < 0 or length < 0:
            raise ValueError(f"not DCP metadata: {name!r} at a negative offset or length")
        ends[name] = max(ends.get(name, 0), offset + length)
    return ends


class DcpLayouts:
    """The layouts of DCP ``.metadata`` files, parsed once per version of the file (its
    device, inode, size and mtime), so a settled checkpoint costs no read at the next pass."""

    def __init__(self, size: int = 4096) -> None:
        self.size = size
        self.parsed = 0
        self._seen: dict[str, tuple[tuple[int, int, int, int], dict[str, int] | None]] = {}

    def layout(self, metadata: Path, confine: Confinement) -> dict[str, int] | None:
        """:func:`dcp_layout` of ``metadata``.

        Raises:
            ValueError: no DCP metadata; CheckpointError: larger than :data:`PARSE_MAX`;
            OSError: unreadable or gone; OutsideRootError: it resolves outside the roots.
        """
        confine.check(metadata, "DCP metadata")
        st = os.stat(metadata)
        stamp_ = (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)
        key = str(metadata)
        last = self._seen.get(key)
        if last is not None and last[0] == stamp_:
            return last[1]
        self.parsed += 1
        ends = dcp_layout(confine.read_bytes(metadata, "DCP metadata", PARSE_MAX))
        self._seen.pop(key, None)
        if len(self._seen) >= self.size:
            del self._seen[next(iter(self._seen))]  # the oldest entry
        self._seen[key] = (stamp_, ends)
        return ends


DCP_LAYOUTS = DcpLayouts()


def dcp_completion(
    folder: Path, confine: Confinement, now: float, settle_s: float
) -> tuple[bool, str]:
    """Whether a DCP folder (one with ``.metadata``) is complete, and why.

    DCP writes ``.metadata`` after every rank's data, but an object store has no rename: the
    metadata can be listed before the data it records, or beside a data file cut short. The
    folder is complete when every ``.distcp`` file the metadata records is present and holds at
    least the bytes its records reach (largest ``offset + length``). Metadata that does not
    parse, or that stays ahead of its data for ``settle_s`` (nothing changed), makes the
    folder complete all the same, so that its analysis fails visibly with the error rather
    than waiting for ever; metadata larger than :data:`PARSE_MAX` is not parsed (complete).

    Raises:
        OutsideRootError: the metadata or a data file it records resolves outside the roots.
    """
    metadata = folder / ".metadata"
    if _larger(metadata, PARSE_MAX, confine):
        return True, f".metadata written (larger than discovery parses, {PARSE_MAX} bytes)"
    try:
        ends = DCP_LAYOUTS.layout(metadata, confine)
    except OutsideRootError:
        raise
    except (OSError, ValueError, CheckpointError) as exc:
        problem = f".metadata does not parse: {printable(str(exc))[:200]}"
        if files_settled(folder, confine, now, settle_s):
            return True, f"{problem}; files settled"
        return False, f"{problem} yet"
    if ends is None:
        return True, ".metadata written (records no file sizes to check)"
    for name, end in sorted(ends.items()):
        data = confine.member(folder, name, "DCP data file named by .metadata")
        try:
            held = os.stat(data).st_size
        except FileNotFoundError:
            problem = f"{shown(data)} is missing"
        else:
            if held >= end:
                continue
            problem = f"{shown(data)} holds {held} of the {end} bytes .metadata records"
        if files_settled(folder, confine, now, settle_s):
            return True, f"marker present but {problem}"
        return False, problem
    return True, f".metadata written and its {len(ends)} data file(s) whole"
