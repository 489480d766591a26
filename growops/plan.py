"""The plan: what growops found in a model and how it will grow it, decided before anything changes.

``growops.plan(model)`` traces the model, finds its block stack(s) (``growops.fx.analysis``), sorts the values that
differ between units (``growops.values``) and probes how the forward reaches the blocks. The result prints as a
summary a user can check; ``apollo(model, ..., plan=p)`` applies it, and ``p.declare(...)`` settles values growops
could not decide::

    >>> p = growops.plan(model)
    >>> print(p)
    growops plan: container mode, L = 12
      transformer.h: 12 growable blocks (transformer.h.0..transformer.h.11)
        per layer: attn.layer_idx = (0, 1, 2, ...)

Modes: ``"container"`` when the forward iterates the container (``for block in self.layers``, a slice, or
``range(len(self.layers))`` with indexing), so the container itself runs the positions; ``"graph"`` when it reaches
its blocks some other way (``self.layers[i]`` for ``i in range(self.n_layer)``), so an FX graph with a depth gate runs
instead (needs ``torch.fx.symbolic_trace``).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.nn.utils.prune import BasePruningMethod

from .errors import GrowopsError, GrowopsTypeError, warn
from .fx.analysis import BlockStack, analyse, call_sequence
from .fx.passes import insert_depth_gate
from .fx.trace import example_inputs_for, graph_trace, trace_model
from .stack import STACK_ATTR, StackRuntime, can_share, deep_copy, share, unshare
from .structure import Layout, block_containers, difference, find_layout, join, module_signature
from .values import MISSING, classify, read

MODES = ("container", "graph")


@dataclass(frozen=True)
class Plan:
    """Which stacks grow (their fixed blocks and growable units, per-layer values) and how the model runs them."""

    stacks: tuple[BlockStack, ...]  # the stacks grown together, outermost first
    mode: str  # "container" (the container runs the positions) or "graph" (a rewritten graph does)
    probed: tuple = field(default=(), compare=False, repr=False)  # (id of the model, mode) the probe found

    @property
    def layers(self) -> int:
        """L: growable units per stack (every stack has the same)."""
        return self.stacks[0].layers

    @property
    def paths(self) -> tuple[str, ...]:
        """The module paths of the stacks this plan grows, e.g. ``("transformer.h",)``."""
        return tuple(s.path for s in self.stacks)

    def __str__(self) -> str:
        lines = [f"growops plan: {self.mode} mode, L = {self.layers}"]
        for s in self.stacks:
            lines.append(f"  {s.describe()}")
            lines += [f"    fixed {reason}" for reason in s.fixed_reasons]
            lines += [f"    per layer: {p} = {_short(v)}" for p, v in s.per_layer_values.items()]
            lines += [f"    undecided: {p} = {_short(v)}" for p, v in s.undecided_values.items()]
        return "\n".join(lines)

    def declare(self, per_layer: Sequence[str] = (), constant: Sequence[str] = ()) -> Plan:
        """A copy with values settled by their path inside a unit (as ``print(plan)`` shows them): those in
        `per_layer` are given per position (each position keeps its own, e.g. a KV cache kept in a block), those in
        `constant` are part of the block like its weights (shared by the positions that run it). ``apollo`` checks
        that the paths exist."""
        if isinstance(per_layer, str) or isinstance(constant, str):
            raise GrowopsTypeError("declare takes lists of paths: declare(per_layer=['attn.cache'])")
        stacks = []
        for s in self.stacks:
            found = {**s.per_layer_values, **s.undecided_values}
            per = {p: v for p, v in s.per_layer_values.items() if p not in constant}
            per |= {p: found.get(p, ()) for p in per_layer}
            undecided = {p: v for p, v in s.undecided_values.items() if p not in per_layer and p not in constant}
            stacks.append(dataclasses.replace(s, per_layer_values=per, undecided_values=undecided,
                                              constant_values=tuple(dict.fromkeys([*s.constant_values, *constant]))))
        return Plan(tuple(stacks), self.mode, self.probed)


def make_plan(model: nn.Module, stack: str | Sequence[str] | None = None, example_inputs: Any = None) -> Plan:
    """Analyse `model` without changing it (see the module docstring); raise a GrowopsError naming what is missing."""
    example_inputs_for(model, example_inputs)  # refuses inputs of a wrong type even where tracing needs none
    stacks = find_stacks(model, stack, example_inputs)
    containers = block_containers(model)
    leaves = {model.get_submodule(b) for blocks, _ in containers.values() for b in blocks}
    probe_failures: list[str] = []
    mode = _probe_mode(model, stacks, leaves, example_inputs, probe_failures)
    if mode == "graph":
        try:
            _check_graph_mode(model, stacks)
        except GrowopsError as e:
            if not probe_failures:
                raise
            # Why the container could not run fewer positions says more than graph mode's failure alone.
            paths = ", ".join(s.path for s in stacks)
            raise GrowopsError(
                f"growops cannot change the depth of {type(model).__name__}: with fewer positions in {paths} its "
                f"forward fails ({probe_failures[0]}), so it reaches the blocks by an index of its own (`for i in "
                "range(self.n_layer): self.layers[i]`) or looks the loop index up in a table built for every layer "
                f"(a fixed block after the growable ones, say); and rewriting its graph failed: {e}. Iterate the "
                "container in forward (`for block in self.layers: ...`) with code after the loop that does not "
                "depend on the depth, or grow a core that ends before such code (stack='path[a:b]')") from None
    return Plan(stacks, mode, (id(model), mode))


def resolve_plan(model: nn.Module, plan: Plan | None = None, stack: str | Sequence[str] | None = None,
                 example_inputs: Any = None) -> Plan:
    """The plan ``apollo`` applies: `plan` checked against `model`, or a new one; refused while a value is undecided.
    Raises ``NeedsInputs`` (a GrowopsError) when `model` cannot be traced without inputs and none were given."""
    if plan is None:
        plan = make_plan(model, stack, example_inputs)
    else:
        check_plan(model, plan, example_inputs)
        if stack is not None:
            raise GrowopsError("pass stack= to growops.plan(model, stack=...), not with plan=: the plan already "
                               f"chose {plan.paths}")
    refuse_undecided(plan)
    return plan


def find_stacks(model: nn.Module, stack: str | Sequence[str] | None = None,
                example_inputs: Any = None) -> tuple[BlockStack, ...]:
    """The block stacks a plan grows (chosen by `stack=` where there are several), with their per-layer values,
    whatever way the forward reaches them; a GrowopsError naming what is missing."""
    if not isinstance(model, nn.Module):
        raise GrowopsTypeError(f"growops plans an nn.Module, got {type(model).__name__}")
    _refuse_wrapped(model)
    containers = block_containers(model)
    wanted, layouts = _wanted(model, stack, containers)
    leaves = {model.get_submodule(b) for blocks, _ in containers.values() for b in blocks}
    traced = trace_model(model, leaves, example_inputs)
    found, notes = analyse(traced.graph_module, model, layouts, keep=wanted)
    chosen = _choose(model, found, notes, wanted)
    for s in chosen:
        _check_blocks(model, s)
    _check_ties(model, chosen)
    stacks = tuple(_with_values(model, s) for s in chosen)
    if len({s.layers for s in stacks}) > 1:
        listing = ", ".join(f"{s.path} ({s.layers})" for s in stacks)
        raise GrowopsError(f"stacks grown together must have the same number of growable blocks, got {listing}: "
                           "grow one stack (stack='...'), or give them equal depths")
    if any(not s.path for s in stacks):
        raise GrowopsError(f"{type(model).__name__} is itself the block container: wrap it in a module that holds it "
                           "as an attribute (e.g. self.blocks) and calls it")
    return stacks


def check_plan(model: nn.Module, plan: Plan, example_inputs: Any = None) -> None:
    """Raise a GrowopsError unless `plan` describes `model` (its stacks, children, per-layer values and mode)."""
    if not isinstance(plan, Plan):
        raise GrowopsTypeError(f"plan= takes a growops.plan(model) result, got {type(plan).__name__}")
    if plan.mode not in MODES:
        raise GrowopsError(f"plan mode must be one of {MODES}, got {plan.mode!r}")
    _refuse_wrapped(model)
    if not plan.stacks or len(set(plan.paths)) != len(plan.paths) or len({s.layers for s in plan.stacks}) > 1:
        raise GrowopsError(f"the plan must name one or more distinct stacks of one L, got {plan.paths}")
    modules = dict(model.named_modules())
    for s in plan.stacks:
        if s.path not in modules:
            raise GrowopsError(f"the plan's stack {s.path!r} is not a module of {type(model).__name__}")
        children = tuple(f"{s.path}.{n}" if s.path else n for n in modules[s.path]._modules)
        if children != s.blocks or s.layout.size != len(children):
            raise GrowopsError(f"the plan's stack {s.path} lists {len(s.blocks)} blocks, the model holds "
                               f"{len(children)} there: was the plan made for another model?")
        sigs = [module_signature(modules[b]) for b in s.blocks]
        for u in range(1, s.layers):
            for i, j in zip(s.layout.unit(0), s.layout.unit(u)):
                if sigs[i] != sigs[j]:
                    raise GrowopsError(f"the plan grows {s.blocks[j]} from {s.blocks[i]}, but "
                                       f"{difference(modules[s.blocks[i]], modules[s.blocks[j]])}")
        unit = [modules[b] for b in s.unit(0)]
        for path in [*s.per_layer_values, *s.constant_values]:
            try:
                found = read(unit, path) is not MISSING
            except (AttributeError, ValueError, IndexError):
                found = False
            if not found:
                raise GrowopsError(f"the plan's value {path!r} is not in {s.path}'s blocks (a path inside a unit, as "
                                   "print(plan) shows them)")
    for s in plan.stacks:
        _check_blocks(model, s)
    _check_ties(model, list(plan.stacks))
    if plan.mode == "container" and plan.probed != (id(model), "container"):  # not probed on this model
        leaves = {modules[b] for s in plan.stacks for b in s.blocks}
        if _probe_mode(model, plan.stacks, leaves, example_inputs) != "container":
            raise GrowopsError(f"the plan runs {', '.join(plan.paths)} in container mode, but this model's forward "
                               "does not reach its blocks by iterating the container: use growops.plan(model) on this "
                               "model (graph mode)")


def refuse_wrapped(model: nn.Module, what: str) -> None:
    """Raise when `model` is (or holds) a model a growops wrapper manages: `what` (``deepen``, ``widen``) grows a
    plain model, which ``a.export()`` gives."""
    wrapped = [name for name, m in model.named_modules() if STACK_ATTR in m.__dict__]
    if wrapped:
        raise GrowopsError(f"{wrapped[0] or type(model).__name__} is managed by a growops wrapper, whose blocks run "
                           f"shared: {what} grows a plain model. Use {what}(a.export(), ...)")


def _refuse_wrapped(model: nn.Module) -> None:
    wrapped = [name for name, m in model.named_modules() if STACK_ATTR in m.__dict__ or
               any(getattr(h, "growops_pending", lambda: False)() for h in m._forward_pre_hooks.values())]
    if wrapped:
        raise GrowopsError(f"{wrapped[0] or type(model).__name__} is already managed by a growops.apollo wrapper: wrap "
                           "the original model once (several stacks together: stack=('encoder.layers', "
                           "'decoder.layers')); to grow a grown model again, wrap a.export()")


def _wanted(model: nn.Module, stack, containers: dict) -> tuple[tuple[str, ...], dict[str, Layout]]:
    """The container paths asked for with ``stack=`` (checked), or () for "find it", and the layouts of those given
    with a slice (``"model.layers[2:]"``: the growable core lies in children 2 and on, the others are fixed)."""
    if stack is None:
        if not containers:
            raise GrowopsError(f"no repeated block stack in {type(model).__name__}: searched every module for one "
                               "whose children repeat (two or more structurally identical blocks: same classes, "
                               "parameter names and shapes, or a repeating pattern of them in an nn.ModuleList / "
                               "nn.Sequential) and found none; growops needs a stack of blocks, e.g. an nn.ModuleList"
                               f"{_near_misses(model)}")
        return (), {}
    specs = (stack,) if isinstance(stack, str) else tuple(stack) if isinstance(stack, (tuple, list)) else None
    if not specs or not all(isinstance(p, str) for p in specs):
        raise GrowopsTypeError(f"stack= takes a container's module path or a tuple of them, got {stack!r}")
    modules = dict(model.named_modules())
    paths, layouts = [], {}
    for spec in specs:
        path, window = _parse_spec(spec)
        if path in paths:
            raise GrowopsError(f"stack= names {path} twice ({stack!r}): name each container once")
        paths.append(path)
        if window is not None and path in modules:
            layouts[path] = _layout_within(modules[path], spec, window)
        if path in containers or path in layouts:
            continue
        if path not in modules:
            raise GrowopsError(f"stack={path!r} is not a module of {type(model).__name__}; candidates: "
                               f"{sorted(containers)}")
        raise GrowopsError(f"stack={path!r} is not a container of repeated blocks in {type(model).__name__}"
                           f"{_why_not_container(modules[path], path)}; candidates: {sorted(containers)}")
    return tuple(paths), layouts


def _parse_spec(spec: str) -> tuple[str, slice | None]:
    """``"model.layers[2:]"`` -> ``("model.layers", slice(2, None))``; a plain path has no slice."""
    match = re.fullmatch(r"(.*)\[(-?\d*):(-?\d*)\]", spec)
    if match is None:
        return spec, None
    start, stop = (int(x) if x else None for x in match.group(2, 3))
    return match.group(1), slice(start, stop)


def _layout_within(container: nn.Module, spec: str, window: slice) -> Layout:
    """The layout whose growable core is the repeating pattern found within `window` of the container's children."""
    children = list(container.children())
    start, stop, _ = window.indices(len(children))
    inner = find_layout([module_signature(c) for c in children[start:stop]])
    if inner is None:
        raise GrowopsError(f"stack={spec!r}: children {start}..{stop - 1} hold no repeating blocks (two or more "
                           "structurally identical blocks, or a repeating pattern of them)")
    return Layout(start + inner.prefix, inner.period, inner.units, len(children) - stop + inner.suffix)


