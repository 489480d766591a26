"""``growops.apollo``: wrap a model once, train as usual, get the model back grown.

The wrapper keeps the user's model object. It finds the block stack in an FX graph of the model, then
either replaces the block container in place (models whose forward iterates it: Hugging Face, nanoGPT) or,
for models that index their blocks, runs an FX graph whose chain of block calls is replaced by a depth gate.
Either way a ``StackRuntime`` decides which block runs at each position; ``step()`` moves the schedule.
"""

from __future__ import annotations

import copy
import inspect
import warnings
from typing import Any

import numpy as np
import torch
from torch import fx, nn

from .errors import GrowopsError, GrowopsTypeError
from .fx.analysis import BlockStack, analyse, called_blocks, repeated_containers
from .fx.passes import GATE, insert_depth_gate
from .fx.trace import TracedModel, trace_model
from .growth import copy_blocks
from .maps import check_growth, depth_map, growth_sources, preserves_function
from .ops.routing import route_shared_linears, unroute
from .optim_state import check_policy, remap_optimizer_state
from .schedule import SamplerSpec, Schedule, resolve_sampler, step_rng
from .stack import StackRuntime, shared_container

STATE_VERSION = 1
RESAMPLE: tuple[str, ...] = ("step", "micro_batch")


def apollo(model: nn.Module, stages=(1, 3, 6, 12), stage_steps=(2000, 4000, 10000), sampler: SamplerSpec = "lvps",
           growth: str = "interpolate", optimizer_state: str = "reset", seed: int = 0, stack: str | None = None,
           example_inputs: Any = None, resample: str = "step", shared_linear: bool | str = "auto") -> Apollo:
    """Wrap `model` for Apollo progressive training.

    stages: unique blocks per stage, strictly increasing, the last equal to the model's L blocks.
    stage_steps: the optimizer step at which each later stage begins (``len(stages) - 1`` values).
    sampler: ``"lvps"``, ``"uniform"``, ``"full"``, ``"unique"`` or a callable ``(unique, L, rng) -> depth``.
    growth: ``"interpolate"`` or ``"stack"`` (see ``growops.maps``).
    optimizer_state: ``"reset"``, ``"copy"`` or ``"keep"``, applied at growth by ``step(optimizer)``.
    seed: the depth at step t is drawn from a generator seeded by ``(seed, t)``.
    stack: the block container's module path, when the model holds several stacks.
    example_inputs: inputs for ``torch.export`` when the model does not symbolically trace; defaults to the
        model's ``dummy_inputs`` (Hugging Face convention).
    resample: ``"step"`` (one depth per optimizer step, so every micro-batch of a gradient-accumulation step runs
        the same depth) or ``"micro_batch"`` (the authors' code: each training forward draws its own depth, from
        ``(seed, step, k)`` for the k-th forward of the step).
    shared_linear: route the blocks' ``nn.Linear`` / ``Conv1D`` layers through ``growops.ops.shared_linear``, whose
        weight gradients are summed over a shared block's uses in fp32 (autocast sums them in bf16), with the
        ``growops_cuda`` kernel where it builds. ``"auto"`` (default): where CUDA is available; ``True``; ``False``.
    """
    return Apollo(model, stages, stage_steps, sampler, growth, optimizer_state, seed, stack, example_inputs, resample,
                  shared_linear)


class _Forward:
    """``Apollo.forward`` with the wrapped model's signature, so tools that inspect it (Trainer) see the model's."""

    def __init__(self, owner: Apollo, signature: inspect.Signature | None):
        self.owner = owner
        if signature is not None:
            self.__signature__ = signature

    def __call__(self, *args, **kwargs):
        return self.owner._run(*args, **kwargs)


