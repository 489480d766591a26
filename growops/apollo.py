"""``growops.apollo``: wrap a model once, train as usual, get the model back grown.

The wrapper keeps the user's model object. ``growops.plan`` finds the block stack(s) and decides how to run them;
the wrapper applies the plan (``growops.install``): either the model's own block container runs the positions (models
whose forward iterates it: Hugging Face, nanoGPT), or an FX graph whose chain of block calls is replaced by a depth
gate runs instead. Either way one ``StackRuntime`` per stack decides which block runs at each position; ``step()``
moves the schedule, growing at stage boundaries.
"""

from __future__ import annotations

import copy
import inspect
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .errors import GrowopsError, GrowopsTypeError, check_choice, check_int
from .growth import copy_units
from .install import install, uninstall
from .maps import check_growth, depth_map, growth_sources, preserves_function
from .ops.routing import route_shared_linears
from .optim_state import apply_states, check_optimizer, check_policy, new_states, unheld
from .plan import Plan, check_plan, make_plan
from .schedule import SamplerSpec, Schedule, resolve_sampler, step_rng
from .stack import CACHE_INDICES, StackRuntime
from .state import (
    EXTRA,
    STATE_VERSION,
    check_fingerprint,
    check_position,
    check_tensors,
    load_options,
    sampler_identity,
)

RESAMPLE: tuple[str, ...] = ("step", "micro_batch")


def apollo(model: nn.Module, stages=(1, 3, 6, 12), stage_steps=(2000, 4000, 10000), sampler: SamplerSpec = "lvps",
           growth: str = "interpolate", optimizer_state: str = "reset", seed: int = 0,
           stack: str | Sequence[str] | None = None, example_inputs: Any = None, resample: str = "step",
           shared_linear: bool | str = "auto", plan: Plan | None = None) -> Apollo:
    """Wrap `model` for Apollo progressive training.

    stages: unique blocks (growable units) per stage, strictly increasing, the last equal to the model's L.
    stage_steps: the optimizer step at which each later stage begins (``len(stages) - 1`` values).
    sampler: ``"lvps"``, ``"uniform"``, ``"full"``, ``"unique"`` or a callable ``(unique, L, rng) -> depth``.
    growth: ``"interpolate"`` or ``"stack"`` (see ``growops.maps``).
    optimizer_state: ``"reset"``, ``"copy"`` or ``"keep"``, applied at growth by ``step(optimizer)``.
    seed: the depth at step t is drawn from a generator seeded by ``(seed, t)``.
    stack: the block container's module path when the model holds several stacks, or a tuple of paths to grow
        several stacks together (same L, one schedule). ``"model.layers[2:]"`` looks for the growable core among
        children 2 and on only (the others stay fixed): for when the core growops finds is not the one you want.
    example_inputs: inputs for ``torch.export`` when the model does not symbolically trace; defaults to the
        model's ``dummy_inputs``, then (Hugging Face models) inputs built from its config.
    resample: ``"step"`` (one depth per optimizer step, so every micro-batch of a gradient-accumulation step runs
        the same depth) or ``"micro_batch"`` (the authors' code: each training forward draws its own depth, from
        ``(seed, step, k)`` for the k-th forward of the step).
    shared_linear: route the blocks' ``nn.Linear`` / ``Conv1D`` layers through ``growops.ops.shared_linear``, whose
        weight gradients are summed over a shared block's uses in fp32 (autocast sums them in bf16), with the
        ``growops_cuda`` kernel where it builds. ``"auto"`` (default): where CUDA is available; ``True``; ``False``.
    plan: a ``growops.plan(model)`` result, possibly edited (``plan.declare(...)``); found from the model if None.
    """
    return Apollo(model, stages, stage_steps, sampler, growth, optimizer_state, seed, stack, example_inputs, resample,
                  shared_linear, plan)