def _near_misses(model: nn.Module) -> str:
    """Why the lists of blocks in `model` hold no repeated blocks: the first difference between neighbours."""
    found = []
    for path, module in model.named_modules():
        children = list(module.named_children())
        if len(children) >= 2 and all(n.isdigit() for n, _ in children):
            (_, first), (name, second) = children[0], children[1]
            found.append(f"{join(path, name)} differs from {join(path, children[0][0])}: {difference(first, second)}")
    return f" ({'; '.join(found[:3])})" if found else ""


def _why_not_container(module: nn.Module, path: str) -> str:
    children = list(module.named_children())
    if len(children) < 2:
        return f" (it has {len(children)} child module{'s' if len(children) != 1 else ''})"
    names = [n for n, _ in children]
    if not all(n.isdigit() for n in names):
        first = children[0][1]
        for name, child in children[1:]:
            if module_signature(child) != module_signature(first):
                return f" (its children differ: {join(path, name)}: {difference(first, child)})"
    (_, first), (name, second) = children[0], children[1]
    return (f" (no pattern of its children repeats; {join(path, name)} differs from {join(path, children[0][0])}: "
            f"{difference(first, second)})")


def _choose(model: nn.Module, found: list[BlockStack], notes: list[str], wanted: tuple[str, ...]) -> list[BlockStack]:
    why = "; ".join(notes) or "none"
    if wanted:
        by_path = {s.path: s for s in found}
        for path in wanted:
            if path not in by_path:
                detail = [n for n in notes if n.startswith(f"{path} (")] or [why]
                raise GrowopsError(f"stack={path!r} is not a chain of blocks in the traced forward: {detail[0]}"
                                   if detail[0] != "none" else f"stack={path!r} is not called as a chain of blocks "
                                   "in the traced forward")
        return [by_path[p] for p in wanted]
    if not found:
        raise GrowopsError(f"no repeated block stack in {type(model).__name__}: containers of repeated blocks were "
                           f"found but none is called as a chain in the traced forward ({why})")
    if len(found) > 1:
        listing = ", ".join(f"{s.path!r} ({s.layers} blocks)" for s in found)
        together = f", or grow them together with stack={tuple(s.path for s in found)!r}" \
            if len({s.layers for s in found}) == 1 else " (stacks grown together need the same number of blocks)"
        raise GrowopsError(f"{type(model).__name__} holds several block stacks: {listing}; choose one with "
                           f"stack='...'{together}")
    return found


