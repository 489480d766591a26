"""Find the block stacks of a model in its FX graph.

A *block stack* is a block container (see ``growops.structure``) whose children are called as a chain in the graph:
every child is called, no child reads a later one, each core block reads the one before it, and a value of a core
unit other than the last flows only into the next block, or is *collected* alike from every unit: returned with the
like value of every other unit (collected hidden states, router logits), or reduced over all of them (a load-balancing
loss summed over the layers). A value that escapes the chain otherwise (a tap on layer k, a weighted sum with per-layer
weights) would silently change meaning at another depth, so such a container is rejected with the node that reads it.
The last block's values, and the side values of the last unit's other blocks, are the last position's at every
depth: they may go anywhere.

Values are followed through the parent's glue code (``getitem``, a residual ``x = x + block(x)`` written in the loop):
each node belongs to the *iteration* of the latest block it depends on, and a core block's iteration may only be read
by itself, the next one, or a collection. A collection is recognised by matching the loop body: the nodes outside the
blocks of one unit's iteration are matched, op for op and input for input, with the next unit's (``_Loop``); a value
carried from one unit's nodes to their match in the next (``aux = aux + layer_aux``) or a reducer taking the matched
values of every unit in one list (``torch.stack``, ``torch.cat``) is a collection, anything else is a tap.

Weights: a tensor held by several blocks (one rotary table assigned to every layer, Zamba's shared attention) and a
tensor of unit 0 (which position 0 runs at every depth) belong to no block for the chain; a tensor of any other core
block read outside its block is refused, since position i runs another unit's copy while blocks are shared.

Works on graphs from ``torch.fx.symbolic_trace`` (blocks as ``call_module`` leaves) and from ``torch.export``
(blocks inlined; every node tagged with ``nn_module_stack``). Each node of a found stack's blocks is annotated with
``node.meta["growops_block"] = (stack path, child index)``.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..structure import Layout, block_containers, explain_fixed, inside


@dataclass(frozen=True)
class BlockStack:
    """A chain of blocks found in a graph, and how it grows.

    path: the container's qualified name, e.g. ``"transformer.h"``.
    blocks: every child's qualified name in call order, fixed blocks included, e.g. ``("transformer.h.0", ...)``.
    layout: which children are fixed and which form the growable units (``growops.structure.Layout``).
    shared_inputs: graph nodes that every unit reads besides the chained hidden state (masks, rotary tables).
    per_layer_values: values that differ between units, by path inside a unit, e.g. ``{"attn.layer_idx": (0, 1, 2)}``;
        position i runs with unit i's (``growops.values``).
    undecided_values: values growops could not compare between units; ``apollo`` refuses them until declared.
    fixed_reasons: why each fixed block is fixed, e.g. ``"h.0: it has an extra attn.relative_attention_bias"``.
    constant_values: paths declared part of the block (``Plan.declare(constant=...)``): shared by the positions that
        run a unit, even if the forward writes them.
    """

    path: str
    blocks: tuple[str, ...]
    layout: Layout = None
    shared_inputs: tuple[str, ...] = ()
    per_layer_values: dict[str, tuple] = field(default_factory=dict, compare=False)
    undecided_values: dict[str, tuple] = field(default_factory=dict, compare=False)
    fixed_reasons: tuple[str, ...] = ()
    constant_values: tuple[str, ...] = ()

    def __post_init__(self):
        if self.layout is None:
            object.__setattr__(self, "layout", Layout(0, 1, len(self.blocks), 0))

    @property
    def layers(self) -> int:
        """L: the number of growable units."""
        return self.layout.units

    def unit(self, u: int) -> tuple[str, ...]:
        """The block paths of growable unit `u`."""
        return tuple(self.blocks[i] for i in self.layout.unit(u))

    def spec(self) -> str:
        """The ``stack=`` string that gives this stack: the path, with the core's span unless it is all of it."""
        lay = self.layout
        return self.path if lay.uniform else f"{self.path}[{lay.core().start}:{lay.core().stop}]"

    def describe(self) -> str:
        """One line: what grows and what stays fixed."""
        return f"{self.path}: " + self.layout.describe(self.blocks)


