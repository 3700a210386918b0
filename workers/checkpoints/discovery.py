"""Finding the checkpoints of a training run, their steps, and whether they are complete.

A checkpoint is analysed only once its producer says it is complete: Hugging Face writes
``trainer_state.json`` last, sharded safetensors are complete when the index exists and every
shard's size equals 8 + header + largest data offset, DeepSpeed and Megatron write a tracker file
(``latest``, ``latest_checkpointed_iteration.txt``) after the step folder, torch DCP writes
``.metadata`` last. Anything else is complete once its files stop changing for ``settle_s``.
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from alphawatch.workers.checkpoints.errors import CheckpointError
from alphawatch.workers.checkpoints.readers import safetensors_header

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
_HF = re.compile(r"^checkpoint-(\d+)$")
_DEEPSPEED = re.compile(r"^global_step(\d+)$")
_MEGATRON = re.compile(r"^iter_(\d+)$")
_STEP_IN_NAME = re.compile(r"(?:step[=_-]?|iter[=_-]?|checkpoint[=_-]?|ckpt[=_-]?)(\d+)",
                           re.IGNORECASE)


@dataclass(frozen=True)
class CheckpointRef:
    """One checkpoint of a run: where it is, its step, its producer, and whether it is complete."""

    path: Path
    step: int | None
    format: str
    complete: bool
    reason: str
    fingerprint: str


def _ignored(name: str) -> bool:
    return ".tmp" in name or name.startswith(("tmp-checkpoint-", "tmp_", ".")) or name.endswith(
        (".tmp", ".partial", ".incomplete"))


def fingerprint(path: Path) -> str:
    """Changes when any file of the checkpoint changes (names, sizes, modification times)."""
    digest = hashlib.sha1(usedforsecurity=False)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for file in files:
        try:
            stat = file.stat()
        except FileNotFoundError:
            continue
        digest.update(f"{file.relative_to(path.parent)}:{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def _settled(path: Path, settle_s: float, now: float) -> bool:
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    try:
        newest = max((f.stat().st_mtime for f in files), default=now)
    except FileNotFoundError:
        return False
    return now - newest >= settle_s


def weights_complete(folder: Path) -> tuple[bool, str]:
    """Whether the weight files of a Hugging Face-style folder are whole."""
    index = next((p for p in sorted(folder.glob("*.safetensors.index.json"))), None)
    shards = sorted(folder.glob("*-of-*.safetensors"))
    if index is None and shards:
        return False, f"{folder}: shards without their index json"
    if index is not None:
        try:
            mapping = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError):
            return False, f"{index}: index is not readable yet"
        for name in sorted(set(mapping.values())):
            shard = folder / name
            if not shard.exists():
                return False, f"{shard} is missing"
            try:
                safetensors_header(shard)
            except CheckpointError as exc:
                return False, str(exc)
        return True, "index and every shard complete"
    single = folder / "model.safetensors"
    if single.exists():
        try:
            safetensors_header(single)
        except CheckpointError as exc:
            return False, str(exc)
        return True, "model.safetensors complete"
    bin_shards = sorted(folder.glob("*-of-*.bin"))
    bin_index = next(iter(sorted(folder.glob("*.bin.index.json"))), None)
    if bin_shards or bin_index is not None:
        if bin_index is None:
            return False, f"{folder}: .bin shards without their index json"
        try:
            names = set(json.loads(bin_index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return False, f"{bin_index}: index is not readable yet"
        missing = sorted(n for n in names if not (folder / n).exists())
        if missing:
            return False, f"{folder / missing[0]} is missing"
        return True, "index and every .bin shard present"
    if any(folder.glob("*.bin")) or any(folder.glob("*.pt")) or any(folder.glob("*.safetensors")):
        return True, "weights present"
    if (folder / "adapter_config.json").exists():
        return True, "adapter present"
    return False, f"{folder}: no weights yet"


def _hf_ref(folder: Path, step: int | None, settle_s: float, now: float) -> CheckpointRef:
    state = folder / "trainer_state.json"
    complete, reason = False, "trainer_state.json not written yet"
    if state.exists():
        try:
            parsed = json.loads(state.read_text())
            if step is None and isinstance(parsed, dict):
                step = int(parsed.get("global_step") or 0) or None
            complete, reason = weights_complete(folder)
            if not complete and _settled(folder, settle_s, now):
                # The producer says it is done and nothing has changed since: a broken file,
                # not one being written. Analyse it so it fails with its error, visibly.
                complete, reason = True, f"marker present but {reason}"
        except (OSError, ValueError):
            reason = "trainer_state.json does not parse yet"
    elif _settled(folder, settle_s, now):
        complete, reason = weights_complete(folder)
        reason = f"no trainer_state.json; files settled: {reason}"
    fmt = "peft" if (folder / "adapter_config.json").exists() else "hf"
    return CheckpointRef(folder, step, fmt, complete, reason, fingerprint(folder))


def _tracker_step(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    digits = re.findall(r"\d+", text)
    return int(digits[-1]) if digits else None


def _has_weights(folder: Path) -> bool:
    return any(p.suffix in WEIGHT_SUFFIXES for p in folder.iterdir() if p.is_file()) or (
        folder / "adapter_config.json").exists()


def _dir_ref(child: Path, trackers: dict[str, int | None], settle_s: float, now: float
             ) -> CheckpointRef | None:
    """The checkpoint a folder holds, judged by its name and its producer's marker, if any."""
    name = child.name
    if m := _HF.match(name):
        return _hf_ref(child, int(m.group(1)), settle_s, now)
    if m := _DEEPSPEED.match(name):
        step, latest = int(m.group(1)), trackers["deepspeed"]
        done = latest is not None and latest >= step
        return CheckpointRef(child, step, "deepspeed", done,
                             "in `latest`" if done else "not yet in `latest`", fingerprint(child))
    if m := _MEGATRON.match(name):
        step, latest = int(m.group(1)), trackers["megatron"]
        done = latest is not None and latest >= step
        return CheckpointRef(child, step, "megatron", done,
                             "tracker file reached it" if done else "tracker file not there yet",
                             fingerprint(child))
    if (child / ".metadata").exists():
        match = _STEP_IN_NAME.search(name)
        return CheckpointRef(child, int(match.group(1)) if match else None, "dcp", True,
                             ".metadata written", fingerprint(child))
    return None


