"""What a grown block's optimizer state becomes: ``"copy"``, ``"reset"`` or ``"keep"``.

Growth copies block ``sources[j]``'s weights into block j in place. The optimizer keys its state (Adam
moments, momentum buffers, step counts) by Parameter, so without a policy block j would keep the state its
slot held before, which may have belonged to another block (the authors' behaviour, ``"keep"``).

- ``"copy"``: every parameter of block j gets a copy of the matching parameter's state in block sources[j].
- ``"reset"``: every block that received new weights (sources[j] != j) starts with no state.
- ``"keep"``: nothing changes.
"""

from __future__ import annotations

import copy
import weakref
from collections.abc import MutableMapping, Sequence

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook

from .errors import GrowopsError, GrowopsTypeError, check_choice

POLICIES: tuple[str, ...] = ("copy", "reset", "keep")


def check_policy(policy: str) -> str:
    return check_choice("optimizer_state", policy, POLICIES)


def unwrap_optimizers(optimizers) -> list[torch.optim.Optimizer]:
    """The optimizers `a.step(...)` was given, checked, and unwrapped where the state lives on an inner optimizer
    (accelerate's ``.optimizer``, ZeroRedundancyOptimizer's ``.optim``); None entries dropped."""
    out = []
    for opt in [o for item in optimizers for o in (item if isinstance(item, (list, tuple)) else (item,))]:
        if opt is None:
            continue
        inner = getattr(opt, "optim", None)
        if _is_optimizer(inner):  # ZeroRedundancyOptimizer: its moments live on the inner optimizer
            opt = inner
        inner = getattr(opt, "optimizer", None)
        if _is_optimizer(inner) and _is_optimizer(opt):  # accelerate's AcceleratedOptimizer
            opt = inner
        if not _is_optimizer(opt):
            hint = " (an LR scheduler: pass its .optimizer)" if hasattr(opt, "optimizer") else ""
            raise GrowopsTypeError(f"a.step() takes the optimizers that train the model, or nothing; got a "
                                   f"{type(opt).__name__}{hint}")
        out.append(opt)
    return out


def _is_optimizer(opt) -> bool:
    groups = getattr(opt, "param_groups", None)
    return isinstance(groups, list) and all(isinstance(g, dict) and "params" in g for g in groups) and \
        isinstance(getattr(opt, "state", None), MutableMapping)


class StepRate:
    """Warns once if ``a.step(optimizer)`` comes without a step of that optimizer since the previous ``a.step()`` (or,
    at the first call, since the wrapper was built): ``a.step()`` called once per micro-batch, which runs the schedule
    too fast, or an optimizer step a GradScaler skipped (fp16 overflow: ``scaler.step(opt)`` does not call
    ``opt.step()``). The schedule counts ``a.step()`` calls, so either way it has moved on by one.

    A global optimizer step post-hook (installed with the first wrapper) records, for every ``torch.optim.Optimizer``,
    the process-wide number of optimizer steps taken at its latest step; the wrapper keeps that number as of its
    previous ``a.step()``. An optimizer stepped since then iff its record is larger: the first call is judged like the
    others, whenever the optimizer was built. Optimizers that are not ``torch.optim.Optimizer`` run no hooks and are
    not checked."""

    def __init__(self):
        install_step_counter()
        self.mark = _counter.steps  # process-wide optimizer steps as of the previous a.step() (or the wrapper's birth)
        self.warned = False

    def check(self, optimizers: Sequence[torch.optim.Optimizer]) -> list[str]:
        """The warning to give (at most once); changes nothing (``advance`` does, once the step is taken)."""
        skipped = [opt for opt in optimizers if isinstance(opt, torch.optim.Optimizer)
                   and _counter.last.get(opt, -1) <= self.mark]
        if not skipped or self.warned:
            return []
        name = type(skipped[0]).__name__
        return [f"growops: a.step(optimizer) was called without {name}.step() since the previous a.step() (or, at the "
                "first call, since the model was wrapped): either a.step() runs more than once per optimizer step "
                "(once per micro-batch, say: call it once per optimizer step, after all micro-batches), or the "
                "optimizer step was skipped, as torch.amp.GradScaler does when fp16 gradients overflow (inf/NaN). The "
                "schedule counts a.step() calls, not optimizer steps, so it has moved on by one step either way (as a "
                "Trainer's global_step does); this warning is given once"]

    def advance(self, notes: Sequence[str]) -> None:
        """The step was taken: count afresh from here; `notes` (from ``check``) were given."""
        self.mark = _counter.steps
        self.warned = self.warned or bool(notes)

    def __getstate__(self) -> dict:
        return {"warned": self.warned}  # the step count is this process's (a copy counts from its birth)

    def __setstate__(self, state: dict) -> None:
        install_step_counter()
        self.mark, self.warned = _counter.steps, state["warned"]


