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
- ``growops.fx.gate.DepthGate`` replaces the chain of block calls in an FX graph (see
  ``growops.fx.insert_depth_gate``), for models that index their blocks.

A child replaced after wrapping (``model.layers[3] = ...``) is used if it is structurally like the block it replaces
and rejected with a GrowopsError otherwise; it is never ignored. A child replaced by an activation wrapper
(``apply_activation_checkpointing``: ``CheckpointWrapper`` holding the block, ``growops.checkpointing``) keeps its
block as the unit's (weights, per-layer values, growth) and is what a position runs, so the checkpointing applies.

Activation checkpointing while a unit runs at several positions: a recomputation in the backward must run the same
block with the per-layer values of the position it recomputes, although the forward has ended and the unit holds its
own values again. Where there are per-layer values, each position's output is marked (``_Position``, outside an
activation wrapper's checkpoint); the backward reaches the mark before anything inside the block, and gives the unit
that position's values then, before the recomputation reads one. The recomputation runs the module the checkpoint
holds: the same block.
"""

from __future__ import annotations

import copy
from collections import Counter, OrderedDict
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .checkpointing import held
from .checkpointing import layers as wrapper_layers
from .eager import compile_boundaries, eager
from .errors import GrowopsError
from .maps import depth_map
from .structure import Layout, difference, module_signature
from .values import is_state_buffer, pruned, read, state_names, write

STACK_ATTR = "_growops_stack"  # set on a managed container (both modes): marks a model as already wrapped


def _fingerprint(value: Any) -> tuple:
    """What tells whether a piece of block state changed: its identity, for a tensor its memory and version, for a
    dict or list what it holds (shallowly)."""
    if isinstance(value, torch.Tensor) and not value.is_inference():
        try:
            return id(value), value.data_ptr(), value._version
        except RuntimeError:  # a fake tensor (torch.export tracing the model): no memory to tell by
            return (id(value),)
    if isinstance(value, dict):
        return id(value), tuple((k, _fingerprint(v)) for k, v in value.items())
    if isinstance(value, list):
        return id(value), tuple(_fingerprint(v) for v in value)
    return (id(value),)


class _Position(torch.autograd.Function):
    """Identity on a block's output whose backward tells the runtime the position that output came from, just before
    the backward reaches the block itself (where activation checkpointing recomputes it)."""

    @staticmethod
    def forward(tensor, runtime, block, position):
        return tensor.view_as(tensor)

    @staticmethod
    def setup_context(ctx, inputs, output):  # a separate setup_context: torch.func transforms (grad, vjp) need it
        _, runtime, block, position = inputs
        ctx.mark = (runtime, block, position)

    @staticmethod
    def backward(ctx, grad):
        runtime, block, position = ctx.mark
        runtime.replaying(block, position)
        return grad, None, None, None


def _mark(output: Any, runtime: StackRuntime, block: int, position: int) -> Any:
    """`output` with every tensor that requires grad (itself, or the items of a tuple or list) passed through
    ``_Position``; None when there is none (the hook then keeps the output)."""
    def one(t):
        return _Position.apply(t, runtime, block, position) if isinstance(t, torch.Tensor) and t.requires_grad else t

    if isinstance(output, torch.Tensor):
        return one(output) if output.requires_grad else None
    if isinstance(output, (tuple, list)) and any(isinstance(t, torch.Tensor) and t.requires_grad for t in output):
        return type(output)(one(t) for t in output) if type(output) in (tuple, list) else None
    return None


def in_backward() -> bool:
    """Whether the autograd engine is running a backward now (where activation checkpointing recomputes)."""
    task = getattr(torch._C, "_current_graph_task_id", None)
    return task is not None and task() != -1


class StackRuntime:
    """Which physical block runs at each position of one stack; shared by its container or gate and by Apollo.

    ``children[i]`` is what the container holds, ``blocks[i]`` the block it runs: the same module, or the one inside
    the activation wrappers put around it. Units, growth, per-layer values and hooks that guard use ``blocks``; a
    position hands out ``children``, so a wrapper's checkpointing applies."""

    def __init__(self, container: nn.Module, layout: Layout | None = None, per_layer: Sequence[str] = (),
                 growth: str = "interpolate", path: str = "stack", shared_state: Sequence[str] = ()):
        _boundaries()
        self.container = container
        self.path = path
        self.names = tuple(container._modules)
        self.children: list[nn.Module] = list(container._modules.values())  # what the container holds, as adopted
        self.blocks: list[nn.Module] = list(self.children)  # the block of each child: itself, or what its wrapper runs
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
        self.cast_cache: dict = {}  # per-forward casts of routed weights (growops.ops.routing), emptied per forward
        self.active = 0  # forwards of the container or a module above it now running (their hooks count)
        self.route_replacements = False  # route the linears of blocks replaced after wrapping (shared_linear)
        self._own: list[dict[str, Any]] | None = None  # each unit's own per-layer values while a forward runs
        self._state: dict = {}  # what the state kept in shared units looked like when the session began
        self._handed: set[int] = set()  # ids of the blocks handed out for a position in this session
        self._position_of: dict[int, int] = {}  # block id -> the position it was last handed out for
        self._running: dict[tuple[int, int], int] = {}  # (unit, phase) -> the position it runs in this session
        self._replay: dict[int, int] = {}  # block id -> the position the backward is about to recompute it for
        self._recomputing = False  # the session is the backward's (begun by _begin_recompute)
        self._index_wrappers()
        self.owned = False  # set by the Apollo wrapper that owns this runtime (owner: a weak reference to it)
        self.owner = None
        self.wrapper_forwards = None  # resample="micro_batch": training forwards a(...) announced, not yet begun
        self._unit_of = None  # module id -> (unit, block), built when guard first needs it

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
    @eager
    def _selected(self, selection: slice | int) -> list:
        self.begin()
        entries = self.entries()
        return entries[selection] if isinstance(selection, slice) else [entries[selection]]

    @eager
    def _block_at(self, entry: tuple[int, int | None]) -> nn.Module:
        first, position = entry
        if position is None:
            return self.children[first]
        self.begin()
        u = self.mapping()[position]
        unit = self.unit(u)
        previous = self._running.get((u, first))
        if previous is not None and previous != position:
            self._keep(unit, first, previous)
        self._running[(u, first)] = position
        for path in self._phase_paths[first]:
            write(unit, path, self._own[position][path])
        self._handed.add(id(unit[first]))
        self._position_of[id(unit[first])] = position
        return self.children[self.layout.unit(u)[first]]  # the block, or its activation wrapper

    # ---------------------------------------------------------------- a session: one forward, or one recomputed call
    @eager
    def core_entries(self) -> list[tuple[int, int | None]]:
        """The entries of the growable positions only (a gate runs those; the graph calls the fixed blocks)."""
        self.begin()
        entries = self.entries()
        return entries[self.layout.prefix:len(entries) - self.layout.suffix]

    @eager
    def begin(self) -> None:
        """A session starts using the stack (a forward, or a recomputation in the backward): adopt replaced children,
        empty the cast cache, note each unit's own per-layer values (read now, so ``model.to()`` and loaded weights
        are seen) and the state of the units that will run at several positions."""
        self.settle()
        if self._own is not None:
            return
        self._check_owner()
        self.sync()
        self.cast_cache.clear()
        self._own = [{p: read(unit, p) for p in self.per_layer} for unit in self.units()]
        self._state = self._state_snapshot()
        self._handed, self._running = set(), {}

    @eager
    def end(self) -> None:
        """The session is over: every unit gets its own per-layer values back. Then, if the forward changed state
        kept in a unit that ran at several positions, raise: that state was shared by the positions."""
        if self._own is not None and not self._recomputing:
            for (u, phase), position in self._running.items():
                self._keep(self.unit(u), phase, position)
        own, self._own, self._recomputing = self._own, None, False
        state, self._state, self._handed, self._running = self._state, {}, set(), {}
        if own and self.per_layer:
            for unit, values in zip(self.units(), own):
                for path, value in values.items():
                    write(unit, path, value)
        for (u, path), before in state.items():
            if _fingerprint(read(self.unit(u), path)) != before:
                raise GrowopsError(
                    f"the forward changed {path} in {self.path}'s unit {u} while that unit ran at several positions: "
                    "state kept inside a block (a KV cache, a counter, a lazily built table) is then shared by those "
                    f"positions. Declare it per layer (each position keeps its own): p = growops.plan(model); "
                    f"p = p.declare(per_layer=[{path!r}]); growops.apollo(model, ..., plan=p), or constant=[...] if "
                    "sharing it is right")

    def _keep(self, unit: tuple[nn.Module, ...], phase: int, position: int) -> None:
        """`position` is over on `unit`: what its block now holds at the per-layer paths (a value the forward
        rebound, a cache it extended) is that position's from now on."""
        for path in self._phase_paths[phase]:
            self._own[position][path] = read(unit, path)

    @eager
    def enter(self, *_) -> None:
        self.active += 1

    @eager
    def exit(self, *_) -> None:
        self.active = max(0, self.active - 1)
        if self.active == 0:
            self.end()

    def _check_owner(self) -> None:
        """Raise if this runtime lost its wrapper (a copy of the wrapped model, made by copy.deepcopy(a.model)), or if a
        training forward bypasses the wrapper that draws each forward's depth (resample="micro_batch")."""
        if self.owned and (self.owner is None or self.owner() is None):
            raise GrowopsError(f"the growops wrapper of this model is gone: it was dropped, or this model is a copy "
                               f"({self.path} copied with copy.deepcopy(a.model), say), whose blocks would follow the "
                               "schedule as it stood then. Keep the wrapper `a` and call it; for a teacher copy "
                               "a.export()")
        if self.wrapper_forwards is not None and self.training and not in_backward():
            if self.wrapper_forwards == 0:
                raise GrowopsError("resample='micro_batch' draws each training forward's depth in a(...): call a(...), "
                                   "not a.model(...) (or build apollo with resample='step')")
            self.wrapper_forwards -= 1

    def _state_snapshot(self) -> dict:
        """What the state kept in the units that run at several positions in this session looks like now: buffers
        and tensor (or None) attributes of their modules, not per-layer values, declared shared state or
        normalization statistics."""
        counts = Counter(self.mapping())
        out = {}
        for u in (u for u, c in counts.items() if c > 1):
            for r, block in enumerate(self.unit(u)):
                for sub_path, sub in block.named_modules():
                    for attr, value in [*sub._buffers.items(), *sub.__dict__.items()]:
                        if not (isinstance(value, (torch.Tensor, dict, list)) or value is None) or \
                                (attr in sub.__dict__ and attr.startswith("_")):
                            continue
                        name = f"{sub_path}.{attr}" if sub_path else attr
                        path = name if self.layout.period == 1 else f"{r}.{name}"
                        if path in self.per_layer or path in self.shared_state or is_state_buffer(block, name):
                            continue
                        out[(u, path)] = _fingerprint(value)
        return out

    # ---------------------------------------------------------------- blocks called where they should not be
    def guard(self, module: nn.Module, args) -> None:
        """Forward pre-hook on every growable block (and, when it holds per-layer values, on its submodules).

        A block runs rightly when the runtime handed it out for a position in this session (the container or the
        gate did), or when the backward recomputes it (activation checkpointing) after its output told the backward
        which position it ran at (``release``): then it gets that position's per-layer values again. Otherwise it
        raises: inside a forward (the forward reached the block another way, e.g. ``children()`` or a stored list,
        and would run a physical block), outside one while its position runs another unit (a method iterating the
        container directly), and in the backward when a stale block runs or a shared block is recomputed with
        per-layer values growops cannot restore."""
        if self._unit_of is None:
            self._unit_of = self._index_units()
        found = self._unit_of.get(id(module))
        if found is None:
            return
        unit, root = found
        where = f"{self.path}.{self.names[self.blocks.index(root)]}"
        if self.active:
            if module is root and id(root) not in self._handed:
                raise GrowopsError(
                    f"{where} ran inside the model's forward, but {self.path} did not hand it out for a position: the "
                    f"forward reaches blocks another way too (children(), a stored list, a path only taken in "
                    "training), which runs a physical block where growops runs another. Reach the blocks only by "
                    f"iterating or indexing {self.path}")
            return
        if in_backward():
            position = self._replay.pop(id(root), None)
            if position is not None:  # recomputed: give it the values of the position it ran at
                self._begin_recompute()
                phase = (self.blocks.index(root) - self.layout.prefix) % self.layout.period
                for path in self._phase_paths[phase]:
                    write(self.unit(unit), path, self._own[position][path])
                self._handed.add(id(root))
                return
            if id(root) in self._handed:
                return
            if unit >= self.unique:
                raise GrowopsError(f"{where} runs in the backward, but it is not live yet: a recomputation "
                                   "(activation checkpointing) reached the physical blocks")
            # Recomputed without a position (a reentrant checkpoint hides the block's output from the backward).
            if self.per_layer and self.unique < self.layers:
                others = ", ".join(self.per_layer)
                raise GrowopsError(
                    f"{where} is recomputed in the backward (activation checkpointing) while blocks are shared, and "
                    f"growops cannot tell which position it ran at, so the recomputation would use the block's own "
                    f"per-layer values ({others}), not its position's, and give wrong gradients. Checkpoint whole "
                    "blocks with use_reentrant=False (Hugging Face's gradient checkpointing does), or turn "
                    "checkpointing off while blocks are shared")
            return
        if id(root) in self._handed:  # positions() used directly, outside a forward
            return
        if module is root and depth_map(self.unique, self.layers, self.growth)[unit] != unit:
            raise GrowopsError(
                f"{where} ran outside the model's forward, where position {unit} runs unit "
                f"{depth_map(self.unique, self.layers, self.growth)[unit]} of {self.path} (it holds {self.unique} "
                "unique units in this stage): code that iterates the container outside a forward (a method other "
                "than forward, or model.forward(...) called directly) runs the physical blocks. Call the model (or a "
                "module that contains the container), or use a.export()")

    def replaying(self, block: int, position: int) -> None:
        """The backward reached the output of the block with id `block` that ran at `position`: what the backward
        recomputes of it (activation checkpointing) comes next. Its unit gets that position's per-layer values now,
        before the recomputation reads one (a checkpointed ``forward`` may read ``self.layer_idx`` before any hook of
        the block runs); ``guard`` gives them again where a hook runs. A backward inside a forward changes nothing:
        the forward's values stand."""
        self._replay[block] = position
        if self.active or not self.per_layer:
            return
        if self._unit_of is None:
            self._unit_of = self._index_units()
        found = self._unit_of.get(block)
        if found is None:
            return  # replaced since the forward: guard refuses the stale block if the recomputation runs it
        unit, root = found
        if self._own is None and unit == position:
            return  # the unit holds its own values, which are this position's
        self._begin_recompute()
        phase = (self.blocks.index(root) - self.layout.prefix) % self.layout.period
        for path in self._phase_paths[phase]:
            write(self.unit(unit), path, self._own[position][path])

    def _begin_recompute(self) -> None:
        """A session for recomputations in this backward; it ends when the backward does."""
        if self._own is None:
            self.begin()
            self._recomputing = True
            torch.autograd.Variable._execution_engine.queue_callback(self._end_recompute)

    def _end_recompute(self) -> None:
        if self._own is not None and not self.active:
            self.end()

    def settle(self) -> None:
        """End a backward's session that its backward did not end (it raised before its end): outside a backward
        every unit holds its own per-layer values."""
        if self._recomputing and not self.active and not in_backward():
            self.end()

    def release(self, module: nn.Module, args, output):
        """Forward hook on every growable block. In a forward, a block handed out for a position marks its output so
        that the backward, reaching it, tells a recomputation of the block which position that was (only needed when
        there are per-layer values). A session begun outside a forward (a recomputation, or positions() used
        directly) ends with the block's call."""
        if not self.active:
            if self._own is not None and not in_backward():  # positions() used directly: one call, one session
                self.end()
            return None
        root = self._wrapped.get(id(module), module)
        if root is module and id(root) in self._wrapped_blocks:
            return None  # its wrapper marks the output outside the wrapper's checkpoint (a reentrant one hides this)
        position = self._position_of.get(id(root))
        if not self.per_layer or position is None or not torch.is_grad_enabled():
            return None
        return _mark(output, self, id(root), position)

    def guard_blocks(self) -> None:
        """Put ``guard`` on every growable block, and on its submodules when there are per-layer values (a
        recomputation of a submodule could not restore them); and ``release`` on every growable block, or on the
        activation wrapper around it (once)."""
        for u in range(self.layers):
            for i in self.layout.unit(u):
                block, child = self.blocks[i], self.children[i]
                for module in block.modules() if self.per_layer else (block,):
                    if not any(isinstance(h, _Guard) and h.runtime is self for h in module._forward_pre_hooks.values()):
                        module.register_forward_pre_hook(_Guard(self, "block" if module is block else "sub"))
                for module in {id(block): block, id(child): child}.values():
                    if not any(isinstance(h, _Guard) and h.runtime is self for h in module._forward_hooks.values()):
                        module.register_forward_hook(_Guard(self, "after"), always_call=True)

    def _index_wrappers(self) -> None:
        """Note each activation wrapper the container holds around a growable block (``_wrapped``: its id -> the
        block) and the blocks so held (``_wrapped_blocks``)."""
        self._wrapped = {id(c): b for i in self.layout.core() if (c := self.children[i]) is not (b := self.blocks[i])}
        self._wrapped_blocks = {id(b) for b in self._wrapped.values()}

    def _index_units(self) -> dict[int, tuple[int, nn.Module]]:
        """id of every module of every growable block -> (its unit, its block)."""
        return {id(m): (u, block) for u in range(self.layers) for block in self.unit(u) for m in block.modules()}

    # ---------------------------------------------------------------- children replaced after wrapping
    def sync(self) -> None:
        """Adopt children replaced since the last call when each is structurally like the one it replaces; raise a
        GrowopsError naming it otherwise (nothing is adopted then). The container itself must stay where it was."""
        self._check_placed()
        current = list(self.container._modules.values())
        if len(current) == len(self.children) and all(a is b for a, b in zip(current, self.children)):
            return
        if tuple(self.container._modules) != self.names:
            raise GrowopsError(f"{self.path} changed after growops.apollo wrapped the model: its children are now "
                               f"{list(self.container._modules)}, were {list(self.names)}; growops cannot tell which "
                               "block is which. Change the model before wrapping it")
        replaced = [i for i, (a, b) in enumerate(zip(current, self.children)) if a is not b]
        blocks = list(self.blocks)
        for i in replaced:
            blocks[i] = self._block_of(i, current[i])
        for i in replaced:
            twin = next((j for j, b in enumerate(blocks) if b is blocks[i] and j != i), None)
            if twin is not None:  # one module in two slots: growth would write one unit's weights into the other's
                raise GrowopsError(
                    f"{self.path}.{self.names[i]} was replaced after growops.apollo wrapped the model by "
                    f"{self.path}.{self.names[twin]}'s block itself, so one module would hold two slots and growth "
                    f"would write through it. Put a copy there (copy.deepcopy), or the block it replaced")
        self.children, self.blocks = current, blocks
        self._unit_of = None
        self._index_wrappers()
        self.guard_blocks()
        if self.route_replacements:
            from .ops.routing import route_shared_linears
            route_shared_linears([blocks[i] for i in replaced], runtime=self)

    def _check_placed(self) -> None:
        """Raise if the owner's model no longer holds the container at its path (an activation wrapper put around
        the container, say): the model's forward would no longer reach what growops runs, and export would keep it."""
        model = getattr(self.owner() if self.owner is not None else None, "model", None)
        if model is None:
            return
        module = model
        for name in self.path.split("."):  # through activation wrappers around a module above (they run it)
            while module is not None and name not in module._modules and held(module) is not None:
                module = held(module)
            module = module._modules.get(name) if module is not None else None
        if module is not self.container:
            kind = "nothing" if module is None else f"a {type(module).__name__}"
            raise GrowopsError(
                f"{self.path} was replaced after growops.apollo wrapped the model, by {kind}: growops runs the blocks "
                f"of the container it wrapped, which the model no longer calls. Wrap the blocks, not their container "
                f"(apply_activation_checkpointing(model, check_fn=lambda m: isinstance(m, YourBlock))), or put the "
                "container back")

    def _block_of(self, i: int, child: nn.Module) -> nn.Module:
        """The block that `child`, put in place of child i, runs: the block it replaced held by activation wrappers
        (``apply_activation_checkpointing``), else `child` or the block inside its wrappers when structurally like
        the one replaced; a GrowopsError naming the difference otherwise."""
        found = wrapper_layers(child)
        for module in found:
            if module is self.blocks[i]:
                return module
        for module in found:
            if module_signature(module) == self.signatures[i]:
                return module
        raise GrowopsError(
            f"{self.path}.{self.names[i]} was replaced after growops.apollo wrapped the model, by a "
            f"{type(child).__name__} whose structure differs from the block it replaced "
            f"({difference(self.blocks[i], found[-1])}); growops would share and grow weights into a module it does "
            "not know. Put back a block like the others (activation checkpointing wrappers, which hold the block "
            "they replace, are fine)")

    def __setstate__(self, state: dict) -> None:
        if state.get("owned"):
            from .averaging import refuse_averaged_copy

            refuse_averaged_copy()
        _boundaries()  # unpickled in a fresh process, where no runtime was built
        self.__dict__.update(state)
        self.__dict__.setdefault("children", list(self.blocks))  # pickled before activation wrappers were adopted
        self.__dict__.setdefault("_recomputing", False)
        self.__dict__.setdefault("_running", {})
        self._index_wrappers()  # ids of the copy's modules

    def __getstate__(self) -> dict:
        # Casts and forward state are not state; ids change in a copy.
        state = {**self.__dict__, "cast_cache": {}, "active": 0, "_own": None, "_state": {}, "_handed": set(),
                 "_position_of": {}, "_running": {}, "_replay": {}, "_unit_of": None, "owner": None,
                 "_recomputing": False}
        for name in ("_wrapped", "_wrapped_blocks"):
            state.pop(name, None)
        return state



