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

import copy
import sys
import types
from collections.abc import Sequence

import torch
from torch import nn

from .errors import GrowopsError
from .integrations.peft import adapter_only_save
from .maps import depth_map
from .state import check_tensors, load_options
from .values import read


def exported_sources(unique: int, layers: int, growth: str, unit_slots) -> list[tuple[int, int]]:
    """``(child, source child)`` for every child of a stack whose exported content is another child's: the blocks of
    position p take those of unit ``depth_map(unique, layers)[p]`` (`unit_slots(u)`: the child indices of unit u)."""
    full = depth_map(unique, layers, growth)
    return [(a, b) for p, u in enumerate(full) if u != p for a, b in zip(unit_slots(p), unit_slots(u))]


def per_layer_tensors(runtime) -> set[int]:
    """ids of the tensors that are per-layer values of `runtime`'s units (each slot keeps its own)."""
    return {id(v) for unit in runtime.units() for p in runtime.per_layer
            if isinstance(v := read(unit, p), torch.Tensor)}


def _per_layer_keys(runtime) -> dict[int, set[str]]:
    """child index -> state-dict keys inside that child that hold per-layer values (recognised by identity: a wrapper
    may rename keys); children without any are left out."""
    if not runtime.per_layer:
        return {}
    own = per_layer_tensors(runtime)
    out = {}
    for child in (i for u in range(runtime.layers) for i in runtime.layout.unit(u)):
        keys = {k for k, v in runtime.blocks[child].state_dict(keep_vars=True).items() if id(v) in own}
        if keys:
            out[child] = keys
    return out


class ExportedState:
    """State-dict post-hook on a stack's container: rewrites its children's entries into the exported layout."""

    def __init__(self, runtime):
        self.runtime = runtime

    def __call__(self, container: nn.Module, state_dict: dict, prefix: str, local_metadata) -> None:
        r = self.runtime
        r.settle()  # every unit holds its own per-layer values, which each slot saves
        if r.owned and (r.owner is None or r.owner() is None):
            raise GrowopsError(f"{r.path}'s growops wrapper is gone (this model is a copy of a.model, or the wrapper "
                               "was dropped): its state dict would describe the schedule as it stood then, not a model "
                               "that trains. Save a.model or a.export(); for a weight average use "
                               "growops.AveragedExport(a)")
        if adapter_only_save():
            raise GrowopsError(f"an adapter-only checkpoint (PEFT's save_pretrained) of a model growops grows would go "
                               f"with a base model it does not carry: {r.path}'s base weights are shared and grown "
                               "too, so the pretrained base it is loaded onto computes another model. Save the whole "
                               "model: a.export() is the model a.eval() computes (merge_and_unload() it, or save its "
                               "full state_dict)")
        if r.unique == r.layers:
            return
        pairs = exported_sources(r.unique, r.layers, r.growth, r.layout.unit)
        keys = {i: [k for k in state_dict if k.startswith(f"{prefix}{r.names[i]}.")] for i, _ in pairs}
        if any(isinstance(state_dict[k], nn.Parameter) for ks in keys.values() for k in ks):
            return  # keep_vars=True: the caller wants the parameters themselves
        original = dict(state_dict)  # a source slot may itself be rewritten (unit 1 sits in slot 1 and runs at 2)
        per_layer = _per_layer_keys(r)
        for target, source in pairs:
            own = per_layer.get(target, set())
            head, src = f"{prefix}{r.names[target]}.", f"{prefix}{r.names[source]}."
            for key in keys[target]:
                rest = key[len(head):]
                if rest not in own and src + rest in original:
                    state_dict[key] = original[src + rest].clone()

    def __deepcopy__(self, memo: dict) -> ExportedState:
        return ExportedState(copy.deepcopy(self.runtime, memo))  # a copied model's hook follows the copy's stack


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
        _check_load(module, state_dict, prefix)
        owner = r.owner() if r.owner is not None else None
        unique, step = owner._incoming_position() if owner is not None else (r.unique, None)
        if unique is not None:
            head = f"{prefix}{self.below}." if self.below else prefix
            map_in(r, state_dict, head, unique, partial=step is not None)
        if owner is not None:
            owner._expect_step(step)  # only now that the state was checked; None clears a refused load's leftover

    def __deepcopy__(self, memo: dict) -> MapIn:
        return MapIn(copy.deepcopy(self.runtime, memo), self.below)


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
        return MapInDone(copy.deepcopy(self.runtime, memo))


