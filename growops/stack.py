"""The runtime block stack: a container's fixed blocks and L growable units, of which the first `unique` are live.

What runs, in order: the fixed prefix blocks, then for each position i < depth (training) or < L (evaluation) the
blocks of unit ``depth_map(unique, depth, growth)[i]``, then the fixed suffix blocks. Before a unit's block runs at
position i it is given the per-layer values of original unit i (``layer_idx``, a per-layer buffer, ...), so a KV
cache or a per-layer scale sees a distinct layer at every position; when the forward ends every block gets its own
values back, so outside a forward (``state_dict``, inspection, export) each block holds its own.

The layout follows the container's training flag (``model.train()``/``eval()``), never a single block's.

Two ways to run it, one semantics:
- ``SharedBlockList`` / ``SharedBlockSequential``: the model's own ``nn.ModuleList`` / ``nn.Sequential`` object
  takes this class (hooks, attributes and references to it stay valid). *Inside the model's forward* (while a forward
  of the container or of a module above it runs) iterating it, ``len()``, indexing and slicing see the positions
  run; outside it they see the physical children, like the original container (``model.layers[3]``, optimizer
  groups built by iterating it, ``state_dict`` keys).
- ``DepthGate`` replaces the chain of block calls in an FX graph (see ``growops.fx.insert_depth_gate``), for
  models that index their blocks.

A child replaced after wrapping (``model.layers[3] = ...``) is used if it is structurally like the block it replaces
and rejected with a GrowopsError otherwise; it is never ignored.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .errors import GrowopsError
from .maps import depth_map
from .structure import Layout, difference, module_signature
from .values import is_state_buffer, read, state_names, write

STACK_ATTR = "_growops_stack"  # set on a managed container (both modes): marks a model as already wrapped
CACHE_INDICES = ("layer_idx", "layer_id")  # per-layer values that only index a KV cache (unused in training)


def _in_backward() -> bool:
    """Whether the autograd engine is running a backward now (where activation checkpointing recomputes)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class StackRuntime:
    """Which physical block runs at each position of one stack; shared by its container or gate and by Apollo."""

    def __init__(self, container: nn.Module, layout: Layout | None = None, per_layer: Sequence[str] = (),
                 growth: str = "interpolate", path: str = "stack", shared_state: Sequence[str] = ()):
        self.container = container
        self.path = path
        self.names = tuple(container._modules)
        self.blocks: list[nn.Module] = list(container._modules.values())
        self.layout = layout or Layout(0, 1, len(self.blocks), 0)
        if self.layout.size != len(self.blocks):
            raise GrowopsError(f"layout {self.layout} does not fit {path}'s {len(self.blocks)} children")
        self.signatures = [module_signature(b) for b in self.blocks]
        self.layers = self.layout.units
        self.unique = self.depth = self.layers
        self.growth = growth
        self.per_layer = tuple(per_layer)
        self._phase_paths = [[p for p in self.per_layer if state_names(p, self.layout.period)[0] == r]
                             for r in range(self.layout.period)]
        self.shared_state = tuple(shared_state)  # buffers declared constant: a forward may write them while shared
        # Recomputing a shared block in the backward (activation checkpointing) gives it its own per-layer values, not
        # those of its position: harmless for cache indices, wrong for anything the computation reads.
        self.recompute_sensitive = any(p.rsplit(".", 1)[-1] not in CACHE_INDICES for p in self.per_layer)
        self.cast_cache: dict = {}  # per-forward casts of routed weights (growops.ops.routing), emptied per forward
        self.active = 0  # forwards of the container or a module above it now running (their hooks count)
        self.route_replacements = False  # route the linears of blocks replaced after wrapping (shared_linear)
        self._own: list[dict[str, Any]] | None = None  # each unit's own per-layer values while a forward runs
        self._versions: dict = {}  # version counters of shared units' buffers while a forward runs
        self.owned = False  # set by the Apollo wrapper that owns this runtime (owner: a weak reference to it)
        self.owner = None
        self.wrapper_forwards = None  # resample="micro_batch": training forwards a(...) announced, not yet begun
        self._unit_of = self._index_units()

    # ---------------------------------------------------------------- what runs
    @property
    def training(self) -> bool:
        return self.container.training

    def unit(self, u: int) -> tuple[nn.Module, ...]:
        """The physical blocks of growable unit `u`."""
        return tuple(self.blocks[i] for i in self.layout.unit(u))

    def units(self) -> list[tuple[nn.Module, ...]]:
        return [self.unit(u) for u in range(self.layers)]

    def mapping(self, training: bool | None = None) -> tuple[int, ...]:
        """Unit per position: sampled depth in training, full depth L in evaluation."""
        training = self.training if training is None else training
        return depth_map(self.unique, self.depth if training else self.layers, self.growth)

    def entries(self) -> list[tuple[int, int | None]]:
        """What runs, in order: ``(child index, None)`` for a fixed block, ``(phase, position)`` for a unit's block."""
        lay = self.layout
        core = [(r, i) for i in range(len(self.mapping())) for r in range(lay.period)]
        return [(j, None) for j in range(lay.prefix)] + core + \
            [(j, None) for j in range(lay.core().stop, lay.size)]

    def positions(self, selection: slice = slice(None)) -> Iterator[nn.Module]:
        """Yield the block of each selected entry, each unit block given its position's per-layer values first."""
        for entry in self._selected(selection):
            yield self._block_at(entry)

    # Both helpers are opaque to torch.compile on purpose: a graph break inside the model's block loop makes dynamo
    # run that loop eagerly and compile each block call as its own frame (regional compilation), so the depth and
    # the sharing never enter a graph and never trigger a recompile.
    @torch.compiler.disable
    def _selected(self, selection: slice | int) -> list:
        self.begin()
        entries = self.entries()
        return entries[selection] if isinstance(selection, slice) else [entries[selection]]

    @torch.compiler.disable
    def _block_at(self, entry: tuple[int, int | None]) -> nn.Module:
        first, position = entry
        if position is None:
            return self.blocks[first]
        unit = self.unit(self.mapping()[position])
        if self._own is not None:
            for path in self._phase_paths[first]:
                write(unit, path, self._own[position][path])
        return unit[first]

    # ---------------------------------------------------------------- a forward's lifetime
    @torch.compiler.disable
    def core_entries(self) -> list[tuple[int, int | None]]:
        """The entries of the growable positions only (a gate runs those; the graph calls the fixed blocks)."""
        self.begin()
        entries = self.entries()
        return entries[self.layout.prefix:len(entries) - self.layout.suffix]

    @torch.compiler.disable
    def begin(self) -> None:
        """A forward starts using the stack: adopt replaced children, empty the cast cache, and note each unit's own
        per-layer values (read now, so ``model.to()`` and loaded weights are seen)."""
        if self._own is not None:
            return
        self._check_owner()
        self.sync()
        self.cast_cache.clear()
        self._own = [{p: read(unit, p) for p in self.per_layer} for unit in self.units()]
        self._versions = self._state_versions()

    @torch.compiler.disable
    def end(self) -> None:
        """The forward is over: every unit gets its own per-layer values back. Then, if the forward wrote into a
        buffer of a unit that ran at several positions, raise: that state was shared by the positions."""
        own, self._own = self._own, None
        versions, self._versions = self._versions, {}
        if own and self.per_layer:
            for unit, values in zip(self.units(), own):
                for path, value in values.items():
                    write(unit, path, value)
        for (u, path), (buffer, version) in versions.items():
            if buffer._version != version:
                raise GrowopsError(
                    f"the forward wrote into {path} of {self.path}'s unit {u} while that unit ran at several "
                    "positions: state kept inside a block (a KV cache, a counter) is then shared by those positions. "
                    "Declare it "
                    f"per layer (each position keeps its own): p = growops.plan(model); "
                    f"p = p.declare(per_layer=[{path!r}]); growops.apollo(model, ..., plan=p), or constant=[...] if "
                    "sharing it is right")

    def _check_owner(self) -> None:
        """Raise if this runtime lost its wrapper (a copy of the wrapped model, made by copy.deepcopy(a.model)), or if a
        training forward bypasses the wrapper that draws each forward's depth (resample="micro_batch")."""
        if self.owned and (self.owner is None or self.owner() is None):
            raise GrowopsError(f"this model is a copy of a model growops manages ({self.path} was copied with "
                               "copy.deepcopy(a.model), say): its blocks follow the schedule as it stood when copied, "
                               "not the wrapper's. For an EMA or a teacher copy a.export(); to copy the wrapper, "
                               "copy.deepcopy(a)")
        if self.wrapper_forwards is not None and self.training:
            if self.wrapper_forwards == 0:
                raise GrowopsError("resample='micro_batch' draws each training forward's depth in a(...): call a(...), "
                                   "not a.model(...) (or build apollo with resample='step')")
            self.wrapper_forwards -= 1

    def _state_versions(self) -> dict:
        """The version counters of the buffers of units that run at several positions in this forward (not per-layer
        values, not declared shared state, not normalization statistics)."""
        counts = Counter(self.mapping())
        out = {}
        for u in (u for u, c in counts.items() if c > 1):
            for r, block in enumerate(self.unit(u)):
                for name, buffer in block.named_buffers():
                    path = name if self.layout.period == 1 else f"{r}.{name}"
                    if path in self.per_layer or path in self.shared_state or is_state_buffer(block, name) or \
                            buffer.is_inference():
                        continue
                    out[(u, path)] = (buffer, buffer._version)
        return out

    def guard(self, module: nn.Module, args) -> None:
        """Forward pre-hook on every growable block (and, when per-layer values matter to the computation, on its
        submodules): a block may run outside the model's forward only if that is right. Raises when a block not live
        yet runs (a method iterating the container directly runs the physical, stale blocks) and when a shared block
        is recomputed in the backward (activation checkpointing) with per-layer values that matter."""
        if torch.compiler.is_compiling() or self.active:
            return
        if self._unit_of is None:
            self._unit_of = self._index_units()
        found = self._unit_of.get(id(module))
        if found is None:
            return
        unit, root = found
        where = f"{self.path}.{self.names[self.blocks.index(root)]}"
        if _in_backward():
            if self.recompute_sensitive and self.unique < self.layers:
                others = ", ".join(p for p in self.per_layer if p.rsplit(".", 1)[-1] not in CACHE_INDICES)
                raise GrowopsError(
                    f"{where} is recomputed in the backward (activation checkpointing) while blocks are shared: the "
                    f"recomputation would use the block's own per-layer values ({others}), not those of the position "
                    "that ran it, and give wrong gradients. Turn activation checkpointing off while blocks are shared")
            return
        if module is root and unit >= self.unique:
            raise GrowopsError(
                f"{where} ran outside the model's forward, but it is not live yet ({self.path} holds {self.unique} "
                "unique units in this stage): code that iterates the container outside a forward (a method other "
                "than forward, or model.forward(...) called directly) runs the physical blocks, whose weights are "
                "stale. Call the model (or a module that contains the container), or use a.export()")

    def guard_blocks(self) -> None:
        """Put ``guard`` on every growable block, and on its submodules when a recomputation could go wrong (once)."""
        for u in range(self.layers):
            for block in self.unit(u):
                for module in block.modules() if self.recompute_sensitive else (block,):
                    if not any(isinstance(h, _Guard) and h.runtime is self for h in module._forward_pre_hooks.values()):
                        module.register_forward_pre_hook(_Guard(self))

    def _index_units(self) -> dict[int, tuple[int, nn.Module]]:
        """id of every module of every growable block -> (its unit, its block)."""
        return {id(m): (u, block) for u in range(self.layers) for block in self.unit(u) for m in block.modules()}

    @torch.compiler.disable
    def enter(self, *_) -> None:
        self.active += 1

    @torch.compiler.disable
    def exit(self, *_) -> None:
        self.active = max(0, self.active - 1)
        if self.active == 0:
            self.end()

    # ---------------------------------------------------------------- children replaced after wrapping
    def sync(self) -> None:
        """Adopt children replaced since the last call when each is structurally like the one it replaces; raise a
        GrowopsError naming it otherwise (nothing is adopted then)."""
        current = list(self.container._modules.values())
        if len(current) == len(self.blocks) and all(a is b for a, b in zip(current, self.blocks)):
            return
        if tuple(self.container._modules) != self.names:
            raise GrowopsError(f"{self.path} changed after growops.apollo wrapped the model: its children are now "
                               f"{list(self.container._modules)}, were {list(self.names)}; growops cannot tell which "
                               "block is which. Change the model before wrapping it")
        replaced = [i for i, (a, b) in enumerate(zip(current, self.blocks)) if a is not b]
        for i in replaced:
            if module_signature(current[i]) != self.signatures[i]:
                raise GrowopsError(
                    f"{self.path}.{self.names[i]} was replaced after growops.apollo wrapped the model, by a "
                    f"{type(current[i]).__name__} whose structure differs from the block it replaced "
                    f"({difference(self.blocks[i], current[i])}); growops would share and grow weights into a module "
                    "it does not know. Apply such wrappers (activation checkpointing, say) before growops.apollo(...), "
                    "or put back a block like the others")
        self.blocks = current
        self._unit_of = self._index_units()
        self.guard_blocks()
        if self.route_replacements:
            from .ops.routing import route_shared_linears
            route_shared_linears([current[i] for i in replaced], runtime=self)

    def __getstate__(self) -> dict:
        # Casts and forward state are not state; ids change in a copy.
        return {**self.__dict__, "cast_cache": {}, "active": 0, "_own": None, "_versions": {}, "_unit_of": None,
                "owner": None}