def find_block_stacks(gm: fx.GraphModule, root: nn.Module | None = None) -> list[BlockStack]:
    """All block stacks of `gm`, outermost first; `root` is the traced model when `gm` lost its submodules
    (torch.export). Annotates ``node.meta["growops_block"]``. Returns ``[]`` when there is none."""
    return analyse(gm, root)[0]


def analyse(gm: fx.GraphModule, root: nn.Module | None = None, layouts: dict[str, Layout] | None = None,
            keep: tuple[str, ...] = ()) -> tuple[list[BlockStack], list[str]]:
    """``(stacks, notes)``: the stacks found and, for each block container rejected, why. `layouts` replaces the
    layout found for the containers it names (a user's choice of the growable core); stacks in `keep` are kept even
    inside a block of another stack (asked for by name)."""
    root = gm if root is None else root
    containers = block_containers(root)
    for path, layout in (layouts or {}).items():
        containers[path] = (containers[path][0], layout)
    tied = tied_names(root)
    stacks, notes = [], []
    for path, (blocks, layout) in containers.items():
        modules = [root.get_submodule(b) for b in blocks]
        twice = next(((blocks[i], blocks[j]) for j in range(len(blocks)) for i in range(j)
                      if modules[i] is modules[j]), None)
        why = (f"{twice[0]} and {twice[1]} are the same module: its blocks already share their weights, and growops "
               "grows stacks of distinct blocks") if twice else _chain(gm.graph, blocks, layout, tied)
        if why is None:
            reasons = tuple(explain_fixed(blocks, modules, layout))
            stacks.append(BlockStack(path, blocks, layout, _shared_inputs(gm.graph, blocks, layout, tied),
                                     fixed_reasons=reasons))
        elif not any(inside(path, b) for other in containers.values() for b in other[0]):
            kind = type(root.get_submodule(blocks[layout.prefix])).__name__
            notes.append(f"{path or '<root>'} ({layout.units} x {kind}): {why}")
    # A stack inside a block of another stack (heads inside each layer, say) is not the model's block stack; the
    # model itself as a container of its children (an encoder and a decoder alike) only where nothing else is.
    candidates = [s for s in stacks if s.path] or stacks
    outer = [s for s in candidates if s.path in keep or
             not any(inside(s.path, b) for o in candidates if o is not s for b in o.blocks)]
    for stack in outer:
        index = _BlockIndex(stack.blocks)
        for node in gm.graph.nodes:
            k = None if node.op == "get_attr" and str(node.target) in tied else index.owner(node)
            if k is not None:
                node.meta["growops_block"] = (stack.path, k)
    return outer, notes


def tied_names(root: nn.Module) -> dict[str, tuple[str, ...]]:
    """Each name of a tensor that `root` holds under several names (one module or weight assigned in several places),
    mapped to all of that tensor's names."""
    groups: dict[tuple, list[str]] = {}
    for name, t in [*root.named_parameters(remove_duplicate=False), *root.named_buffers(remove_duplicate=False)]:
        key = ("id", id(t)) if t.device.type == "meta" or not t.numel() else \
            (str(t.device), t.data_ptr(), tuple(t.shape), t.stride())
        groups.setdefault(key, []).append(name)
    return {name: tuple(group) for group in groups.values() if len(group) > 1 for name in group}


def call_sequence(gm: fx.GraphModule, blocks: tuple[str, ...]) -> list[int]:
    """The child index of every block *call* in the graph, in graph order (a block run twice appears twice);
    blocks that only hold weights the graph reads, or whose submodule the forward calls, do not count."""
    index, sequence, seen, called = _BlockIndex(blocks), [], set(), _called(gm.graph)
    for node in gm.graph.nodes:
        call = None if _submodule_call(node, index, called) else index.call(node)
        if call is not None and call not in seen:
            seen.add(call)
            sequence.append(call[0])
    return sequence


def block_regions(graph: fx.Graph, blocks: tuple[str, ...]) -> dict[fx.Node, int]:
    """The index of the block each node of `graph` computes in or reads a weight of, for the nodes that have one."""
    return _iterations(graph, blocks)[0]


