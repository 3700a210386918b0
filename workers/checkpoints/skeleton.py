"""A model's skeleton built from its ``config.json``: offline and code-free, by construction.

Naming a Trainer's optimizer entries needs the model's ``named_parameters()`` order, so the
model is built from the checkpoint's config on the meta device. A config is hostile input, and
transformers reads more in it than shapes: ``backbone: "org/repo"`` (DPT, UperNet, DETR, ...)
makes ``load_backbone`` fetch that repository's config from the model hub (``HF_ENDPOINT``),
``use_pretrained_backbone`` downloads weights, timm's ``hf-hub:`` names do both, and
``auto_map`` names remote code. Three things hold whatever the config says:

- the config is cleaned first (:func:`skeleton_config`): keys that name something to fetch or
  run are dropped, pretrained backbones are switched off, and a backbone named only by a hub or
  timm name (no local ``backbone_config`` describing it) is refused with a clear message;
- only classes that the installed transformers ships are built (never an ``Auto*`` class, which
  is what reads ``auto_map``), and ``trust_remote_code`` is never passed;
- while the skeleton is built, the building thread can open no network connection and resolve
  no host name (:func:`offline`, an audit hook): what the first two miss fails, unsent.

The analysis process also starts with ``HF_HUB_OFFLINE=1`` and ``TRANSFORMERS_OFFLINE=1``.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

OFFLINE_ENVIRONMENT = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
"""Set in the analysis process before it imports anything of the hub's."""

_DROPPED = frozenset(
    {
        "auto_map",  # names remote code for the Auto* classes
        "trust_remote_code",
        "_name_or_path",
        "name_or_path",  # where the config came from: a hub repository, maybe
        "backbone_kwargs",  # passed to the backbone's from_pretrained / timm.create_model
        "custom_pipelines",
        "_commit_hash",
    }
)
_NO_PRETRAINED = {"use_pretrained_backbone": False}
_NETWORK_EVENTS = frozenset(
    {
        "socket.getaddrinfo",
        "socket.gethostbyname",
        "socket.gethostbyname_ex",
        "socket.gethostbyaddr",
        "socket.connect",
        "socket.sendto",
        "socket.sendmsg",
    }
)


class SkeletonRefused(ValueError):
    """The config names something that cannot be built offline and code-free."""


class NetworkRefused(ConnectionRefusedError):
    """A network call made while a skeleton was being built: refused before anything is sent."""


def skeleton_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """``config`` without what names something to fetch or run, at any depth.

    Raises:
        SkeletonRefused: a backbone named only by a string (``"org/repo"``, a timm name):
            its layers are described nowhere in the checkpoint.
    """
    return _clean(config, "config.json")


def _clean(config: Mapping[str, Any], where: str) -> dict[str, Any]:
    backbone = config.get("backbone")
    described = isinstance(config.get("backbone_config"), Mapping)
    if config.get("backbone_config") is not None and not described:
        raise SkeletonRefused(
            f"{where}: backbone_config is {config['backbone_config']!r}, not a configuration; "
            "alphawatch never fetches a configuration from the model hub"
        )
    if backbone is not None and not described:
        raise SkeletonRefused(
            f"{where}: the backbone is named {backbone!r} (a model hub or timm name) and not "
            "described by a backbone_config, so its layers are unknown; alphawatch never "
            "fetches from the model hub"
        )
    out: dict[str, Any] = {}
    for key, value in config.items():
        # A described backbone is built from its backbone_config; its name alone would be
        # looked up in the hub.
        if key in _DROPPED or (key == "backbone" and described):
            continue
        out[key] = _cleaned(value, f"{where}: {key}")
    if "backbone" in config or described or "use_pretrained_backbone" in config:
        out.update(_NO_PRETRAINED)
    return out


def _cleaned(value: Any, where: str) -> Any:
    if isinstance(value, Mapping):
        return _clean(value, where)
    if isinstance(value, list):
        return [_cleaned(v, where) for v in value]
    return value


def meta_model(config: Mapping[str, Any]) -> torch.nn.Module:
    """The model of ``config`` on the meta device (no memory, no weights, no code, no network).

    Raises:
        SkeletonRefused: transformers is missing, the config names no single architecture that
            the installed transformers ships, or it cannot be built offline.
    """
    import torch

    try:
        import transformers
    except ImportError as exc:
        raise SkeletonRefused(
            "naming a Trainer's optimizer entries needs the model's parameter "
            "order, built from config.json by transformers, which is not "
            "installed (pip install transformers)"
        ) from exc
    architectures = config.get("architectures")
    model_type = config.get("model_type")
    if not (
        isinstance(architectures, list)
        and len(architectures) == 1
        and isinstance(architectures[0], str)
        and isinstance(model_type, str)
    ):
        raise SkeletonRefused(
            "config.json beside it names no single architecture and "
            "model_type, so the model's parameter order is unknown"
        )
    model_class = getattr(transformers, architectures[0], None)
    if not (
        isinstance(model_class, type)
        and issubclass(model_class, torch.nn.Module)
        and not architectures[0].startswith("Auto")
    ):
        raise SkeletonRefused(
            f"architecture {architectures[0]!r} is not part of transformers "
            f"{transformers.__version__} (custom model code is never run)"
        )
    settings = {k: v for k, v in skeleton_config(config).items() if k != "model_type"}
    build: Callable[..., Any] = transformers.AutoConfig.for_model
    try:
        with offline():
            model_config = build(model_type, **settings)
            with torch.device("meta"):
                model = model_class(model_config)
    except NetworkRefused as exc:
        raise SkeletonRefused(
            f"transformers tried to reach the network to build "
            f"{architectures[0]} from config.json ({exc})"
        ) from exc
    except Exception as exc:  # transformers raises many kinds on a config it cannot build
        cause = exc.__context__ if isinstance(exc.__context__, NetworkRefused) else exc
        raise SkeletonRefused(
            f"transformers cannot build {architectures[0]} from config.json "
            f"offline ({type(cause).__name__}: {cause})"
        ) from exc
    assert isinstance(model, torch.nn.Module)
    return model


_state = threading.local()
_hook_lock = threading.Lock()
_hooked = False


@contextlib.contextmanager
def offline() -> Iterator[None]:
    """While it lasts, this thread resolves no host name and connects no network socket (local
    sockets still work): the attempt raises :class:`NetworkRefused` before a byte is sent."""
    global _hooked
    with _hook_lock:
        if not _hooked:
            # Audit hooks cannot be removed: one per process, asleep outside `offline()`.
            sys.addaudithook(_audit)
            _hooked = True
    depth = getattr(_state, "depth", 0)
    _state.depth = depth + 1
    try:
        yield
    finally:
        _state.depth = depth


def _audit(event: str, args: tuple[Any, ...]) -> None:
    if event not in _NETWORK_EVENTS or not getattr(_state, "depth", 0):
        return
    target = args[0]  # a host name, or the socket for connect/send
    if event in ("socket.connect", "socket.sendto", "socket.sendmsg"):
        if isinstance(target, socket.socket) and target.family == socket.AF_UNIX:
            return
        target = args[-1]
    raise NetworkRefused(f"{event} to {target!r} refused: a model skeleton is built offline")
