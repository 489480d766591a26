"""Find a block's residual branches in an FX graph, and the parameters that switch each branch off.

A *residual block* computes ``h -> h + f1(...) + f2(...) + ...``: its hidden-state output is reached from its
hidden-state input through additions only (the *stream*; dtype casts and copies of the stream count as the stream),
and every other operand of those additions is a *branch*. A branch *vanishes* when its last parametrised op is
linear in parameters of the block that can be set to zero: a ``Linear``/``Conv1D``/conv (weight and bias), a
``linear``/``addmm``/``matmul`` on a weight, a multiplication by a parameter (a layer scale), with only ops that keep
zero at zero after it (dropout, views, reshapes, casts, scaling, activations with f(0) = 0) and parameter additions
(a separate bias) on the way.

A residual written around the block in the parent's loop (``x = x + block(x)``) makes the whole block one branch.

Invariant of ``branch_zeros``: setting every returned parameter of the block to zero makes each branch exactly zero,
so the block returns its hidden-state input unchanged (``h + 0 + 0``): inserting such a block preserves the function
of the model at any depth (LLaMA Pro's block expansion, found for any architecture). Anything else (a block whose
output normalises the stream, as BERT's post-norm does; a branch ending in an op that does not vanish) raises a
GrowopsError naming the node.

Works on graphs traced through the blocks: ``torch.fx.symbolic_trace`` (``torch.nn`` layers as ``call_module``
leaves) and ``torch.export`` (aten ops, weights as ``get_attr``).
"""

from __future__ import annotations

import operator

import torch
from torch import fx, nn

from ..errors import GrowopsError
from .analysis import BlockStack, block_regions

_ADDS = {operator.add, operator.iadd, torch.add, torch.Tensor.add, "add", "add_", "__add__", "__radd__"}
# Ops whose output is their first tensor operand's value, cast or copied: the stream may pass through them.
_SAME = {"to", "type", "type_as", "float", "contiguous", "clone", "alias", "detach", "_to_copy"}
# Ops that keep zero at zero in their first tensor operand (a branch may end in them after its vanishing op).
_KEEPS_ZERO = _SAME | {"dropout", "native_dropout", "feature_dropout", "alpha_dropout", "view", "reshape",
                       "_unsafe_view", "flatten", "unflatten", "transpose", "permute", "squeeze", "unsqueeze", "expand",
                       "getitem", "t", "div", "truediv", "neg", "_assert_tensor_metadata", "view_as", "reshape_as",
                       "tanh", "relu", "gelu", "silu", "leaky_relu", "elu", "hardtanh", "relu6"}
_MULS = {"mul", "mul_", "__mul__", "__rmul__"}
_RESHAPES = {"view", "reshape", "_unsafe_view", "view_as", "reshape_as"}
_LINEAR_FUNCTIONS = {"linear", "addmm", "matmul", "mm", "bmm", "conv1d", "conv2d", "conv3d", "convolution",
                     "baddbmm", "einsum"}
# Modules that keep zero at zero: dropouts, and activations with f(0) = 0.
_ZERO_MODULES = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity, nn.Tanh, nn.ReLU,
                 nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.Hardtanh, nn.ReLU6)


def _name(node: fx.Node) -> str:
    """The op's short name: ``aten.add.Tensor`` -> ``add``, ``operator.add`` -> ``add``, a method -> its name."""
    target = node.target
    if isinstance(target, str):
        return target
    if isinstance(target, torch._ops.OpOverload):
        return target._schema.name.split("::")[-1]
    if isinstance(target, torch._ops.OpOverloadPacket):
        return target._qualified_op_name.split("::")[-1]
    return getattr(target, "__name__", str(target)).strip("_") if target not in _ADDS else "add"