def _chain(graph: fx.Graph, blocks: tuple[str, ...], layout: Layout,
           tied: dict[str, tuple[str, ...]] | None = None) -> str | None:
    """None if `blocks` are called as a chain in `graph` (see the module docstring), else the reason why not. `tied`
    (``tied_names``) names the tensors held in several places, which belong to no block here."""
    tied = tied or {}
    region, iteration = _iterations(graph, blocks, _free(graph, blocks, layout, tied))
    missing = sorted(set(range(len(blocks))) - set(region.values()))
    if len(missing) == len(blocks):
        return "never called in the traced forward"
    if missing:
        return f"{', '.join(blocks[i] for i in missing)} never called in the traced forward"
    why = _outside_reads(graph, blocks, layout, region) or _shared_reads(blocks, layout, region, tied)
    if why is not None:
        return why
    core = layout.core()
    reads = {k: set() for k in range(len(blocks))}
    for node, k in region.items():
        for inp in node.all_input_nodes:
            if region.get(inp) != k:
                reads[k].add(iteration[inp])
    for k in range(len(blocks)):
        later = sorted(j for j in reads[k] if j > k)
        if later:
            return (f"not a chain: {blocks[k]} reads {blocks[later[0]]}'s output, but the blocks must run in the "
                    f"container's order, {blocks[0]} first (reversed or reordered iteration is not supported)")
        if k in core and k > core.start and k - 1 not in reads[k]:
            return (f"not a chain: {blocks[k]} does not read {blocks[k - 1]}'s output; the blocks must be called one "
                    "after another, each on the previous one's output")
    loop = _Loop(graph, blocks, layout, region, iteration)
    last = range(core.stop - layout.period, core.stop)  # the last unit's values are the last position's: free
    for k in core[:-1]:
        feeds_next = _ancestors([n for n, j in region.items() if j == k + 1], region)
        for node in graph.nodes:
            if iteration[node] != k:
                continue
            chained = node in region or node in feeds_next
            if k in last and not chained:
                continue
            for user in node.users:
                if region.get(user) == k or loop.carries(user) or loop.reduces(user, node):
                    continue
                if _collects(user):
                    if k in last or loop.returns(user, node):
                        continue
                # The chain's values reach the next block's iteration; a side value only its own layer's side code.
                elif (iteration[user] <= k + 1) if chained else (iteration[user] == k and user not in region):
                    continue
                if _collects(user):
                    return (f"{blocks[k]}'s output is returned (`{node.name}`{_where(node)}) without the like value of "
                            "every other layer (as collected hidden states are): at another depth it would be another "
                            "layer's value, or none. Return every layer's value, or the value after the last layer")
                return (f"{blocks[k]}'s output is used outside the chain of blocks by `{user.name}`{_where(user)}: "
                        "at another depth that would read another layer's output, or none. growops grows stacks "
                        "whose blocks' outputs only feed the next block, are returned as they are "
                        "(output_hidden_states), or are collected alike from every layer (an auxiliary loss summed "
                        "over the layers, a stack of every layer's value)")
    return None


def _free(graph: fx.Graph, blocks: tuple[str, ...], layout: Layout, tied: dict[str, tuple[str, ...]]) -> set[fx.Node]:
    """The nodes that read a block's module or tensor but belong to no block for the chain: reads of a tensor held in
    several places (a table assigned to every layer; growops.plan refuses ties that are not alike in every unit), and
    reads of unit 0's tensors and calls of its submodules outside its call (position 0 runs unit 0 at every depth,
    under every growth map, so they are the same function at every depth)."""
    index, first, called = _BlockIndex(blocks), set(layout.unit(0)), _called(graph)
    free = set()
    for node in graph.nodes:
        target = str(node.target)
        if node.op == "get_attr" and (target in tied or index.find(target) in first):
            free.add(node)
        elif index.find(target) in first and _submodule_call(node, index, called):
            free.add(node)
        elif _alias_of_input(node, index):
            free.add(node)
    return free


# Ops that hand back their input itself when nothing is to be done (x.float() on a float32 tensor, a contiguous
# tensor's .contiguous()).
_NO_OPS = ("aten::to", "aten::contiguous", "aten::alias", "aten::type_as")