def _trackers(folder: Path) -> dict[str, int | None]:
    return {"deepspeed": _tracker_step(folder / "latest") if (folder / "latest").exists() else None,
            "megatron": _tracker_step(folder / "latest_checkpointed_iteration.txt")}


def _scan(folder: Path, settle_s: float, now: float, depth: int) -> list[CheckpointRef]:
    try:
        children = sorted(folder.iterdir())
    except FileNotFoundError:
        return []  # removed between listing its parent and listing it
    except OSError as exc:
        raise CheckpointError(folder, f"cannot list {folder}: {exc}") from exc
    trackers = _trackers(folder)
    refs: list[CheckpointRef] = []
    for child in children:
        name = child.name
        if _ignored(name):
            continue
        if child.is_dir():
            ref = _dir_ref(child, trackers, settle_s, now)
            if ref is not None:
                refs.append(ref)
            elif depth > 0:
                # Lightning keeps its files in <run>/lightning_logs/version_0/checkpoints/,
                # other trainers in <run>/checkpoints/: look a few levels down.
                refs += _scan(child, settle_s, now, depth - 1)
        elif child.suffix in WEIGHT_SUFFIXES:
            match = _STEP_IN_NAME.search(name)
            if match is None or "-of-" in name:
                continue
            fmt = "lightning" if child.suffix == ".ckpt" else "file"
            done = _settled(child, settle_s, now)
            refs.append(CheckpointRef(child, int(match.group(1)), fmt, done,
                                      "settled" if done else "still changing", fingerprint(child)))
    return refs


def discover(run_dir: Path, *, settle_s: float = 30.0, now: float | None = None
             ) -> list[CheckpointRef]:
    """Every checkpoint under ``run_dir`` (or ``run_dir`` itself), sorted by step.

    Args:
        run_dir: a training run's output folder, a single checkpoint folder or a weight file.
        settle_s: for producers without a completion marker, how long a checkpoint's files must
            stay unchanged before it counts as complete.
        now: the current time (seconds since the epoch); for tests.

    Returns:
        Every checkpoint found, complete or not (``complete`` and ``reason`` say which and why);
        ``*.tmp*`` and ``tmp-checkpoint-*`` are left out.

    Raises:
        CheckpointError: ``run_dir`` does not exist or cannot be listed.
    """
    now = time.time() if now is None else now
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise CheckpointError(run_dir, f"{run_dir} does not exist")
    if run_dir.is_file():
        match = _STEP_IN_NAME.search(run_dir.name)
        fmt = "lightning" if run_dir.suffix == ".ckpt" else "file"
        done = _settled(run_dir, settle_s, now)
        return [CheckpointRef(run_dir, int(match.group(1)) if match else None, fmt, done,
                              "settled" if done else "still changing", fingerprint(run_dir))]
    refs = _scan(run_dir, settle_s, now, depth=3)
    if not refs:
        # run_dir is itself one checkpoint: a step folder, or a model saved at the end.
        own = _dir_ref(run_dir, _trackers(run_dir.parent), settle_s, now)
        if own is not None:
            refs.append(own)
        elif _has_weights(run_dir) or rank_dirs(run_dir):
            refs.append(_hf_ref(run_dir, None, settle_s, now))
    return sorted(refs, key=lambda r: (r.step is None, r.step or 0, str(r.path)))


def rank_dirs(folder: Path) -> list[Path]:
    """Megatron ``mp_rank_XX`` sub-folders of a step folder."""
    return sorted(p for p in folder.glob("mp_rank_*") if p.is_dir())
