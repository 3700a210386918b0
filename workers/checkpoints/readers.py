"""Reading weight tensors one at a time: safetensors (header validated) and safe torch pickles."""

from __future__ import annotations

import argparse
import io
import json
import os
import pickle
import struct
import zipfile
from collections.abc import Callable, Container, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO, TypeVar, overload

import numpy as np

from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement, descriptor_path
from alphawatch.workers.checkpoints.errors import (
    CheckpointError,
    CheckpointVanished,
    UnsafeCheckpointError,
)

if TYPE_CHECKING:
    import torch

# safetensors' own limit on a header, for the analysis process (held to the job's budgets).
_MAX_HEADER = 100 * 1024 * 1024
_FLOAT8_NAMES = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
SCALE_SUFFIXES = ("_scale_inv", "_scale")
"""Keys of an fp8 weight's dequantisation factor beside it: ``<weight>_scale_inv`` (DeepSeek:
one per 128×128 block) or ``<weight>_scale`` (compressed-tensors, as vLLM's FP8 checkpoints
store it: one per tensor or per output row). Both multiply the stored values."""


def is_scale_key(key: str) -> bool:
    """Whether ``key`` names a dequantisation factor (never a weight matrix of its own)."""
    return key.endswith(SCALE_SUFFIXES)


def scale_key_of(key: str, keys: Container[str]) -> str | None:
    """The key of the factor stored for the weight ``key`` among ``keys``, if any."""
    return next((key + suffix for suffix in SCALE_SUFFIXES if key + suffix in keys), None)


class HeaderTooLarge(CheckpointError):
    """A safetensors header declaring more bytes than the caller parses: refused, not read."""


def safetensors_header(
    path: Path, confine: Confinement = UNCONFINED, max_header: int = _MAX_HEADER
) -> tuple[int, dict[str, dict[str, object]]]:
    """Header length and parsed header of a safetensors file, checked against the file size.

    A file is complete when its size is 8 + header length + the largest data offset: anything
    shorter is a shard still being written or cut short.

    Args:
        max_header: the largest header parsed; discovery, which runs beside the API in the
            worker's own process, passes a smaller one than the analysis process.

    Raises:
        OutsideRootError: the file resolves outside ``confine``'s roots (it is not read).
        HeaderTooLarge: its header declares more than ``max_header`` bytes (only 8 are read).
        CheckpointError: not a whole safetensors file; CheckpointVanished when it is gone.
    """
    try:
        with confine.open(path) as handle:
            return _header_of(handle, path, max_header)
    except FileNotFoundError as exc:
        raise CheckpointVanished(path, f"{path} disappeared while being read") from exc


def _header_of(
    handle: BinaryIO, path: Path, max_header: int = _MAX_HEADER
) -> tuple[int, dict[str, dict[str, object]]]:
    """The header of the safetensors file open as ``handle``, validated against its size."""
    size = _size_of(handle)
    prefix = handle.read(8)
    if len(prefix) < 8:
        raise CheckpointError(path, f"{path}: empty or truncated safetensors file")
    (length,) = struct.unpack("<Q", prefix)
    if max_header < length <= _MAX_HEADER:
        raise HeaderTooLarge(
            path,
            f"refused: {path}: its safetensors header declares {length} "
            f"bytes, more than the {max_header} that discovery parses "
            "(a 70B model's header holds about 90 KB)",
        )
    if length > _MAX_HEADER or length > size - 8:
        raise CheckpointError(path, f"{path}: not a safetensors file (bad header length)")
    raw = handle.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(path, f"{path}: not a safetensors file (header is not JSON)") from exc
    if not isinstance(header, dict):
        raise CheckpointError(path, f"{path}: not a safetensors file (header is not an object)")
    end = 0
    for key, info in header.items():
        if key == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            raise CheckpointError(path, f"{path}: tensor {key!r} has no data offsets")
        end = max(end, int(offsets[1]))
    if size != 8 + length + end:
        raise CheckpointError(
            path, f"{path}: incomplete safetensors file ({size} bytes, expected {8 + length + end})"
        )
    return length, header


def _size_of(handle: BinaryIO) -> int:
    """The size of an open file: its descriptor's, or the listed size of an object-store file
    (read by ranges, it has no descriptor; see ``workers.checkpoints.objects``)."""
    size = getattr(handle, "size", None)
    if isinstance(size, int) and not isinstance(size, bool):
        return size
    return os.fstat(handle.fileno()).st_size