def _alias_of_input(node: fx.Node, index: _BlockIndex) -> bool:
    """Whether `node`, the first op of a block on a value from outside it, returns that value itself and no later
    block reads it. torch.export then records the value under the block's node (a hidden state saved before the block
    is called and returned, say), which is not the block's output: it belongs to the iteration it came from."""
    name = getattr(getattr(node.target, "_schema", None), "name", None)
    source = node.args[0] if node.args else None
    if name not in _NO_OPS or not isinstance(source, fx.Node) or index.owner(node) is None or \
            index.owner(source) == index.owner(node):
        return False
    if any(index.owner(u) not in (None, index.owner(node)) for u in node.users):
        return False  # handed on to a later block (as the block's output, say): the block's value for the chain
    out, val = node.meta.get("val"), source.meta.get("val")
    return isinstance(out, torch.Tensor) and isinstance(val, torch.Tensor) and out.dtype == val.dtype and \
        out.device == val.device and out.shape == val.shape and out.stride() == val.stride()


def _called(graph: fx.Graph) -> set[str]:
    """The targets of the graph's ``call_module`` nodes."""
    return {str(n.target) for n in graph.nodes if n.op == "call_module"}


def _submodule_call(node: fx.Node, index: _BlockIndex, called: set[str]) -> bool:
    """Whether `node` calls a submodule of a block that the graph also calls as a whole: in a symbolic trace, where
    blocks are leaves, such a call comes from outside the block (a block without a forward of its own, an
    nn.ModuleList, is run by calling its children)."""
    target = str(node.target)
    if node.op != "call_module" or target in index.index:
        return False
    k = index.find(target)
    return k is not None and any(index.index.get(c) == k for c in called)


def _outside_reads(graph: fx.Graph, blocks: tuple[str, ...], layout: Layout,
                   region: dict[fx.Node, int]) -> str | None:
    """Why a tensor or submodule of a core block other than unit 0's is used outside the block, if one is: while
    blocks are shared, position i runs another unit's copy, and a grown block's own weights are not live."""
    core, first, index, called = layout.core(), set(layout.unit(0)), _BlockIndex(blocks), _called(graph)
    for node, k in region.items():
        if k not in core or k in first:
            continue
        submodule = _submodule_call(node, index, called)
        users = [u for u in node.users if region.get(u) != k]
        if submodule or node.op == "get_attr" and users:
            where = f" (`{users[0].name}`{_where(users[0])})" if users else _where(node)
            what = "calls" if submodule else "reads"
            kind = "a module" if submodule else "a tensor"
            return (f"the forward {what} {node.target}, {kind} of {blocks[k]}, outside the block{where}: while blocks "
                    f"are shared it would use one block's {kind[2:]} where the positions run others. Use it inside "
                    f"the block (outside it, only {blocks[layout.core().start]}'s, which position 0 runs at every "
                    "depth)")
    return None


def _shared_reads(blocks: tuple[str, ...], layout: Layout, region: dict[fx.Node, int],
                  tied: dict[str, tuple[str, ...]]) -> str | None:
    """Why the blocks read different tensors of a module every unit holds alike, if they do (Zamba2's shared block
    keeps one adapter per hybrid layer and picks it by the layer index the forward passes): a position would pick by
    its own index, not by the layer its unit was, and growops could not tell."""
    core, period = layout.core(), layout.period
    alike, reads = {}, {k: set() for k in core}
    for node, k in region.items():
        for inp in node.all_input_nodes:
            target = str(inp.target)
            if k in core and inp.op == "get_attr" and target in tied:
                if target not in alike:
                    alike[target] = _alike(tied[target], blocks, layout)
                if alike[target]:
                    reads[k].add(inp)
    for k in core[period:]:
        j = core.start + (k - core.start) % period  # the same block of unit 0
        if reads[k] != reads[j]:
            only = min(reads[k] ^ reads[j], key=lambda n: n.name)
            reader, other = (blocks[j], blocks[k]) if only in reads[j] else (blocks[k], blocks[j])
            path = next((n[len(reader) + 1:] for n in tied[str(only.target)] if n.startswith(reader + ".")), "")
            return (f"{blocks[j]} and {blocks[k]} read different tensors of a module that every unit holds alike: "
                    f"{reader} reads its {path}, {other} does not. The blocks pick their own weights out of the shared "
                    "module by the layer index the forward passes (as Zamba2's per-layer adapters do), so at another "
                    "depth a position would pick them by its position, not by the layer its unit was, and growth "
                    "would not copy them. growops cannot grow this stack: keep each layer's own weights in its block")
    return None


