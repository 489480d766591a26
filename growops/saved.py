"""What a model under apollo saves and loads: the function ``a.eval()`` computes, in the layout ``a.export()`` has.

Physically, the live units of a stack sit in its first ``unique`` slots and the slots not grown yet hold stale
weights; in evaluation position i runs unit ``depth_map(unique, L)[i]``. Whatever leaves the model as a state dict
(``a.model.state_dict()``, ``save_pretrained``, a Trainer or accelerate checkpoint, ``a.state_dict()``) is written
in the *exported layout*: slot i holds a copy of the unit position i runs, per-layer values staying each slot's own.
So a checkpoint saved mid-schedule, loaded into a plain model (``from_pretrained``), computes what ``a.eval()`` did.

Loading maps the exported layout back: live unit u takes the tensors of the first position that runs it. A state in
which two positions that run the same unit hold different tensors (a plain pretrained model loaded while blocks are
shared) is not a model this schedule can run: the load raises a GrowopsError naming the slots before anything is
written. Which schedule position the incoming state describes: the wrapper's saved position (``a.load_state_dict``),
a position source the owner names (a Trainer checkpoint being loaded), else the current one.

Invariants: ``load_state_dict(state_dict())`` restores every live unit bit for bit; the state dict of a state taken
with ``keep_vars=True`` (the parameters themselves) stays physical.
"""

from __future__ import annotations

import sys
import types
from collections.abc import Sequence

import torch
from torch import nn

from .errors import GrowopsError
from .maps import depth_map
from .values import read


def exported_sources(unique: int, layers: int, growth: str, unit_slots) -> list[tuple[int, int]]:
    """``(child, source child)`` for every child of a stack whose exported content is another child's: the blocks of
    position p take those of unit ``depth_map(unique, layers)[p]`` (`unit_slots(u)`: the child indices of unit u)."""
    full = depth_map(unique, layers, growth)
    return [(a, b) for p, u in enumerate(full) if u != p for a, b in zip(unit_slots(p), unit_slots(u))]


def _per_layer_keys(runtime, child: int) -> set[str]:
    """State-dict keys inside child `child` that hold per-layer values (recognised by identity: a wrapper may rename
    keys)."""
    if not runtime.per_layer:
        return set()
    units = runtime.units()
    own = {id(v) for unit in units for p in runtime.per_layer if isinstance(v := read(unit, p), torch.Tensor)}
    return {k for k, v in runtime.blocks[child].state_dict(keep_vars=True).items() if id(v) in own}


