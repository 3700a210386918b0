"""Where the spectral engine computes, and the matrices it takes.

Two paths compute the same numbers. The host path reads numpy arrays in host memory and never
imports torch. The accelerator path computes with torch on a torch device: CUDA in production,
and the CPU in CI, where it is the only way its code runs (no GPU has been available to the
project), checked equal to the host path by ``tests/spectral/test_torch_path.py``. Which path runs
is :attr:`Device.kind`, never the device's name; only the TF32 switch (:func:`exact_float32`)
depends on the hardware, because it exists only on CUDA.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, TypeAlias

import numpy as np

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Device:
    """Where the engine computes: ``kind="host"`` (numpy) or ``kind="torch"`` (torch tensors).

    ``torch_device`` names the torch device of the accelerator path (``"cuda"``, ``"cuda:1"``,
    or ``"cpu"`` to run that path on torch CPU tensors). Read like a ``torch.device`` where the
    engine and its callers read one: ``.type`` and ``str()`` (``"cpu"``, ``"cuda"``, ...).

    Example
    -------
    >>> Device(kind="torch", torch_device="cpu").accelerated
    True
    """

    kind: Literal["host", "torch"] = "host"
    torch_device: str = "cpu"

    def __post_init__(self) -> None:
        if self.kind not in ("host", "torch"):
            raise ValueError(f"device kind {self.kind!r}: 'host' or 'torch'")
        if self.kind == "host" and self.torch_device != "cpu":
            raise ValueError("the host path computes in host memory: torch_device must be 'cpu'")

    @property
    def accelerated(self) -> bool:
        """Whether the accelerator path (torch tensors on :attr:`torch_device`) computes."""
        return self.kind == "torch"

    @property
    def type(self) -> str:
        """The hardware, as ``torch.device.type`` names it: ``"cpu"`` or ``"cuda"``."""
        return self.torch_device.split(":", 1)[0]

    def __str__(self) -> str:
        return self.torch_device


HOST = Device()
"""The CPU through numpy: the engine's default, and the one that imports no torch."""


def _gpu_nodes() -> bool:
    """Whether this machine may have a GPU torch can use: always, except on a Linux machine
    without the device files the NVIDIA (``/dev/nvidia0``...) and ROCm (``/dev/kfd``) drivers
    create, where ``torch.cuda.is_available()`` is False and importing torch to ask costs
    more than a second."""
    if not sys.platform.startswith("linux"):
        return True
    dev = Path("/dev")
    return (dev / "kfd").exists() or any(dev.glob("nvidia[0-9]*"))


def resolve_device(requested: str | Device | torch.device) -> Device:
    """``"auto"`` → CUDA when available, else CPU; ``"cuda"`` without a GPU is an error.

    ``"cpu"`` is :data:`HOST` and imports nothing, and so is ``"auto"`` on a Linux machine
    without a GPU's device files; any other request imports torch to ask it. A
    ``torch.device("cpu")`` is the host too; a :class:`Device` is taken as it is.
    """
    if isinstance(requested, Device):
        return requested
    if not isinstance(requested, str):
        return HOST if requested.type == "cpu" else Device("torch", str(requested))
    if requested == "cpu" or (requested == "auto" and not _gpu_nodes()):
        return HOST
    import torch

    if requested == "auto":
        return Device("torch", "cuda") if torch.cuda.is_available() else HOST
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError("device 'cuda' requested but no CUDA device is available")
    device = torch.device(requested)
    return HOST if device.type == "cpu" else Device("torch", str(device))


@contextmanager
def exact_float32(device: Device) -> Iterator[None]:
    """Matrix products in true float32 inside: TF32 (10-bit mantissas, on CUDA's tensor cores
    when allowed) would move the eigenvalues by ~1e-3 relative. The switch exists only on CUDA;
    elsewhere this does nothing."""
    if device.type != "cuda":
        yield
        return
    import torch

    previous = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = previous


Matrix: TypeAlias = "np.ndarray | torch.Tensor"
"""A weight matrix as the engine takes it: a numpy array or a torch tensor (any device)."""


def as_matrices(weight: Matrix) -> list[Matrix]:
    """The 2-D matrices whose spectra are pooled: W itself, or each (kh, kw) slice of a Conv2d.

    Raises ValueError for shapes that have no unambiguous matrix reading (1-D, 3-D, 5-D+).
    """
    if weight.ndim == 2:
        return [weight]
    if weight.ndim == 4:
        kh, kw = weight.shape[2], weight.shape[3]
        return [weight[:, :, i, j] for i in range(kh) for j in range(kw)]
    raise ValueError(
        f"cannot read a {weight.ndim}-D tensor of shape {tuple(weight.shape)} as a "
        "matrix; reshape it explicitly (Conv1d: (out, in*k))"
    )


def host_array(matrix: Matrix) -> np.ndarray:
    """``matrix`` as a numpy array in host memory, without a copy where its dtype allows.

    float16/32/64 CPU tensors share their memory (``Tensor.numpy()``); bfloat16, float8 and
    integer tensors, which numpy has no dtype for, become float32 copies.
    """
    if isinstance(matrix, np.ndarray):
        return matrix
    import torch

    tensor = matrix.detach().cpu()
    if tensor.dtype not in (torch.float64, torch.float32, torch.float16):
        tensor = tensor.to(torch.float32)
    return tensor.numpy()


def is_complex(matrix: Matrix) -> bool:
    """Whether ``matrix`` holds complex numbers (the engine analyses real matrices only)."""
    if isinstance(matrix, np.ndarray):
        return bool(np.iscomplexobj(matrix))
    return bool(matrix.is_complex())


def device_tensor(matrix: Matrix, device: Device) -> torch.Tensor:
    """``matrix`` as a torch tensor on ``device``'s torch device (shared memory where it can)."""
    import torch

    # torch shares a numpy array's memory and warns on read-only ones (decoded file bytes)
    tensor = (
        torch.from_numpy(np.require(matrix, requirements="W"))
        if isinstance(matrix, np.ndarray)
        else matrix.detach()
    )
    return tensor.to(device=device.torch_device, non_blocking=True)


def entry_count(matrix: Matrix) -> int:
    """Number of entries of ``matrix``."""
    return int(np.prod(matrix.shape))