def _alike(names: tuple[str, ...], blocks: tuple[str, ...], layout: Layout) -> bool:
    """Whether every growable unit holds the tensor with these names at the same places (block of the unit, path)."""
    places = [set() for _ in range(layout.units)]
    for name in names:
        for u in range(layout.units):
            for r, i in enumerate(layout.unit(u)):
                if name.startswith(blocks[i] + "."):
                    places[u].add((r, name[len(blocks[i]) + 1:]))
    return bool(places[0]) and all(p == places[0] for p in places)


def _ancestors(nodes: list[fx.Node], region: dict[fx.Node, int]) -> set[fx.Node]:
    """The nodes outside every block that `nodes` depend on through other such nodes (the glue feeding a block)."""
    seen, todo = set(), [i for n in nodes for i in n.all_input_nodes]
    while todo:
        node = todo.pop()
        if node in seen or node in region:
            continue
        seen.add(node)
        todo.extend(node.all_input_nodes)
    return seen


def _collects(node: fx.Node) -> bool:
    """Whether `node` only hands values to the graph's output: the output itself, or an output object built from
    them (a dataclass or named tuple) that only goes there."""
    if node.op == "output":
        return True
    return node.op == "call_function" and isinstance(node.target, type) and all(_collects(u) for u in node.users)


class _Loop:
    """The code outside the blocks, matched from one unit's iteration to the next: ``image[n]`` is the node that does
    in the next unit's iteration what `n` does in its own (the same op, on the inputs one unit later).

    The input one unit later of a value computed before the stack is that value; of a node of a block, the node at
    the same place in the block one unit later (same op, same rank among the block's nodes); of a node outside the
    blocks, its image. A node that starts a recurrence (one of unit 0, or of unit 1 with no match in unit 0:
    ``aux = a if aux is None else aux + a``) may take an initial value (a constant, a value from before its unit)
    where its image takes the state its own unit leaves. Invariant: a node and its image compute the same function of
    their layers; so a value carried into an image, or a list holding one value of every unit each the image of the
    one before, treats every layer alike."""

    def __init__(self, graph: fx.Graph, blocks: tuple[str, ...], layout: Layout, region: dict[fx.Node, int],
                 iteration: dict[fx.Node, int]):
        self.layout, self.region, self.iteration, self.core = layout, region, iteration, layout.core()
        self.key, self.at, seen = {}, {}, Counter()
        for node in graph.nodes:
            k = region.get(node)
            if k is None:
                continue
            target = str(node.target)
            base = (node.op, target[len(blocks[k]) + 1:] if target.startswith(blocks[k] + ".") else
                    "" if target == blocks[k] else target)
            seen[k, base] += 1
            self.key[node] = (base, seen[k, base])
            self.at[k, self.key[node]] = node
        self.image: dict[fx.Node, fx.Node] = {}
        self.source: dict[fx.Node, fx.Node] = {}
        outside = [n for n in graph.nodes if n not in region and iteration[n] in self.core]
        for node in outside:
            if iteration[node] + layout.period in self.core:
                self._match(node)

    def unit(self, node: fx.Node) -> int:
        return (self.iteration[node] - self.core.start) // self.layout.period

    def counterpart(self, node: fx.Node) -> fx.Node | None:
        """The node one unit later that corresponds to `node`, or None."""
        k = self.region.get(node)
        if k is not None and k in self.core:
            later = k + self.layout.period
            return self.at.get((later, self.key[node])) if later in self.core else None
        if self.iteration[node] < self.core.start:
            return node
        return self.image.get(node)

    def carries(self, user: fx.Node) -> bool:
        """Whether `user` is part of the matched loop body: the image of a node one unit earlier, or a recurrence
        started in unit 0 or 1 that goes on in the next unit."""
        return user in self.source or user in self.image and self.unit(user) <= 1

    def returns(self, user: fx.Node, node: fx.Node) -> bool:
        """Whether `user` (the output, or an output object) returns `node` with its values of every unit but the last
        (whose value is free), as collected hidden states are returned: not one layer's value alone."""
        orbit = self.orbit(node)
        held = set(_nodes((user.args, user.kwargs)))
        return orbit is not None and all(n in held for n in orbit[:-1])

    def orbit(self, node: fx.Node) -> list[fx.Node] | None:
        """`node`'s values in unit 0, 1, ..., L - 1 (each the image of the one before), or None if there is none."""
        first = node
        while True:
            k = self.region.get(first)
            earlier = self.source.get(first) if k is None else \
                self.at.get((k - self.layout.period, self.key[first])) if k - self.layout.period in self.core else None
            if earlier is None:
                break
            first = earlier
        if first not in self.region and self.iteration[first] not in self.core or self.unit(first) != 0:
            return None
        orbit = [first]
        while len(orbit) < self.layout.units and self.counterpart(orbit[-1]) is not None:
            orbit.append(self.counterpart(orbit[-1]))
        return orbit if len(orbit) == self.layout.units else None

    def reduces(self, user: fx.Node, node: fx.Node) -> bool:
        """Whether `user` takes `node` in a list holding one value of every unit, each the image of the one before
        (``torch.stack([aux_0, ..., aux_L-1])``)."""
        for arg in [*user.args, *user.kwargs.values()]:
            if isinstance(arg, (list, tuple)) and any(a is node for a in arg):
                seq = [a for a in arg if isinstance(a, fx.Node) and self.iteration.get(a, -1) in self.core]
                if len(seq) % self.layout.units:
                    return False
                q = len(seq) // self.layout.units
                return all(self.counterpart(a) is b for a, b in zip(seq[:-q], seq[q:]))
        return False

    def _match(self, node: fx.Node) -> None:
        """Find `node`'s image: a user of its inputs' counterparts one unit later doing the same with them, the exact
        inputs preferred; for a start, then one taking its unit's state where `node` takes an initial value."""
        anchor = next((self.counterpart(i) for i in node.all_input_nodes if self.iteration[i] == self.iteration[node]),
                      None)
        if anchor is None:
            return
        later = self.iteration[node] + self.layout.period
        starts = node not in self.source and self.unit(node) <= 1
        for lenient in (False, True) if starts else (False,):
            same = _Same(self, node, lenient)
            for c in anchor.users:
                if c in self.region or c in self.source or self.iteration[c] != later or \
                        (c.op, c.target) != (node.op, node.target) or not same(node.kwargs, c.kwargs):
                    continue
                if same(node.args, c.args) or _commutes(node) and len(c.args) == 2 and same(node.args, c.args[::-1]):
                    self.image[node], self.source[c] = c, node
                    return