class BlockLoad:
    """Load pre-hook on every growable block: loading one block on its own while blocks are shared would write a
    physical slot (a unit that runs at other positions, or one not live yet), never the layer the user means."""

    def __init__(self, runtime):
        self.runtime = runtime

    def __call__(self, module: nn.Module, *_) -> None:
        r = self.runtime
        if r.unique == r.layers:
            return
        if r._unit_of is None:
            r._unit_of = r._index_units()
        found = r._unit_of.get(id(module))  # the unit and block `module` is part of, if any
        if found is None or _outer_hooked_load(r, module):
            return
        block = found[1]
        index = next(i for i, b in enumerate(r.blocks) if b is block)
        unit = (index - r.layout.prefix) // r.layout.period
        runs = [p for p, u in enumerate(depth_map(r.unique, r.layers, r.growth)) if u == unit]
        where = f"positions {runs}" if runs else "no position (it is not live yet)"
        part = "" if module is block else f" ({next(n for n, m in block.named_modules() if m is module)} of it)"
        raise GrowopsError(f"{r.path}.{r.names[index]}{part} was loaded on its own while blocks are shared: it holds "
                           f"unit {unit}, which runs at {where}. Load the whole model's state dict (or {r.path}'s), "
                           "which growops maps onto the blocks, or load before wrapping")

    def __deepcopy__(self, memo: dict) -> BlockLoad:
        if id(self.runtime) not in memo and id(self.runtime.container) not in memo:
            return self  # one block copied alone: its hook does nothing for it
        return BlockLoad(copy.deepcopy(self.runtime, memo))


def _load_code():
    """The code of the recursive ``load`` inside ``nn.Module.load_state_dict`` (one frame per module loaded)."""
    return next((c for c in nn.Module.load_state_dict.__code__.co_consts
                 if isinstance(c, types.CodeType) and c.co_name == "load"), None)


_LOAD = _load_code()


