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
    """Warns once if ``a.step()`` comes twice without a step of the optimizer in between (called once per
    micro-batch, say, which runs the schedule too fast). Counts each optimizer's steps with a post-step hook."""

    def __init__(self):
        self.steps: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # optimizer -> its step counter
        self.warned = False

    def check(self, optimizers: Sequence[torch.optim.Optimizer]) -> list[str]:
        """The warning to give (at most once), and start counting afresh."""
        notes = []
        for opt in optimizers:
            count = self.steps.get(opt)
            if count is None:  # first seen: count its steps from now on
                count = self.steps[opt] = _StepCount()
                opt.register_step_post_hook(count)
            elif count.steps == 0 and not self.warned:
                self.warned = True
                notes.append("growops: a.step(optimizer) was called twice without optimizer.step() between: call it "
                             "once per optimizer step, after all micro-batches, or the schedule runs too fast (an "
                             "optimizer step skipped by mixed-precision overflow also shows here)")
            count.steps = 0
        return notes

    def __getstate__(self) -> dict:
        return {"warned": self.warned}  # the optimizers it counts are not part of the model

    def __setstate__(self, state: dict) -> None:
        self.steps, self.warned = weakref.WeakKeyDictionary(), state["warned"]


class _StepCount:
    """An optimizer step post-hook that counts the optimizer's steps (picklable, unlike a closure)."""

    def __init__(self):
        self.steps = 0

    def __call__(self, optimizer, args, kwargs) -> None:
        self.steps += 1


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
