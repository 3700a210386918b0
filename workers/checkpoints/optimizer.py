"""Gradient spectra: Adam's first moment of each weight matrix, from the saved optimizer state.

``exp_avg`` is an exponential average of a weight's gradients; its spectrum is analysed like the
weight's, as a row named ``<layer>@exp_avg`` (kind and block as the weight's).

An optimizer's state dict names no parameter: ``state`` is keyed by integers and
``param_groups[i]["params"]`` lists those integers, numbered in the order the parameters were
handed to the optimizer, group after group. Naming them is done exactly or not at all:

- Hugging Face Trainer (``checkpoint-N/optimizer.pt``): the model is built from the checkpoint's
  ``config.json`` on the meta device (no memory, no weights, no custom code, no network: only
  architectures that the installed ``transformers`` ships; ``skeleton.py``), which gives
  ``named_parameters()`` order; the Trainer put the parameters that get weight decay in a first
  group and the others in a second (``Trainer.create_optimizer`` /
  ``get_decay_parameter_names``). Each rule transformers has used to split them is tried, and
  also one group holding every parameter in order; a layout is accepted only when its group
  sizes and the shape of every moment agree with the state, and when every layout that agrees
  names the parameters the same way.
- Lightning (``*.ckpt`` with ``optimizer_states``): the parameters of a module come in
  ``state_dict`` order (both walk the modules depth first, parameters before children; tied
  parameters count once). Accepted for one optimizer with one parameter group whose size equals
  the number of distinct floating tensors of the state dict, every shape agreeing; a state dict
  holding buffers, or several groups, cannot be named exactly and is refused.

- torch DCP (``.metadata`` folders saved from ``get_state_dict(model, optimizer)``): the state
  is keyed by parameter name already (``<optim>.state.<fqn>.exp_avg``). Each moment is matched
  to the one weight tensor whose key is its name, or ends with ``.`` + its name (the weights'
  own top-level key, e.g. ``model.``), and has its shape; none, several, or another shape is
  refused.

Anything else is refused with :class:`OptimizerStateRefused`, whose message says why: the
weights are analysed all the same.

Scale: gradient moments are small (entries of 1e-5 give eigenvalues far below 1e-5), and the
``ww`` fit drops eigenvalues under weightwatcher's absolute floor of 1e-5, which is calibrated
for weights: most of a gradient's spectrum would vanish under it. Alpha itself is scale-free, so
:func:`unit_mean_eigenvalue` divides each moment by one constant that makes its mean eigenvalue
1 before it is analysed; the floor then cuts at 1e-5 of the mean, as for a well-scaled weight.
Norm metrics of ``@exp_avg`` rows therefore describe the spectrum's shape, not the gradient's
size (``log_norm`` = log10 of the smaller dimension).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from alphawatch.vocabulary import VARIANT_SEPARATOR, Source
from alphawatch.workers.checkpoints.confine import UNCONFINED, Confinement
from alphawatch.workers.checkpoints.errors import CheckpointError, shown
from alphawatch.workers.checkpoints.files import LayerMatrix, model_config
from alphawatch.workers.checkpoints.layers import _matrices
from alphawatch.workers.checkpoints.naming import is_weight_matrix
from alphawatch.workers.checkpoints.readers import _check_extent, load_torch
from alphawatch.workers.checkpoints.skeleton import SkeletonRefused, meta_model

EXP_AVG = Source.EXP_AVG.value
# Where a Trainer (optimizer.pt) or an Accelerate-saved loop (optimizer.bin) keeps the state.
OPTIMIZER_FILES = ("optimizer.pt", "optimizer.bin")

Shape = tuple[int, ...]
Parameter = tuple[str, Shape]


class OptimizerStateRefused(CheckpointError):
    """Optimizer state that is missing, or cannot be matched to layer names exactly."""


def optimizer_file(path: Path) -> Path | None:
    """The file holding a checkpoint's optimizer state, or None when it has none."""
    if path.is_dir() and (path / ".metadata").is_file():
        return path / ".metadata"
    if path.is_dir():
        return next((path / n for n in OPTIMIZER_FILES if (path / n).is_file()), None)
    return path if path.suffix == ".ckpt" else None