class _Guard:
    """The forward pre-hook ``StackRuntime.guard`` puts on growable blocks. A deep copy of one block does not drag the
    whole stack along: its copy keeps this hook, which does nothing for modules that are not the stack's own."""

    def __init__(self, runtime: StackRuntime):
        self.runtime = runtime

    def __call__(self, module: nn.Module, args) -> None:
        self.runtime.guard(module, args)

    def __deepcopy__(self, memo: dict) -> _Guard:
        copied = memo.get(id(self.runtime))
        return self if copied is None else _Guard(copied)


def scope_forwards(runtime: StackRuntime, modules: Sequence[nn.Module]) -> list[tuple[nn.Module, int]]:
    """Hook the forwards of `modules` (the container and every module above it): while one of them runs, the
    container sees positions; when the outermost returns, per-layer values go back. Returns ``(module, hook id)``
    pairs, for ``unscope``."""
    hooks = []
    for module in modules:
        hooks.append((module, module.register_forward_pre_hook(runtime.enter).id))
        hooks.append((module, module.register_forward_hook(runtime.exit, always_call=True).id))
    return hooks


def unscope(root: nn.Module) -> None:
    """Remove every growops forward hook under `root` (an exported copy, say)."""
    for module in root.modules():
        for hooks in (module._forward_pre_hooks, module._forward_hooks):
            for key, hook in list(hooks.items()):
                if isinstance(hook, _Guard) or isinstance(getattr(hook, "__self__", None), StackRuntime):
                    del hooks[key]
                    module._forward_hooks_always_called.pop(key, None)


