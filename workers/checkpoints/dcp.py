"""torch distributed checkpoints (DCP): ``.metadata`` + ``*.distcp``, read one tensor at a time.

torch reads ``.metadata`` with a plain ``pickle.load``: a hostile folder would run code the
moment it is opened. It is read here with an unpickler that knows only the classes DCP writes
into it, and torch is handed the result instead of reading the file itself.
"""

from __future__ import annotations

import pickle
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from alphawatch.workers.checkpoints.errors import (
    CheckpointError,
    CheckpointVanished,
    UnsafeCheckpointError,
)
from alphawatch.workers.checkpoints.naming import is_weight_matrix

_METADATA = "torch.distributed.checkpoint.metadata"
# Everything torch's DCP writes into .metadata: dataclasses of plain data, dtypes, a layout
# and memory-format lookup by name, torch.Size and a path.
_ALLOWED = {
    *((_METADATA, name) for name in (
        "Metadata", "TensorStorageMetadata", "TensorProperties", "ChunkStorageMetadata",
        "BytesStorageMetadata", "MetadataIndex", "StorageMeta", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("pathlib", "PosixPath"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self.path = path

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            self.path, f"{self.path}: refused: the DCP metadata needs {module}.{name}, which is "
                       "no part of a checkpoint's description (alphawatch never unpickles code)")


def read_metadata(path: Path) -> Any:
    """The ``Metadata`` of a DCP folder, unpickled with only DCP's own classes allowed."""
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    file = path / ".metadata"
    try:
        with file.open("rb") as handle:
            metadata = _MetadataUnpickler(handle, file).load()
    except FileNotFoundError as exc:
        raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
    except CheckpointError:
        raise
    except Exception as exc:  # the unpickler fails in many ways on bytes that are no pickle
        raise CheckpointError(path, f"{path}: unreadable DCP metadata: {exc}") from exc
    if not isinstance(metadata, Metadata):
        raise CheckpointError(path, f"{path}: DCP metadata holds a {type(metadata).__name__}")
    if getattr(metadata, "storage_meta", None) is None:
        metadata.storage_meta = StorageMeta()
    return metadata


def iter_dcp(path: Path) -> Iterator[tuple[str, torch.Tensor, None, Path]]:
    """(key, tensor, no scale, source) of every weight matrix in a DCP folder, in one process."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load

    metadata = read_metadata(path)

    class _Reader(FileSystemReader):
        def read_metadata(self, *args: Any, **kwargs: Any) -> Any:
            metadata.storage_meta.load_id = self.load_id
            return metadata

    try:
        stored = sum(f.stat().st_size for f in path.glob("*.distcp"))
    except FileNotFoundError as exc:
        raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
    for key, info in metadata.state_dict_metadata.items():
        if not isinstance(info, TensorStorageMetadata):
            continue
        if not is_weight_matrix(key, len(info.size)) or "optim" in key:
            continue
        declared = info.size.numel() * info.properties.dtype.itemsize
        if declared > stored:
            # The target tensor is allocated from the declaration before any byte is read.
            raise CheckpointError(
                path, f"{path}: tensor {key!r} declares {tuple(info.size)} "
                      f"{info.properties.dtype} ({declared} bytes) but the .distcp files hold "
                      f"{stored} bytes: the metadata lies about the data")
        target = {key: torch.empty(tuple(info.size), dtype=info.properties.dtype)}
        try:
            with warnings.catch_warnings():
                # Loading without a process group is the point here, not a mistake.
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                load(target, storage_reader=_Reader(str(path)), no_dist=True)
        except FileNotFoundError as exc:
            raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
        except Exception as exc:
            raise CheckpointError(path, f"{path}: cannot read {key!r} from DCP: {exc}") from exc
        yield key, target.pop(key), None, path