# Each safetensors dtype: its name in torch (and numpy, where numpy has it) and its size.
_SAFETENSORS_DTYPES: dict[str, tuple[str, int]] = {
    "F64": ("float64", 8),
    "F32": ("float32", 4),
    "F16": ("float16", 2),
    "BF16": ("bfloat16", 2),
    "I64": ("int64", 8),
    "I32": ("int32", 4),
    "I16": ("int16", 2),
    "I8": ("int8", 1),
    "U64": ("uint64", 8),
    "U32": ("uint32", 4),
    "U16": ("uint16", 2),
    "U8": ("uint8", 1),
    "BOOL": ("bool", 1),
    "C64": ("complex64", 8),
    "F8_E4M3": ("float8_e4m3fn", 1),
    "F8_E5M2": ("float8_e5m2", 1),
}


@dataclass(frozen=True)
class StoredArray:
    """A safetensors tensor read without torch: its values and the dtype it was stored in.

    ``array`` is numpy: float32 for BF16 and float8 (numpy has no arithmetic for them; the
    widening is exact), the stored dtype otherwise. ``dtype`` is the stored dtype's name as torch
    spells it without ``torch.`` (``bfloat16``, ``float8_e4m3fn``).
    """

    array: np.ndarray
    dtype: str

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    def dim(self) -> int:
        return int(self.array.ndim)

    def to_torch(self) -> torch.Tensor:
        """The tensor torch would have read: the stored dtype, the same values."""
        import torch

        return torch.from_numpy(np.array(self.array)).to(getattr(torch, self.dtype))


# numpy's reading of each safetensors dtype: the dtype of the stored bytes, and for the dtypes
# numpy has no arithmetic for (bfloat16, float8), how ``decode_array`` widens them to float32.
_NUMPY_STORAGE = {
    "F64": np.float64,
    "F32": np.float32,
    "F16": np.float16,
    "BF16": np.uint16,
    "I64": np.int64,
    "I32": np.int32,
    "I16": np.int16,
    "I8": np.int8,
    "U64": np.uint64,
    "U32": np.uint32,
    "U16": np.uint16,
    "U8": np.uint8,
    "BOOL": np.bool_,
    "C64": np.complex64,
    "F8_E4M3": np.uint8,
    "F8_E5M2": np.uint8,
}


def _float8_table(exponent_bits: int, mantissa_bits: int, fn: bool) -> np.ndarray:
    """float32 value of each of the 256 bytes of an OCP float8 format (exact: all fit).

    E4M3 (``fn``: finite, only S.1111.111 is NaN, bias 7) and E5M2 (IEEE-like: infinities and
    NaNs at the top exponent, bias 15); subnormals at exponent 0.
    """
    bias = 2 ** (exponent_bits - 1) - 1
    top = 2**exponent_bits - 1
    table = np.empty(256, dtype=np.float32)
    for byte in range(256):
        sign = -1.0 if byte >> 7 else 1.0
        exponent = (byte >> mantissa_bits) & top
        mantissa = byte & (2**mantissa_bits - 1)
        fraction = mantissa / 2**mantissa_bits
        if exponent == top and (not fn or mantissa == 2**mantissa_bits - 1):
            value = float("nan") if (fn or mantissa) else sign * float("inf")
        elif exponent == 0:
            value = sign * fraction * 2.0 ** (1 - bias)
        else:
            value = sign * (1.0 + fraction) * 2.0 ** (exponent - bias)
        table[byte] = value
    return table


_FLOAT8_TABLES = {"F8_E4M3": _float8_table(4, 3, fn=True), "F8_E5M2": _float8_table(5, 2, fn=False)}