class _PositionView:
    """``stack[a:b]`` inside a forward: the selected entries, iterated lazily so per-layer values are set just in
    time."""

    def __init__(self, runtime: StackRuntime, selection: slice):
        self.runtime, self.selection = runtime, selection

    def __iter__(self) -> Iterator[nn.Module]:
        return self.runtime.positions(self.selection)

    def __len__(self) -> int:
        return len(self.runtime._selected(self.selection))

    def __getitem__(self, index):
        entries = self.runtime._selected(self.selection)
        if isinstance(index, slice):
            return [self.runtime._block_at(e) for e in entries[index]]
        return self.runtime._block_at(entries[index])


class _SharedStack:
    """Mixin for a container whose iteration runs the runtime's positions inside a forward (module docstring)."""

    _growops_stack: StackRuntime

    @property
    def runtime(self) -> StackRuntime:
        return self.__dict__[STACK_ATTR]

    def _inside(self) -> bool:
        return self.runtime.active > 0

    def __iter__(self) -> Iterator[nn.Module]:
        if self._inside():
            return self.runtime.positions()
        return iter(self._modules.values())

    def __len__(self) -> int:
        if self._inside():
            return len(self.runtime._selected(slice(None)))
        return len(self._modules)

    def __getitem__(self, index):
        if self._inside():
            if isinstance(index, slice):
                return _PositionView(self.runtime, index)
            return self.runtime._block_at(self.runtime._selected(index)[0])
        return self._physical(index)

    def __repr__(self) -> str:
        r = self.runtime
        return f"{type(self).__name__}(unique={r.unique}, depth={r.depth}, layers={r.layers}, growth={r.growth!r})"


