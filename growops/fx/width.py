"""The width plan: how each parameter of a model is filled when its widths grow, read from the model's FX graph.

Widening (Net2Net's Net2WiderNet, bert2BERT's function-preserving initialisation) gives every grown dimension a
*unit map*: new unit j of a dimension of `old` units runs old unit ``map[j]``. One rule serves every dimension, so
that all tensors that meet along a width (a Linear's output and the next Linear's input, the residual stream's every
writer and reader, a norm's weight) agree without knowing which is which: tiling, ``map[j] = j mod old``; a dimension
that holds c > 1 pieces of the hidden width (a fused q|k|v projection, 3 x hidden) is tiled piece by piece. Tiling
a width of attention heads duplicates whole heads, so the head size never changes and neither does attention.

How a parameter is filled along a grown dimension follows from its uses in the graph:
- *copied* (``new[j] = old[map[j]]``) where the dimension is produced: a Linear's output rows, an embedding's
  columns, a norm's weight, a bias;
- *split* (``new[j] = old[map[j]] / count[map[j]]``, count = how many new units run old unit map[j]) where the
  dimension is contracted: a Linear's input columns, so the sum over duplicated inputs adds up to the old sum;
- a tensor used both ways (an embedding tied to the output head) is copied, and the norm that feeds its contraction
  (the final LayerNorm / RMSNorm, or a multiplication by a parameter) is *scaled* per unit by 1 / count instead.

Invariant of ``width_plan`` (checked on a probe input by ``growops.widen``): when every grown dimension grows by a
whole multiple, the widened model computes the old model's activations, each grown one read through its unit map
(normalisation statistics over a tiled vector equal the old ones), hence the same outputs. For other sizes the same
maps are used: linear layers and elementwise activations still preserve what flows through them, normalisation
statistics over a widened dimension do not, so the output moves.

Works on graphs from ``torch.fx.symbolic_trace`` (``torch.nn`` layers as ``call_module``) and ``torch.export``
(aten ops on ``get_attr`` weights). A parameter with a grown dimension used by an op the plan does not know is refused
with the node.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx, nn

from ..errors import GrowopsError
from .residual import _name, _tensors, _where


@dataclass(frozen=True)
class DimGrowth:
    """A dimension grown from `old` to `new` units, tiled in pieces of `piece` old units (``old`` for plain tiling)."""

    old: int
    new: int
    piece: int

    def unit_map(self) -> torch.Tensor:
        """Old unit run by each new unit."""
        pieces = self.old // self.piece
        new_piece = self.new // pieces
        j = torch.arange(self.new)
        return (j // new_piece) * self.piece + (j % new_piece) % self.piece

    def counts(self) -> torch.Tensor:
        """For each new unit, how many new units run its old unit."""
        m = self.unit_map()
        return torch.bincount(m, minlength=self.old)[m]

    @property
    def whole_multiple(self) -> bool:
        """Every old unit runs the same number of times (the function-preserving case)."""
        return len(set(self.counts().tolist())) == 1


@dataclass
class ParamWidth:
    """How one parameter (or buffer) is filled: `grows` maps a dimension to its growth; dimensions in `split` are
    divided by the unit counts (contracted), those in `scale` too (a norm standing in for a tied contraction)."""

    names: tuple[str, ...]
    grows: dict[int, DimGrowth]
    split: set[int] = field(default_factory=set)
    scale: set[int] = field(default_factory=set)

    def fill(self, old: torch.Tensor, power: int = 1) -> torch.Tensor:
        """The widened tensor; `power` 2 divides by the squared counts (for a second moment, as Adam's)."""
        new = old
        for dim, g in self.grows.items():
            new = new.index_select(dim, g.unit_map().to(old.device))
        for dim in self.split | self.scale:
            g = self.grows[dim]
            shape = [1] * new.dim()
            shape[dim] = g.new
            new = new / g.counts().to(device=old.device, dtype=old.dtype).view(shape) ** power
        return new.contiguous()


def dim_growths(old_shapes: dict[str, tuple], new_shapes: dict[str, tuple],
                hidden: tuple[int, int]) -> dict[str, dict[int, DimGrowth]]:
    """Grown dimensions of every tensor, by name: pieces of the hidden width are tiled piece by piece."""
    h, h_new = hidden
    out = {}
    for name, shape in old_shapes.items():
        new = new_shapes.get(name)
        if new is None or len(new) != len(shape):
            raise GrowopsError(f"{name} has shape {tuple(shape)} in the model and {new} in the widened one: growops "
                               "widens tensors, it does not change their rank or their names")
        grows = {}
        for d, (a, b) in enumerate(zip(shape, new)):
            if b < a:
                raise GrowopsError(f"{name} would shrink along dimension {d} ({a} -> {b}): widen only grows")
            if b > a:
                piece = h if a % h == 0 and a // h > 1 and b * h == a * h_new else a
                grows[d] = DimGrowth(a, b, piece)
        out[name] = grows
    return out


def width_plan(gm: fx.GraphModule, root: nn.Module, growths: dict[str, dict[int, DimGrowth]]) -> dict[str, ParamWidth]:
    """How to fill every tensor of `root` (by name; tied names share one entry) given its grown dimensions, from its
    uses in `gm` (a graph of `root`'s forward). Raises a GrowopsError naming the node where a grown parameter is used
    in a way the plan does not know, or a tied contraction has no norm to scale."""
    tensors = _named_tensors(root)
    entries: dict[int, ParamWidth] = {}
    for name, t in tensors.items():
        entry = entries.get(id(t))
        if entry is None:
            entries[id(t)] = ParamWidth((name,), dict(growths.get(name, {})))
        else:
            entry.names += (name,)
    uses = _uses(gm, root, tensors)
    for key, entry in entries.items():
        if not entry.grows:
            continue
        found = uses.get(key, [])
        for node, contracted in found:
            if contracted is None:
                raise GrowopsError(
                    f"{entry.names[0]} grows along dimension(s) {sorted(entry.grows)} and is used by `{node.name}` "
                    f"({_name(node)}){_where(node)}, which growops does not know how to widen: it widens weights used "
                    "by linear/matmul/conv/embedding/normalisation and elementwise ops")
        ndim = tensors[entry.names[0]].dim()
        contracted = [{d % ndim for d in c} & set(entry.grows) for _, c in found]
        split = set().union(*contracted) if contracted else set()
        tied = [d for d in split if any(d not in c for c in contracted)]
        if not tied:
            entry.split = split
            continue
        # Used both ways along a grown dimension (an embedding tied to the head): copy it, and scale what feeds each
        # contraction instead.
        entry.split = split - set(tied)
        for (node, _), c in zip(found, contracted):
            if set(tied) & c:
                for site_key, dim in _scale_sites(node, root, tensors, uses, entry):
                    entries[site_key].scale.add(dim)
    return {e.names[0]: e for e in entries.values()}


def _named_tensors(root: nn.Module) -> dict[str, torch.Tensor]:
    return {**dict(root.named_parameters(remove_duplicate=False)), **dict(root.named_buffers(remove_duplicate=False))}


# A use: (node, the tensor's contracted dimensions, or None for a use the plan does not know).
Use = tuple[fx.Node, "set[int] | None"]
_ELEMENTWISE = {"add", "add_", "sub", "mul", "mul_", "div", "truediv", "layer_norm", "rms_norm", "native_layer_norm",
                "group_norm", "batch_norm", "where", "to", "_to_copy", "type_as", "clone", "detach", "alias",
                "_assert_tensor_metadata", "lerp", "addcmul", "sigmoid", "tanh", "exp", "neg", "pow", "rsqrt"}


def _uses(gm: fx.GraphModule, root: nn.Module, tensors: dict[str, torch.Tensor]) -> dict[int, list[Use]]:
    """For every tensor (by id), the nodes that use it and which of its dimensions each contracts."""
    out: dict[int, list[Use]] = {}
    for node in gm.graph.nodes:
        if node.op == "get_attr" and str(node.target) in tensors:
            t = tensors[str(node.target)]
            for user in node.users:
                out.setdefault(id(t), []).append((user, _contracted(user, node, t.dim())))
        elif node.op == "call_module":
            module = root.get_submodule(str(node.target)) if _has(root, str(node.target)) else None
            if module is None:
                continue
            for pname, p in module.named_parameters(recurse=False):
                out.setdefault(id(p), []).append((node, _module_contracted(module, pname)))
            for b in module.buffers(recurse=False):
                out.setdefault(id(b), []).append((node, set()))
    return out


def _has(root: nn.Module, path: str) -> bool:
    try:
        root.get_submodule(path)
        return True
    except AttributeError:
        return False


def _contracted(user: fx.Node, arg: fx.Node, ndim: int) -> set[int] | None:
    """The dimensions of the tensor `arg` that op `user` contracts (sums over with another tensor's units)."""
    name = _name(user)
    args = list(user.args)
    position = next((i for i, a in enumerate(args) if a is arg), None)
    if name == "linear":
        return {1} if position == 1 else set() if position == 2 else None
    if name == "addmm":
        return {0} if position == 2 else {1} if position == 1 else set()
    if name in ("mm", "matmul", "bmm"):
        return {ndim - 2} if position == 1 else {ndim - 1}
    if name in ("conv1d", "conv2d", "conv3d", "convolution"):
        return {1} if position == 1 else set()
    if name == "embedding":
        return set() if position == _embedding_weight(user) else None
    if name in _ELEMENTWISE:
        return set()
    return None  # any other use, a weight reshaped or transposed before use among them: not followed


def _embedding_weight(node: fx.Node) -> int:
    """Where an embedding op takes its table: ``F.embedding(input, weight)``, ``aten.embedding(weight, indices)``."""
    return 1 if node.target is torch.nn.functional.embedding else 0


def _module_contracted(module: nn.Module, pname: str) -> set[int] | None:
    if isinstance(module, nn.Linear):
        return {1} if pname == "weight" else set()
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return {1} if pname == "weight" else set()
    if type(module).__name__ == "Conv1D" and type(module).__module__.startswith("transformers."):
        return {0} if pname == "weight" else set()
    if isinstance(module, (nn.Embedding, nn.LayerNorm, nn.RMSNorm, nn.GroupNorm,
                           nn.modules.batchnorm._NormBase)):
        return set()
    return None


_PASS = {"view", "reshape", "_unsafe_view", "to", "_to_copy", "contiguous", "clone", "dropout", "alias", "flatten",
         "_assert_tensor_metadata", "type_as"}


def _scale_sites(use: fx.Node, root: nn.Module, tensors: dict[str, torch.Tensor], uses: dict[int, list[Use]],
                 tied: ParamWidth) -> list[tuple[int, int]]:
    """(tensor id, dimension) of the parameters to scale per unit so that the activation contracted with the tied
    tensor at `use` comes in divided by the unit counts: the affine weight (and bias) of the norm that produces it."""
    node = use.args[0] if use.op == "call_module" else _activation(use)
    sites: list[tuple[int, int]] = []
    while isinstance(node, fx.Node):
        name = _name(node)
        if node.op == "call_module":
            module = root.get_submodule(str(node.target))
            if isinstance(module, (nn.Dropout, nn.Identity)):
                node = node.args[0]
                continue
            if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) and module.weight is not None:
                return sites + [(id(p), 0) for p in module.parameters(recurse=False) if _sole(p, uses)]
            break
        params = [a for a in _tensors(node) if a.op == "get_attr" and str(a.target) in tensors]
        if name in ("layer_norm", "rms_norm") and params:
            return sites + [(id(tensors[str(p.target)]), 0) for p in params if _sole(tensors[str(p.target)], uses)]
        if name == "mul" and len(params) == 1:
            return sites + [(id(tensors[str(params[0].target)]), tensors[str(params[0].target)].dim() - 1)]
        if name == "add" and len(params) == 1:
            t = tensors[str(params[0].target)]
            sites.append((id(t), t.dim() - 1))
            node = next(a for a in _tensors(node) if a is not params[0])
            continue
        if name in _PASS and node.args:
            node = node.args[0]
            continue
        break
    where = f"`{node.name}`{_where(node)}" if isinstance(node, fx.Node) else "nothing"
    raise GrowopsError(
        f"{tied.names[0]} (also {', '.join(tied.names[1:]) or 'used elsewhere'}) is used both as an embedding and as "
        f"a weight contracted over the widened dimension at `{use.name}`, so it cannot be split; growops scales the "
        f"norm that feeds that contraction instead, but found {where} there. Untie the weights before widening")