def _is_add(node: fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and (node.target in _ADDS or _name(node) in ("add", "add_")) \
        and len(_tensors(node)) == 2


def _tensors(node: fx.Node) -> list[fx.Node]:
    """The node operands of `node` (positional, then keyword), in order."""
    return [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]


def branch_zeros(gm: fx.GraphModule, stack: BlockStack, index: int, root: nn.Module | None = None) -> list[str]:
    """Parameter names, relative to block `index` of `stack`, whose zeroing turns the block into the identity on its
    hidden state (see the module docstring for what holds). `root`: the traced model when `gm` lost its submodules.
    Raises a GrowopsError naming the node when the block is not a residual block whose branches vanish."""
    root = gm if root is None else root
    block = stack.blocks[index]
    region = {n for n, k in block_regions(gm.graph, stack.blocks).items() if k == index}
    if not region:
        raise GrowopsError(f"{block} is not traced through: growops sees it as one call and cannot find its residual "
                           "branches (torch.nn containers such as nn.Sequential are leaves of torch.fx's tracer)")
    output = _hidden_output(gm.graph, region, block)
    stream: dict[fx.Node, bool] = {}

    def on_stream(node: fx.Node) -> bool:
        """Whether `node` carries the block's input stream: outside the block, or reached from there through
        additions (exactly one operand on the stream) and same-value ops."""
        if node not in region:
            return True
        if node not in stream:
            stream[node] = False  # no cycles in a graph; guards the recursion anyway
            if _is_add(node):
                stream[node] = sum(on_stream(t) for t in _tensors(node)) == 1
            elif _name(node) in _SAME and node.op != "call_module" and _tensors(node):
                stream[node] = on_stream(_tensors(node)[0])
            elif _name(node) in _RESHAPES and _tensors(node) and _known(node) and _known(_tensors(node)[0]):
                stream[node] = on_stream(_tensors(node)[0])  # views of the stream (OPT flattens it and back)
        return stream[node]

    source = output
    while source in region and on_stream(source):  # back along the stream to the block's input
        source = next(t for t in _tensors(source) if on_stream(t)) if _is_add(source) else _tensors(source)[0]
    if on_stream(output) and _known(output) and not _same_shape(output, source):
        stream[output] = False  # views of the stream that do not come back to its shape
    if not on_stream(output):
        glue = _glue_residual(output, region)
        if glue is not None:  # `x = x + block(x)` written around the block: the whole block is the branch
            return _vanish(gm, root, region, block, output, glue)
        raise GrowopsError(
            f"{block} is not a residual block: its output `{output.name}`{_where(output)} is not its input plus "
            "branches (a post-norm block normalises the sum, as BERT's does), so no zero-initialised branch makes it "
            "the identity. Use method='interpolate' or 'stack'")
    names: list[str] = []
    node, seen = output, set()
    todo = [output]
    while todo:
        node = todo.pop()
        if node not in region or node in seen:
            continue
        seen.add(node)
        if _is_add(node):
            for operand in _tensors(node):
                if on_stream(operand):
                    todo.append(operand)
                else:
                    names += _vanish(gm, root, region, block, operand, node)
        elif _tensors(node):
            todo.append(_tensors(node)[0])
    if not names:
        raise GrowopsError(f"{block} has no residual branch that growops can switch off: its output "
                           f"`{output.name}` is its input passed through")
    return list(dict.fromkeys(names))


def _glue_residual(output: fx.Node, region: set[fx.Node]) -> fx.Node | None:
    """The addition after the block of its output and its input (a residual written in the parent's loop), if any."""
    inputs = {i for n in region for i in n.all_input_nodes if i not in region}
    for user in output.users:
        if user not in region and _is_add(user):
            other = [t for t in _tensors(user) if t is not output]
            if len(other) == 1 and other[0] in inputs:
                return user
    return None


def _known(node: fx.Node) -> bool:
    return isinstance(node.meta.get("val"), torch.Tensor)


def _same_shape(a: fx.Node, b: fx.Node) -> bool:
    """Both nodes' shapes are known (torch.export's ``val``) and equal."""
    va, vb = a.meta.get("val"), b.meta.get("val")
    return isinstance(va, torch.Tensor) and isinstance(vb, torch.Tensor) and va.shape == vb.shape


def _hidden_output(graph: fx.Graph, region: set[fx.Node], block: str) -> fx.Node:
    """The block's hidden-state output: its one tensor value read after the block that the rest of the model goes on
    from (ties broken towards a value read by later code at all). A cast of a value from before the block made inside
    it (``position_embeddings.to(device)``, which the next block reads too) is not an output of the block."""
    outside = [n for n in graph.nodes if n in region and n.op != "get_attr"
               and any(u not in region for u in n.users)
               and not (_name(n) in _SAME and _tensors(n) and all(t not in region for t in _tensors(n)))]
    later = [n for n in outside if any(u not in region and u.op != "output" for u in n.users)]
    candidates = later or outside
    if len(candidates) != 1:
        names = ", ".join(f"`{n.name}`" for n in candidates) or "none"
        raise GrowopsError(f"cannot tell {block}'s hidden-state output: the model reads {names} from it")
    return candidates[0]


def _vanish(gm: fx.GraphModule, root: nn.Module, region: set[fx.Node], block: str, end: fx.Node,
            add: fx.Node) -> list[str]:
    """Names (relative to `block`) of the parameters whose zeroing makes the branch ending at `end` zero."""
    prefix = f"{block}."
    node, zeroed = end, []
    while True:
        if node not in region:
            break
        params = [t for t in _tensors(node) if t.op == "get_attr" and str(t.target).startswith(prefix)]
        name = _name(node)
        if node.op == "call_module":
            module = root.get_submodule(str(node.target))
            if isinstance(module, _ZERO_MODULES) and node.args and isinstance(node.args[0], fx.Node):
                node = node.args[0]
                continue
            if _linear_module(module):
                inner = str(node.target)[len(prefix):] if str(node.target) != block else ""
                return zeroed + [f"{inner}.{p}" if inner else p for p, _ in module.named_parameters()]
            break
        if node.op == "call_method" or node.op == "call_function":
            if name in _LINEAR_FUNCTIONS and params:
                return zeroed + [str(p.target)[len(prefix):] for p in params]
            if name in _MULS and params:  # a layer scale: output * gamma
                return zeroed + [str(params[0].target)[len(prefix):]]
            if _is_add(node) and len(params) == 1:  # a bias added on its own: zero it, follow the other operand
                zeroed.append(str(params[0].target)[len(prefix):])
                node = next(t for t in _tensors(node) if t is not params[0])
                continue
            if _is_add(node) and not params:  # a sum of branches (GPT-J's parallel attention and MLP): each vanishes
                return zeroed + [n for t in _tensors(node) for n in _vanish(gm, root, region, block, t, add)]
            if name in _MULS:
                node = _zero_side(node, region, prefix)
                if node is not None:
                    continue
            elif name in _KEEPS_ZERO and node.args and isinstance(node.args[0], fx.Node):
                node = node.args[0]  # zero in, zero out: for the first operand only (1 / x is no such op)
                continue
        break
    where = f"`{node.name}`{_where(node)}" if node in region else "outside the block"
    raise GrowopsError(
        f"{block}'s residual branch `{end.name}` (added at `{add.name}`) does not end in a layer growops can zero: "
        f"walking back from it reached {where}. Zero-initialised insertion needs each branch to end in a "
        "Linear/Conv1D/conv, a matmul on a weight or a multiplication by a parameter; use method='interpolate' or "
        "'stack'")


def _zero_side(node: fx.Node, region: set[fx.Node], prefix: str) -> fx.Node | None:
    """For a product inside a branch: the operand that comes from a parametrised op of the block (zero it and the
    product is zero), the first such in argument order."""
    for t in _tensors(node):
        if t in region and t.op != "get_attr":
            return t
    return None


def _linear_module(module: nn.Module) -> bool:
    """A module whose output is zero when its parameters are (weight and bias): Linear, conv, HF's Conv1D."""
    if isinstance(module, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return True
    return type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers.")


def _where(node: fx.Node) -> str:
    from .analysis import _where as where

    return where(node)


def zero_branches(block: nn.Module, names: list[str]) -> None:
    """Set the named parameters of `block` to zero in place (``branch_zeros``'s result)."""
    with torch.no_grad():
        for name in names:
            block.get_parameter(name).zero_()