def _check_blocks(model: nn.Module, s: BlockStack) -> None:
    """Refuse growable blocks growops cannot read or copy: TorchScript modules, modules that do not deep-copy."""
    unit = [model.get_submodule(b) for b in s.unit(0)]
    for path, block in zip(s.unit(0), unit):
        scripted = [name for name, m in block.named_modules() if isinstance(m, torch.jit.ScriptModule)]
        if scripted:
            raise GrowopsError(f"{join(path, scripted[0])} is a TorchScript module: growops reads and rewrites Python "
                               "modules; script the model after growing it (torch.jit.script(a.export()))")
        try:
            deep_copy(block)
        except Exception as e:  # noqa: BLE001 - export() deep-copies the model: refuse now, not after training
            raise GrowopsError(f"{path} cannot be deep-copied ({type(e).__name__}: {str(e).splitlines()[0]}), and "
                               "a.export() copies the model: keep tensors computed from weights (a weight's view, "
                               "the old torch.nn.utils.weight_norm) out of module attributes, or compute them in "
                               "forward (torch.nn.utils.parametrizations.weight_norm does)") from None


def _check_ties(model: nn.Module, stacks: list[BlockStack]) -> None:
    """Refuse a tensor shared between a growable unit and anything outside that unit (another unit, a fixed block,
    the head), unless every unit holds it at the same path: growth copies weights into a unit in place and would
    write through the tie. A tensor shared inside one unit, or by all units alike, is fine."""
    where = {}  # block path -> (stack index, unit, block of the unit)
    for k, s in enumerate(stacks):
        for u in range(s.layers):
            for r, path in enumerate(s.unit(u)):
                where[path] = (k, u, r)
    names: dict[tuple, list[str]] = {}  # one entry per piece of memory: one tensor, or tensors viewing the same memory
    for name, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]:
        key = ("id", id(t)) if t.device.type == "meta" or not t.numel() else \
            (str(t.device), t.data_ptr(), tuple(t.shape), t.stride())
        names.setdefault(key, []).append(name)
    for tied in (n for n in names.values() if len(n) > 1):
        places = [_place(name, where) for name in tied]
        core = [p for p in places if p is not None]
        if not core:
            continue  # a tie outside the growable units
        units = {p[:2] for p in core}
        inside_one = len(core) == len(places) and len(units) == 1
        stack = stacks[core[0][0]]
        # Held alike by every unit (a copy writes it onto itself), whoever else holds it.
        same_everywhere = len(units) == stack.layers and len({p[2:] for p in core}) * stack.layers == len(core)
        if not (inside_one or same_everywhere):
            raise GrowopsError(f"{tied[0]} and {tied[1]} are one tensor, tied across blocks of {stack.path} or to a "
                               "module outside them: growth copies weights between blocks in place and would write "
                               "through the tie. Untie them before wrapping (e.g. a .clone() of the weight), or tie "
                               "every block alike")


