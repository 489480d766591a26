"""Per-layer values: what differs between a stack's units and is not a trained parameter.

Rule: an attribute or buffer of a block's submodules whose value differs between the units of a stack (``layer_idx``,
a per-layer rotary base buffer, a sliding window that is an int in some layers and None in others, an enum, a
tuple) is a *per-layer value*. Growth never copies it, position i of the stack runs with the values of original
unit i, and ``export()`` keeps each block's own. A value that is the same in every unit is part of the block like its
weights. Parameters are always weights; so are the running statistics of normalization layers.

Values are compared structurally: numbers, strings, enums, tensors (dtype, shape and contents), containers of them,
objects by their attributes, and references to a block's own submodules by their path inside the block. Where two
values cannot be compared (an object with identity equality and no attributes, say), growops cannot tell whether
the difference matters: the value is *undecided* and ``apollo`` refuses it until the plan declares it.

A value is named by its path inside a unit: ``"attn.layer_idx"`` for period-1 stacks, ``"1.mixer.window"`` (block 1 of
each unit) for periodic ones. ``read``/``write`` reach it in a unit's blocks.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import math
import types
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn.utils.prune import BasePruningMethod, PruningContainer

from .checkpointing import held

# _parameters, _buffers, _modules, hook dicts, training, ...; and what Module.compile() sets
_MODULE_INTERNALS = frozenset(vars(nn.Module())) | {"_compiled_call_impl"}
_STATE_BUFFERS = ("running_mean", "running_var", "num_batches_tracked")  # trained state of normalization layers
_UNDECIDED = object()
MISSING = object()  # read() of an attribute a block does not have


def unit_paths(period: int) -> list[str]:
    """The path prefix of each block of a unit: ``[""]`` for period 1, ``["0.", "1.", ...]`` otherwise."""
    return [""] if period == 1 else [f"{r}." for r in range(period)]


def classify(units: Sequence[Sequence[nn.Module]]) -> tuple[dict[str, tuple], dict[str, tuple]]:
    """``(per_layer, undecided)``: unit path -> the value in each unit, for values that differ between `units`
    (each a sequence of `period` blocks) and for values that cannot be compared."""
    per_layer, undecided = {}, {}
    stack = nn.ModuleList([block for unit in units for block in unit])  # to find references to any block
    for phase, prefix in enumerate(unit_paths(len(units[0]))):
        blocks = [unit[phase] for unit in units]
        named = [dict(block.named_modules()) for block in blocks]
        for sub_path in named[0]:
            subs = [n[sub_path] for n in named]
            for attr, kind in _candidates(subs, sub_path):
                path = prefix + (f"{sub_path}.{attr}" if sub_path else attr)
                values = tuple(_get(s, attr, kind) for s in subs)
                verdict = _all_equal(values, blocks, top=0 if kind == "attr" else -1)
                if verdict is not _UNDECIDED and not verdict and kind == "attr" and any(
                        _refers_to(v, stack) for v in values):
                    verdict = _UNDECIDED  # differs, yet reaches into the stack's blocks: given to another position
                    # it would run the weights of the block it reaches
                if verdict is _UNDECIDED:
                    undecided[path] = values
                elif not verdict:
                    per_layer[path] = values
    return per_layer, undecided


def is_state_buffer(block: nn.Module, name: str) -> bool:
    """Whether the buffer or attribute `name` of `block` is state that belongs to a weight (``weight_state``)."""
    owner_path, _, attr = name.rpartition(".")
    owner = block.get_submodule(owner_path) if owner_path else block
    return weight_state(owner, attr, owner_path)


def weight_state(module: nn.Module, attr: str, path: str) -> bool:
    """Whether `attr` of `module` (at `path` inside its block) is state that belongs to a weight, shared and grown
    with it, never a per-layer value: a normalization layer's running statistics; anything inside a parametrization
    (``torch.nn.utils.parametrize``: spectral norm's power-iteration vectors, say); a pruning mask and the weight
    that ``torch.nn.utils.prune`` recomputes from it at every call."""
    if attr in _STATE_BUFFERS and isinstance(module, nn.modules.batchnorm._NormBase):
        return True
    if "parametrizations" in path.split("."):
        return True
    return any(attr in (name, f"{name}_mask") for name in pruned(module))


def pruned(module: nn.Module) -> list[str]:
    """The names of `module`'s tensors that ``torch.nn.utils.prune`` recomputes at every call (``weight`` from
    ``weight_orig * weight_mask``, by a forward pre-hook)."""
    out = []
    for hook in module._forward_pre_hooks.values():
        methods = hook._pruning_methods if isinstance(hook, PruningContainer) else (hook,)
        out += [m._tensor_name for m in methods if isinstance(m, BasePruningMethod)]
    return out


def read(unit: Sequence[nn.Module], path: str) -> Any:
    """The value at unit path `path` in `unit`."""
    owner, attr = _locate(unit, path)
    if attr in owner._buffers:
        return owner._buffers[attr]
    return owner.__dict__.get(attr, MISSING)


def write(unit: Sequence[nn.Module], path: str, value: Any) -> None:
    """Set the value at unit path `path` in `unit`: a buffer stays a buffer, an attribute is set without
    registering anything (a module held in a plain attribute does not become a submodule)."""
    owner, attr = _locate(unit, path)
    if attr in owner._buffers:
        owner._buffers[attr] = value
    elif value is MISSING:
        owner.__dict__.pop(attr, None)
    else:
        owner.__dict__[attr] = value


def state_names(path: str, period: int) -> tuple[int, str]:
    """``(block of the unit, state_dict key inside that block)`` of a per-layer buffer at unit path `path`."""
    if period == 1:
        return 0, path
    phase, _, rest = path.partition(".")
    return int(phase), rest


def _locate(unit: Sequence[nn.Module], path: str) -> tuple[nn.Module, str]:
    phase, rest = state_names(path, len(unit))
    owner_path, _, attr = rest.rpartition(".")
    block = unit[phase]
    return _inside(block.get_submodule(owner_path) if owner_path else block, attr), attr  # through wrappers too


def _inside(module: nn.Module, attr: str) -> nn.Module:
    """The module that holds `attr` for `module`: `module`, or where an activation wrapper was put around it after
    the plan named its values (``apply_activation_checkpointing``), the module the wrapper runs, which is the one
    that reads the value (the wrapper forwards attribute reads to it)."""
    while attr not in module.__dict__ and attr not in module._buffers and (inner := held(module)) is not None:
        module = inner
    return module


def _candidates(subs: list[nn.Module], path: str = "") -> list[tuple[str, str]]:
    """``(name, "buffer" | "attr")`` for every buffer and non-internal attribute found in any of `subs` (the module at
    `path` of each block) that is not state belonging to a weight."""
    out, seen = [], set()
    for sub in subs:
        for name in sub._buffers:
            if (name, "buffer") not in seen and not weight_state(sub, name, path):
                seen.add((name, "buffer"))
                out.append((name, "buffer"))
        for name in vars(sub):
            if name not in _MODULE_INTERNALS and name not in sub._buffers and (name, "attr") not in seen and \
                    not weight_state(sub, name, path):
                seen.add((name, "attr"))
                out.append((name, "attr"))
    return out


def _get(sub: nn.Module, name: str, kind: str) -> Any:
    if kind == "buffer":
        return sub._buffers.get(name, MISSING)
    return sub.__dict__.get(name, MISSING)


def _all_equal(values: tuple, blocks: list[nn.Module], top: int = 0):
    """True if every value equals the first, False if one differs, _UNDECIDED if a pair cannot be compared. `top` is
    the depth the values start at: -1 for buffers (compared by value, never as references to the block)."""
    verdict = True
    for value, block in zip(values[1:], blocks[1:]):
        same = _equal(values[0], value, blocks[0], block, depth=top)
        if same is _UNDECIDED:
            return _UNDECIDED
        verdict = verdict and same
    return verdict


def _equal(a: Any, b: Any, block_a: nn.Module, block_b: nn.Module, depth: int):
    """Structural equality of two values held by two blocks (see the module docstring)."""
    if a is b:
        return True
    if depth > 8:
        return _UNDECIDED
    if a is MISSING or b is MISSING:
        return False
    # A reference to the block's own submodule or tensor (or a view of one) is the same if it is at the same path.
    ra, rb = (_relative(a, block_a), _relative(b, block_b)) if depth >= 0 else (None, None)
    if ra is not None or rb is not None:
        return ra == rb
    depth = max(depth, 0)
    if isinstance(a, nn.Module) or isinstance(b, nn.Module):
        return False
    if type(a) is not type(b):
        return False
    if isinstance(a, torch.Tensor):
        if (a.dtype, a.shape, a.device) != (b.dtype, b.shape, b.device):
            return False
        return True if a.device.type == "meta" else bool(torch.equal(a, b))
    if isinstance(a, np.ndarray):
        return a.shape == b.shape and a.dtype == b.dtype and bool(np.array_equal(a, b))
    if isinstance(a, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    if isinstance(a, (int, complex, str, bytes, bool, enum.Enum, torch.dtype, torch.device, type, range, slice)):
        return a == b
    if isinstance(a, (tuple, list)):
        if len(a) != len(b):
            return False
        return _combine(_equal(x, y, block_a, block_b, depth + 1) for x, y in zip(a, b))
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return False
        return _combine(_equal(a[k], b[k], block_a, block_b, depth + 1) for k in a)
    if isinstance(a, (set, frozenset)):
        return a == b
    if isinstance(a, types.MethodType):
        return a.__func__ is b.__func__ and _equal(a.__self__, b.__self__, block_a, block_b, depth + 1)
    if isinstance(a, weakref.ref):
        return _equal(a(), b(), block_a, block_b, depth + 1)
    if isinstance(a, functools.partial):
        return _combine((_equal(a.func, b.func, block_a, block_b, depth + 1),
                         _equal(a.args, b.args, block_a, block_b, depth + 1),
                         _equal(a.keywords, b.keywords, block_a, block_b, depth + 1)))
    if isinstance(a, types.FunctionType):  # a lambda or closure per block: the same code over equal cells
        if a.__code__ is not b.__code__:
            return False
        cells_a = tuple(c.cell_contents for c in a.__closure__ or ())
        cells_b = tuple(c.cell_contents for c in b.__closure__ or ())
        return _combine((_equal(cells_a, cells_b, block_a, block_b, depth + 1),
                         _equal(a.__defaults__, b.__defaults__, block_a, block_b, depth + 1)))
    if isinstance(a, types.BuiltinFunctionType):
        return False  # two distinct builtins (identical ones returned above)
    if dataclasses.is_dataclass(a) or type(a).__eq__ is not object.__eq__:
        try:
            return bool(a == b)
        except Exception:  # noqa: BLE001 - an __eq__ that cannot answer: undecided
            return _UNDECIDED
    if hasattr(a, "__dict__"):
        return _equal(vars(a), vars(b), block_a, block_b, depth + 1)
    return _UNDECIDED


def _combine(verdicts) -> Any:
    out = True
    for v in verdicts:
        if v is _UNDECIDED:
            return _UNDECIDED
        out = out and v
    return out


def _relative(value: Any, block: nn.Module) -> tuple | None:
    """Where `value` sits inside `block` (a submodule, a parameter or buffer, or a view of one's memory), or None."""
    if isinstance(value, nn.Module):
        for path, sub in block.named_modules(remove_duplicate=False):
            if sub is value:
                return "module", path
    elif isinstance(value, torch.Tensor):
        for kind, named in (("parameter", block.named_parameters), ("buffer", block.named_buffers)):
            for path, tensor in named(remove_duplicate=False):
                if tensor is value:
                    return kind, path
        if value.device.type != "meta" and value.numel():
            storage = value.untyped_storage().data_ptr()
            for path, tensor in [*block.named_parameters(), *block.named_buffers()]:
                if tensor.device == value.device and tensor.numel() and \
                        tensor.untyped_storage().data_ptr() == storage:
                    return "view", path, value.storage_offset(), tuple(value.shape), tuple(value.stride())
    return None


def _refers_to(value: Any, block: nn.Module, depth: int = 0) -> bool:
    """Whether `value` holds a reference to `block`'s own modules or tensors (directly, inside containers,
    closures, bound methods or an object's attributes). Past the depth `_equal` compares to, it cannot tell and
    answers True: the value is then undecided, never silently per layer."""
    if value is None or isinstance(value, (int, float, str, bytes, bool, enum.Enum)):
        return False
    if depth > 8:
        return True
    if _relative(value, block) is not None:
        return True
    if isinstance(value, (tuple, list, set, frozenset)):
        return any(_refers_to(v, block, depth + 1) for v in value)
    if isinstance(value, dict):
        return any(_refers_to(v, block, depth + 1) for v in value.values())
    if isinstance(value, types.MethodType):
        return _refers_to(value.__self__, block, depth + 1)
    if isinstance(value, weakref.ref):
        return _refers_to(value(), block, depth + 1)
    if isinstance(value, types.FunctionType):
        return any(_refers_to(c.cell_contents, block, depth + 1) for c in value.__closure__ or ())
    if isinstance(value, functools.partial):
        return _refers_to((value.func, value.args, value.keywords), block, depth + 1)
    if hasattr(value, "__dict__") and not isinstance(value, (type, types.ModuleType, nn.Module, torch.Tensor)):
        return any(_refers_to(v, block, depth + 1) for v in vars(value).values())
    return False