def iter_exp_avg(path: Path, confine: Confinement = UNCONFINED) -> Iterator[LayerMatrix]:
    """``exp_avg`` of each weight matrix of a checkpoint, as ``<layer>@exp_avg`` matrices.

    Args:
        path: a Hugging Face Trainer ``checkpoint-N`` folder, a torch DCP folder or a
            Lightning ``.ckpt`` file.
        confine: the roots every file read must resolve under.

    Yields:
        LayerMatrix: float32 CPU matrices named ``<layer>@exp_avg``, kind and block as the
        layer's; fused QKV split and GPT-2 Conv1D un-transposed as the weights are. Parameters
        the optimizer holds no state for (never stepped) are skipped.

    Raises:
        OptimizerStateRefused: no optimizer state, a state that is not Adam-like, or one whose
            entries cannot be named exactly (the message says which check failed).
        CheckpointError: an unreadable or unsafe file, as for weights.
    """
    confine.check(path, "checkpoint")
    file = optimizer_file(path)
    if file is None:
        raise OptimizerStateRefused(
            path,
            f"{shown(path)}: no optimizer state beside the weights "
            f"({' or '.join(OPTIMIZER_FILES)} in a checkpoint folder, a torch DCP "
            "folder, or a Lightning .ckpt)",
        )
    if file.name == ".metadata":
        yield from _dcp_moments(path, confine)
        return
    loaded = load_torch(file, confine)
    if path.is_dir():
        config = model_config(path, confine)
        groups, moments = _moments(file, loaded)
        names = _trainer_names(file, config, groups, moments)
    else:
        config = {}
        groups, moments, parameters = _lightning(file, loaded)
        names = _exact(
            file, {"one parameter group in state_dict order": [parameters]}, groups, moments
        )
    digests: set[str] = set()
    for index in (i for group in groups for i in group):
        name = names[index]
        moment = moments.get(index)
        if moment is None or not is_weight_matrix(name, moment.dim()):
            continue
        for matrix in _matrices(name, moment, None, str(file), config, digests):
            yield replace(matrix, name=f"{matrix.name}{VARIANT_SEPARATOR}{EXP_AVG}")


def unit_mean_eigenvalue(matrix: LayerMatrix) -> LayerMatrix:
    """``matrix`` divided by the constant that makes the mean of its eigenvalues σ² equal 1.

    For W of shape (N, M), M ≤ N: W · √M / ‖W‖_F, so Σλ = M. A zero matrix is returned as is
    (the engine reports it as degenerate).
    """
    weight = torch.as_tensor(matrix.weight)
    norm = float(torch.linalg.norm(weight.double()))
    if norm == 0.0 or not torch.isfinite(torch.tensor(norm)):
        return matrix
    scale = (min(weight.shape[0], weight[0].numel()) ** 0.5) / norm
    return replace(matrix, weight=(weight.double() * scale).float())


def _refuse(file: Path, why: str) -> OptimizerStateRefused:
    return OptimizerStateRefused(
        file,
        f"{shown(file)}: optimizer state not analysed: {why}; weights are analysed all the same",
    )


def _moments(
    file: Path, loaded: Mapping[str, Any]
) -> tuple[list[list[int]], dict[int, torch.Tensor]]:
    """Parameter indices per group and each index's ``exp_avg``, the structure checked."""
    state, groups = loaded.get("state"), loaded.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list):
        raise _refuse(file, "not a torch optimizer state dict (no 'state' and 'param_groups')")
    indices: list[list[int]] = []
    for group in groups:
        params = group.get("params") if isinstance(group, dict) else None
        if not (isinstance(params, list) and all(_is_index(i) for i in params)):
            raise _refuse(file, "a parameter group does not list integer parameter indices")
        indices.append(list(params))
    flat = [i for group in indices for i in group]
    if flat != list(range(len(flat))):
        # torch numbers the parameters 0, 1, ... group after group when it saves its state.
        raise _refuse(file, "parameter indices are not numbered 0..n-1 group after group")
    moments: dict[int, torch.Tensor] = {}
    for index, entry in state.items():
        if not _is_index(index) or index >= len(flat):
            raise _refuse(file, f"state entry {index!r} is no parameter of any group")
        moment = entry.get("exp_avg") if isinstance(entry, dict) else None
        if not isinstance(moment, torch.Tensor):
            keys = sorted(map(str, entry)) if isinstance(entry, dict) else []
            raise _refuse(
                file,
                f"parameter {index} has no exp_avg tensor (state keys {keys}): "
                "not an Adam-like optimizer",
            )
        _check_extent(file, f"state.{index}.exp_avg", moment)
        moments[index] = moment
    return indices, moments


