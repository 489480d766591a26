"""Find the block stack of a model in its FX graph.

A *block stack* is a container of L >= 2 structurally identical modules (same classes, parameter names,
shapes and dtypes) whose calls form a chain in the graph: block 0 reads no other block, and block k reads
block k-1 and no other block (directly, or through glue nodes of the parent such as ``getitem``).

Works on graphs from ``torch.fx.symbolic_trace`` (blocks as ``call_module`` leaves) and from
``torch.export`` (blocks inlined; every node tagged with ``nn_module_stack``). Each node of a found stack's
blocks is annotated with ``node.meta["growops_block"] = (stack path, block index)``.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

from torch import fx, nn

_SCALARS = (int, float, str, bool, type(None))


@dataclass(frozen=True)
class BlockStack:
    """A chain of identical blocks found in a graph.

    path: the container's qualified name, e.g. ``"transformer.h"``.
    blocks: the blocks' qualified names in call order, e.g. ``("transformer.h.0", ...)``.
    shared_inputs: graph nodes that every block reads besides the chained hidden state (masks, rotary tables).
    per_layer_values: scalar attributes that differ from block to block, by path inside a block, e.g.
        ``{"attn.layer_idx": (0, 1, 2, 3)}``; growops gives position i the value block i had.
    """

    path: str
    blocks: tuple[str, ...]
    shared_inputs: tuple[str, ...] = ()
    per_layer_values: dict[str, tuple] = field(default_factory=dict, compare=False)

    @property
    def depth(self) -> int:
        return len(self.blocks)


def module_signature(module: nn.Module) -> tuple:
    """What makes two blocks interchangeable: module classes, parameter and buffer names, shapes, dtypes."""
    return (
        tuple((name, type(m)) for name, m in module.named_modules()),
        tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters()),
        tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers()),
    )


def repeated_containers(root: nn.Module) -> dict[str, tuple[str, ...]]:
    """Every module with at least two children, all structurally identical: ``{path: child paths}``."""
    found = {}
    for path, module in root.named_modules():
        children = list(module.named_children())
        if len(children) < 2:
            continue
        first = module_signature(children[0][1])
        if all(module_signature(child) == first for _, child in children[1:]):
            found[path] = tuple(_join(path, name) for name, _ in children)
    return found


def per_layer_attributes(blocks: list[nn.Module]) -> dict[str, tuple]:
    """Scalar attributes (ints, floats, strings) that differ between blocks, such as ``layer_idx``."""
    out = {}
    named = [dict(block.named_modules()) for block in blocks]
    for sub_path, sub in named[0].items():
        for attr, value in vars(sub).items():
            if attr.startswith("_") or not isinstance(value, _SCALARS):
                continue
            values = tuple(getattr(n[sub_path], attr, None) for n in named)
            if len(set(map(repr, values))) > 1:
                out[_join(sub_path, attr)] = values
    return out


def find_block_stacks(gm: fx.GraphModule, root: nn.Module | None = None) -> list[BlockStack]:
    """All block stacks of `gm`, outermost first; `root` is the traced model when `gm` lost its submodules
    (torch.export). Annotates ``node.meta["growops_block"]``. Returns ``[]`` when there is none."""
    return analyse(gm, root)[0]


def analyse(gm: fx.GraphModule, root: nn.Module | None = None) -> tuple[list[BlockStack], list[str]]:
    """``(stacks, notes)``: the stacks found and, for each repeated container rejected, why."""
    root = gm if root is None else root
    containers = repeated_containers(root)
    stacks, notes = [], []
    for path, blocks in containers.items():
        stack, why = _chain(gm.graph, root, path, blocks)
        if stack is not None:
            stacks.append(stack)
        elif not any(_inside(path, b) for other in containers.values() for b in other):
            notes.append(f"{path or '<root>'} ({len(blocks)} x {type(root.get_submodule(blocks[0])).__name__}): {why}")
    # A stack inside a block of another stack (heads inside each layer, say) is not the model's block stack.
    outer = [s for s in stacks if not any(_inside(s.path, b) for o in stacks if o is not s for b in o.blocks)]
    for stack in outer:
        for node in gm.graph.nodes:
            index = _owner(node, stack.blocks)
            if index is not None:
                node.meta["growops_block"] = (stack.path, index)
    return outer, notes


def called_blocks(gm: fx.GraphModule, blocks: tuple[str, ...]) -> list[int]:
    """Indices of the blocks that compute at least one node of the graph (not just hold weights), in graph order."""
    seen = []
    for node in gm.graph.nodes:
        index = _owner(node, blocks) if node.op.startswith("call_") else None
        if index is not None and index not in seen:
            seen.append(index)
    return seen


def _chain(graph: fx.Graph, root: nn.Module, path: str, blocks: tuple[str, ...]):
    """``(BlockStack, None)`` if `blocks` are called as a chain in `graph`, else ``(None, reason)``."""
    region = {}
    for node in graph.nodes:
        index = _owner(node, blocks)
        if index is not None:
            region[node] = index
    missing = sorted(set(range(len(blocks))) - set(region.values()))
    if len(missing) == len(blocks):
        return None, "never called in the traced forward"
    if missing:
        return None, f"blocks {missing} are never called in the traced forward"

    memo: dict[fx.Node, frozenset] = {}

    def sources(node: fx.Node) -> frozenset:
        """Blocks that `node` depends on through nodes outside every block."""
        if node in region:
            return frozenset((region[node],))
        if node not in memo:
            memo[node] = frozenset().union(*(sources(i) for i in node.all_input_nodes))
        return memo[node]

    reads = defaultdict(set)  # block -> blocks it reads
    side = defaultdict(set)  # block -> outside nodes (not derived from any block) it reads
    for node, index in region.items():
        for inp in node.all_input_nodes:
            if region.get(inp) == index:
                continue
            src = sources(inp)
            reads[index] |= src - {index}
            if not src and inp.op != "get_attr":
                side[index].add(inp)
    for k in range(len(blocks)):
        expected = {k - 1} if k else set()
        if reads[k] != expected:
            got = sorted(reads[k]) or "no block"
            return None, (f"not a chain: block {k} reads {got}, expected {sorted(expected) or 'no block'}; "
                          "its blocks must be called one after another, each on the previous one's output")
    shared = set.intersection(*(side[k] for k in range(len(blocks))))
    shared_names = tuple(n.name for n in graph.nodes if n in shared)
    modules = [root.get_submodule(b) for b in blocks]
    return BlockStack(path, blocks, shared_names, per_layer_attributes(modules)), None


def _owner(node: fx.Node, blocks: tuple[str, ...]) -> int | None:
    """Index of the block that `node` belongs to, or None."""
    paths = []
    if node.op in ("call_module", "get_attr"):
        paths.append(str(node.target))
    for value in (node.meta.get("nn_module_stack") or {}).values():
        paths.append(str(value[0]).split("@")[0])
    for p in paths:
        for index, block in enumerate(blocks):
            if _inside(p, block):
                return index
    return None


def _inside(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + ".")


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name
