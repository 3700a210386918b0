"""Builders of hostile checkpoints, written as real files the way an attacker would craft them.

Each builder writes one checkpoint folder (``checkpoint-<step>``, or ``step_<step>`` for torch
DCP) and returns it. The torch pickles are made
by hand (a pickler with its own persistent ids, or raw opcodes) so that they can declare what no
honest ``torch.save`` would write.
"""

from __future__ import annotations

import collections
import io
import json
import pickle
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path

import torch


def _folder(run: Path, step: int, pattern: str = "checkpoint-{}") -> Path:
    folder = run / pattern.format(step)
    folder.mkdir(parents=True)
    return folder


_UP = "model.layers.0.mlp.up_proj.weight"


def _safetensors(path: Path, header: dict[str, object], data: bytes) -> None:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)


def lying_safetensors(run: Path, step: int) -> Path:
    """Declares a 4096x4096 float32 matrix (64 MiB) over 64 bytes of data."""
    folder = _folder(run, step)
    _safetensors(
        folder / "model.safetensors",
        {
            "model.layers.0.mlp.up_proj.weight": {
                "dtype": "F32",
                "shape": [4096, 4096],
                "data_offsets": [0, 64],
            },
        },
        b"\0" * 64,
    )
    return folder


def overlapping_safetensors(run: Path, step: int) -> Path:
    """Two tensors over the same bytes: every read of the file reads it again."""
    folder = _folder(run, step)
    info = {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]}
    _safetensors(
        folder / "model.safetensors",
        {
            "model.layers.0.mlp.up_proj.weight": info,
            "model.layers.0.mlp.down_proj.weight": info,
        },
        b"\0" * 64,
    )
    return folder


class _Storage:
    def __init__(self, numel: int) -> None:
        self.numel = numel


class _Tensor:
    def __init__(self, storage: _Storage, shape: tuple[int, int], stride: tuple[int, int]) -> None:
        self.storage, self.shape, self.stride = storage, shape, stride

    def __reduce__(self) -> tuple[object, ...]:
        return (
            torch._utils._rebuild_tensor_v2,
            (self.storage, 0, self.shape, self.stride, False, collections.OrderedDict()),
        )


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj: object) -> object:
        if isinstance(obj, _Storage):
            return ("storage", torch.FloatStorage, "0", "cpu", obj.numel)
        return None


def _torch_zip(path: Path, pickled: bytes, record: bytes = b"\0" * 64) -> None:
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("archive/data.pkl", pickled)
        archive.writestr("archive/byteorder", "little")
        archive.writestr("archive/version", "3\n")
        archive.writestr("archive/data/0", record)


def _pickled(obj: object) -> bytes:
    buffer = io.BytesIO()
    _Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def lying_torch_storage(run: Path, step: int) -> Path:
    """A storage that declares 2**34 floats (64 GiB) over a 64-byte record."""
    folder = _folder(run, step)
    tensor = _Tensor(_Storage(2**34), (2**17, 2**17), (2**17, 1))
    _torch_zip(folder / "pytorch_model.bin", _pickled({_UP: tensor}))
    return folder


def zero_stride_tensor(run: Path, step: int) -> Path:
    """A 40000x40000 view (6 GB as float32) of one stored float, through zero strides."""
    folder = _folder(run, step)
    tensor = _Tensor(_Storage(16), (40000, 40000), (0, 0))
    _torch_zip(folder / "pytorch_model.bin", _pickled({_UP: tensor}))
    return folder


def shared_reference_bomb(run: Path, step: int, levels: int = 48) -> Path:
    """Each level's two keys point at the level below: 2**48 dotted names from a few KB."""
    folder = _folder(run, step)
    node: dict[str, object] = {"weight": _Tensor(_Storage(16), (4, 4), (4, 1))}
    for _ in range(levels):
        node = {"a": node, "b": node}
    _torch_zip(folder / "pytorch_model.bin", _pickled(node))
    return folder