def _is_index(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _exact(
    file: Path,
    layouts: Mapping[str, Sequence[Sequence[Parameter]]],
    groups: Sequence[Sequence[int]],
    moments: Mapping[int, torch.Tensor],
) -> dict[int, str]:
    """Parameter names by index under the one naming every agreeing layout gives.

    A layout (parameters per group, in order) agrees when it has as many groups, each as long,
    as the state, and every moment has the shape of the parameter it would name.
    """
    agreeing: dict[str, dict[int, str]] = {}
    why: list[str] = []
    for label, layout in layouts.items():
        problem = _disagreement(layout, groups, moments)
        if problem is None:
            agreeing[label] = {
                index: name
                for group, params in zip(groups, layout, strict=True)
                for index, (name, _) in zip(group, params, strict=True)
            }
        else:
            why.append(f"{label}: {problem}")
    if not agreeing:
        raise _refuse(file, "no parameter layout matches it exactly (" + "; ".join(why) + ")")
    namings = list(agreeing.values())
    if any(n != namings[0] for n in namings[1:]):
        raise _refuse(
            file,
            "layouts " + ", ".join(agreeing) + " all match it but name the "
            "parameters differently: ambiguous, so not guessed",
        )
    return namings[0]


def _disagreement(
    layout: Sequence[Sequence[Parameter]],
    groups: Sequence[Sequence[int]],
    moments: Mapping[int, torch.Tensor],
) -> str | None:
    sizes, expected = [len(g) for g in groups], [len(g) for g in layout]
    if sizes != expected:
        return f"group sizes {sizes}, the layout has {expected}"
    for group, params in zip(groups, layout, strict=True):
        for index, (name, shape) in zip(group, params, strict=True):
            moment = moments.get(index)
            if moment is not None and tuple(moment.shape) != shape:
                return f"parameter {index} has shape {tuple(moment.shape)}, but {name} has {shape}"
    return None


# -- Hugging Face Trainer ---------------------------------------------------------------------
# The name rules transformers' Trainer.get_decay_parameter_names has used: parameters inside an
# nn.LayerNorm, or whose dotted name (lower case) matches a pattern, get no weight decay.
_DECAY_RULES: dict[str, tuple[str, ...]] = {
    # transformers >= 4.50 (read in 5.x): norms matched by name, whatever their class.
    "Trainer decay/no-decay groups (transformers >= 4.50)": (
        r"bias",
        r"layernorm",
        r"rmsnorm",
        r"(?:^|\.)norm(?:$|\.)",
        r"_norm(?:$|\.)",
    ),
    # transformers 4.38 - 4.49: the final `model.norm` of Llama-like models still decayed.
    "Trainer decay/no-decay groups (transformers 4.38 - 4.49)": (r"bias", r"layernorm", r"rmsnorm"),
    # transformers < 4.38: LayerNorm modules and biases only.
    "Trainer decay/no-decay groups (transformers < 4.38)": (r"bias",),
}


def _trainer_names(
    file: Path,
    config: Mapping[str, object],
    groups: Sequence[Sequence[int]],
    moments: Mapping[int, torch.Tensor],
) -> dict[int, str]:
    model = _meta_model(file, config)
    parameters = [(name, tuple(p.shape)) for name, p in model.named_parameters()]
    layouts: dict[str, list[list[Parameter]]] = {}
    for label, patterns in _DECAY_RULES.items():
        decay = set(decay_parameter_names(model, patterns))
        layouts[label] = [
            [p for p in parameters if p[0] in decay],
            [p for p in parameters if p[0] not in decay],
        ]
    layouts["one parameter group in named_parameters() order"] = [parameters]
    return _exact(file, layouts, groups, moments)


def decay_parameter_names(model: torch.nn.Module, patterns: Sequence[str]) -> list[str]:
    """Names of the parameters a Trainer decays, as ``transformers.trainer_pt_utils`` finds them.

    The same walk as ``get_parameter_names(model, [nn.LayerNorm], patterns)``: a parameter inside
    an ``nn.LayerNorm`` or whose dotted name (lower case) matches a pattern is left out.
    """
    compiled = [re.compile(p) for p in patterns]

    def walk(module: torch.nn.Module) -> list[str]:
        result = []
        for name, child in module.named_children():
            result += [
                f"{name}.{n}"
                for n in walk(child)
                if not isinstance(child, torch.nn.LayerNorm)
                and not any(c.search(f"{name}.{n}".lower()) for c in compiled)
            ]
        result += [k for k in module._parameters if not any(c.search(k.lower()) for c in compiled)]
        return result

    return walk(model)


def _meta_model(file: Path, config: Mapping[str, object]) -> torch.nn.Module:
    """The checkpoint's model built on the meta device from its config (no weights, no code,
    no network: :mod:`~alphawatch.workers.checkpoints.skeleton`)."""
    try:
        return meta_model(config)
    except SkeletonRefused as exc:
        raise _refuse(file, str(exc)) from exc


# -- Lightning ---------------------------------------------------------------------------------
def _lightning(
    file: Path, loaded: Mapping[str, Any]
) -> tuple[list[list[int]], dict[int, torch.Tensor], list[Parameter]]:
    states, weights = loaded.get("optimizer_states"), loaded.get("state_dict")
    if not isinstance(states, list) or not states:
        raise _refuse(file, "the Lightning checkpoint holds no optimizer_states")
    if len(states) != 1 or not isinstance(states[0], dict):
        raise _refuse(
            file,
            f"{len(states)} optimizers: which parameters each one holds is not "
            "saved, so their entries cannot be named",
        )
    if not isinstance(weights, dict):
        raise _refuse(file, "the Lightning checkpoint holds no state_dict")
    groups, moments = _moments(file, states[0])
    if len(groups) != 1:
        raise _refuse(
            file,
            f"{len(groups)} parameter groups: which parameter went to which "
            "group is not saved in a Lightning checkpoint",
        )
    parameters: list[Parameter] = []
    seen: set[tuple[int, int, Shape, Shape]] = set()
    for name, tensor in weights.items():
        if not isinstance(tensor, torch.Tensor) or not tensor.is_floating_point():
            continue
        identity = (
            tensor.untyped_storage().data_ptr(),
            int(tensor.storage_offset()),
            tuple(tensor.shape),
            tuple(tensor.stride()),
        )
        if tensor.numel() and identity in seen:
            continue  # a tied parameter: the optimizer holds it once
        seen.add(identity)
        parameters.append((str(name), tuple(tensor.shape)))
    if len(parameters) != len(groups[0]):
        raise _refuse(
            file,
            f"the optimizer holds {len(groups[0])} parameters but the state dict "
            f"{len(parameters)} distinct floating tensors (buffers or frozen "
            "parameters): its entries cannot be named exactly",
        )
    return groups, moments, parameters


# -- torch DCP ---------------------------------------------------------------------------------
def _dcp_moments(path: Path, confine: Confinement) -> Iterator[LayerMatrix]:
    # Imported here: torch.distributed costs seconds to import, and only a DCP folder needs it.
    from alphawatch.workers.checkpoints.dcp import dcp_shapes, iter_dcp

    file = path / ".metadata"
    shapes = dcp_shapes(path, confine)
    suffix = f".{EXP_AVG}"
    moments = {
        key: shape for key, shape in shapes.items() if key.endswith(suffix) and ".state." in key
    }
    if not moments:
        raise _refuse(file, "the DCP checkpoint holds no optimizer state with exp_avg")
    prefixes = {key.split(".state.", 1)[0] for key in moments}
    if len(prefixes) != 1:
        raise _refuse(file, f"optimizer state under several keys {sorted(prefixes)}")
    prefix = f"{prefixes.pop()}.state."
    weights = {
        key: shape
        for key, shape in shapes.items()
        if not key.startswith(prefix) and ".state." not in key
    }
    names: dict[str, str] = {}
    for key, shape in moments.items():
        fqn = key[len(prefix) : -len(suffix)]
        found = [w for w in weights if w == fqn or w.endswith(f".{fqn}")]
        if len(found) != 1:
            raise _refuse(
                file,
                f"{key} names parameter {fqn!r}, which matches "
                f"{len(found)} weight tensors ({found[:3]}), not exactly one",
            )
        if weights[found[0]] != shape:
            raise _refuse(file, f"{key} has shape {shape}, but {found[0]} has {weights[found[0]]}")
        names[key] = found[0]
    config = model_config(path, confine)
    digests: set[str] = set()
    for key, moment, _, _ in iter_dcp(path, confine, lambda k, _ndim: k in names):
        name = names[key]
        if not is_weight_matrix(name, moment.dim()):
            continue
        for matrix in _matrices(name, moment, None, str(file), config, digests):
            yield replace(matrix, name=f"{matrix.name}{VARIANT_SEPARATOR}{EXP_AVG}")
