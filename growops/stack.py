"""The runtime block stack: L physical blocks, of which the first `unique` are live, run at `depth` positions.

Position i runs block ``depth_map(unique, depth, growth)[i]`` in training and
``depth_map(unique, L, growth)[i]`` in evaluation (full depth with the current sharing). Before a block runs
at position i its per-layer values (``layer_idx``, ...) are set to those block i had originally, so a KV cache
or a per-layer scale sees a distinct layer at every position.

Two ways to run it, one semantics:
- ``SharedBlockList`` / ``SharedBlockSequential`` replace a model's container in place: a forward that
  iterates its container (``for block in self.layers``, ``self.layers[:n]``) runs the positions.
  Integer indexing and ``len`` stay physical, like the container they replace, so state_dict keys and
  ``model.layers[3]`` keep their meaning.
- ``DepthGate`` replaces the chain of block calls in an FX graph (see ``growops.fx.insert_depth_gate``),
  for models that index their blocks.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .maps import depth_map


class StackRuntime:
    """Which physical block runs at each position; shared by a container or a gate and by Apollo."""

    def __init__(self, blocks: list[nn.Module], per_layer_values: dict[str, tuple] | None = None,
                 growth: str = "interpolate"):
        self.blocks = list(blocks)
        self.layers = len(self.blocks)
        self.unique = self.layers
        self.depth = self.layers
        self.growth = growth
        self.per_layer_values = dict(per_layer_values or {})
        self.cast_cache: dict = {}  # per-forward casts of routed weights (growops.ops.routing), emptied per forward

    @property
    def training(self) -> bool:
        # The blocks follow model.train()/eval(), whoever calls it.
        return self.blocks[0].training

    def mapping(self, training: bool | None = None) -> tuple[int, ...]:
        """Physical block per position: sampled depth in training, full depth L in evaluation."""
        training = self.training if training is None else training
        return depth_map(self.unique, self.depth if training else self.layers, self.growth)

    def positions(self, selection: slice = slice(None)) -> Iterator[nn.Module]:
        """Yield the block of each selected position, each given that position's per-layer values first."""
        for position in self._selected(selection):
            yield self._block_at(position)

    # Both helpers are opaque to torch.compile on purpose: a graph break inside the model's block loop makes dynamo
    # run that loop eagerly and compile each block call as its own frame (regional compilation), so the depth and
    # the sharing never enter a graph and never trigger a recompile.
    @torch.compiler.disable
    def _selected(self, selection: slice) -> range:
        self.cast_cache.clear()  # a new forward: weights may have changed since the last
        return range(len(self.mapping()))[selection]

    @torch.compiler.disable
    def _block_at(self, position: int) -> nn.Module:
        block = self.blocks[self.mapping()[position]]
        self.place(block, position)
        return block

    def __getstate__(self) -> dict:
        return {**self.__dict__, "cast_cache": {}}  # casts are not state

    def place(self, block: nn.Module, position: int) -> None:
        """Give `block` the per-layer values of original layer `position`."""
        for path, values in self.per_layer_values.items():
            owner_path, _, attr = path.rpartition(".")
            owner = block.get_submodule(owner_path) if owner_path else block
            setattr(owner, attr, values[position])


class _PositionView:
    """``stack[a:b]``: the selected positions, iterated lazily so per-layer values are set just in time."""

    def __init__(self, runtime: StackRuntime, selection: slice):
        self.runtime, self.selection = runtime, selection

    def __iter__(self) -> Iterator[nn.Module]:
        return self.runtime.positions(self.selection)

    def __len__(self) -> int:
        return len(self.runtime._selected(self.selection))


class _SharedStack:
    """Mixin for a container whose iteration runs the runtime's positions (see the module docstring)."""

    runtime: StackRuntime

    def __iter__(self) -> Iterator[nn.Module]:
        return self.runtime.positions()

    def __getitem__(self, index):
        if isinstance(index, slice):
            return _PositionView(self.runtime, index)
        return self.runtime.blocks[index]

    def __repr__(self) -> str:
        r = self.runtime
        return f"{type(self).__name__}(unique={r.unique}, depth={r.depth}, layers={r.layers}, growth={r.growth!r})"


class SharedBlockList(_SharedStack, nn.ModuleList):
    """A ``nn.ModuleList`` of the same L blocks (same state_dict keys) whose iteration runs the positions."""

    def __init__(self, runtime: StackRuntime):
        super().__init__(runtime.blocks)
        self.runtime = runtime


class SharedBlockSequential(_SharedStack, nn.Sequential):
    """A ``nn.Sequential`` of the same L blocks whose ``forward`` runs the positions."""

    def __init__(self, runtime: StackRuntime):
        super().__init__(*runtime.blocks)
        self.runtime = runtime


def shared_container(container: nn.Module, runtime: StackRuntime) -> nn.Module | None:
    """The shared counterpart of `container` (keeping its children's names), or None for other classes."""
    if type(container) is nn.ModuleList:
        shared = SharedBlockList(runtime)
    elif type(container) is nn.Sequential:
        shared = SharedBlockSequential(runtime)
    else:
        return None
    shared.training = container.training
    # Keep the original child names (a Sequential built from an OrderedDict may not use "0", "1", ...).
    shared._modules = type(container._modules)(container._modules)
    return shared


@dataclass(frozen=True)
class Slot:
    """One argument of a block call: the chained hidden state, a shared graph input, a constant, or a
    per-layer constant (``value`` holds one per original position)."""

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
    """Runs the runtime's positions in place of a chain of block calls in a graph.

    ``gate(hidden, *shared)`` returns what the last block returns; with the identity map (unique = depth = L)
    it computes exactly what the original chain computed. The blocks are not registered here (they already
    are, in the graph module), so parameters and state_dict keys are not duplicated.
    """

    def __init__(self, runtime: StackRuntime, template: CallTemplate):
        super().__init__()
        self.__dict__["runtime"] = runtime  # not a submodule: see the docstring
        self.template = template

    def forward(self, hidden, *shared):
        out = None
        for position, block in enumerate(self.runtime.positions()):
            args, kwargs = self.template.build(hidden, shared, position)
            out = block(*args, **kwargs)
            hidden = out if self.template.out_index is None else out[self.template.out_index]
        return out