def plan(model: nn.Module, stack: str | Sequence[str] | None = None, example_inputs: Any = None) -> Plan:
    """What ``apollo`` would do to `model`, without changing it: print it, edit it, pass it as ``plan=``."""
    return make_plan(model, stack, example_inputs)


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
    first ``a.unique_layers`` growable units; in evaluation it runs all L positions with the same sharing.
    Call ``a.step(optimizer)`` once per optimizer step.
    """

    def __init__(self, model: nn.Module, stages, stage_steps, sampler: SamplerSpec = "lvps",
                 growth: str = "interpolate", optimizer_state: str = "reset", seed: int = 0,
                 stack: str | Sequence[str] | None = None, example_inputs: Any = None, resample: str = "step",
                 shared_linear: bool | str = "auto", plan: Plan | None = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise GrowopsTypeError(f"apollo wraps an nn.Module, got {type(model).__name__}")
        if isinstance(model, Apollo):
            raise GrowopsError("this model is already wrapped by growops.apollo: wrap the original model once "
                               "(a.model is the model; a.export() gives a plain grown copy)")
        seed = check_int("seed", seed)
        self._growth = check_growth(growth)
        self._policy = check_policy(optimizer_state)
        self._sampler_name, self._sampler = resolve_sampler(sampler)
        self._sampler_id = sampler_identity(self._sampler_name, sampler)
        self._seed = seed
        self._resample = check_choice("resample", resample, RESAMPLE)
        if not (isinstance(shared_linear, bool) or (isinstance(shared_linear, str) and shared_linear == "auto")):
            raise GrowopsTypeError(f"shared_linear must be True, False or 'auto', got {shared_linear!r}")

        if plan is None:
            plan = make_plan(model, stack, example_inputs)
        else:
            check_plan(model, plan, example_inputs)
            if stack is not None:
                raise GrowopsError("pass stack= to growops.plan(model, stack=...), not with plan=: the plan already "
                                   f"chose {plan.paths}")
        _refuse_undecided(plan)
        # Everything that can reject the arguments runs before the model is touched.
        try:
            self._schedule = Schedule.checked(stages, stage_steps, plan.layers)
        except GrowopsError as e:
            raise type(e)(f"{e} ({'; '.join(s.describe() for s in plan.stacks)})") from None
        depth = _draw(self._sampler, self._sampler_name, self._schedule.stages[0], plan.layers, seed, 0)
        _warn_non_multiples(self._schedule.stages, growth)

        self._plan = plan
        self.model = model
        self._runtimes, self._graph = install(model, plan, self._growth)  # self._graph: a GraphRunner in graph mode
        if shared_linear is True or (shared_linear == "auto" and torch.cuda.is_available()):
            for runtime in self._runtimes:
                route_shared_linears(runtime.blocks, runtime=runtime)
                runtime.route_replacements = True
        self.forward = _Forward(self, _signature(model))
        self.step_count = 0
        self.stage = 0
        self._configure(self._schedule.stages[0], depth)
        self._micro_batch = 0  # training forwards since the last step(), for resample="micro_batch"
        self._warned = set()
        self.register_load_state_dict_post_hook(_after_load)
        for runtime in self._runtimes:
            runtime.owned = True
            runtime.wrapper_forwards = 0 if self._resample == "micro_batch" else None
        self._own_runtimes()

    def _own_runtimes(self) -> None:
        for runtime in self._runtimes:
            runtime.owner = weakref.ref(self)

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)
        self._own_runtimes()  # a copy's (deepcopy, pickle) runtimes belong to the copy

    # ---------------------------------------------------------------- public state
    @property
    def depth(self) -> int:
        """Positions run in training at this step (evaluation always runs all L)."""
        return self._runtimes[0].depth

    @property
    def unique_layers(self) -> int:
        """Growable units with their own weights in the current stage (the model's first ones)."""
        return self._runtimes[0].unique

    @property
    def layers(self) -> int:
        """L, the number of growable units."""
        return self._runtimes[0].layers

    @property
    def plan(self) -> Plan:
        """What growops found and applies: stacks, fixed blocks, growable units, per-layer values, mode."""
        return self._plan

    @property
    def mode(self) -> str:
        """``"container"`` (the block container runs the positions) or ``"graph"`` (an FX graph runs)."""
        return self._plan.mode

    def mapping(self) -> tuple[int, ...]:
        """The unit each position runs now (training depth in train mode, L in eval mode)."""
        return self._runtimes[0].mapping()

    def _configure(self, unique: int, depth: int) -> None:
        for runtime in self._runtimes:
            runtime.unique, runtime.depth = unique, depth

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
            self._configure(self.unique_layers, _draw(self._sampler, self._sampler_name, self.unique_layers,
                                                      self.layers, self._seed, self.step_count, self._micro_batch))
        self._micro_batch += 1
        for runtime in self._runtimes:
            runtime.wrapper_forwards = 1

    def _check_checkpointing(self) -> None:
        """Warn once if activation checkpointing is on and would recompute shared blocks with other per-layer values
        than they ran with (only ``layer_idx``, used by KV caches, is harmless in training)."""
        if "checkpointing" in self._warned or not _checkpointing(self.model, self._runtimes):
            return
        self._warned.add("checkpointing")
        others = sorted(k for s in self._plan.stacks for k in s.per_layer_values
                        if k.rsplit(".", 1)[-1] not in CACHE_INDICES)
        if others:
            warnings.warn(f"growops: activation checkpointing recomputes shared blocks in the backward with each "
                          f"block's own per-layer values ({', '.join(others)}), not those of the position that ran "
                          "them, so their gradients are approximate; turn checkpointing off while blocks are shared",
                          stacklevel=3)

    def step(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Count one optimizer step; grow at a stage boundary (applying the optimizer-state policy to
        `optimizer`); then draw the next step's depth from ``(seed, step)``. Everything is checked first: after an
        error the step count, weights and optimizer state are as before."""
        check_optimizer(optimizer)
        step = self.step_count + 1
        target = self._schedule.stage_at(step)
        depth = self._sample(self._schedule.stages[target], step)
        for runtime in self._runtimes:
            runtime.sync()
        while self.stage < target:
            self._grow(optimizer)
        self.step_count = step
        self._configure(self.unique_layers, depth)
        self._micro_batch = 0
        for runtime in self._runtimes:
            runtime.cast_cache.clear()  # free the routed layers' bf16 copies between steps

    def restore_step(self, step: int) -> None:
        """Put the schedule at optimizer step `step` (stage, unique blocks, depth) without touching weights or
        optimizer state: for weights restored from a checkpoint of that step by other means (a Trainer checkpoint,
        say). Prefer ``load_state_dict``, which checks that the state belongs to this schedule."""
        step = check_int("restore_step's step", step)
        stage = self._schedule.stage_at(step)
        depth = self._sample(self._schedule.stages[stage], step)
        self.step_count, self.stage = step, stage
        self._configure(self._schedule.stages[stage], depth)
        self._micro_batch = 0

    def _grow(self, optimizer: torch.optim.Optimizer | None) -> None:
        n_old, n_new = self.unique_layers, self._schedule.stages[self.stage + 1]
        sources = growth_sources(n_old, n_new, self._growth)
        states = {}
        if optimizer is not None:  # everything that can fail first: the optimizer side, then the weights
            self._check_holds(optimizer)
            for runtime in self._runtimes:
                states |= new_states(optimizer, runtime.units(), sources, self._policy)
        for runtime in self._runtimes:
            copy_units(runtime.units(), sources, runtime.per_layer)
        if optimizer is not None:
            apply_states(optimizer, states)
            self._warn_unheld(optimizer, n_new)
        elif self._policy != "keep" and "optimizer" not in self._warned:
            self._warned.add("optimizer")
            warnings.warn(f"growops: the model grew without an optimizer, so optimizer_state={self._policy!r} was "
                          "not applied; call a.step(optimizer) so grown blocks get the right optimizer state",
                          stacklevel=3)
        self._configure(n_new, self.depth)
        self.stage += 1

    def _check_holds(self, optimizer: torch.optim.Optimizer) -> None:
        """Refuse an optimizer that holds none of the stacks' parameters: it is not the one that trains the model,
        and the one that does would never get the optimizer-state policy."""
        held = {id(p) for group in optimizer.param_groups for p in group["params"]}
        if not any(id(p) in held for r in self._runtimes for b in r.blocks for p in b.parameters()):
            raise GrowopsError(f"a.step got an optimizer that holds none of {', '.join(self._plan.paths)}'s "
                               "parameters: pass the optimizer that trains this model (built over a.parameters())")

    def _warn_unheld(self, optimizer: torch.optim.Optimizer, live: int) -> None:
        """Warn once if the optimizer lacks parameters of live units: they would never train."""
        if "unheld" in self._warned:
            return
        named = [(f"{r.path}.{r.names[i]}.{n}", p) for r in self._runtimes for u in range(live)
                 for i in r.layout.unit(u) for n, p in r.blocks[i].named_parameters()]
        missing = unheld(optimizer, named)
        if missing:
            self._warned.add("unheld")
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            warnings.warn(f"growops: the optimizer does not hold {', '.join(missing[:5])}{more}: these blocks are live "
                          "now but will never train. Build the optimizer over a.parameters() (every block, live "
                          "or not)", stacklevel=4)

    def _sample(self, unique: int, step: int) -> int:
        return _draw(self._sampler, self._sampler_name, unique, self.layers, self._seed, step)

    # ---------------------------------------------------------------- export
    def export(self) -> nn.Module:
        """A copy of the model in its own class at full depth: L untied units, position i holding a copy of the
        unit it runs now, fixed blocks and every block's per-layer values as they are, original state_dict keys."""
        out = uninstall(copy.deepcopy(self.model), self._plan)
        full = depth_map(self.unique_layers, self.layers, self._growth)
        for s, runtime in zip(self._plan.stacks, self._runtimes):
            units = [[out.get_submodule(b) for b in s.unit(u)] for u in range(s.layers)]
            copy_units(units, full, runtime.per_layer)
        return out

    # ---------------------------------------------------------------- state
    def get_extra_state(self) -> dict:
        return {"version": STATE_VERSION, "step": self.step_count, "stage": self.stage,
                "unique": self.unique_layers, "depth": self.depth, **self._fingerprint()}

    def set_extra_state(self, state: dict) -> None:
        self._check_state(state)
        if self.__dict__.get("_loading"):  # a load_state_dict: applied once the weights are in (_after_load)
            self.__dict__["_pending"] = state
        else:
            self._apply_state(state)

    def _apply_state(self, state: dict) -> None:
        self.step_count, self.stage = state["step"], state["stage"]
        self._configure(state["unique"], state["depth"])
        self._micro_batch = 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``load_state_dict`` restores weights and the schedule position; the whole state is checked first, so a
        state from another schedule or model raises a GrowopsError and changes nothing, and the schedule moves only
        once every weight is loaded."""
        # torch calls this on `a` before anything under it is loaded, whoever started the load (a.load_state_dict,
        # a DDP or compile wrapper's); it passes strict=True whatever the caller asked, so read the caller's.
        strict, assign = load_options()
        if assign or local_metadata.get("assign_to_params_buffers"):
            raise GrowopsError("load_state_dict(..., assign=True) would replace the model's parameters, which the "
                               "optimizer and tied weights hold: load without assign=True")
        incoming = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if EXTRA in incoming:
            self._check_state(incoming[EXTRA])
        elif strict:
            raise GrowopsError(f"this state_dict has no growops schedule (key {prefix + EXTRA!r}): load a plain "
                               "model's weights with a.model.load_state_dict(...), or save with a.state_dict()")
        check_tensors(self.state_dict(), incoming, strict, prefix)
        self.__dict__.update(_loading=True, _pending=None)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _fingerprint(self) -> dict:
        return {"stages": list(self._schedule.stages), "stage_steps": list(self._schedule.stage_steps),
                "layers": self.layers, "growth": self._growth, **self._sampler_id, "seed": self._seed,
                "stack": [s.spec() for s in self._plan.stacks], "resample": self._resample,
                "optimizer_state": self._policy}

    def _check_state(self, state) -> None:
        check_fingerprint(state, self._fingerprint())
        check_position(state, self._schedule, self.layers)


def _after_load(a: Apollo, incompatible_keys) -> None:
    """Load post-hook: every weight under `a` is in; now the schedule moves."""
    pending = a.__dict__.pop("_pending", None)
    a.__dict__["_loading"] = False
    if pending is not None:
        a._apply_state(pending)


def _refuse_undecided(plan: Plan) -> None:
    for s in plan.stacks:
        if s.undecided_values:
            path, values = next(iter(s.undecided_values.items()))
            kinds = sorted({type(v).__name__ for v in values})
            raise GrowopsError(
                f"{s.path}: the blocks hold different values at {path} ({', '.join(kinds)} objects growops cannot "
                f"compare), so growops cannot tell whether position i must use block i's (a per-layer value) or any "
                f"block's (part of the block). Declare it: p = growops.plan(model); "
                f"p = p.declare(per_layer=[{path!r}]) (or constant=[...]); growops.apollo(model, ..., plan=p)")


def _checkpointing(model: nn.Module, runtimes: list[StackRuntime]) -> bool:
    """Whether activation checkpointing is on: a Hugging Face model's flag (renamed in transformers 5), or blocks
    wrapped by torch's checkpoint wrapper."""
    flag = getattr(type(model), "is_activation_checkpointing", None)
    if flag is None:
        flag = getattr(type(model), "is_gradient_checkpointing", None)
    if isinstance(flag, property) and flag.__get__(model):
        return True
    return any(type(b).__name__ == "CheckpointWrapper" for r in runtimes for b in r.blocks)


def _draw(sampler, name: str, unique: int, layers: int, seed: int, step: int, micro_batch: int = 0) -> int:
    """The depth of optimizer step `step` (and micro-batch), checked: an int in [unique, layers]."""
    try:
        depth = sampler(unique, layers, step_rng(seed, step, micro_batch))
    except Exception as e:  # noqa: BLE001 - a user's sampler: say which call failed, keep the cause
        raise GrowopsError(f"sampler {name} failed on (unique={unique}, L={layers}, rng) at step {step}: "
                           f"{type(e).__name__}: {e}; a sampler takes (unique, L, rng) and returns a depth") from e
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