def decode_array(data: bytes | bytearray | memoryview, dtype: str, shape: list[int]) -> np.ndarray:
    """The tensor a safetensors dtype name and shape make of ``data``, as numpy, without torch.

    F64/F32/F16 and the integer, bool and complex dtypes are read in place (little-endian, as
    the format stores them); BF16 becomes float32 by a 16-bit shift (exact: bfloat16 is
    float32's top half), F8_E4M3/F8_E5M2 become float32 through a 256-entry table (exact). Equal
    to torch's own decoding bit for bit (tests/checkpoints/test_formats.py).

    Raises:
        KeyError: a dtype name the format does not define.
    """
    raw: np.ndarray = np.frombuffer(data, dtype=np.dtype(_NUMPY_STORAGE[dtype]).newbyteorder("<"))
    decoded: np.ndarray
    if dtype == "BF16":
        widened = raw.astype(np.uint32)
        widened <<= 16  # in place: one float32-sized array, not two
        decoded = widened.view(np.float32)
    elif dtype in _FLOAT8_TABLES:
        decoded = _FLOAT8_TABLES[dtype][raw]
    else:
        decoded = raw
    return decoded.reshape(shape)


def check_layout(path: Path, header: dict[str, dict[str, object]]) -> None:
    """Refuse a safetensors header whose declarations disagree with the bytes that are there.

    Every tensor's dtype size times the product of its shape must equal its byte range, and the
    ranges must tile the data area without gaps or overlaps (as the safetensors format requires),
    so no read is larger than the file and nothing is read twice: a file that lies about its
    tensors is refused before anything is allocated for them.
    """
    spans: list[tuple[int, int, str]] = []
    for key, info in header.items():
        if key == "__metadata__":
            continue
        known = _SAFETENSORS_DTYPES.get(str(info.get("dtype")))
        if known is None:
            raise CheckpointError(
                path, f"{path}: tensor {key!r} has unsupported dtype {info.get('dtype')}"
            )
        shape, offsets = info.get("shape"), info.get("data_offsets")
        if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
            raise CheckpointError(path, f"{path}: tensor {key!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(_is_count(o) for o in offsets)
            and offsets[0] <= offsets[1]
        ):
            raise CheckpointError(
                path, f"{path}: tensor {key!r} has invalid data offsets {offsets!r}"
            )
        numel = 1
        for dim in shape:
            numel *= dim
        dtype, itemsize = f"torch.{known[0]}", known[1]
        declared = numel * itemsize
        begin, end = offsets
        if declared != end - begin:
            raise CheckpointError(
                path,
                f"{path}: tensor {key!r} declares {dtype} {shape} ({declared} bytes) but "
                f"its data holds {end - begin} bytes: the header lies about the file",
            )
        spans.append((begin, end, key))
    position = 0
    for begin, end, key in sorted(spans):
        if begin != position:
            what = "overlaps the tensor before it" if begin < position else "leaves a gap"
            raise CheckpointError(
                path, f"{path}: tensor {key!r} at bytes {begin}-{end} {what}: invalid layout"
            )
        position = end
    # safetensors_header already matched the file size to the largest end offset, so a tiling
    # from 0 covers every byte of the data area.
    for key, info in header.items():
        weight = next(
            (key.removesuffix(suffix) for suffix in SCALE_SUFFIXES if key.endswith(suffix)), None
        )
        if (
            weight is None
            or weight == "__metadata__"
            or weight not in header
            or scale_key_of(weight, header) != key
        ):
            continue
        # "_scale" is read only beside an fp8 weight (an int8 weight's is not ours to check)
        if key.endswith("_scale_inv") or str(header[weight].get("dtype")).startswith("F8_"):
            _check_block_scale(path, key, header[weight]["shape"], info["shape"])


def _check_block_scale(path: Path, key: str, weight: object, scale: object) -> None:
    """Refuse an fp8 inverse scale that is neither one number nor one per block of its weight.

    A block-wise scale has the weight's two dimensions, each between 1 and the weight's own
    (each scale then covers ``ceil(weight / scale)`` rows or columns); anything else has no
    reading, and would fail (or divide by zero) when the weight is scaled back.
    """
    assert isinstance(weight, list) and isinstance(scale, list)  # check_layout checked both
    numel = 1
    for dim in scale:
        numel *= dim
    if numel == 1:
        return
    if (
        len(weight) == 2
        and len(scale) == 2
        and all(1 <= s <= w for s, w in zip(scale, weight, strict=True))
    ):
        return
    if len(weight) == 2 and scale == weight[:1]:
        return  # one per output row, stored flat
    raise CheckpointError(
        path,
        f"{path}: tensor {key!r} of shape {scale} is not one scale per block of its "
        f"weight of shape {weight}",
    )