class Apollo(nn.Module):
    """A model under Apollo progressive training; build it with ``growops.apollo``.

    ``a(...)`` takes and returns what the model does. In training it runs ``a.depth`` positions sharing the
    first ``a.unique_layers`` blocks; in evaluation it runs all L positions with the same sharing.
    Call ``a.step(optimizer)`` once per optimizer step.
    """

    def __init__(self, model: nn.Module, stages, stage_steps, sampler: SamplerSpec = "lvps",
                 growth: str = "interpolate", optimizer_state: str = "reset", seed: int = 0,
                 stack: str | None = None, example_inputs: Any = None, resample: str = "step",
                 shared_linear: bool | str = "auto"):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise GrowopsTypeError(f"apollo wraps an nn.Module, got {type(model).__name__}")
        if isinstance(model, Apollo):
            raise GrowopsError("this model is already wrapped by growops.apollo: wrap the original model once")
        if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
            raise GrowopsError(f"seed must be a non-negative int, got {seed!r}")
        self._growth = check_growth(growth)
        self._policy = check_policy(optimizer_state)
        self._sampler_name, self._sampler = resolve_sampler(sampler)
        self._seed = seed
        if resample not in RESAMPLE:
            raise GrowopsError(f"unknown resample {resample!r}: use one of {', '.join(map(repr, RESAMPLE))}")
        self._resample = resample
        if not (isinstance(shared_linear, bool) or shared_linear == "auto"):
            raise GrowopsError(f"shared_linear must be True, False or 'auto', got {shared_linear!r}")

        found, traced = _locate_stack(model, stack, example_inputs)
        self._schedule = Schedule.checked(stages, stage_steps, found.depth)
        self._stack = found
        # Everything that can reject the arguments runs before the model is touched.
        depth = _draw(self._sampler, self._sampler_name, self._schedule.stages[0], found.depth, seed, 0)
        if not found.path:
            raise GrowopsError(f"{type(model).__name__} is itself the block container: wrap it in a module that "
                               "holds it as an attribute (e.g. self.blocks) and calls it")
        _warn_non_multiples(self._schedule.stages, growth)

        self.model = model
        self._swap = None  # (parent, name, original container) when the container was replaced
        self._graph = None  # a _GraphRunner when the model indexes its blocks
        self._install(model, found, traced, example_inputs)
        if shared_linear is True or (shared_linear == "auto" and torch.cuda.is_available()):
            route_shared_linears(self._runtime.blocks, runtime=self._runtime)
        self.forward = _Forward(self, _signature(model))
        self.step_count = 0
        self.stage = 0
        self._runtime.unique = self._schedule.stages[0]
        self._runtime.depth = depth
        self._micro_batch = 0  # training forwards since the last step(), for resample="micro_batch"
        self._warned = set()

    # ---------------------------------------------------------------- public state
    @property
    def depth(self) -> int:
        """Positions run in training at this step (evaluation always runs all L)."""
        return self._runtime.depth

    @property
    def unique_layers(self) -> int:
        """Blocks with their own weights in the current stage (the model's first ones)."""
        return self._runtime.unique

    @property
    def layers(self) -> int:
        """L, the model's full depth."""
        return self._runtime.layers

    @property
    def block_stack(self) -> BlockStack:
        """What the FX analysis found: the container, its blocks, shared inputs and per-layer values."""
        return self._stack

    @property
    def mode(self) -> str:
        """``"container"`` (the block container was replaced in place) or ``"graph"`` (an FX graph runs)."""
        return "graph" if self._graph is not None else "container"

    def mapping(self) -> tuple[int, ...]:
        """The block each position runs now (training depth in train mode, L in eval mode)."""
        return self._runtime.mapping()

    # ---------------------------------------------------------------- running
    def _run(self, *args, **kwargs):
        # Under torch.compile this check is folded away, so it adds no guard on Python state.
        if not torch.compiler.is_compiling() and self.training:
            self._check_checkpointing()
        if self._resample == "micro_batch" and self.training:
            self._next_micro_batch()
        return (self._graph if self._graph is not None else self.model)(*args, **kwargs)

    @torch.compiler.disable
    def _next_micro_batch(self) -> None:
        """resample="micro_batch": the k-th training forward of a step runs a depth drawn from (seed, step, k)."""
        if self._micro_batch:
            self._runtime.depth = _draw(self._sampler, self._sampler_name, self._runtime.unique,
                                        self._runtime.layers, self._seed, self.step_count, self._micro_batch)
        self._micro_batch += 1

    def _check_checkpointing(self) -> None:
        """Warn once if gradient checkpointing is on and would recompute shared blocks with wrong per-layer values."""
        if "checkpointing" in self._warned or not _checkpointing(self.model):
            return
        self._warned.add("checkpointing")
        others = sorted(k for k in self._runtime.per_layer_values if not k.endswith("layer_idx"))
        if others:
            warnings.warn(f"growops: gradient checkpointing recomputes shared blocks with the per-layer values of the "
                          f"last position that ran them ({', '.join(others)}), so their gradients are approximate; "
                          "turn checkpointing off while blocks are shared", stacklevel=3)

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Count one optimizer step; grow at a stage boundary (applying the optimizer-state policy to
        `optimizer`); then draw the next step's depth from ``(seed, step)``."""
        self.step_count += 1
        target = self._schedule.stage_at(self.step_count)
        while self.stage < target:
            self._grow(optimizer)
        self._runtime.depth = self._sample(self.step_count)
        self._micro_batch = 0
        self._runtime.cast_cache.clear()  # free the routed layers' bf16 copies between steps

    def restore_step(self, step: int) -> None:
        """Put the schedule at optimizer step `step` (stage, unique blocks, depth) without touching weights or
        optimizer state: for weights restored from a checkpoint of that step by other means (a Trainer checkpoint,
        say). Prefer ``load_state_dict``, which checks that the state belongs to this schedule."""
        if not isinstance(step, int) or step < 0:
            raise GrowopsError(f"restore_step needs a non-negative int step, got {step!r}")
        self.step_count, self.stage = step, self._schedule.stage_at(step)
        self._runtime.unique = self._schedule.stages[self.stage]
        self._runtime.depth = self._sample(step)
        self._micro_batch = 0

    def _grow(self, optimizer: torch.optim.Optimizer | None) -> None:
        n_old, n_new = self._runtime.unique, self._schedule.stages[self.stage + 1]
        sources = growth_sources(n_old, n_new, self._growth)
        copy_blocks(self._runtime.blocks, sources)
        if optimizer is not None:
            remap_optimizer_state(optimizer, self._runtime.blocks, sources, self._policy)
        elif self._policy != "keep" and "optimizer" not in self._warned:
            self._warned.add("optimizer")
            warnings.warn(f"growops: the model grew without an optimizer, so optimizer_state={self._policy!r} was "
                          "not applied; call a.step(optimizer) so grown blocks get the right optimizer state",
                          stacklevel=3)
        self._runtime.unique = n_new
        self.stage += 1

    def _sample(self, step: int) -> int:
        return _draw(self._sampler, self._sampler_name, self._runtime.unique, self._runtime.layers, self._seed, step)

    # ---------------------------------------------------------------- export
    def export(self) -> nn.Module:
        """A copy of the model in its own class at full depth: L untied blocks, position i holding a copy of the
        block it runs now, per-layer values (``layer_idx``) renumbered by position, original state_dict keys."""
        if self._swap is not None:
            parent, name, original = self._swap
            shared = getattr(parent, name)
            setattr(parent, name, original)
            try:
                out = copy.deepcopy(self.model)
            finally:
                setattr(parent, name, shared)
        else:
            out = copy.deepcopy(self.model)
        unroute(out)
        container = out.get_submodule(self._stack.path)
        names = list(container._modules)
        blocks = [container._modules[n] for n in names]
        runtime = StackRuntime(blocks, self._runtime.per_layer_values)
        for position, (name, index) in enumerate(zip(names, depth_map(self.unique_layers, self.layers, self._growth))):
            block = copy.deepcopy(blocks[index])
            runtime.place(block, position)
            container._modules[name] = block
        return out

    # ---------------------------------------------------------------- state
    def get_extra_state(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step_count, "stage": self.stage,
                "unique": self._runtime.unique, "depth": self._runtime.depth, **self._fingerprint()}

    def set_extra_state(self, state: dict) -> None:
        self._check_state(state)
        self.step_count, self.stage = int(state["step"]), int(state["stage"])
        self._runtime.unique, self._runtime.depth = int(state["unique"]), int(state["depth"])
        self._micro_batch = 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``load_state_dict`` restores weights and the schedule position; a state from another schedule or model
        raises a GrowopsError before anything is changed (also when a wrapper such as DDP or compile loads it)."""
        # torch calls this on `a` before anything under it is loaded, whoever started the load (a.load_state_dict,
        # a DDP or compile wrapper's): checking the whole prefixed state here keeps a failed load from half-applying.
        own = {prefix + k: v for k, v in self.state_dict().items()}
        mine = {k: v for k, v in state_dict.items() if k.startswith(prefix)}
        key = prefix + "_extra_state"
        if key not in mine:
            raise GrowopsError(f"this state_dict has no growops schedule (key {key!r}): load a plain model's weights "
                               "with a.model.load_state_dict(...), or save with a.state_dict()")
        self._check_state(mine[key])
        if strict:
            missing, unexpected = sorted(set(own) - set(mine)), sorted(set(mine) - set(own))
            if missing or unexpected:
                raise GrowopsError(f"state_dict does not match this model: missing {missing[:5]}, unexpected "
                                   f"{unexpected[:5]}; was it saved from another model?")
        for k, v in mine.items():
            if isinstance(v, torch.Tensor) and k in own and own[k].shape != v.shape:
                raise GrowopsError(f"state_dict entry {k} has shape {tuple(v.shape)}, this model's has "
                                   f"{tuple(own[k].shape)}; was it saved from another model?")
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _fingerprint(self) -> dict:
        return {"stages": list(self._schedule.stages), "stage_steps": list(self._schedule.stage_steps),
                "layers": self._runtime.layers, "growth": self._growth, "sampler": self._sampler_name,
                "seed": self._seed, "stack": self._stack.path, "resample": self._resample}

    def _check_state(self, state) -> None:
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            raise GrowopsError(f"unrecognised growops state {state!r}: expected a dict saved by a.state_dict()")
        mine = self._fingerprint()
        diff = {k: (state.get(k), v) for k, v in mine.items() if state.get(k) != v}
        if diff:
            detail = "; ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in diff.items())
            raise GrowopsError(f"this state was saved under another schedule or model ({detail}); build apollo with "
                               "the same arguments and model to resume")

    # ---------------------------------------------------------------- installation
    def _install(self, model: nn.Module, found: BlockStack, traced: TracedModel, example_inputs: Any) -> None:
        """Container mode where the forward iterates the container, else graph mode; nothing stays half-applied."""
        parent_path, _, name = found.path.rpartition(".")
        parent = model.get_submodule(parent_path)
        original = getattr(parent, name)
        runtime = StackRuntime([model.get_submodule(b) for b in found.blocks], found.per_layer_values, self._growth)
        shared = shared_container(original, runtime)
        if shared is not None:
            setattr(parent, name, shared)
            try:
                works = _iterates_container(model, found, runtime, traced, example_inputs)
            except BaseException:
                setattr(parent, name, original)
                raise
            if works:
                self._swap, self._runtime = (parent, name, original), runtime
                return
            setattr(parent, name, original)
        if traced.kind != "symbolic":
            raise GrowopsError(
                f"cannot change the depth of {type(model).__name__}: its forward does not iterate {found.path} "
                f"(a {type(original).__name__}), and graph rewriting needs torch.fx.symbolic_trace, which failed "
                f"({traced.symbolic_error}). Iterate the container in forward (`for block in self.{name}: ...`) "
                "or make the forward symbolically traceable")
        # Code outside the blocks may read self.training (dropout, say): one graph per mode, one shared runtime.
        graphs = {False: insert_depth_gate(traced.graph_module, found, inplace=True, runtime=runtime)}
        train_graph = trace_model(model, set(runtime.blocks), training=True).graph_module
        graphs[True] = insert_depth_gate(train_graph, found, inplace=True, runtime=runtime)
        self._graph, self._runtime = _GraphRunner(model, graphs), runtime


def _locate_stack(model: nn.Module, stack: str | None, example_inputs: Any) -> tuple[BlockStack, TracedModel]:
    containers = repeated_containers(model)
    if not containers:
        raise GrowopsError(f"no repeated block stack in {type(model).__name__}: searched every module for one whose "
                           "children (two or more) are structurally identical (same classes, parameter names and "
                           "shapes) and found none; growops needs a stack of identical blocks, e.g. nn.ModuleList")
    if stack is not None and stack not in containers:
        raise GrowopsError(f"stack={stack!r} is not a container of identical blocks in {type(model).__name__}; "
                           f"candidates: {sorted(containers)}")
    leaves = {model.get_submodule(b) for blocks in containers.values() for b in blocks}
    traced = trace_model(model, leaves, example_inputs)
    stacks, notes = analyse(traced.graph_module, model)
    why = "; ".join(notes) or "none"
    if stack is not None:
        chosen = [s for s in stacks if s.path == stack]
        if not chosen:
            raise GrowopsError(f"stack={stack!r} is not a chain of blocks in the traced forward ({why})")
        return chosen[0], traced
    if not stacks:
        raise GrowopsError(f"no repeated block stack in {type(model).__name__}: containers of identical modules were "
                           f"found but none is called as a chain in the traced forward ({why})")
    if len(stacks) > 1:
        listing = ", ".join(f"{s.path!r} ({s.depth} blocks)" for s in stacks)
        raise GrowopsError(f"{type(model).__name__} holds several block stacks: {listing}; choose one with stack=...")
    return stacks[0], traced


def _iterates_container(model, found: BlockStack, runtime: StackRuntime, traced: TracedModel, example_inputs) -> bool:
    """Probe: trace again with the shared container set to one position; did only block 0 run?"""
    runtime.unique = runtime.depth = 1
    try:
        probe = trace_model(model, set(runtime.blocks), example_inputs)
    except GrowopsError:
        return False
    finally:
        runtime.unique = runtime.depth = runtime.layers
    return called_blocks(probe.graph_module, found.blocks) == [0]


class _GraphRunner:
    """Graph mode: the model's forward as FX graphs with the block chain replaced by a gate, one per training mode,
    run on the model's *current* tensors (``model.to()`` or a reassigned buffer replaces tensors, which a
    GraphModule would otherwise keep stale copies of)."""

    def __init__(self, model: nn.Module, graphs: dict[bool, fx.GraphModule]):
        self.model, self.graphs = model, graphs
        self._bound: dict[bool, tuple[tuple[int, ...], fx.GraphModule]] = {}

    def __call__(self, *args, **kwargs):
        mode = self.model.training
        template = self.graphs[mode]
        attrs = [n.target for n in template.graph.nodes if n.op == "get_attr"]
        tensors = [_resolve(self.model, t) for t in attrs]
        ids = tuple(map(id, tensors))
        bound = self._bound.get(mode)
        if bound is None or bound[0] != ids:
            root = dict(zip(attrs, tensors))
            for node in template.graph.nodes:
                if node.op == "call_module":
                    root[node.target] = getattr(template, GATE) if node.target == GATE else \
                        self.model.get_submodule(node.target)
            bound = self._bound[mode] = (ids, fx.GraphModule(root, template.graph, type(self.model).__name__))
        return bound[1](*args, **kwargs)

    def __getstate__(self):
        return {"model": self.model, "graphs": self.graphs, "_bound": {}}


def _checkpointing(model: nn.Module) -> bool:
    """Whether a Hugging Face model has activation (gradient) checkpointing on (the name changed in transformers 5)."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(type(model), "is_gradient_checkpointing", None)
    return bool(flag.__get__(model)) if isinstance(flag, property) else False