def _place(name: str, where: dict) -> tuple | None:
    """``(stack, unit, block of the unit, path inside the block)`` of a tensor name, or None outside every unit."""
    parts = name.split(".")
    for i in range(len(parts) - 1, 0, -1):
        hit = where.get(".".join(parts[:i]))
        if hit is not None:
            return (*hit, ".".join(parts[i:]))
    return None


def _with_values(model: nn.Module, s: BlockStack) -> BlockStack:
    units = [[model.get_submodule(b) for b in s.unit(u)] for u in range(s.layers)]
    per_layer, undecided = classify(units)
    return dataclasses.replace(s, per_layer_values=per_layer, undecided_values=undecided)


def _probe_mode(model: nn.Module, stacks: tuple[BlockStack, ...], leaves: set, example_inputs: Any,
                failures: list[str] | None = None) -> str:
    """"container" if the forward reaches every stack's blocks through its container, else "graph".

    Probes trace the forward again with each container running unit 0 at a few positions, and the graph must call each
    stack's fixed blocks and unit 0 at exactly those positions (in one pass or several, a block once or several times
    per position). Two positions tell a container that runs positions from one looked up by name
    (``getattr(self.layers, str(i))`` reaches physical blocks); one position catches a forward that indexes up to a
    count of its own (``range(self.n_layer)``), which two positions cannot when L is 2."""
    containers = [model.get_submodule(s.path) for s in stacks]
    if not all(can_share(c) for c in containers):
        return "graph"
    layers = stacks[0].layers
    for depth in (2,) if layers >= 3 else (1, 2):
        try:
            for c, s in zip(containers, stacks):
                runtime = StackRuntime(c, s.layout, path=s.path)
                share(c, runtime)
                runtime.unique, runtime.depth, runtime.layers = 1, depth, depth  # throwaway: the same in any mode
                runtime.active += 1  # the traced forward is a forward: containers see positions
            probe = trace_model(model, leaves, example_inputs)
        except GrowopsError as e:
            if failures is not None:  # why the forward failed with fewer positions: said if graph mode fails too
                failures.append(str(e).rpartition("torch.export failed ")[2].rpartition("; ")[0] or str(e))
            return "graph"
        finally:
            for c in containers:
                unshare(c)
        for s in stacks:
            lay = s.layout
            expected = [*range(lay.prefix), *(list(lay.unit(0)) * depth), *range(lay.core().stop, lay.size)]
            if not _same_calls(call_sequence(probe.graph_module, s.blocks), expected):
                return "graph"
    return "container"