class _Guard:
    """The hooks ``StackRuntime`` puts on growable blocks: ``guard`` before a block ("block") or one of its submodules
    ("sub"), ``release`` after a block ("after"). A deep copy of one block does not drag the whole stack along: its
    copy keeps this hook, which does nothing for modules that are not the stack's own."""

    def __init__(self, runtime: StackRuntime, kind: str = "block"):
        self.runtime, self.kind = runtime, kind

    def __call__(self, module: nn.Module, args, output=None):
        if self.kind == "sub":
            # Inside a compiled block a graph break per submodule would cost the block's graph: skip the check there.
            if not torch.compiler.is_compiling():
                self.runtime.guard(module, args)
            return None
        return self._block(module, args, output)

    # At a block's boundary, run eagerly under torch.compile too (a graph break where regional compilation breaks
    # anyway): the checks read and set Python state.
    @eager
    def _block(self, module: nn.Module, args, output):
        if self.kind == "after":
            return self.runtime.release(module, args, output)
        self.runtime.guard(module, args)
        return None

    def __deepcopy__(self, memo: dict) -> _Guard:
        if id(self.runtime) not in memo and id(self.runtime.container) not in memo:
            return self  # one block copied alone
        return _Guard(copy.deepcopy(self.runtime, memo), self.kind)  # the stack is copied: guard the copy


