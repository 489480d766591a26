"""Graph passes over a symbolically traced model whose blocks are ``call_module`` leaves.

Each pass returns a new GraphModule over the same submodules (parameters are shared, the graph is copied)
unless ``inplace=True``; both lint and recompile the graph before returning.
"""

from __future__ import annotations

import copy
import operator

from torch import fx

from ..errors import GrowopsError
from ..stack import StackRuntime
from .analysis import BlockStack
from .gate import CallTemplate, DepthGate, Slot

GATE = "growops_gate"


def insert_depth_gate(gm: fx.GraphModule, stack: BlockStack, inplace: bool = False,
                      runtime: StackRuntime | None = None, name: str = GATE) -> fx.GraphModule:
    """Replace the chain of the stack's growable block calls by one call to a ``DepthGate`` (submodule `name`).

    Invariant: with the gate's runtime at unique = depth = L (as created) the module computes exactly what
    it computed before; setting ``gm.growops_gate.runtime.unique / .depth`` then changes the depth and the
    sharing without retracing. Fixed blocks keep their own calls. Requires each growable block to be called once,
    on the previous block's output (or one item of it), with the other arguments shared graph nodes or constants;
    intermediate outputs may not be used outside the chain. Pass `runtime` to let several graphs (say, one per
    training mode) share one.

    Before: ``h1 = layers_0(h0, mask); h2 = layers_1(h1, mask); out = head(h2)``
    After:  ``h2 = growops_gate(h0, mask); out = head(h2)``
    """
    gm = gm if inplace else fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    layout = stack.layout
    calls = _block_calls(gm.graph, stack)[layout.core().start:layout.core().stop]
    slot_keys, out_indices, glue = _chain_slots(calls, layout.period)
    shared_nodes: list[fx.Node] = []
    templates = [_template(calls[r::layout.period], slot_keys[r], out_indices[r], shared_nodes)
                 for r in range(layout.period)]

    if runtime is None:
        runtime = StackRuntime(gm.get_submodule(stack.path), layout, stack.per_layer_values, path=stack.path)
    gm.add_submodule(name, DepthGate(runtime, templates))
    first, last = calls[0], calls[-1]
    with gm.graph.inserting_before(last):
        gate = gm.graph.call_module(name, (_slot_value(first, slot_keys[0]), *shared_nodes))
    gate.meta = dict(last.meta)
    last.replace_all_uses_with(gate)
    for call in reversed(calls):
        for item in glue.get(call, ()):
            gm.graph.erase_node(item)
        gm.graph.erase_node(call)
    gm.graph.lint()
    gm.recompile()
    return gm


def tie_blocks(gm: fx.GraphModule, stack: BlockStack, mapping, inplace: bool = False) -> fx.GraphModule:
    """Make position i of the chain call block ``mapping[i]``: blocks at the same index share their weights.

    Invariant: the graph keeps its block calls and every other node; only the targets of the growable units'
    calls change (position i calls unit ``mapping[i]``), so the identity mapping returns an identical graph.
    ``mapping`` has one entry per growable unit, each in ``[0, L)``.
    """
    mapping, layers = tuple(mapping), stack.layers
    if len(mapping) != layers or not all(0 <= m < layers for m in mapping):
        raise GrowopsError(f"tie_blocks needs one unit index in [0, {layers}) per position, got {mapping}")
    gm = gm if inplace else fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    calls = _block_calls(gm.graph, stack)
    for position, unit in enumerate(mapping):
        for call, target in zip((calls[i] for i in stack.layout.unit(position)), stack.unit(unit)):
            call.target = target
    gm.graph.lint()
    gm.recompile()
    return gm


def _block_calls(graph: fx.Graph, stack: BlockStack) -> list[fx.Node]:
    calls = {b: [n for n in graph.nodes if n.op == "call_module" and n.target == b] for b in stack.blocks}
    bad = {b: len(c) for b, c in calls.items() if len(c) != 1}
    if bad:
        raise GrowopsError(f"expected each block of {stack.path} called once as a call_module node, got call counts "
                           f"{bad}: trace with growops.fx.trace_model (blocks as leaves) before this pass")
    return [calls[b][0] for b in stack.blocks]