def _is_count(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_bytes(
    handle: BinaryIO, path: Path, base: int, info: dict[str, object]
) -> tuple[bytearray, str, list[int]]:
    # Only called after check_layout: dtype, shape and offsets agree with the file.
    begin, end = (int(x) for x in info["data_offsets"])  # type: ignore[attr-defined]
    shape = [int(d) for d in info.get("shape", [])]  # type: ignore[attr-defined]
    buffer = bytearray(end - begin)
    handle.seek(base + begin)
    # Binary files opened by open() are buffered readers; BinaryIO does not declare readinto.
    if handle.readinto(buffer) != len(buffer):  # type: ignore[attr-defined]
        raise CheckpointVanished(path, f"{path} shrank while being read")
    return buffer, str(info.get("dtype")), shape


def _read_tensor(
    handle: BinaryIO, path: Path, base: int, key: str, info: dict[str, object]
) -> torch.Tensor:
    import torch

    buffer, name, shape = _read_bytes(handle, path, base, info)
    dtype = getattr(torch, _SAFETENSORS_DTYPES[name][0])
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(buffer, dtype=dtype).reshape(shape)


def _read_array(
    handle: BinaryIO, path: Path, base: int, key: str, info: dict[str, object]
) -> StoredArray:
    buffer, name, shape = _read_bytes(handle, path, base, info)
    return StoredArray(decode_array(buffer, name, shape), _SAFETENSORS_DTYPES[name][0])


def iter_safetensors(
    path: Path,
    want: Callable[[str, int], bool] | None = None,
    confine: Confinement = UNCONFINED,
) -> Iterator[tuple[str, torch.Tensor, torch.Tensor | None]]:
    """(key, stored tensor, fp8 scale or None) of a safetensors file, one at a time.

    ``want(key, ndim)`` selects tensors before they are read; ``*_scale_inv`` and ``*_scale``
    tensors are returned beside the weight they scale, not on their own. Tensors are read with
    plain file reads rather than a memory map, so pages of tensors already analysed do not stay
    resident.
    The header and the tensors are read through one descriptor, checked by ``confine``.
    """
    return _iter_safetensors(_read_tensor, path, want, confine)


def iter_safetensors_arrays(
    path: Path,
    want: Callable[[str, int], bool] | None = None,
    confine: Confinement = UNCONFINED,
) -> Iterator[tuple[str, StoredArray, StoredArray | None]]:
    """:func:`iter_safetensors` with numpy arrays (:class:`StoredArray`): no torch imported."""
    return _iter_safetensors(_read_array, path, want, confine)


_T = TypeVar("_T")


def _iter_safetensors(
    read: Callable[[BinaryIO, Path, int, str, dict[str, object]], _T],
    path: Path,
    want: Callable[[str, int], bool] | None,
    confine: Confinement,
) -> Iterator[tuple[str, _T, _T | None]]:
    try:
        with confine.open(path) as handle:
            length, header = _header_of(handle, path)
            check_layout(path, header)
            base = 8 + length
            keys = [k for k in header if k != "__metadata__" and not is_scale_key(k)]
            for key in keys:
                info = header[key]
                shape = info.get("shape", []) if isinstance(info, dict) else []
                ndim = len(shape) if isinstance(shape, list) else 0
                if want is not None and not want(key, ndim):
                    continue
                scale_key = scale_key_of(key, header)
                scale = (
                    read(handle, path, base, scale_key, header[scale_key])
                    if scale_key is not None
                    else None
                )
                yield key, read(handle, path, base, key, info), scale
    except FileNotFoundError as exc:
        raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
    except OSError as exc:
        if not path.exists():
            raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
        raise CheckpointError(path, f"{path}: cannot read safetensors: {exc}") from exc


def _flatten(path: Path, obj: object) -> Iterator[tuple[str, torch.Tensor]]:
    """(dotted key, tensor) of nested dicts, refusing graphs built to explode when walked.

    A dict reached a second time (shared references: n levels of two keys pointing at the
    level below name 2**n tensors) or nested deeper than any real checkpoint is refused, and so
    is a tensor whose shape and strides span more elements than its storage holds.
    """
    import torch

    seen: set[int] = set()
    stack: list[tuple[str, object, int]] = [("", obj, 0)]
    while stack:
        prefix, node, depth = stack.pop()
        if isinstance(node, torch.Tensor):
            _check_extent(path, prefix, node)
            yield prefix, node
        elif isinstance(node, dict):
            if id(node) in seen:
                raise CheckpointError(
                    path,
                    f"{path}: refused: the same container is reachable under several keys "
                    f"(at {prefix!r}); a pickle built to explode when walked",
                )
            seen.add(id(node))
            if depth >= _MAX_DEPTH:
                raise CheckpointError(
                    path, f"{path}: refused: containers nested deeper than {_MAX_DEPTH} levels"
                )
            children = [
                (f"{prefix}.{key}" if prefix else str(key), value, depth + 1)
                for key, value in node.items()
            ]
            stack.extend(reversed(children))  # keep the file's order


# Real checkpoints nest a handful of levels (Lightning: state_dict -> module -> weights).
_MAX_DEPTH = 64


def _check_extent(path: Path, key: str, tensor: torch.Tensor) -> None:
    """Refuse a tensor whose view reaches past its storage (zero or overlapping strides)."""
    if tensor.numel() == 0:
        return
    storage = tensor.untyped_storage().nbytes()
    needed = tensor.numel() * tensor.element_size()
    if needed > storage:
        raise CheckpointError(
            path,
            f"{path}: tensor {key!r} declares {tuple(tensor.shape)} {tensor.dtype} "
            f"({needed} bytes) over a storage of {storage} bytes: refused before "
            f"materialising it",
        )


def _data_only_globals() -> list[Any]:
    """Globals that only hold data, beside what ``weights_only`` already allows.

    Megatron stores its arguments as an ``argparse.Namespace`` and numpy RNG states, Transformer
    Engine its ``_extra_state`` as ``io.BytesIO``: refusing them would refuse every real Megatron
    checkpoint. Each of these builds a value from bytes or sets attributes; none runs code, and
    anything nested in them goes through the same restricted unpickler.
    """
    multiarray = (getattr(np, "_core", None) or np.core).multiarray  # numpy 2, numpy 1
    allowed: list[Any] = [argparse.Namespace, io.BytesIO, np.ndarray, np.dtype]
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed += [
            (multiarray._reconstruct, f"{module}._reconstruct"),
            (multiarray.scalar, f"{module}.scalar"),
        ]
    allowed += [
        getattr(np.dtypes, name)
        for name in dir(np.dtypes)
        if name.endswith("DType") and name not in ("ObjectDType", "VoidDType")
    ]
    return allowed


_DATA_ONLY = _data_only_globals()


_SIZE_LIES = (
    "resize storage that is not resizable",
    "does not match expected size",
    "wrong byte size",
    "out of bounds for storage",
)


def load_torch(path: Path, confine: Confinement = UNCONFINED) -> dict[str, object]:
    """Load a torch pickle with ``weights_only=True``: tensors, plain containers and data.

    A pickle that needs any other global (a class, a function — code) is refused with
    :class:`UnsafeCheckpointError`; nothing in it is executed. Zip-format files are memory
    mapped, so a tensor's bytes are read only when that tensor is used. The file is opened and
    checked by ``confine`` first; torch then reads that same open file (``/proc/self/fd/N``).
    """
    import torch

    try:
        with confine.open(path) as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise CheckpointError(path, f"{path}: empty file")
            mmap = zipfile.is_zipfile(handle)
            handle.seek(0)
            with torch.serialization.safe_globals(_DATA_ONLY):
                obj = torch.load(
                    descriptor_path(handle, path), map_location="cpu", weights_only=True, mmap=mmap
                )
    except FileNotFoundError as exc:
        raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
    except pickle.UnpicklingError as exc:
        message = str(exc)
        if "weights_only" in message or "global" in message.lower():
            raise UnsafeCheckpointError(
                path,
                f"{path}: refused: the pickle needs code, not only tensors "
                f"(alphawatch never unpickles code). {message.splitlines()[0]}",
            ) from exc
        raise CheckpointError(path, f"{path}: not a torch checkpoint: {message}") from exc
    except CheckpointError:
        raise
    except RecursionError as exc:
        raise CheckpointError(path, f"{path}: refused: its pickle is nested too deeply") from exc
    except Exception as exc:  # the unpickler fails in many ways on bytes that are no pickle
        if any(sign in str(exc) for sign in _SIZE_LIES):
            # torch compares each storage's declared size with its record before using it.
            raise CheckpointError(
                path,
                f"{path}: a tensor declares more bytes than the file stores for it "
                f"(the file lies about its size): {str(exc).splitlines()[0]}",
            ) from exc
        raise CheckpointError(
            path, f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {exc})"
        ) from exc
    if not isinstance(obj, dict):
        raise CheckpointError(path, f"{path}: holds a {type(obj).__name__}, not a state dict")
    return obj


