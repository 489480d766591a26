"""Find the block stacks of a model in its FX graph.

A *block stack* is a block container (see ``growops.structure``) whose children are called as a chain in the graph:
every child is called, no child reads a later one, each core block reads the one before it, and the value of a core
block other than the last flows only into the next block (or, untouched, into the graph's output, as collected
hidden states do). A value that escapes the chain (a weighted sum of every layer's output, a tap on layer k) would
silently change meaning at another depth, so such a container is rejected with the node that reads it.

Values are followed through the parent's glue code (``getitem``, a residual ``x = x + block(x)`` written in the loop):
each node belongs to the *iteration* of the latest block it depends on, and a core block's iteration may only be read
by itself or the next one.

Works on graphs from ``torch.fx.symbolic_trace`` (blocks as ``call_module`` leaves) and from ``torch.export``
(blocks inlined; every node tagged with ``nn_module_stack``). Each node of a found stack's blocks is annotated with
``node.meta["growops_block"] = (stack path, child index)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

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
    stacks, notes = [], []
    for path, (blocks, layout) in containers.items():
        modules = [root.get_submodule(b) for b in blocks]
        twice = next(((blocks[i], blocks[j]) for j in range(len(blocks)) for i in range(j)
                      if modules[i] is modules[j]), None)
        why = (f"{twice[0]} and {twice[1]} are the same module: its blocks already share their weights, and growops "
               "grows stacks of distinct blocks") if twice else _chain(gm.graph, blocks, layout)
        if why is None:
            reasons = tuple(explain_fixed(blocks, modules, layout))
            stacks.append(BlockStack(path, blocks, layout, _shared_inputs(gm.graph, blocks, layout),
                                     fixed_reasons=reasons))
        elif not any(inside(path, b) for other in containers.values() for b in other[0]):
            kind = type(root.get_submodule(blocks[layout.prefix])).__name__
            notes.append(f"{path or '<root>'} ({layout.units} x {kind}): {why}")
    # A stack inside a block of another stack (heads inside each layer, say) is not the model's block stack.
    outer = [s for s in stacks if s.path in keep or
             not any(inside(s.path, b) for o in stacks if o is not s for b in o.blocks)]
    for stack in outer:
        index = _BlockIndex(stack.blocks)
        for node in gm.graph.nodes:
            k = index.owner(node)
            if k is not None:
                node.meta["growops_block"] = (stack.path, k)
    return outer, notes


def call_sequence(gm: fx.GraphModule, blocks: tuple[str, ...]) -> list[int]:
    """The child index of every block *call* in the graph, in graph order (a block run twice appears twice);
    blocks that only hold weights the graph reads do not count."""
    index, sequence, seen = _BlockIndex(blocks), [], set()
    for node in gm.graph.nodes:
        call = index.call(node)
        if call is not None and call not in seen:
            seen.add(call)
            sequence.append(call[0])
    return sequence


def block_regions(graph: fx.Graph, blocks: tuple[str, ...]) -> dict[fx.Node, int]:
    """The index of the block each node of `graph` computes in or reads a weight of, for the nodes that have one."""
    return _iterations(graph, blocks)[0]


def _chain(graph: fx.Graph, blocks: tuple[str, ...], layout: Layout) -> str | None:
    """None if `blocks` are called as a chain in `graph` (see the module docstring), else the reason why not."""
    region, iteration = _iterations(graph, blocks)
    missing = sorted(set(range(len(blocks))) - set(region.values()))
    if len(missing) == len(blocks):
        return "never called in the traced forward"
    if missing:
        return f"{', '.join(blocks[i] for i in missing)} never called in the traced forward"
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
    for k in core[:-1]:
        feeds_next = _ancestors([n for n, j in region.items() if j == k + 1], region)
        for node in graph.nodes:
            if iteration[node] != k:
                continue
            late = [u for u in node.users if iteration[u] > k + 1 and u.op != "output"]
            side = [] if node in region or node in feeds_next else [u for u in node.users if not _collects(u)]
            for user in late + side:
                weight = _weight_read(node, region, k)
                if weight is not None:
                    return (f"the forward reads {weight.target}, a tensor of {blocks[k]}, outside the block "
                            f"(`{user.name}`{_where(user)}): while blocks are shared it would read one block's tensor "
                            "where the positions run others. Read it inside the block")
                return (f"{blocks[k]}'s output is used outside the chain of blocks by `{user.name}`{_where(user)}: "
                        "at another depth that would read another layer's output, or none. growops grows stacks "
                        "whose blocks' outputs only feed the next block or are returned as they are "
                        "(output_hidden_states)")
    return None


def _weight_read(node: fx.Node, region: dict[fx.Node, int], k: int) -> fx.Node | None:
    """The ``get_attr`` of block k's tensor that `node` is (or is computed from, outside the block), if any."""
    todo, seen = [node], set()
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        if n.op == "get_attr" and region.get(n) == k:
            return n
        if n not in region:
            todo.extend(n.all_input_nodes)
    return None


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


def _iterations(graph: fx.Graph, blocks: tuple[str, ...]) -> tuple[dict[fx.Node, int], dict[fx.Node, int]]:
    """``(region, iteration)``: the block index of every node computed in a block, and for every node the latest
    block it depends on (-1: none; graph order is a topological order)."""
    index = _BlockIndex(blocks)
    region, iteration = {}, {}
    for node in graph.nodes:
        k = index.owner(node)
        if k is not None:
            region[node] = iteration[node] = k
        else:
            iteration[node] = max((iteration[i] for i in node.all_input_nodes), default=-1)
    return region, iteration


def _shared_inputs(graph: fx.Graph, blocks: tuple[str, ...], layout: Layout) -> tuple[str, ...]:
    """Graph inputs and values computed before the stack that every growable unit reads."""
    region, iteration = _iterations(graph, blocks)
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