def being_loaded(module: nn.Module) -> bool:
    """Whether a ``load_state_dict`` call running now is loading `module` (it is on the stack of torch's recursive
    ``load``)."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is _LOAD and frame.f_locals.get("module") is module:
            return True
        frame = frame.f_back
    return False


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


def _check_load(module: nn.Module, state_dict: dict, prefix: str) -> None:
    """What torch would refuse only after writing everything else (a shape, strict keys), or what would unhook the
    optimizer (``assign=True``), refused before anything is written."""
    strict, assign = load_options()
    own = module.state_dict(keep_vars=True)
    on_meta = any(t.is_meta for t in own.values() if isinstance(t, torch.Tensor))
    if assign and not on_meta:
        raise GrowopsError("load_state_dict(..., assign=True) would replace the model's parameters, which the "
                           "optimizer and tied weights hold: load without assign=True (assign=True is for a model "
                           "built on the meta device)")
    check_tensors(own, {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}, strict, prefix)


def check_whole(module: nn.Module, runtimes, state_dict: dict, unique: int) -> None:
    """Check a whole state for `module` (the model that holds `runtimes`' stacks, keys without prefix) as the loads
    of its parts (shards, one by one) will be checked together: shapes, and positions that run one unit holding
    equal tensors. Writes nothing; raises a GrowopsError naming what is wrong."""
    check_tensors(module.state_dict(keep_vars=True), state_dict, False)
    for runtime in runtimes:
        map_in(runtime, dict(state_dict), f"{runtime.path}.", unique)


def map_in(runtime, state_dict: dict, head: str, unique: int, partial: bool = False) -> None:
    """Rewrite `state_dict`'s entries under `head` (the container's prefix), written in the exported layout of a
    schedule at `unique` live units, so that each live unit's slot holds its tensors and no slot takes the tensors of
    a position that runs another unit. Raise a GrowopsError (changing nothing) when positions that run the same unit
    hold different tensors, or when a partial state gives some of a unit's positions but not all and would change
    the others too (`partial`: allowed, for the shards of one checkpoint loaded one by one)."""
    r = runtime
    if unique >= r.layers:
        return
    full = depth_map(unique, r.layers, r.growth)
    updates, drop = {}, []  # applied once everything is checked: the checks read the incoming layout as it came
    per_layer = _per_layer_keys(r)
    for u in range(unique):
        positions = [p for p, v in enumerate(full) if v == u]
        for phase, target in enumerate(r.layout.unit(u)):
            own = per_layer.get(target, set())
            slots = [r.layout.unit(p)[phase] for p in positions]
            heads = [f"{head}{r.names[slot]}." for slot in slots]
            rests = {k[len(h):] for h in heads for k in state_dict if k.startswith(h)} - own
            current = None
            for rest in sorted(rests):
                present = [(h + rest, state_dict[h + rest]) for h in heads if h + rest in state_dict]
                key, value = present[0]
                for twin_key, twin in present[1:]:
                    if not _same(twin, value):
                        raise GrowopsError(
                            f"this state dict is not a model the schedule can run: {key} and {twin_key} differ, but "
                            f"with {unique} unique blocks of {r.layers} they are positions of {r.path} that run the "
                            "same block. Load pretrained weights into the model before growops.apollo(...) wraps it; "
                            "resume a checkpoint of this schedule with a.load_state_dict(...) or "
                            "growops.from_pretrained(model, folder), which restore its position too")
                if len(present) < len(positions) and not partial:
                    current = current if current is not None else r.blocks[target].state_dict(keep_vars=True)
                    if rest in current and not _same(value, current[rest]):
                        absent = [h + rest for h in heads if h + rest not in state_dict]
                        raise GrowopsError(
                            f"this state dict gives {key} but not {absent[:3]}, positions of {r.path} that run the "
                            f"same block with {unique} unique blocks of {r.layers}: loading it would change those "
                            "too. Load all of them (the whole model's state dict), or load before wrapping")
                updates[f"{head}{r.names[target]}.{rest}"] = value if key == f"{head}{r.names[target]}.{rest}" \
                    else value.clone()
            if target not in slots:  # the slot's own key holds position `target`'s tensors, another unit's
                mine = f"{head}{r.names[target]}."
                drop += [k for k in state_dict if k.startswith(mine) and k not in updates and k[len(mine):] not in own]
    for key in drop:
        del state_dict[key]
    state_dict.update(updates)


def _position(runtime, child: int) -> int:
    return (child - runtime.layout.prefix) // runtime.layout.period


def _same(a, b) -> bool:
    """Whether two tensors hold the same values, NaN equal to NaN (a copy of a tensor with a NaN is the same)."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        return a is b
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(((a == b) | (a.isnan() & b.isnan())).all())


def state_hooks(runtime, ancestors: Sequence[tuple[nn.Module, str]]) -> None:
    """Put the exported-layout hooks on `runtime`'s container, the load hooks on every ``(module, path of the
    container below it)`` in `ancestors` (root first), and ``BlockLoad`` on every growable block."""
    runtime.container.register_state_dict_post_hook(ExportedState(runtime))
    for u in range(runtime.layers):
        for block in runtime.unit(u):
            for module in block.modules():
                module.register_load_state_dict_pre_hook(BlockLoad(runtime))
    for module, below in ancestors:
        module.register_load_state_dict_pre_hook(MapIn(runtime, below))
        module.register_load_state_dict_post_hook(MapInDone(runtime))


def remove_state_hooks(root: nn.Module) -> None:
    """Remove every hook ``state_hooks`` put under `root` (an exported copy, say)."""
    for module in root.modules():
        for hooks in (module._state_dict_hooks, module._load_state_dict_pre_hooks,
                      module._load_state_dict_post_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(getattr(hook, "hook", hook), (ExportedState, MapIn, MapInDone, BlockLoad)):
                    del hooks[key]