class ExportedState:
    """State-dict post-hook on a stack's container: rewrites its children's entries into the exported layout."""

    def __init__(self, runtime):
        self.runtime = runtime

    def __call__(self, container: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        r = self.runtime
        if r.unique == r.layers:
            return
        pairs = exported_sources(r.unique, r.layers, r.growth, r.layout.unit)
        keys = {i: [k for k in state_dict if k.startswith(f"{prefix}{r.names[i]}.")] for i, _ in pairs}
        if any(isinstance(state_dict[k], nn.Parameter) for ks in keys.values() for k in ks):
            return  # keep_vars=True: the caller wants the parameters themselves
        original = dict(state_dict)  # a source slot may itself be rewritten (unit 1 sits in slot 1 and runs at 2)
        for target, source in pairs:
            own = _per_layer_keys(r, target)
            head, src = f"{prefix}{r.names[target]}.", f"{prefix}{r.names[source]}."
            for key in keys[target]:
                rest = key[len(head):]
                if rest not in own and src + rest in original:
                    state_dict[key] = original[src + rest].clone()

    def __deepcopy__(self, memo: dict) -> ExportedState:
        copied = memo.get(id(self.runtime))
        return self if copied is None else ExportedState(copied)


class MapIn:
    """Load pre-hook on a stack's container and every module above it (so it runs first, whichever module's
    ``load_state_dict`` is called): the outermost one in a load checks the incoming exported layout and maps it onto
    the live units before anything is written."""

    def __init__(self, runtime, below: str):
        self.runtime, self.below = runtime, below  # below: the container's path under the hooked module ("" itself)

    def __call__(self, module: nn.Module, state_dict: dict, prefix: str, *_) -> None:
        r = self.runtime
        if _outer_hooked_load(r, module):
            return  # a module above, loading in this same call, mapped it already
        owner = r.owner() if r.owner is not None else None
        unique = owner._incoming_unique() if owner is not None else r.unique
        if unique is not None:
            head = f"{prefix}{self.below}." if self.below else prefix
            map_in(r, state_dict, head, unique)

    def __deepcopy__(self, memo: dict) -> MapIn:
        copied = memo.get(id(self.runtime))
        return self if copied is None else MapIn(copied, self.below)


class MapInDone:
    """Load post-hook paired with ``MapIn``: when the outermost hooked module of a load is loaded, the owner moves
    its schedule if the load's position came from elsewhere (a Trainer checkpoint)."""

    def __init__(self, runtime):
        self.runtime = runtime

    def __call__(self, module: nn.Module, incompatible_keys) -> None:
        r = self.runtime
        owner = r.owner() if r.owner is not None else None
        if owner is not None and not _outer_hooked_load(r, module):
            owner._after_model_load()

    def __deepcopy__(self, memo: dict) -> MapInDone:
        copied = memo.get(id(self.runtime))
        return self if copied is None else MapInDone(copied)


def _load_code():
    """The code of the recursive ``load`` inside ``nn.Module.load_state_dict`` (one frame per module loaded)."""
    return next((c for c in nn.Module.load_state_dict.__code__.co_consts
                 if isinstance(c, types.CodeType) and c.co_name == "load"), None)


_LOAD = _load_code()


def _outer_hooked_load(runtime, module: nn.Module) -> bool:
    """Whether this load call is loading a module above `module` that carries `runtime`'s ``MapIn`` (read from the
    frames of torch's recursive ``load``: no state that an interrupted load could leave behind)."""
    frame = sys._getframe(2)
    while frame is not None:
        if frame.f_code is _LOAD:
            outer = frame.f_locals.get("module")
            if outer is not module and outer is not None and any(
                    isinstance(h, MapIn) and h.runtime is runtime
                    for h in (getattr(w, "hook", w) for w in outer._load_state_dict_pre_hooks.values())):
                return True
        frame = frame.f_back
    return False


def map_in(runtime, state_dict: dict, head: str, unique: int) -> None:
    """Rewrite `state_dict`'s entries under `head` (the container's prefix), written in the exported layout of a
    schedule at `unique` live units, so that each live unit's slot holds its tensors; raise a GrowopsError (changing
    nothing) when positions that run the same unit hold different tensors."""
    r = runtime
    if unique >= r.layers:
        return
    full = depth_map(unique, r.layers, r.growth)
    updates = {}  # applied once everything is checked: the checks read the incoming layout as it came
    for u in range(unique):
        positions = [p for p, v in enumerate(full) if v == u]
        for phase, target in enumerate(r.layout.unit(u)):
            own = _per_layer_keys(r, target)
            slots = [r.layout.unit(p)[phase] for p in positions]
            first = f"{head}{r.names[slots[0]]}."
            for key in [k for k in state_dict if k.startswith(first)]:
                rest = key[len(first):]
                if rest in own:
                    continue
                value = state_dict[key]
                for other in slots[1:]:
                    twin = state_dict.get(f"{head}{r.names[other]}.{rest}")
                    if twin is not None and not _same(twin, value):
                        raise GrowopsError(
                            f"this state dict is not a model the schedule can run: {first}{rest} and "
                            f"{head}{r.names[other]}.{rest} differ, but with {unique} unique blocks of {r.layers} "
                            f"positions {positions[0]} and {_position(r, other)} of {r.path} run the same block. Load "
                            "pretrained weights into the model before growops.apollo(...) wraps it; resume a "
                            "checkpoint of this schedule with a.load_state_dict(...) or "
                            "growops.from_pretrained(model, folder), which restore its position too")
                if target != slots[0]:
                    updates[f"{head}{r.names[target]}.{rest}"] = value.clone()
    state_dict.update(updates)


def _position(runtime, child: int) -> int:
    return (child - runtime.layout.prefix) // runtime.layout.period


def _same(a, b) -> bool:
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return a is b
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def state_hooks(runtime, ancestors: Sequence[tuple[nn.Module, str]]) -> None:
    """Put the exported-layout hooks on `runtime`'s container and the load hooks on every ``(module, path of the
    container below it)`` in `ancestors` (root first)."""
    runtime.container.register_state_dict_post_hook(ExportedState(runtime))
    for module, below in ancestors:
        module.register_load_state_dict_pre_hook(MapIn(runtime, below))
        module.register_load_state_dict_post_hook(MapInDone(runtime))


def remove_state_hooks(root: nn.Module) -> None:
    """Remove every hook ``state_hooks`` put under `root` (an exported copy, say)."""
    for module in root.modules():
        for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks,
                      module._load_state_dict_post_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(getattr(hook, "hook", hook), (ExportedState, MapIn, MapInDone)):
                    del hooks[key]