class _StepCounter:
    """Process-wide: ``steps`` optimizer steps taken since growops started counting, and ``last[opt]``, the value of
    ``steps`` at `opt`'s latest step."""

    def __init__(self):
        self.steps = 0
        self.last: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.installed = False

    def __call__(self, optimizer, args, kwargs) -> None:
        self.steps += 1
        self.last[optimizer] = self.steps


_counter = _StepCounter()


def install_step_counter() -> None:
    """Count every optimizer's steps from now on (a global optimizer step post-hook, installed once)."""
    if not _counter.installed:
        register_optimizer_step_post_hook(_counter)
        _counter.installed = True


def remap_optimizer_state(optimizer: torch.optim.Optimizer, blocks: Sequence[nn.Module | Sequence[nn.Module]],
                          sources: Sequence[int], policy: str) -> None:
    """Apply `policy` to `optimizer`'s state after block (or unit of blocks) j took ``sources[j]``'s weights."""
    apply_states(optimizer, new_states(optimizer, blocks, sources, policy))


def new_states(optimizer: torch.optim.Optimizer, blocks: Sequence[nn.Module | Sequence[nn.Module]],
               sources: Sequence[int], policy: str) -> dict[nn.Parameter, dict | None]:
    """What `policy` makes of the optimizer state of each parameter that growth along `sources` overwrites: a fresh
    copy of its source's state, or None (no state). Computed before anything changes, so a failure here (a state that
    does not copy) leaves everything as it was; ``apply_states`` then cannot fail."""
    check_policy(policy)
    if policy == "keep":
        return {}
    changed = [j for j, s in enumerate(sources) if s != j]
    held = {p for group in optimizer.param_groups for p in group["params"]}
    params = [[p for m in ((b,) if isinstance(b, nn.Module) else b) for _, p in m.named_parameters(
        remove_duplicate=False)] for b in blocks]
    # A parameter that an unchanged block also holds (tied across blocks) keeps its state.
    unchanged = {p for j, ps in enumerate(params) if j not in changed for p in ps}
    out = {}
    for j in changed:
        for i, p in enumerate(params[j]):
            if p in held and p not in unchanged:
                source = optimizer.state.get(params[sources[j]][i]) if policy == "copy" else None
                try:
                    out[p] = copy.deepcopy(source) if source else None
                except Exception as e:  # noqa: BLE001 - an optimizer state that does not copy: refuse, change nothing
                    raise GrowopsError(f"optimizer_state='copy' cannot copy the optimizer's state of a parameter "
                                       f"({type(e).__name__}: {e}); use optimizer_state='reset'") from e
    return out


def apply_states(optimizer: torch.optim.Optimizer, states: dict[nn.Parameter, dict | None]) -> None:
    """Set the states ``new_states`` computed (None: drop the parameter's state)."""
    for p, state in states.items():
        optimizer.state.pop(p, None)
        if state is not None:
            optimizer.state[p] = state