class _Same:
    """``same(a, b)``: whether argument `b` of a candidate image is argument `a` of `node` one unit later."""

    def __init__(self, loop: _Loop, node: fx.Node, lenient: bool):
        self.loop, self.lenient = loop, lenient
        self.first = loop.core.start + loop.unit(node) * loop.layout.period
        self.state = range(self.first, self.first + loop.layout.period)  # the iterations of the node's own unit

    def initial(self, b) -> bool:
        """Whether `b` may stand where the node takes an initial value: the state its own unit leaves."""
        loop = self.loop
        return self.lenient and isinstance(b, fx.Node) and b not in loop.region and loop.iteration[b] in self.state

    def __call__(self, a, b) -> bool:
        if isinstance(a, fx.Node):
            return b is self.loop.counterpart(a) or self.loop.iteration[a] < self.first and self.initial(b)
        if isinstance(b, fx.Node):
            return self.initial(b)
        if isinstance(a, (list, tuple)):
            return isinstance(b, (list, tuple)) and isinstance(a, tuple) == isinstance(b, tuple) and \
                len(a) == len(b) and all(map(self, a, b))
        if isinstance(a, dict):
            return isinstance(b, dict) and a.keys() == b.keys() and all(self(a[x], b[x]) for x in a)
        if isinstance(a, slice):
            return isinstance(b, slice) and self(a.start, b.start) and self(a.stop, b.stop) and self(a.step, b.step)
        try:
            return type(a) is type(b) and bool(a == b)
        except Exception:  # noqa: BLE001 - a constant that does not compare: not the same
            return False


