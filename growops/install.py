"""Apply a plan to a model, and take it off a copy.

``install`` builds one ``StackRuntime`` per planned stack. In container mode each container takes its shared class
(``growops.stack.share``) and the forwards of the container and every module above it are hooked, so the container
knows when a forward runs; in graph mode the model's forward is traced symbolically once per training mode and each
stack's chain of block calls is replaced by a depth gate. ``uninstall`` removes every trace of growops from a deep
copy of the model (classes, hooks, markers, routed linears), which is how ``export`` starts.

Invariant: ``uninstall(copy.deepcopy(model))`` after ``install(model, ...)`` is a plain model of the original class,
with the original state_dict keys and no growops hooks or attributes. An installed model's state dict is written in the
layout ``export`` has (``growops.saved``).
"""

from __future__ import annotations

from torch import fx, nn

from .fx.passes import GATE, insert_depth_gate
from .fx.trace import graph_trace
from .ops.routing import unroute
from .plan import Plan, warn_block_hooks
from .saved import remove_state_hooks, state_hooks
from .stack import StackRuntime, mark, scope_forwards, share, unscope, unshare


def install(model: nn.Module, plan: Plan, growth: str) -> tuple[list[StackRuntime], GraphRunner | None]:
    """Runtimes for `plan`'s stacks, and the graph runner to call instead of the model (graph mode) or None."""
    warn_block_hooks(model, plan)
    runtimes = [StackRuntime(model.get_submodule(s.path), s.layout, s.per_layer_values, growth, s.path,
                             s.constant_values) for s in plan.stacks]
    for s, runtime in zip(plan.stacks, runtimes):
        runtime.guard_blocks()
        ancestors = _ancestors(model, s.path)
        state_hooks(runtime, [(m, ".".join(s.path.split(".")[i:])) for i, m in enumerate(ancestors)])
    if plan.mode == "container":
        for s, runtime in zip(plan.stacks, runtimes):
            share(runtime.container, runtime)
            scope_forwards(runtime, _ancestors(model, s.path))
        return runtimes, None
    leaves = {model.get_submodule(b) for s in plan.stacks for b in s.blocks}
    graphs = {}
    for training in (False, True):
        # Code outside the blocks may read self.training (dropout, say): one graph per mode, shared runtimes.
        gm = graph_trace(model, leaves, training, plan.paths)
        for i, (s, runtime) in enumerate(zip(plan.stacks, runtimes)):
            insert_depth_gate(gm, s, inplace=True, runtime=runtime, name=GATE if i == 0 else f"{GATE}_{i}")
        graphs[training] = gm
    for runtime in runtimes:
        mark(runtime.container, runtime)
    return runtimes, GraphRunner(model, graphs)


def uninstall(model: nn.Module, plan: Plan) -> nn.Module:
    """Take growops off `model` (a deep copy of an installed model) in place; returns it."""
    for s in plan.stacks:
        unshare(model.get_submodule(s.path))
    unscope(model)
    remove_state_hooks(model)
    unroute(model)
    return model


def _ancestors(model: nn.Module, path: str) -> list[nn.Module]:
    """The modules from the root down to the module at `path` (never the root: find_stacks refuses a root container),
    both included."""
    parts = path.split(".")
    return [model.get_submodule(".".join(parts[:i])) for i in range(len(parts) + 1)]


class GraphRunner:
    """Graph mode: the model's forward as FX graphs with the block chains replaced by gates, one per training mode,
    run on the model's *current* tensors and modules (``model.to()``, a reassigned buffer or a replaced block
    replaces objects, which a GraphModule would otherwise keep stale copies of)."""

    def __init__(self, model: nn.Module, graphs: dict[bool, fx.GraphModule]):
        self.model, self.graphs = model, graphs
        self._bound: dict[bool, tuple[tuple[int, ...], fx.GraphModule]] = {}

    def __call__(self, *args, **kwargs):
        mode = self.model.training
        template = self.graphs[mode]
        attrs = [n.target for n in template.graph.nodes if n.op == "get_attr"]
        modules = [n.target for n in template.graph.nodes if n.op == "call_module" and not n.target.startswith(GATE)]
        current = [_resolve(self.model, t) for t in attrs] + [self.model.get_submodule(t) for t in modules]
        ids = tuple(map(id, current))
        bound = self._bound.get(mode)
        if bound is None or bound[0] != ids:
            root = dict(zip(attrs + modules, current))
            for node in template.graph.nodes:
                if node.op == "call_module" and node.target.startswith(GATE):
                    root[node.target] = getattr(template, node.target)
            bound = self._bound[mode] = (ids, fx.GraphModule(root, template.graph, type(self.model).__name__))
        return bound[1](*args, **kwargs)

    def __getstate__(self):
        return {"model": self.model, "graphs": self.graphs, "_bound": {}}


def _resolve(model: nn.Module, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(owner), attr)