def iter_torch(
    path: Path, root_keys: tuple[str, ...] = (), confine: Confinement = UNCONFINED
) -> Iterator[tuple[str, torch.Tensor]]:
    """(key, tensor) of a torch checkpoint; ``root_keys`` names where the weights live."""
    obj: object = load_torch(path, confine)
    for key in root_keys:
        if isinstance(obj, dict) and key in obj:
            obj = obj[key]
            break
    yield from _flatten(path, obj)


@overload
def upcast(tensor: StoredArray, scale: torch.Tensor | StoredArray | None = None) -> np.ndarray: ...
@overload
def upcast(
    tensor: torch.Tensor, scale: torch.Tensor | StoredArray | None = None
) -> torch.Tensor: ...
def upcast(
    tensor: torch.Tensor | StoredArray, scale: torch.Tensor | StoredArray | None = None
) -> torch.Tensor | np.ndarray:
    """float32 copy of a stored tensor; fp8 weights are multiplied by their inverse scale.

    A :class:`StoredArray` gives a numpy array (computed without torch), a tensor a tensor.
    """
    if isinstance(tensor, StoredArray):
        # No copy when already float32 (as torch's ``.to``): the array owns its file bytes.
        array = tensor.array.astype(np.float32, copy=False)
        if tensor.dtype in _FLOAT8_NAMES and scale is not None:
            factors = (scale.array if isinstance(scale, StoredArray) else scale.numpy()).astype(
                np.float32
            )
            array = _apply_block_scale_array(array, factors)
        return array
    import torch

    if str(tensor.dtype).removeprefix("torch.") in _FLOAT8_NAMES:
        widened = tensor.to(torch.float32)
        if scale is not None:
            inverse = scale.to_torch() if isinstance(scale, StoredArray) else scale
            widened = _apply_block_scale(widened, inverse.to(torch.float32))
        return widened
    return tensor.to(torch.float32)


