"""``growops.apollo``: wrap a model once, train as usual, get the model back grown.

The wrapper keeps the user's model object. ``growops.plan`` finds the block stack(s) and decides how to run them;
the wrapper applies the plan (``growops.install``): either the model's own block container runs the positions (models
whose forward iterates it: Hugging Face, nanoGPT), or an FX graph whose chain of block calls is replaced by a depth
gate runs instead. Either way one ``StackRuntime`` per stack decides which block runs at each position; ``step()``
moves the schedule, growing at stage boundaries.
"""

from __future__ import annotations

import inspect
import logging
import os
import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from .averaging import refuse_averaged_copy
from .config import ApolloConfig
from .eager import compile_boundaries, eager
from .errors import GrowopsError, GrowopsTypeError, check_choice, check_int, warn
from .fx.trace import NeedsInputs
from .growth import copy_units
from .install import install, uninstall
from .lr import REST, check_lr_options, register, scale, split_groups, warmup
from .maps import check_growth, depth_map, growth_sources, preserves_function
from .ops.routing import route_shared_linears
from .optim_state import StepRate, apply_states, check_policy, new_states, unwrap_optimizers
from .plan import Plan, make_plan, resolve_plan
from .saved import being_loaded
from .schedule import SamplerSpec, Schedule, resolve_sampler, step_rng
from .stack import deep_copy, in_backward
from .state import (
    EXTRA,
    STATE_VERSION,
    check_fingerprint,
    check_position,
    check_tensors,
    decode_state,
    encode_state,
    load_options,
    loading,
    sampler_identity,
)

RESAMPLE: tuple[str, ...] = ("step", "micro_batch")
# "growops.apollo": INFO at each growth, DEBUG at each step (the library adds only a NullHandler to "growops").
logger = logging.getLogger(__name__)


def apollo(model: nn.Module, stages=(1, 3, 6, 12), stage_steps=(2000, 4000, 10000), sampler: SamplerSpec = "lvps",
           growth: str = "interpolate", optimizer_state: str = "reset", seed: int = 0,
           stack: str | Sequence[str] | None = None, example_inputs: Any = None, resample: str = "step",
           shared_linear: bool | str = "auto", plan: Plan | None = None, lr_scale: str = "none",
           rewarmup: int = 0) -> Apollo:
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
    lr_scale: ``"none"`` (default), ``"sqrt"`` or ``"linear"``: divide the learning rate of a unit that runs k times
        at this step's depth by sqrt(k) or k. Needs the optimizer built from ``a.param_groups(...)``.
    rewarmup: after each growth, ramp the learning rate linearly from 1/rewarmup of its value back to all of it over
        this many steps (0: off). Needs ``a.param_groups(...)`` too. Both compose with your LR scheduler: the
        multiplier is applied only while the optimizer steps (``growops.lr``).
    """
    return Apollo(model, stages, stage_steps, sampler, growth, optimizer_state, seed, stack, example_inputs, resample,
                  shared_linear, plan, lr_scale, rewarmup)


def plan(model: nn.Module, stack: str | Sequence[str] | None = None, example_inputs: Any = None) -> Plan:
    """What ``apollo`` would do to `model`, without changing it: print it, edit it, pass it as ``plan=``.

    stack: the container's module path when the model holds several stacks (a tuple grows several together;
        ``"path[a:b]"`` picks the growable core).
    example_inputs: one batch for ``torch.export``, for a model that neither traces symbolically nor provides
        inputs (a Hugging Face model does); ``apollo`` without them plans at the first forward instead.

    Returns a ``Plan``: ``print(plan)`` shows it, ``plan.declare(...)`` settles values growops could not decide,
    ``growops.apollo(model, ..., plan=plan)`` applies it."""
    return make_plan(model, stack, example_inputs)


class _NoForwardCode(GrowopsError, AttributeError):
    """``a.forward.__code__``: growops' dispatcher has no code of its own."""


class _Forward:
    """``Apollo.forward`` with the wrapped model's signature, so tools that inspect it (Trainer) see the model's."""

    def __init__(self, owner: Apollo, signature: inspect.Signature | None):
        self.owner = owner
        if signature is not None:
            self.__signature__ = signature

    def __call__(self, *args, **kwargs):
        return self.owner._run(*args, **kwargs)

    @property
    def __code__(self):
        # What reads a forward's code (torch.export.export(a)) would capture one step of a schedule: say what to do.
        # An AttributeError too, so hasattr(a.forward, "__code__") is False as before.
        raise _NoForwardCode("a.forward runs growops' schedule, which has no code of its own to export: "
                             "torch.export.export(a, ...) would capture one step of it. Export the plain model "
                             "a.eval() computes: torch.export.export(a.export(), args)")


