"""The depth gate: what runs in an FX graph in place of a stack's chain of block calls (graph mode).

``insert_depth_gate`` (``growops.fx.passes``) builds one from the chain's calls: a ``CallTemplate`` per block of a
unit says how to call that block at any position (which argument carries the hidden state, which are shared graph
values, constants or per-layer constants), and the gate runs the runtime's positions with them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..stack import StackRuntime


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