def _nodes(value) -> list[fx.Node]:
    """The graph nodes in a node's (nested) arguments."""
    if isinstance(value, fx.Node):
        return [value]
    if isinstance(value, (list, tuple)):
        return [n for v in value for n in _nodes(v)]
    if isinstance(value, dict):
        return [n for v in value.values() for n in _nodes(v)]
    return []


def _commutes(node: fx.Node) -> bool:
    """Whether `node` is an addition or multiplication of two operands (in either order)."""
    target = node.target
    name = target if isinstance(target, str) else getattr(target, "__name__", "")
    if isinstance(target, torch._ops.OpOverload):
        name = target._schema.name.split("::")[-1]
    name = name.strip("_").removeprefix("i").removeprefix("r")
    return len(node.args) == 2 and not node.kwargs and name in ("add", "mul")


def _iterations(graph: fx.Graph, blocks: tuple[str, ...], free: set[fx.Node] = frozenset()) \
        -> tuple[dict[fx.Node, int], dict[fx.Node, int]]:
    """``(region, iteration)``: the block index of every node computed in a block (but `free`), and for every node the
    latest block it depends on (-1: none; graph order is a topological order)."""
    index = _BlockIndex(blocks)
    region, iteration = {}, {}
    for node in graph.nodes:
        k = None if node in free else index.owner(node)
        if k is not None:
            region[node] = iteration[node] = k
        else:
            iteration[node] = max((iteration[i] for i in node.all_input_nodes), default=-1)
    return region, iteration


def _shared_inputs(graph: fx.Graph, blocks: tuple[str, ...], layout: Layout,
                   tied: dict[str, tuple[str, ...]] | None = None) -> tuple[str, ...]:
    """Graph inputs and values computed before the stack that every growable unit reads."""
    region, iteration = _iterations(graph, blocks, _free(graph, blocks, layout, tied or {}))
    read = [set() for _ in range(layout.units)]
    for node, k in region.items():
        if k in layout.core():
            u = (k - layout.prefix) // layout.period
            read[u] |= {i for i in node.all_input_nodes if iteration[i] == -1 and i.op != "get_attr"}
    shared = set.intersection(*read)
    return tuple(n.name for n in graph.nodes if n in shared)


def _where(node: fx.Node) -> str:
    """`` (at file, line n, in f: code)`` for the last frame of the node's recorded stack trace outside torch."""
    lines = [line.strip() for line in (node.meta.get("stack_trace") or "").strip().splitlines()]
    frames = [(lines[i], lines[i + 1]) for i in range(len(lines) - 1) if lines[i].startswith("File ")]
    user = [f for f in frames if "/torch/" not in f[0].replace("\\", "/")]
    if not user:
        return ""
    where, code = user[-1]
    return f" (at {where[5:]}: {code})"


class _BlockIndex:
    """Which block a node belongs to, by module path: ``call_module`` targets (symbolic traces, where a block is a
    leaf), ``nn_module_stack`` entries (torch.export) and ``get_attr`` targets (a block's weights)."""

    def __init__(self, blocks: tuple[str, ...]):
        self.index = {b: i for i, b in enumerate(blocks)}

    def find(self, path: str) -> int | None:
        """Index of the block that module path `path` lies in."""
        while True:
            if path in self.index:
                return self.index[path]
            if "." not in path:
                return None
            path = path.rpartition(".")[0]

    def call(self, node: fx.Node) -> tuple[int, str] | None:
        """``(block index, call id)`` of the block call that `node` is part of, or None."""
        if node.op == "call_module":  # export graphs only call _guards_fn, which belongs to no block
            index = self.find(str(node.target))
            return None if index is None else (index, node.name)
        if node.op not in ("call_function", "call_method"):
            return None
        for key, value in (node.meta.get("nn_module_stack") or {}).items():
            index = self.index.get(str(value[0]).split("@")[0])
            if index is not None:
                return index, key
        return None

    def owner(self, node: fx.Node) -> int | None:
        """Index of the block that `node` computes in or reads a weight of, or None."""
        call = self.call(node)
        if call is not None:
            return call[0]
        return self.find(str(node.target)) if node.op == "get_attr" else None