def _check_graph_mode(model: nn.Module, stacks: tuple[BlockStack, ...]) -> None:
    """Graph mode needs a symbolic trace whose chains of block calls a depth gate can replace: try it now, on a
    throwaway graph, so that a plan that prints is a plan that applies."""
    leaves = {model.get_submodule(b) for s in stacks for b in s.blocks}
    gm = graph_trace(model, leaves, False, tuple(s.path for s in stacks))
    for s in stacks:
        try:
            insert_depth_gate(gm, s, runtime=StackRuntime(model.get_submodule(s.path), s.layout, path=s.path))
        except GrowopsError as e:
            raise GrowopsError(f"{s.path}: the forward reaches its blocks other than by iterating it, so growops "
                               f"would rewrite its graph, which needs a plain chain of block calls: {e}. A forward "
                               f"that iterates the container (`for block in self.{s.path.rpartition('.')[2]}: ...`) "
                               "supports more (code between the blocks, collected outputs)") from None


def _same_calls(sequence: list[int], expected: list[int]) -> bool:
    """`sequence` is `expected`, run in k passes or with each call repeated r times (a siamese encoder, b(b(x)))."""
    n = len(expected)
    if not sequence or len(sequence) % n:
        return False
    k = len(sequence) // n
    return sequence == expected * k or sequence == [e for e in expected for _ in range(k)]


