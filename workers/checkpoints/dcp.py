"""torch distributed checkpoints (DCP): ``.metadata`` + ``*.distcp``, read one tensor at a time.

``.metadata`` is a pickle, and torch's own reader loads it with plain ``pickle.load``, which
runs whatever code the pickle names. alphawatch reads it with an unpickler that knows only the
data classes DCP writes (metadata records, tensor properties, ``torch.Size``, dtypes, paths):
a ``.metadata`` that names anything else is refused, never executed. The data files it names
must be plain relative names inside the checkpoint folder, and every file is opened through
the confinement.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import warnings
from collections.abc import Callable, Generator, Iterator
from pathlib import Path
from typing import Any, cast

import torch
from torch.distributed.checkpoint import metadata as dcp_metadata
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.filesystem import FileSystem, FileSystemReader, _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata
from torch.distributed.checkpoint.state_dict_loader import load

from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement
from alphawatch.workers.checkpoints.errors import (
    CheckpointError,
    CheckpointVanished,
    UnsafeCheckpointError,
)
from alphawatch.workers.checkpoints.naming import is_weight_matrix


def _metadata_globals() -> dict[tuple[str, str], Any]:
    """Every global a DCP ``.metadata`` pickle names; each builds data and runs no code."""
    allowed: dict[tuple[str, str], Any] = {
        (dcp_metadata.__name__, name): value
        for name, value in vars(dcp_metadata).items()
        if isinstance(value, type) and value.__module__ == dcp_metadata.__name__
    }
    allowed[("torch.distributed.checkpoint.filesystem", "_StorageInfo")] = _StorageInfo
    allowed[("torch", "Size")] = torch.Size
    allowed.update(
        {
            ("torch", name): value
            for name, value in vars(torch).items()
            if isinstance(value, torch.dtype)
        }
    )
    # Looks a layout up by name in a fixed table: torch.strided, torch.sparse_coo, ...
    allowed[("torch.serialization", "_get_layout")] = torch.serialization._get_layout
    allowed.update(
        {
            ("pathlib", name): getattr(__import__("pathlib"), name)
            for name in ("Path", "PosixPath", "PurePath", "PurePosixPath")
        }
    )
    allowed[("collections", "OrderedDict")] = __import__("collections").OrderedDict
    return allowed


_METADATA_GLOBALS = _metadata_globals()


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        found = _METADATA_GLOBALS.get((module, name))
        if found is None:
            raise pickle.UnpicklingError(f"global {module}.{name} is not DCP metadata")
        return found


class _ConfinedFileSystem(FileSystem):
    def __init__(self, confine: Confinement) -> None:
        super().__init__()
        self.confine = confine

    @contextlib.contextmanager
    def create_stream(self, path: Any, mode: str) -> Generator[io.IOBase, None, None]:
        if mode != "rb":
            raise CheckpointError(Path(path), f"{path}: alphawatch never writes checkpoints")
        with self.confine.open(Path(path), "DCP file") as handle:
            yield cast(io.IOBase, handle)


class _SafeReader(FileSystemReader):
    """torch's filesystem reader, with metadata unpickled safely and every file confined."""

    def __init__(self, path: Path, confine: Confinement) -> None:
        super().__init__(path)
        self.folder = path
        self.confine = confine
        self.fs = _ConfinedFileSystem(confine)

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        path = self.folder / ".metadata"
        with self.confine.open(path, "DCP metadata") as handle:
            try:
                metadata = _MetadataUnpickler(handle).load()
            except pickle.UnpicklingError as exc:
                raise UnsafeCheckpointError(
                    path,
                    f"{path}: refused: the metadata pickle needs code, not only DCP "
                    f"records (alphawatch never unpickles code). {exc}",
                ) from exc
        if not isinstance(metadata, Metadata):
            raise CheckpointError(
                path, f"{path}: holds a {type(metadata).__name__}, not DCP metadata"
            )
        for info in (metadata.storage_data or {}).values():
            relative = getattr(info, "relative_path", None)
            if not isinstance(relative, str):
                raise CheckpointError(path, f"{path}: a storage entry names no file")
            self.confine.member(self.folder, relative, "DCP data file")
        storage_meta = getattr(metadata, "storage_meta", None) or StorageMeta()
        storage_meta.load_id = self.load_id
        metadata.storage_meta = storage_meta
        return metadata