def _activation(use: fx.Node) -> fx.Node | None:
    """The activation contracted with a weight at `use` (``linear(x, W)``, ``addmm(b, x, W)``, ``x @ W``)."""
    name = _name(use)
    if name == "addmm":
        return use.args[1]
    return use.args[0] if isinstance(use.args[0], fx.Node) else None


def _sole(t: torch.Tensor, uses: dict[int, list[Use]]) -> bool:
    """The tensor is used once (a scale site must feed only the contraction it stands in for)."""
    if len(uses.get(id(t), [])) != 1:
        raise GrowopsError("the norm that feeds a tied contraction is used elsewhere too: growops cannot scale it for "
                           "that contraction alone. Untie the weights before widening")
    return True


# ---------------------------------------------------------------- dimension groups, for models without a config
_SAME_SHAPE = {"relu", "gelu", "tanh", "sigmoid", "silu", "dropout", "to", "_to_copy", "float", "contiguous", "clone",
               "neg", "exp", "rsqrt", "sqrt", "pow", "softmax", "_softmax", "log_softmax", "alias", "detach",
               "type_as", "leaky_relu", "elu", "hardtanh", "relu6", "native_dropout", "abs", "square"}
_BROADCAST = {"add", "add_", "sub", "mul", "mul_", "div", "truediv", "where", "maximum", "minimum", "lerp"}
_SAME_SHAPE_MODULES = (nn.Dropout, nn.Identity, nn.ReLU, nn.GELU, nn.Tanh, nn.SiLU, nn.Sigmoid, nn.LeakyReLU, nn.ELU,
                       nn.Softmax)