class SharedBlockList(_SharedStack, nn.ModuleList):
    """A model's ``nn.ModuleList`` whose iteration runs the positions inside a forward (same object, same keys)."""

    _original = nn.ModuleList

    def _physical(self, index):
        if isinstance(index, slice):
            return nn.ModuleList(list(self._modules.values())[index])
        return nn.ModuleList.__getitem__(self, index)


class SharedBlockSequential(_SharedStack, nn.Sequential):
    """A model's ``nn.Sequential`` whose ``forward`` runs the positions (same object, same keys)."""

    _original = nn.Sequential

    def _physical(self, index):
        if isinstance(index, slice):
            return nn.Sequential(OrderedDict(list(self._modules.items())[index]))
        return nn.Sequential.__getitem__(self, index)


_SHARED = {nn.ModuleList: SharedBlockList, nn.Sequential: SharedBlockSequential}


def can_share(container: nn.Module) -> bool:
    """Whether `container`'s class can run positions in place (exact ``nn.ModuleList`` or ``nn.Sequential``)."""
    return type(container) in _SHARED


def share(container: nn.Module, runtime: StackRuntime) -> None:
    """Make `container` (an ``nn.ModuleList`` or ``nn.Sequential``) run `runtime`'s positions inside a forward."""
    container.__class__ = _SHARED[type(container)]
    container.__dict__[STACK_ATTR] = runtime