class Apollo(nn.Module):
    """A model under Apollo progressive training; build it with ``growops.apollo``.

    ``a(...)`` takes and returns what the model does. In training it runs ``a.depth`` positions sharing the
    first ``a.unique_layers`` growable units; in evaluation it runs all L positions with the same sharing.
    Call ``a.step(optimizer)`` once per optimizer step.
    """

    def __init__(self, model: nn.Module, stages, stage_steps, sampler: SamplerSpec = "lvps",
                 growth: str = "interpolate", optimizer_state: str = "reset", seed: int = 0,
                 stack: str | Sequence[str] | None = None, example_inputs: Any = None, resample: str = "step",
                 shared_linear: bool | str = "auto", plan: Plan | None = None, lr_scale: str = "none",
                 rewarmup: int = 0):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise GrowopsTypeError(f"apollo wraps an nn.Module, got {type(model).__name__}")
        compile_boundaries(type(self))
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
        self._lr_scale = lr_scale
        self._arguments = {"stack": stack, "shared_linear": shared_linear}  # for a.config, as given
        self._lr_power, self._rewarmup = check_lr_options(lr_scale, rewarmup, self._resample)
        if not (isinstance(shared_linear, bool) or (isinstance(shared_linear, str) and shared_linear == "auto")):
            raise GrowopsTypeError(f"shared_linear must be True, False or 'auto', got {shared_linear!r}")

        deferred, self._given_plan = None, plan
        try:
            plan = resolve_plan(model, plan, stack, example_inputs)
        except NeedsInputs as e:  # plan from the first batch instead (no plan or inputs were given)
            deferred = str(e)
        self.model = model
        self.forward = _Forward(self, _signature(model))
        self.step_count = 0
        self.stage = 0
        self._micro_batch = 0  # training forwards since the last step(), for resample="micro_batch"
        self._warned = set()
        self._step_rate = StepRate()
        self._stages = (stages, stage_steps)
        if deferred is None:
            self._apply_plan(plan)
            return
        Schedule.checked(stages, stage_steps, None)  # every rule that does not need L, now
        if self._lr_power or self._rewarmup:
            raise GrowopsError(f"lr_scale and rewarmup need the plan before the optimizer is built, and {deferred}. "
                               "Pass example_inputs= (one batch) to growops.apollo")
        self.__dict__["_deferred"] = deferred
        self.__dict__["_plan_hook"] = model.register_forward_pre_hook(_PlanAtFirstCall(self), with_kwargs=True)
        logger.info("planning %s at its first forward: %s", type(model).__name__, deferred)

    def _apply_plan(self, plan: Plan) -> None:
        """Check `plan` against the schedule's arguments and apply it; nothing changes unless all of it holds."""
        # Everything that can reject the arguments runs before the model is touched.
        stages, stage_steps = self._stages
        try:
            schedule = Schedule.checked(stages, stage_steps, plan.layers)
        except GrowopsError as e:
            raise type(e)(f"{e} ({'; '.join(s.describe() for s in plan.stacks)})") from None
        depth = _draw(self._sampler, self._sampler_name, schedule.stages[0], plan.layers, self._seed, 0)
        _warn_non_multiples(schedule.stages, self._growth)
        model = self.model
        self._schedule, self._plan = schedule, plan
        self._runtimes, self._graph = install(model, plan, self._growth)  # self._graph: a GraphRunner in graph mode
        shared_linear = self._arguments["shared_linear"]
        if shared_linear is True or (shared_linear == "auto" and torch.cuda.is_available()):
            for runtime in self._runtimes:
                route_shared_linears(runtime.blocks, runtime=runtime)
                runtime.route_replacements = True
        self._configure(self._schedule.stages[0], depth)
        if "_after_load_hook" not in self.__dict__:
            self.__dict__["_after_load_hook"] = self.register_load_state_dict_post_hook(_after_load)
        for runtime in self._runtimes:
            runtime.owned = True
            runtime.wrapper_forwards = 0 if self._resample == "micro_batch" else None
        self._own_runtimes()

    @property
    def planned(self) -> bool:
        """False until a wrapper built without inputs for a model that needs them has run its first forward."""
        return "_deferred" not in self.__dict__

    def _plan_now(self, args: tuple, kwargs: dict) -> None:
        """Plan from this first batch and apply the plan (a deferred wrapper); on an error nothing changed and the
        next forward tries again. (Only container mode can be planned so: graph mode traces without inputs.)"""
        hook = self.__dict__.pop("_plan_hook")
        hook.remove()  # the trace runs the model's forward
        try:
            self._apply_plan(resolve_plan(self.model, self._given_plan, self._arguments["stack"], (args, kwargs)))
        except BaseException:
            self.__dict__["_plan_hook"] = self.model.register_forward_pre_hook(_PlanAtFirstCall(self),
                                                                              with_kwargs=True)
            raise
        del self.__dict__["_deferred"]
        logger.info("planned %s from its first batch: %s", type(self.model).__name__, "; ".join(
            s.describe() for s in self._plan.stacks))

    def __getattr__(self, name: str):
        if name in _NEEDS_PLAN and "_deferred" in self.__dict__:
            raise GrowopsError(f"growops has not planned {type(self.__dict__['_modules']['model']).__name__} yet: "
                               f"{self.__dict__['_deferred']}. It is planned from the first batch it runs: run one "
                               "forward first (a(batch), or a.model(batch) under the Trainer), or pass example_inputs= "
                               "(one batch) to growops.apollo to plan up front")
        return super().__getattr__(name)

    def _own_runtimes(self) -> None:
        if "_runtimes" not in self.__dict__:  # deferred: planned at the first forward
            return
        for runtime in self._runtimes:
            if runtime.owner is None or runtime.owner() is None:  # a shallow copy shares the original's runtimes
                runtime.owner = weakref.ref(self)
        if self._lr_power or self._rewarmup:
            register(self, self._unit_params())

    def _unit_params(self) -> list[tuple[int, nn.Parameter]]:
        """``(unit, parameter)`` for every parameter of the model, REST for those outside the growable units."""
        unit_of = {id(p): u for r in self._runtimes for u in range(r.layers) for b in r.unit(u)
                   for p in b.parameters()}
        return [(unit_of.get(id(p), REST), p) for p in self.model.parameters()]

    def param_groups(self, groups=None) -> list[dict]:
        """Optimizer parameter groups in which each growable unit's parameters are groups of their own (what
        ``lr_scale`` and ``rewarmup`` need): ``torch.optim.AdamW(a.param_groups(), lr=...)``. `groups` are your own
        (parameters, or dicts with "params" and options such as weight_decay); ``a.parameters()`` if None. Every
        option is kept; each group gets a ``"growops_unit"`` entry (-1: outside the units)."""
        if not self.planned:  # no lr options (refused when deferred): every parameter in its own group
            return split_groups(self.parameters() if groups is None else groups, {})
        units = self._unit_params()
        if self._lr_power or self._rewarmup:
            register(self, units)  # parameters added since wrapping (an adapter, to_empty()) are scaled too
        return split_groups(self.parameters() if groups is None else groups, {id(p): u for u, p in units})

    def lr_factor(self, unit: int) -> float:
        """The multiplier ``lr_scale`` and ``rewarmup`` put on the learning rate of `unit`'s parameter groups (-1:
        the parameters outside the units) at the coming optimizer step."""
        uses = self._runtimes[0].mapping(training=True).count(unit) if unit >= 0 else 0
        since = self.step_count - self._schedule.stage_steps[self.stage - 1] if self.stage > 0 else None
        return scale(uses, self._lr_power) * warmup(since, self._rewarmup)

    def __setstate__(self, state: dict) -> None:
        refuse_averaged_copy()
        compile_boundaries(type(self))  # an unpickled wrapper in a fresh process was never built
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
        if not self.planned:
            self._plan_now(args, kwargs)
        if self._resample == "micro_batch" and self.training:
            self._next_micro_batch()
            try:
                return (self._graph if self._graph is not None else self.model)(*args, **kwargs)
            finally:
                self._close_micro_batch()
        return (self._graph if self._graph is not None else self.model)(*args, **kwargs)

    @eager
    def _next_micro_batch(self) -> None:
        """resample="micro_batch": the k-th training forward of a step runs a depth drawn from (seed, step, k). A
        recomputation in the backward (checkpointing the whole model) runs the forward's depth again."""
        if in_backward():
            return
        if self._micro_batch:
            self._configure(self.unique_layers, _draw(self._sampler, self._sampler_name, self.unique_layers,
                                                      self.layers, self._seed, self.step_count, self._micro_batch))
        self._micro_batch += 1
        for runtime in self._runtimes:
            runtime.wrapper_forwards = 1

    @eager
    def _close_micro_batch(self) -> None:
        for runtime in self._runtimes:
            runtime.wrapper_forwards = 0

    def step(self, *optimizers: torch.optim.Optimizer | None) -> None:
        """Count one optimizer step; grow at a stage boundary (applying the optimizer-state policy to the
        `optimizers` that train the model: one, or several such as Muon and AdamW side by side); then draw the next
        step's depth from ``(seed, step)``. Everything is checked first: after an error the step count, weights and
        optimizer state are as before."""
        optimizers = unwrap_optimizers(optimizers)
        step = self.step_count + 1
        target = self._schedule.stage_at(step)
        depth = self._sample(self._schedule.stages[target], step)
        for runtime in self._runtimes:
            runtime.sync()
        rate = self._step_rate.check(optimizers)
        grew, n_old = self.stage < target, self.unique_layers
        notes = self._grow(optimizers) if grew else []
        self._step_rate.advance(rate)
        self.step_count = step
        self._configure(self.unique_layers, depth)
        self._micro_batch = 0
        for runtime in self._runtimes:
            runtime.cast_cache.clear()  # free the routed layers' bf16 copies between steps
        if grew:
            policy = self._policy if optimizers else "not applied: no optimizer"
            logger.info("step %d: grew from %d to %d unique units (stage %d, growth=%r, optimizer_state=%s), "
                        "stack %s", step, n_old, self.unique_layers, self.stage, self._growth, policy,
                        ", ".join(self._plan.paths))
        logger.debug("step %d: stage %d, %d unique units, next depth %d", step, self.stage, self.unique_layers,
                     self.depth)
        for note in rate + notes:  # only now that the state is whole: warnings raised as errors change nothing
            warn(note)

    def restore_step(self, step: int) -> None:
        """Put the schedule at optimizer step `step` (stage, unique blocks, depth) without touching weights or
        optimizer state: call it before loading plain weights saved at that step into ``a.model`` (they are read at
        the schedule's position). Prefer ``a.load_state_dict`` or ``growops.from_pretrained``, which restore the
        position with the weights and check that the state belongs to this schedule."""
        step = check_int("restore_step's step", step)
        stage = self._schedule.stage_at(step)
        depth = self._sample(self._schedule.stages[stage], step)
        self.step_count, self.stage = step, stage
        self._configure(self._schedule.stages[stage], depth)
        self._micro_batch = 0

    def _grow(self, optimizers: list[torch.optim.Optimizer]) -> list[str]:
        """Grow to the next stage (step() checked everything before); returns the warnings to give."""
        n_old, n_new = self.unique_layers, self._schedule.stages[self.stage + 1]
        sources = growth_sources(n_old, n_new, self._growth)
        held = {id(p) for opt in optimizers for group in opt.param_groups for p in group["params"]}
        if optimizers and not any(id(p) in held for r in self._runtimes for b in r.blocks for p in b.parameters()):
            raise GrowopsError(f"a.step got optimizers that hold none of {', '.join(self._plan.paths)}'s parameters: "
                               "pass the optimizer(s) that train this model (built over a.parameters())")
        states = []  # everything that can fail first: the optimizer side, then the weights
        for opt in optimizers:
            states.append({k: v for r in self._runtimes for k, v in
                           new_states(opt, r.units(), sources, self._policy).items()})
        for runtime in self._runtimes:
            copy_units(runtime.units(), sources, runtime.per_layer)
        for opt, new in zip(optimizers, states):
            apply_states(opt, new)
        self._configure(n_new, self.depth)
        self.stage += 1
        notes = []
        if optimizers and "unheld" not in self._warned:
            named = [(f"{r.path}.{r.names[i]}.{n}", p) for r in self._runtimes for u in range(n_new)
                     for i in r.layout.unit(u) for n, p in r.blocks[i].named_parameters()]
            missing = [name for name, p in named if p.requires_grad and id(p) not in held]
            if missing:
                self._warned.add("unheld")
                more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
                notes.append(f"growops: the optimizer does not hold {', '.join(missing[:5])}{more}: these blocks are "
                             "live now but will never train, and optimizer_state was not applied to them. Build the "
                             "optimizer over a.parameters() (every block, live or not), or pass every optimizer to "
                             "a.step(opt1, opt2)")
        elif not optimizers and self._policy != "keep" and "optimizer" not in self._warned:
            self._warned.add("optimizer")
            notes.append(f"growops: the model grew without an optimizer, so optimizer_state={self._policy!r} was not "
                         "applied; call a.step(optimizer) so grown blocks get the right optimizer state")
        return notes

    def _sample(self, unique: int, step: int) -> int:
        return _draw(self._sampler, self._sampler_name, unique, self.layers, self._seed, step)

    # ---------------------------------------------------------------- export
    def export(self) -> nn.Module:
        """A copy of the model in its own class at full depth: L untied units, position i holding a copy of the
        unit it runs now, fixed blocks and every block's per-layer values as they are, original state_dict keys."""
        try:
            copied = deep_copy(self.model)
        except Exception as e:  # noqa: BLE001 - say what to do instead (a sharded model, say)
            raise GrowopsError(f"export() deep-copies the model, which failed ({type(e).__name__}: {e}); a sharded "
                               "model (FSDP2) must be gathered first: load its full state dict into an unsharded "
                               "apollo of the same schedule and export that") from e
        out = uninstall(copied, self._plan)
        full = depth_map(self.unique_layers, self.layers, self._growth)
        for s, runtime in zip(self._plan.stacks, self._runtimes):
            units = [[out.get_submodule(b) for b in s.unit(u)] for u in range(s.layers)]
            copy_units(units, full, runtime.per_layer)
        return out

    # ---------------------------------------------------------------- configuration and checkpoints
    @property
    def config(self) -> ApolloConfig:
        """The arguments that decide this schedule, as the ``ApolloConfig`` saved beside checkpoints."""
        builtin = self._sampler_id.get("sampler_code") is None
        stack = self._arguments["stack"]
        return ApolloConfig(
            stages=tuple(self._schedule.stages), stage_steps=tuple(self._schedule.stage_steps),
            sampler=self._sampler_name if builtin else None, growth=self._growth, optimizer_state=self._policy,
            seed=self._seed, stack=stack if stack is None or isinstance(stack, str) else tuple(stack),
            resample=self._resample, shared_linear=self._arguments["shared_linear"], lr_scale=self._lr_scale,
            rewarmup=self._rewarmup, sampler_callable=None if builtin else self._sampler_name)

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        """Write the model as ``a.eval()`` computes it (``save_pretrained`` for a Hugging Face model, else
        ``model.safetensors``) and ``growops_config.json`` (the arguments and the step) to `folder`; rebuild with
        ``growops.from_pretrained(model, folder)``."""
        from .checkpoint import save_pretrained

        save_pretrained(self, folder)

    def _state_at(self, step: int) -> dict:
        """The extra state a wrapper at optimizer step `step` of this schedule saves."""
        stage = self._schedule.stage_at(step)
        unique = self._schedule.stages[stage]
        return {"version": STATE_VERSION, "step": step, "stage": stage, "unique": unique,
                "depth": self._sample(unique, step), **self._fingerprint()}

    # ---------------------------------------------------------------- state
    def get_extra_state(self) -> torch.Tensor:
        return encode_state({"version": STATE_VERSION, "step": self.step_count, "stage": self.stage,
                             "unique": self.unique_layers, "depth": self.depth, **self._fingerprint()})

    def set_extra_state(self, state: dict | torch.Tensor) -> None:
        state = decode_state(state)
        if loading():  # a load_state_dict (checked already): applied once the weights are in (_after_load)
            self.__dict__["_pending"] = state
        else:
            self._check_state(state)
            self._apply_state(state)

    def _apply_state(self, state: dict) -> None:
        self.step_count, self.stage = state["step"], state["stage"]
        self._configure(state["unique"], state["depth"])
        self._micro_batch = 0

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        """``load_state_dict`` restores weights and the schedule position; the whole state is checked first, so a
        state from another schedule or model raises a GrowopsError and changes nothing, and the schedule moves only
        once every weight is loaded. The weights come in the exported layout (``growops.saved``) and are mapped onto
        the live units of the saved position."""
        # torch calls this on `a` before anything under it is loaded, whoever started the load (a.load_state_dict,
        # a DDP or compile wrapper's); it passes strict=True whatever the caller asked, so read the caller's.
        strict, assign = load_options()
        own = self.state_dict(keep_vars=True)  # the tensors as they sit: their kinds and shapes are what loads into
        on_meta = any(t.is_meta for t in own.values() if isinstance(t, torch.Tensor))
        if (assign or local_metadata.get("assign_to_params_buffers")) and not on_meta:
            raise GrowopsError("load_state_dict(..., assign=True) would replace the model's parameters, which the "
                               "optimizer and tied weights hold: load without assign=True (assign=True is for a model "
                               "built on the meta device)")
        if on_meta and not assign:
            raise GrowopsError("the model's weights are on the meta device, where loading copies nothing: load with "
                               "assign=True (then build the optimizer), or move the model to a device first")
        incoming = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
        if EXTRA in incoming:
            self._check_state(decode_state(incoming[EXTRA]))
        elif strict:
            raise GrowopsError(f"this state_dict has no growops schedule (key {prefix + EXTRA!r}): load a plain "
                               "model's weights with a.model.load_state_dict(...), or save with a.state_dict()")
        check_tensors(own, incoming, strict, prefix)
        self.__dict__["_pending"] = None
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def _incoming_position(self) -> tuple[int | None, int | None]:
        """``(unique, step)`` of the state being loaded into this model now: its live units, whose exported layout
        ``growops.saved`` maps onto the live units (None for a state saved physically, before the exported layout),
        and the step the schedule must move to once the weights are in, when that comes from a position source (a
        Trainer checkpoint; None otherwise). Reads only; ``_expect_step`` records that step after the map-in."""
        pending = self.__dict__.get("_pending")
        if pending is not None and being_loaded(self):  # a.load_state_dict: the saved position (_after_load applies it)
            return (pending["unique"] if pending.get("version", STATE_VERSION) >= 2 else None), None
        source = self.__dict__.get("_position_source")  # a Trainer checkpoint being loaded, say
        step = source(self) if source is not None else None
        if step is not None:
            return self._schedule.stages[self._schedule.stage_at(step)], step
        return self.unique_layers, None

    def _expect_step(self, step: int | None) -> None:
        """The load now running was checked: once its weights are in, the schedule moves to `step` (if any)."""
        self.__dict__["_pending_step"] = step

    def _after_model_load(self) -> None:
        """A load into ``a.model`` is over: if its position came from a position source (a Trainer checkpoint), the
        schedule moves to that step now, with the weights."""
        step = self.__dict__.pop("_pending_step", None)
        if step is not None:
            self.restore_step(step)

    def _fingerprint(self) -> dict:
        return {"stages": list(self._schedule.stages), "stage_steps": list(self._schedule.stage_steps),
                "layers": self.layers, "growth": self._growth, **self._sampler_id, "seed": self._seed,
                "stack": [s.spec() for s in self._plan.stacks], "resample": self._resample,
                "optimizer_state": self._policy, "lr_scale": self._lr_scale, "rewarmup": self._rewarmup}

    def _check_state(self, state) -> None:
        check_fingerprint(state, self._fingerprint())
        check_position(state, self._schedule, self.layers)