class _Groups:
    """Union-find over (key, dimension) pairs: a key is a graph node or a tensor's id."""

    def __init__(self):
        self.parent: dict = {}

    def find(self, x):
        self.parent.setdefault(x, x)
        while self.parent[x] != x:
            self.parent[x] = self.parent[self.parent[x]]
            x = self.parent[x]
        return x

    def union(self, a, b):
        self.parent[self.find(a)] = self.find(b)


def _shape(node) -> tuple | None:
    if not isinstance(node, fx.Node):
        return None
    val = node.meta.get("val")
    if isinstance(val, torch.Tensor):
        return tuple(val.shape)
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if hasattr(meta, "shape") else None


def width_groups(gm: fx.GraphModule, root: nn.Module) -> _Groups:
    """Which dimensions must have the same size, from the graph's shapes (``node.meta["val"]`` of torch.export, or
    ``tensor_meta`` from ``ShapeProp``): ops that carry a dimension through (elementwise ops, broadcasting aligned from
    the right, linear / matmul / embedding / normalisation with their weights, transposes) tie it; ops the pass does
    not follow (reshapes into heads, indexing) tie nothing, so widths behind them stay as they are. Returns the
    groups over ``(node or id(tensor), dim)``.

    Invariant: two dimensions in one group have the same size in every consistent widening, so widening a group as
    a whole keeps every op it passes through well-shaped."""
    groups = _Groups()
    tensors = _named_tensors(root)

    def tie(a, da, b, db):
        groups.union((a, da), (b, db))

    def align(a_key, a_shape, b_key, b_shape):
        for i in range(1, min(len(a_shape), len(b_shape)) + 1):
            if a_shape[-i] == b_shape[-i] != 1:
                tie(a_key, len(a_shape) - i, b_key, len(b_shape) - i)

    for node in gm.graph.nodes:
        out = _shape(node)
        if node.op == "get_attr" and str(node.target) in tensors:
            t = tensors[str(node.target)]
            for d in range(t.dim()):
                tie(node, d, id(t), d)
            continue
        if out is None:
            continue
        name = _name(node)
        # Tensors passed by keyword (F.layer_norm's weight and bias in a symbolic trace) follow those passed by place.
        args = [a for a in (*node.args, *node.kwargs.values()) if isinstance(a, fx.Node)]
        shaped = [(a, _shape(a)) for a in args if _shape(a) is not None]
        if node.op == "call_module":
            module = root.get_submodule(str(node.target))
            x, xs = shaped[0] if shaped else (None, None)
            params = dict(module.named_parameters(recurse=False))
            if isinstance(module, nn.Linear) or (type(module).__name__ == "Conv1D" and
                                                 type(module).__module__.startswith("transformers.")):
                w_in, w_out = (1, 0) if isinstance(module, nn.Linear) else (0, 1)
                tie(x, len(xs) - 1, id(params["weight"]), w_in)
                tie(node, len(out) - 1, id(params["weight"]), w_out)
                if params.get("bias") is not None:
                    tie(node, len(out) - 1, id(params["bias"]), 0)
                for d in range(len(out) - 1):
                    tie(node, d, x, d)
            elif isinstance(module, nn.Embedding):
                tie(node, len(out) - 1, id(params["weight"]), 1)
            elif isinstance(module, (nn.LayerNorm, nn.RMSNorm)):
                for d in range(len(out)):
                    tie(node, d, x, d)
                for p in params.values():
                    align(node, out, id(p), tuple(p.shape))
            elif isinstance(module, _SAME_SHAPE_MODULES) and xs == out:
                for d in range(len(out)):
                    tie(node, d, x, d)
            continue
        if node.op not in ("call_function", "call_method"):
            continue
        if name in _SAME_SHAPE and shaped and shaped[0][1] == out:
            for d in range(len(out)):
                tie(node, d, shaped[0][0], d)
        elif name in _BROADCAST:
            for a, s in shaped:
                align(node, out, a, s)
        elif name in ("layer_norm", "rms_norm") and shaped:
            for d in range(len(out)):
                tie(node, d, shaped[0][0], d)
            for a, s in shaped[1:]:
                align(node, out, a, s)
        elif name == "linear" and len(shaped) >= 2:
            (x, xs), (w, _) = shaped[:2]
            tie(x, len(xs) - 1, w, 1)
            tie(node, len(out) - 1, w, 0)
            if len(shaped) > 2:
                tie(node, len(out) - 1, shaped[2][0], 0)
            for d in range(len(out) - 1):
                tie(node, d, x, d)
        elif name == "addmm" and len(shaped) == 3:
            (b, bs), (x, _), (w, _) = shaped
            tie(x, 1, w, 0)
            tie(node, 1, w, 1)
            tie(node, 0, x, 0)
            align(node, out, b, bs)
        elif name in ("matmul", "mm", "bmm") and len(shaped) == 2:
            (a, sa), (b, sb) = shaped
            if len(sa) >= 2 and len(sb) >= 2:
                tie(a, len(sa) - 1, b, len(sb) - 2)
                tie(node, len(out) - 1, b, len(sb) - 1)
                tie(node, len(out) - 2, a, len(sa) - 2)
        elif name == "embedding" and len(node.args) > _embedding_weight(node):
            w = node.args[_embedding_weight(node)]
            if _shape(w) is not None:
                tie(node, len(out) - 1, w, 1)
        elif name in ("transpose", "t") and shaped:
            x, xs = shaped[0]
            dims = [d for d in node.args[1:3] if isinstance(d, int)] if name == "transpose" else [0, 1]
            if len(dims) == 2:
                a, b = (d % len(xs) for d in dims)
                perm = list(range(len(xs)))
                perm[a], perm[b] = perm[b], perm[a]
                for d in range(len(out)):
                    tie(node, d, x, perm[d])
    return groups


def group_growths(groups: _Groups, tensors: dict[str, torch.Tensor], anchor: tuple,
                  new: int) -> dict[str, dict[int, DimGrowth]]:
    """Grown dimensions of every tensor: those in `anchor`'s group (an ``(node, dim)`` pair, e.g. the last dimension
    of a block's hidden output) go from their size to `new`, tiled."""
    target = groups.find(anchor)
    out = {}
    for name, t in tensors.items():
        grows = {}
        for d, size in enumerate(t.shape):
            if (id(t), d) in groups.parent and groups.find((id(t), d)) == target and new != size:
                grows[d] = DimGrowth(size, new, size)
        out[name] = grows
    return out