def unshare(container: nn.Module) -> None:
    """Undo ``share`` and ``mark``: the container's original class, no runtime."""
    original = type(container).__dict__.get("_original")
    if original is not None:
        container.__class__ = original
    container.__dict__.pop(STACK_ATTR, None)


def mark(container: nn.Module, runtime: StackRuntime) -> None:
    """Graph mode: note the runtime on the container (it keeps its class), so the model counts as wrapped."""
    container.__dict__[STACK_ATTR] = runtime


@dataclass(frozen=True)
class Slot:
    """One argument of a block call: the chained hidden state, a shared graph input, a constant, or a
    per-layer constant (``value`` holds one per original unit)."""

    kind: str  # "hidden" | "shared" | "const" | "per_layer"
    value: Any = None


@dataclass(frozen=True)
class CallTemplate:
    """How to call a block at a position: its argument slots, and where its output holds the next hidden state."""

    args: tuple[Slot, ...]
    kwargs: tuple[tuple[str, Slot], ...]
    out_index: int | None  # None: the block returns the hidden state itself

    def build(self, hidden, shared: tuple, position: int) -> tuple[tuple, dict]:
        def fill(slot: Slot):
            if slot.kind == "hidden":
                return hidden
            if slot.kind == "shared":
                return shared[slot.value]
            if slot.kind == "per_layer":
                return slot.value[position]
            return slot.value

        return tuple(fill(s) for s in self.args), {k: fill(s) for k, s in self.kwargs}


class DepthGate(nn.Module):
    """Runs the runtime's growable positions in place of the chain of core block calls in a graph (the fixed blocks
    keep their own calls in the graph).

    ``gate(hidden, *shared)`` returns what the last core block returns; with the identity map (unique = depth = L)
    it computes exactly what the original chain computed. ``templates`` holds one call template per block of a unit.
    The blocks are not registered here (they already are, in the graph module), so parameters and state_dict keys
    are not duplicated.
    """

    def __init__(self, runtime: StackRuntime, templates: Sequence[CallTemplate]):
        super().__init__()
        self.__dict__["runtime"] = runtime  # not a submodule: see the docstring
        self.templates = tuple(templates)

    def forward(self, hidden, *shared):
        runtime, out = self.runtime, None
        runtime.enter()
        try:
            for entry in runtime.core_entries():
                phase, position = entry
                template = self.templates[phase]
                args, kwargs = template.build(hidden, shared, position)
                out = runtime._block_at(entry)(*args, **kwargs)
                hidden = out if template.out_index is None else out[template.out_index]
        finally:
            runtime.exit()
        return out