def _boundaries() -> None:
    """Make the ``@eager`` methods of the runtime and its hooks opaque to torch.compile, with ``COMPILE_ADVICE`` as
    the reason dynamo gives when ``fullgraph=True`` meets one (``growops.eager``)."""
    compile_boundaries(StackRuntime)
    compile_boundaries(_Guard)


def deep_copy(model: nn.Module) -> nn.Module:
    """``copy.deepcopy(model)`` (a model under growops or any module), where a tensor that ``torch.nn.utils.prune``
    recomputes at every call is copied detached: copy.deepcopy alone refuses it (it is computed from a weight, not a
    leaf), and the copy's own hook recomputes it from the copy's ``weight_orig`` and mask at its first call. A
    backward's session that an error left open is ended first, so every unit holds its own per-layer values; nothing
    else in `model` changes."""
    memo = {}
    for module in model.modules():
        runtime = module.__dict__.get(STACK_ATTR)
        if runtime is not None:
            runtime.settle()
        for name in pruned(module):
            tensor = module.__dict__.get(name)
            if isinstance(tensor, torch.Tensor) and not tensor.is_leaf:
                memo[id(tensor)] = tensor.detach().clone()  # deepcopy takes a tensor found in the memo as its copy
    return copy.deepcopy(model, memo)


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
        # In the backward too: a recomputation (checkpoint_sequential over the container) runs the positions again.
        return self.runtime.active > 0 or in_backward()

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