def _resolve(model: nn.Module, target: str):
    owner, _, attr = target.rpartition(".")
    return getattr(model.get_submodule(owner), attr)


def _draw(sampler, name: str, unique: int, layers: int, seed: int, step: int, micro_batch: int = 0) -> int:
    """The depth of optimizer step `step` (and micro-batch), checked: an int in [unique, layers]."""
    depth = sampler(unique, layers, step_rng(seed, step, micro_batch))
    if isinstance(depth, float) and depth.is_integer():
        depth = int(depth)
    if not isinstance(depth, (int, np.integer)) or isinstance(depth, bool):
        raise GrowopsTypeError(f"sampler {name} returned {depth!r}; it must return an int")
    if not unique <= depth <= layers:
        raise GrowopsError(f"sampler {name} returned depth {depth} at step {step}; it must lie in "
                           f"[unique={unique}, L={layers}]")
    return int(depth)


def _signature(model: nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _warn_non_multiples(stages: tuple[int, ...], growth: str) -> None:
    if growth != "interpolate":
        return
    bad = [f"{a} -> {b}" for a, b in zip(stages, stages[1:]) if not preserves_function(a, b, growth)]
    if bad:
        warnings.warn(f"growops: stages {stages} grow by a non-multiple ({', '.join(bad)}); interpolation there "
                      "does not preserve the model's function (use multiples, e.g. 1, 3, 6, 12)", stacklevel=4)
