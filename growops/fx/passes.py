"""Graph passes over a symbolically traced model whose blocks are ``call_module`` leaves.

Each pass returns a new GraphModule over the same submodules (parameters are shared, the graph is copied)
unless ``inplace=True``; both lint and recompile the graph before returning.
"""

from __future__ import annotations

import copy
import operator

from torch import fx

from ..errors import GrowopsError
from ..stack import CallTemplate, DepthGate, Slot, StackRuntime
from .analysis import BlockStack

GATE = "growops_gate"


def insert_depth_gate(gm: fx.GraphModule, stack: BlockStack, inplace: bool = False,
                      runtime: StackRuntime | None = None) -> fx.GraphModule:
    """Replace the chain of block calls by one call to a ``DepthGate`` (submodule ``growops_gate``).

    Invariant: with the gate's runtime at unique = depth = L (as created) the module computes exactly what
    it computed before; setting ``gm.growops_gate.runtime.unique / .depth`` then changes the depth and the
    sharing without retracing. Requires each block to be called once, on the previous block's output (or one
    item of it), with the other arguments shared graph nodes or constants; intermediate outputs may not be
    used outside the chain. Pass `runtime` to let several graphs (say, one per training mode) share one.

    Before: ``h1 = layers_0(h0, mask); h2 = layers_1(h1, mask); out = head(h2)``
    After:  ``h2 = growops_gate(h0, mask); out = head(h2)``
    """
    gm = gm if inplace else fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    calls = _block_calls(gm.graph, stack)
    slot_key, out_index, glue = _chain_slot(calls)
    shared_nodes: list[fx.Node] = []
    template = _template(calls, slot_key, out_index, shared_nodes)

    if runtime is None:
        runtime = StackRuntime([gm.get_submodule(b) for b in stack.blocks], stack.per_layer_values)
    gm.add_submodule(GATE, DepthGate(runtime, template))
    first, last = calls[0], calls[-1]
    with gm.graph.inserting_before(last):
        gate = gm.graph.call_module(GATE, (_slot_value(first, slot_key), *shared_nodes))
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

    Invariant: the graph keeps its L block calls and every other node; only their targets change, so the
    identity mapping returns an identical graph. ``mapping`` has one entry per block, each in ``[0, L)``.
    """
    mapping = tuple(mapping)
    if len(mapping) != stack.depth or not all(0 <= m < stack.depth for m in mapping):
        raise GrowopsError(f"tie_blocks needs one block index in [0, {stack.depth}) per position, got {mapping}")
    gm = gm if inplace else fx.GraphModule(gm, copy.deepcopy(gm.graph), gm.__class__.__name__)
    for node, index in zip(_block_calls(gm.graph, stack), mapping):
        node.target = stack.blocks[index]
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


def _chain_slot(calls: list[fx.Node]):
    """``(slot, out_index, glue)``: the argument slot that carries the hidden state, the index of the hidden
    state in a block's output (None if the output is the hidden state), and the getitem nodes in between."""
    found, glue = None, {}
    for prev, node in zip(calls, calls[1:]):
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
                               f"{len(hits)}: insert_depth_gate handles a plain chain of blocks")
        key, index, item = hits[0]
        if found is not None and found != (key, index):
            raise GrowopsError(f"blocks pass the hidden state in different arguments ({found} and {(key, index)})")
        found = (key, index)
        expected_users = {node} if item is None else {item}
        if set(prev.users) != expected_users or (item is not None and set(item.users) != {node}):
            raise GrowopsError(f"the output of {prev.target} is used outside the chain of blocks "
                               f"(by {sorted(u.name for u in prev.users)}); insert_depth_gate needs a plain chain")
        if item is not None:
            glue[prev] = (item,)
    return found[0], found[1], glue


def _template(calls: list[fx.Node], slot_key, out_index, shared_nodes: list[fx.Node]) -> CallTemplate:
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