def _short(values: tuple) -> str:
    text = ", ".join(_short_value(v) for v in values[:6])
    return f"({text}{', ...' if len(values) > 6 else ''})"


def _short_value(v: Any) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor{tuple(v.shape)}" if v.numel() > 4 else repr(v.tolist())
    text = repr(v)
    return text if len(text) <= 24 else text[:21] + "..."


def refuse_undecided(plan: Plan) -> None:
    """Raise a GrowopsError naming the first value growops could not decide, with the way to declare it."""
    for s in plan.stacks:
        if s.undecided_values:
            path, values = next(iter(s.undecided_values.items()))
            kinds = sorted({type(v).__name__ for v in values})
            raise GrowopsError(
                f"{s.path}: the blocks hold different values at {path} ({', '.join(kinds)} objects growops cannot "
                f"compare), so growops cannot tell whether position i must use block i's (a per-layer value) or any "
                f"block's (part of the block). Declare it: p = growops.plan(model); "
                f"p = p.declare(per_layer=[{path!r}]) (or constant=[...]); growops.apollo(model, ..., plan=p)")


def warn_block_hooks(model: nn.Module, plan: Plan) -> None:
    """Hooks on growable blocks fire wherever a block runs: at every position that shares it, never while it is not
    live. Say so once, naming one, when the model comes with such hooks."""
    for s in plan.stacks:
        for path in (p for u in range(s.layers) for p in s.unit(u)):
            block = model.get_submodule(path)
            hooked = [name for name, m in block.named_modules() if m._forward_hooks or m._backward_hooks or
                      any(not isinstance(h, BasePruningMethod) for h in m._forward_pre_hooks.values())]
            if hooked:
                warn(f"growops: {join(path, hooked[0])} has hooks of yours: they fire wherever its block "
                     "runs while blocks are shared (at every position that shares it, never while it is not "
                     "live yet), not at one layer's position")
                return