def _apply_block_scale(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    if scale.numel() == 1:
        return weight * scale.reshape(())
    if scale.dim() == 1:  # one per output row
        scale = scale.reshape(-1, 1)
    # Block-wise scales (e.g. 128x128 blocks): expand each scale over its block.
    rows = -(-weight.shape[0] // scale.shape[0])
    cols = -(-weight.shape[1] // scale.shape[1])
    expanded = scale.repeat_interleave(rows, 0).repeat_interleave(cols, 1)
    return weight * expanded[: weight.shape[0], : weight.shape[1]]


def _apply_block_scale_array(weight: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """:func:`_apply_block_scale` in numpy: the same float32 products."""
    scaled: np.ndarray
    if scale.size == 1:
        scaled = weight * scale.reshape(())
        return scaled
    if scale.ndim == 1:  # one per output row
        scale = scale.reshape(-1, 1)
    rows = -(-weight.shape[0] // scale.shape[0])
    cols = -(-weight.shape[1] // scale.shape[1])
    expanded = np.repeat(np.repeat(scale, rows, axis=0), cols, axis=1)
    scaled = weight * expanded[: weight.shape[0], : weight.shape[1]]
    return scaled


def read_safetensors_tensor(
    path: Path, key: str, confine: Confinement = UNCONFINED
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One tensor (and its fp8 scale, if any) of a safetensors file, by key."""
    try:
        with confine.open(path) as handle:
            length, header = _header_of(handle, path)
            check_layout(path, header)
            info = header.get(key)
            if not isinstance(info, dict):
                raise CheckpointError(path, f"{path}: has no tensor {key!r}")
            scale_key = scale_key_of(key, header)
            scale = (
                _read_tensor(handle, path, 8 + length, scale_key, header[scale_key])
                if scale_key is not None
                else None
            )
            return _read_tensor(handle, path, 8 + length, key, info), scale
    except FileNotFoundError as exc:
        raise CheckpointVanished(path, f"{path} disappeared while being read") from exc
