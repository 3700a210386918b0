"""What discovery remembers between passes, so that a pass reads only what may have changed.

Per run folder: the stamps of the folders the last pass listed, and the entries it found
complete and registered (see :func:`~alphawatch.workers.checkpoints.discovery.survey`'s
``settled``). A run whose entries were all settled, whose folders all kept their stamps, is not
listed again. Files rewritten in place change no folder's stamp: a few settled checkpoints per
pass are looked at again, round-robin (:meth:`DiscoveryMemory.recheck`), by a ``stat`` of the
files and folders their fingerprint was computed from
(:class:`~alphawatch.workers.checkpoints.fingerprints.Shape`), or by their fingerprint where a
symlinked file makes that not enough.

A worker's first pass over a run starts from what the database holds instead (the caller's
:func:`registered` entries): a checkpoint registered complete, by this worker before a restart
or by another, is taken as settled while its fingerprint is the stored one, so a restart reads
none of its producer's files again.

The memory knows paths and run ids, never the database: the caller decides what counts as
registered and tells the memory.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from alphawatch.workers.checkpoints.confine import Confinement
from alphawatch.workers.checkpoints.discovery import CheckpointRef
from alphawatch.workers.checkpoints.fingerprints import (
    Shape,
    Stamp,
    fingerprint,
    restat,
    unchanged,
)

Settled = tuple[int | None, CheckpointRef]
"""An entry a pass found complete and registered: the inode it had then (None when that pass
was another process's: see :func:`registered`), and its ref."""


def registered(path: Path, *, step: int, fmt: str, fingerprint: str) -> Settled:
    """The settled entry of a checkpoint registered before this process started.

    The database holds a checkpoint's fingerprint only from a pass that found it complete (a
    refused one has none): while the fingerprint computed from its files' names, sizes and
    times is that one, its files are those that were complete, and it is not read again.
    """
    return None, CheckpointRef(path, step, fmt, True, "registered with these files", fingerprint)


@dataclass
class RunMemory:
    """What the last pass over one run left: enough to skip it, or to re-read only what changed.

    ``settled``: entries found complete, registered and matching the database, by path (their
    inode then, and their ref). ``quiet``: every entry was settled and nothing was refused; a
    quiet run whose folders kept their stamps is skipped.
    """

    run_id: int
    listed: dict[Path, Stamp]
    settled: dict[Path, Settled]
    quiet: bool

    def unchanged_since(self, run_id: int | None) -> bool:
        """Whether the run, known as ``run_id``, needs no listing: quiet, and its folders kept
        their stamps (one ``stat`` each, looked at last)."""
        return self.quiet and self.run_id == run_id and unchanged(self.listed)


class DiscoveryMemory:
    """The :class:`RunMemory` of every run folder, and the round of settled checkpoints.

    Args:
        confine: the roots a re-checked checkpoint's files must resolve under.
    """

    def __init__(self, confine: Confinement) -> None:
        self.confine = confine
        self.runs: dict[Path, RunMemory] = {}
        # Settled entries in the order they are looked at again: (run, path, the memory entry,
        # the shape its fingerprint was computed from); one whose memory entry was replaced or
        # dropped leaves the round.
        self.round: deque[tuple[Path, Path, Settled, Shape | None]] = deque()

    def get(self, run_dir: Path) -> RunMemory | None:
        """What the last pass over ``run_dir`` left, if it is remembered."""
        return self.runs.get(run_dir)

    def remember(self, run_dir: Path, memory: RunMemory) -> None:
        """Keep what a pass over ``run_dir`` left, in place of what an earlier one did."""
        self.runs[run_dir] = memory

    def forget(self, run_dir: Path) -> None:
        """Read ``run_dir`` whole at its next pass (gone, or its pass failed)."""
        self.runs.pop(run_dir, None)

    def forget_gone(self, watched: Mapping[Path, int | None]) -> None:
        """Forget every run that is no longer watched, or is now registered under another id."""
        for gone in [
            p
            for p, m in self.runs.items()
            if m.run_id != watched.get(p, m.run_id) or p not in watched
        ]:
            del self.runs[gone]  # deleted, or deleted and registered again

    def settle(
        self,
        run_dir: Path,
        ref: CheckpointRef,
        *,
        earlier: Mapping[Path, Settled],
        inodes: Mapping[Path, int],
        shapes: Mapping[Path, Shape],
        rechecked: bool,
    ) -> Settled:
        """The entry to remember for ``ref``, found complete and registered in this pass.

        Args:
            earlier: the run's settled entries the pass started from; one ``ref`` was taken
                from stays as it was (and keeps its turn in the round), unless it came from
                the database (:func:`registered`): it then gets its inode and joins the round.
            inodes, shapes: what the pass's survey recorded.
            rechecked: whether settled checkpoints are looked at again at all; a new entry
                then joins the round.
        """
        entry = earlier.get(ref.path)
        if entry is None or entry[1] is not ref or entry[0] is None:
            entry = (inodes.get(ref.path, -1), ref)
            if rechecked:
                self.round.append((run_dir, ref.path, entry, shapes.get(ref.path)))
        return entry

    def recheck(self, count: int) -> set[Path]:
        """Fingerprint the next ``count`` settled checkpoints again; the runs where one changed.

        A changed checkpoint leaves its run's settled entries, so the run's next pass reads it.
        """
        changed: set[Path] = set()
        for _ in range(min(count, len(self.round))):
            turn = self.round.popleft()
            run_dir, path, entry, shape = turn
            memory = self.runs.get(run_dir)
            if memory is None or memory.settled.get(path) is not entry:
                continue  # read again since, or forgotten: its newer entry has its own turn
            try:
                # One stat per member where the fingerprint's members are known (the same
                # answer: see Shape), else the fingerprint itself.
                same = (
                    restat(path, shape) == shape.stamp
                    if shape is not None
                    else fingerprint(path, self.confine) == entry[1].fingerprint
                )
            except Exception:  # whatever went wrong, the run's next pass reads it and says
                same = False
            if same:
                self.round.append(turn)
            else:
                del memory.settled[path]
                changed.add(run_dir)
        return changed
