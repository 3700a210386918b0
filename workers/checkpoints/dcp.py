"""torch distributed checkpoints (DCP): ``.metadata`` + ``*.distcp``, read one tensor at a time."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

from alphawatch.workers.checkpoints.errors import CheckpointError, CheckpointVanished
from alphawatch.workers.checkpoints.naming import is_weight_matrix


def iter_dcp(path: Path) -> Iterator[tuple[str, torch.Tensor, None, Path]]:
    """(key, tensor, no scale, source) of every weight matrix in a DCP folder, in one process."""
    from torch.distributed.checkpoint.filesystem import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata
    from torch.distributed.checkpoint.state_dict_loader import load

    try:
        metadata = FileSystemReader(str(path)).read_metadata()
    except FileNotFoundError as exc:
        raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
    except Exception as exc:
        raise CheckpointError(path, f"{path}: unreadable DCP metadata: {exc}") from exc
    for key, info in metadata.state_dict_metadata.items():
        if not isinstance(info, TensorStorageMetadata):
            continue
        if not is_weight_matrix(key, len(info.size)) or "optim" in key:
            continue
        target = {key: torch.empty(tuple(info.size), dtype=info.properties.dtype)}
        try:
            with warnings.catch_warnings():
                # Loading without a process group is the point here, not a mistake.
                warnings.filterwarnings("ignore", message=".*torch.distributed is disabled.*")
                load(target, checkpoint_id=str(path), no_dist=True)
        except FileNotFoundError as exc:
            raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
        except Exception as exc:
            raise CheckpointError(path, f"{path}: cannot read {key!r} from DCP: {exc}") from exc
        yield key, target.pop(key), None, path
