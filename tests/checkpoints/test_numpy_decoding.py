"""Every safetensors dtype decoded by numpy alone equals torch's own decoding, bit for bit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from alphawatch.workers.checkpoints.readers import decode_array, safetensors_header

ALL_BITS = {
    "BF16": (torch.bfloat16, torch.arange(-(2**15), 2**15, dtype=torch.int32).to(torch.int16)),
    "F8_E4M3": (torch.float8_e4m3fn, torch.arange(256, dtype=torch.int32).to(torch.uint8)),
    "F8_E5M2": (torch.float8_e5m2, torch.arange(256, dtype=torch.int32).to(torch.uint8)),
}


def stored(dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    values = torch.randn(37, 53, generator=g, dtype=torch.float64) * 7
    if dtype == torch.bool:
        return values > 0
    if dtype.is_complex:
        return torch.complex(values, values.flip(0) / 3).to(dtype)
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return values.clamp(info.min, info.max).to(dtype)
    return values.to(dtype)


def through_file(tmp_path: Path, tensors: dict[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """Write a real safetensors file, decode each tensor's bytes with numpy only."""
    path = tmp_path / "t.safetensors"
    save_file(tensors, str(path))
    length, header = safetensors_header(path)
    raw = path.read_bytes()[8 + length :]
    out = {}
    for key, info in header.items():
        if key == "__metadata__":
            continue
        begin, end = info["data_offsets"]  # type: ignore[misc]
        out[key] = decode_array(raw[begin:end], str(info["dtype"]), list(info["shape"]))  # type: ignore[call-overload]
    return out


@pytest.mark.parametrize(
    "dtype",
    [
        torch.float64,
        torch.float32,
        torch.float16,
        torch.bfloat16,
        torch.float8_e4m3fn,
        torch.float8_e5m2,
        torch.int64,
        torch.int32,
        torch.int16,
        torch.int8,
        torch.uint64,
        torch.uint32,
        torch.uint16,
        torch.uint8,
        torch.bool,
        torch.complex64,
    ],
)
def test_every_dtype_decodes_as_torch_does(tmp_path: Path, dtype: torch.dtype) -> None:
    tensor = stored(dtype, 3)
    got = through_file(tmp_path, {"w": tensor, "row": tensor[0].clone()})
    for key, want in (("w", tensor), ("row", tensor[0])):
        assert got[key].shape == tuple(want.shape)
        if dtype in (torch.bfloat16, torch.float8_e4m3fn, torch.float8_e5m2):
            assert got[key].dtype == np.float32
            np.testing.assert_array_equal(got[key], want.to(torch.float32).numpy())
        else:
            assert got[key].dtype == want.numpy().dtype
            np.testing.assert_array_equal(got[key], want.numpy())


@pytest.mark.parametrize("name", sorted(ALL_BITS))
def test_every_bit_pattern_decodes_as_torch_does(tmp_path: Path, name: str) -> None:
    """All 65,536 bfloat16 and all 256 float8 patterns: subnormals, signed zeros, inf, NaN."""
    dtype, bits = ALL_BITS[name]
    tensor = bits.view(dtype)
    got = through_file(tmp_path, {"w": tensor})["w"]
    want = tensor.to(torch.float32).numpy()
    nan = np.isnan(want)
    np.testing.assert_array_equal(np.isnan(got), nan)
    # bit for bit where not NaN: the sign of zero included
    np.testing.assert_array_equal(got[~nan].view(np.uint32), want[~nan].view(np.uint32))


def test_a_scalar_and_an_empty_tensor(tmp_path: Path) -> None:
    got = through_file(
        tmp_path,
        {"s": torch.tensor(2.5, dtype=torch.bfloat16), "e": torch.zeros(0, 4, dtype=torch.float16)},
    )
    assert got["s"].shape == () and float(got["s"]) == 2.5
    assert got["e"].shape == (0, 4) and got["e"].dtype == np.float16


def test_an_unknown_dtype_is_refused() -> None:
    with pytest.raises(KeyError):
        decode_array(b"\0\0\0\0", "F4", [1])