def deep_nesting(run: Path, step: int, depth: int = 100_000) -> Path:
    """100,000 dicts nested in each other, built with raw opcodes (no recursion to write it)."""
    folder = _folder(run, step)
    ops = bytearray(b"\x80\x02")
    for _ in range(depth):
        ops += b"}X\x01\x00\x00\x00k"  # EMPTY_DICT, key 'k'
    ops += b"}"  # the innermost dict
    ops += b"s" * depth  # SETITEM: each dict into its parent
    ops += b"."
    _torch_zip(folder / "pytorch_model.bin", bytes(ops))
    return folder


def memory_bomb(run: Path, step: int, size: int = 2**32) -> Path:
    """Forty bytes of pickle asking for a 4 GiB ``bytearray``, which torch's safe loader allows."""
    folder = _folder(run, step)
    ops = b"\x80\x02cbuiltins\nbytearray\n\x8a\x05" + size.to_bytes(5, "little") + b"\x85R."
    _torch_zip(folder / "pytorch_model.bin", ops)
    return folder


def time_bomb(run: Path, step: int, keys: int = 100_000) -> Path:
    """Integer keys that all hash to 0: building the dict takes time quadratic in its size."""
    folder = _folder(run, step)
    modulus = 2**61 - 1  # CPython hashes an int by its residue modulo this prime
    ops = bytearray(b"\x80\x02}(")  # EMPTY_DICT, MARK
    for i in range(1, keys + 1):
        value = (i * modulus).to_bytes(10, "little", signed=True)
        ops += b"\x8a\x0a" + value + b"N"  # LONG1 key, None value
    ops += b"u."  # SETITEMS, STOP
    _torch_zip(folder / "pytorch_model.bin", bytes(ops))
    return folder


def code_pickle(run: Path, step: int) -> Path:
    """A pickle that would run a shell command if it were ever unpickled without restriction."""
    folder = _folder(run, step)
    ops = b"\x80\x02cos\nsystem\nX\x04\x00\x00\x00trueq\x00\x85R."
    _torch_zip(folder / "pytorch_model.bin", ops)
    return folder


def _dcp(folder: Path) -> None:
    import warnings

    import torch.distributed.checkpoint as dcp

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # saving without a process group is intended here
        dcp.save({_UP: torch.ones(4, 4)}, checkpoint_id=str(folder), no_dist=True)


# What a payload would leave behind if a checkpoint's code ever ran.
PWNED = "PWNED"


def dcp_metadata_code(run: Path, step: int) -> Path:
    """A DCP folder whose ``.metadata`` (read by torch with plain pickle) runs a command."""
    folder = _folder(run, step, "step_{}")  # DCP folders are named by the training loop
    _dcp(folder)
    command = f"touch {folder / PWNED}".encode()
    (folder / ".metadata").write_bytes(
        b"\x80\x02cos\nsystem\nX" + struct.pack("<I", len(command)) + command + b"\x85R."
    )
    return folder


def dcp_metadata_lie(run: Path, step: int) -> Path:
    """A DCP folder whose metadata declares a 100000x100000 matrix over 64 bytes of data."""
    folder = _folder(run, step, "step_{}")
    _dcp(folder)
    metadata = pickle.loads((folder / ".metadata").read_bytes())  # written by torch just now
    metadata.state_dict_metadata[_UP].size = torch.Size([100_000, 100_000])
    (folder / ".metadata").write_bytes(pickle.dumps(metadata))
    return folder


# Each hostile class, and words its checkpoint's error must contain.
HOSTILE: dict[str, tuple[Callable[[Path, int], Path], str]] = {
    "lying safetensors header": (lying_safetensors, "header lies"),
    "overlapping safetensors offsets": (overlapping_safetensors, "overlaps"),
    "lying torch storage size": (lying_torch_storage, "lies about its size"),
    "zero-stride torch view": (zero_stride_tensor, "refused before materialising"),
    "shared-reference pickle": (shared_reference_bomb, "reachable under several keys"),
    "deeply nested pickle": (deep_nesting, "nested deeper than"),
    "memory-exploding pickle": (memory_bomb, "exceeded the memory budget of"),
    "slow pickle": (time_bomb, "exceeded the time budget of"),
    "pickle holding code": (code_pickle, "refused"),
    "DCP metadata holding code": (dcp_metadata_code, "global os.system is not DCP metadata"),
    "lying DCP metadata": (dcp_metadata_lie, "the metadata lies about the data"),
}