def _weights(key: str, ndim: int) -> bool:
    return is_weight_matrix(key, ndim) and "optim" not in key


def dcp_shapes(path: Path, confine: Confinement = UNCONFINED) -> dict[str, tuple[int, ...]]:
    """Key and shape of every tensor a DCP folder's metadata declares (nothing else is read)."""
    return {
        key: tuple(info.size)
        for key, info in _metadata(path, confine).state_dict_metadata.items()
        if isinstance(info, TensorStorageMetadata)
    }


def _metadata(path: Path, confine: Confinement) -> Metadata:
    reader = _SafeReader(path, confine)
    try:
        return reader.read_metadata()
    except FileNotFoundError as exc:
        raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
    except CheckpointError:
        raise
    except Exception as exc:  # the unpickler fails in many ways on bytes that are no pickle
        raise CheckpointError(path, f"{path}: unreadable DCP metadata: {exc}") from exc


def iter_dcp(
    path: Path, confine: Confinement = UNCONFINED, want: Callable[[str, int], bool] = _weights
) -> Iterator[tuple[str, torch.Tensor, None, Path]]:
    """(key, tensor, no scale, source) of every weight matrix in a DCP folder, in one process.

    ``want(key, ndim)`` selects other tensors (optimizer moments) instead of the weights.

    Raises:
        UnsafeCheckpointError: ``.metadata`` names a global that is not DCP metadata.
        OutsideRootError: ``.metadata`` or a data file it names resolves outside the roots.
        CheckpointError: unreadable metadata or data; CheckpointVanished when it is gone.
    """
    metadata = _metadata(path, confine)
    try:
        stored = sum(f.stat().st_size for f in path.glob("*.distcp"))
    except FileNotFoundError as exc:
        raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
    for key, info in metadata.state_dict_metadata.items():
        if not isinstance(info, TensorStorageMetadata):
            continue
        if not want(key, len(info.size)):
            continue
        declared = info.size.numel() * info.properties.dtype.itemsize
        if declared > stored:
            # The target tensor is allocated from the declaration before any byte is read.
            raise CheckpointError(
                path,
                f"{path}: tensor {key!r} declares {tuple(info.size)} "
                f"{info.properties.dtype} ({declared} bytes) but the .distcp files hold "
                f"{stored} bytes: the metadata lies about the data",
            )
        target = {key: torch.empty(tuple(info.size), dtype=info.properties.dtype)}
        try:
            with warnings.catch_warnings():
                # Loading without a process group is the point here, not a mistake.
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                load(target, storage_reader=_SafeReader(path, confine), no_dist=True)
        except FileNotFoundError as exc:
            raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
        except CheckpointError:
            raise
        except CheckpointException as exc:  # a BaseException: torch's wrapper of a rank's failure
            raise _load_failure(path, key, metadata, exc) from exc
        except Exception as exc:
            raise CheckpointError(path, f"{path}: cannot read {key!r} from DCP: {exc}") from exc
        yield key, target.pop(key), None, path


def _load_failure(
    path: Path, key: str, metadata: Metadata, exc: CheckpointException
) -> CheckpointError:
    """The error a failed ``load`` of ``key`` stands for, naming the data files it was read
    from: torch wraps each rank's exception (an ``EOFError`` for a ``.distcp`` cut short)."""
    causes = [f[0] if isinstance(f, tuple) else f for f in exc.failures.values()]
    for cause in causes:
        if isinstance(cause, FileNotFoundError):
            return CheckpointVanished(path, f"{path} disappeared while being read")
        if isinstance(cause, CheckpointError):
            return cause
    files = sorted(
        {
            str(getattr(info, "relative_path", "?"))
            for index, info in (metadata.storage_data or {}).items()
            if getattr(index, "fqn", None) == key
        }
    )
    cause = causes[0] if causes else exc
    why = f"{type(cause).__name__}: {cause}".rstrip(": ")
    if isinstance(cause, EOFError):
        why += " (the data file ends before the records of .metadata do: cut short?)"
    return CheckpointError(
        path, f"{path}: cannot read {key!r} from DCP ({', '.join(files) or 'no file'}): {why}"
    )