# What exists only once the model is planned: reading it before then says why and what to do.
_NEEDS_PLAN = frozenset({"_plan", "_schedule", "_runtimes", "_graph"})


class _PlanAtFirstCall:
    """Forward pre-hook of a deferred wrapper's model: a call of the model itself (the Trainer calls ``a.model``)
    plans it from its batch first. Held by weak reference, so a copy of the model runs as the plain model it is."""

    def __init__(self, owner: Apollo):
        self.owner = weakref.ref(owner)

    def growops_pending(self) -> bool:
        """Whether a live wrapper waits to plan the model (``growops.plan`` refuses to wrap it again)."""
        owner = self.owner()
        return owner is not None and not owner.planned

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        owner = self.owner()
        tracing = torch.compiler.is_compiling() or torch.fx._symbolic_trace.is_fx_tracing()
        if owner is not None and not owner.planned and owner.model is module and not tracing:
            owner._plan_now(args, kwargs)


def _after_load(a: Apollo, incompatible_keys) -> None:
    """Load post-hook: every weight under `a` is in; now the schedule moves."""
    pending = a.__dict__.pop("_pending", None)
    if pending is not None:
        a._apply_state(pending)


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
        warn(f"growops: stages {stages} grow by a non-multiple ({', '.join(bad)}); interpolation there does not "
             "preserve the model's function (use multiples, e.g. 1, 3, 6, 12)")