def _slots(node: fx.Node) -> list:
    return list(range(len(node.args))) + sorted(node.kwargs)


def _slot_value(node: fx.Node, key):
    return node.args[key] if isinstance(key, int) else node.kwargs[key]


def _chain_slots(calls: list[fx.Node], period: int):
    """``(slot per phase, out_index per phase, glue)``: the argument slot through which each block of a unit takes the
    hidden state, the index of the hidden state in each block's output (None if the output is the hidden state), and
    the getitem nodes in between. Call k is block k % period of its unit."""
    slots: dict[int, object] = {}
    outs: dict[int, object] = {}
    glue = {}
    for k, (prev, node) in enumerate(zip(calls, calls[1:]), start=1):
        hits = []
        for key in _slots(node):
            value = _slot_value(node, key)
            if value is prev:
                hits.append((key, None, None))
            elif (isinstance(value, fx.Node) and value.op == "call_function" and value.target is operator.getitem
                  and value.args[0] is prev):
                hits.append((key, value.args[1], value))
        if len(hits) != 1:
            raise GrowopsError(f"{node.target} must take {prev.target}'s output in exactly one argument, found "
                               f"{len(hits)}: insert_depth_gate handles a plain chain of blocks (code between the "
                               "blocks, such as a residual written in the loop, needs a forward that iterates the "
                               "container: `for block in self.layers: ...`)")
        key, index, item = hits[0]
        _agree(slots, k % period, key, "arguments")
        _agree(outs, (k - 1) % period, index, "output items")
        expected_users = {node} if item is None else {item}
        outside = sorted(u.name for u in [*prev.users, *(item.users if item is not None else ())]
                         if u not in expected_users and u is not node)
        if outside:
            # The graph holds one such use per layer: the gate runs another number of positions, so they cannot follow.
            raise GrowopsError(f"{prev.target}'s output is also used outside the chain of blocks (by `{outside[0]}`): "
                               "a value collected over the layers (hidden states, router logits, an auxiliary loss) "
                               "or a tap on one layer is written into the graph once per layer, for L layers, and a "
                               "depth gate runs another number of positions; insert_depth_gate needs a plain chain. A "
                               "forward that iterates the container (`for block in self.layers: ...`) runs its own "
                               "loop at every depth, which supports collected values")
        if item is not None:
            glue[prev] = (item,)
    return [slots[r] for r in range(period)], [outs[r] for r in range(period)], glue


def _agree(table: dict, phase: int, value, what: str) -> None:
    if phase in table and table[phase] != value:
        raise GrowopsError(f"blocks pass the hidden state in different {what} ({table[phase]!r} and {value!r}); "
                           "insert_depth_gate needs one call form per block of a unit")
    table[phase] = value


def _template(calls: list[fx.Node], slot_key, out_index, shared_nodes: list[fx.Node]) -> CallTemplate:
    """The call template of one block of a unit, from its calls in every unit."""
    def slot(key) -> Slot:
        if key == slot_key:
            return Slot("hidden")
        try:
            values = [_slot_value(c, key) for c in calls]
        except (IndexError, KeyError):
            raise GrowopsError(f"blocks are called with different arguments ({key!r} missing in some calls)") from None
        if all(isinstance(v, fx.Node) for v in values):
            if any(v is not values[0] for v in values):
                raise GrowopsError(f"argument {key!r} is a different graph value for each block; "
                                   "insert_depth_gate supports shared inputs and per-layer constants only")
            if values[0] not in shared_nodes:
                shared_nodes.append(values[0])
            return Slot("shared", shared_nodes.index(values[0]))
        if any(isinstance(v, fx.Node) for v in values):
            raise GrowopsError(f"argument {key!r} mixes graph values and constants across blocks")
        if all(v == values[0] for v in values):
            return Slot("const", values[0])
        return Slot("per_layer", tuple(values))

    first = calls[0]
    if any(_slots(c) != _slots(first) for c in calls):
        raise GrowopsError("blocks are called with different argument lists; insert_depth_gate needs one call form")
    args = tuple(slot(i) for i in range(len(first.args)))
    kwargs = tuple((k, slot(k)) for k in sorted(first.kwargs))
    return CallTemplate(args, kwargs, out_index)
