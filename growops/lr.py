"""Growth-aware learning rates: a multiplier per optimizer parameter group, applied only while the optimizer steps.

A growable unit that runs k times at this step's depth gets the sum of k gradients, and Adam moves a function that
applies it k times, so ``lr_scale`` divides its learning rate by k (``"linear"``) or sqrt(k) (``"sqrt"``). After a
growth, ``rewarmup=W`` ramps every group's learning rate from 1/W of its value back to all of it over W steps.

Invariants:
- Between optimizer steps every group's ``"lr"`` is exactly what the user (or an LR scheduler) set: the multiplier is
  applied by a global optimizer step pre-hook and undone by the post-hook, so any scheduler composes with it. (A
  step that raises leaves its scaled values until the next step starts, unless something set them anew.)
- A group holding parameters of a wrapper with scaling on holds one unit's parameters, or only parameters outside
  the units (multiplier: the re-warmup factor alone); anything else is refused before the optimizer steps.
- With ``lr_scale="none"`` and ``rewarmup=0`` nothing is registered: optimizers run untouched.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable

import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook
from torch.utils.weak import WeakIdKeyDictionary

from .errors import GrowopsError, GrowopsTypeError, check_choice, check_int

LR_SCALES: dict[str, float] = {"none": 0.0, "sqrt": 0.5, "linear": 1.0}  # name -> power of the uses
REST = -1  # the "unit" of parameters outside the growable units (fixed blocks, embeddings, head)

# parameter -> (weak reference to its wrapper, unit); filled by register(), read by the hooks. The wrapper gives the
# multiplier with ``lr_factor(unit)``.
_UNITS = WeakIdKeyDictionary()
_hooks_installed = False
# optimizer -> [(group, the lr that was set, the scaled lr)] from the pre-hook, until the post-hook puts them back.
_SAVED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def check_lr_options(lr_scale: str, rewarmup: int, resample: str) -> tuple[float, int]:
    """``(power, rewarmup)`` for valid options; refuses scaling with per-micro-batch depths (no one count of uses)."""
    power = LR_SCALES[check_choice("lr_scale", lr_scale, tuple(LR_SCALES))]
    rewarmup = check_int("rewarmup", rewarmup)
    if power and resample != "step":
        raise GrowopsError(f"lr_scale={lr_scale!r} needs one depth per optimizer step, but resample={resample!r} "
                           "draws a depth per micro-batch: use resample='step', or lr_scale='none'")
    return power, rewarmup


def scale(uses: int, power: float) -> float:
    """The learning-rate multiplier of a unit run `uses` times: ``uses ** -power`` (1 for a unit not run)."""
    return float(uses) ** -power if uses > 0 else 1.0


def warmup(steps_since_growth: int | None, rewarmup: int) -> float:
    """``min(1, (t + 1) / rewarmup)`` at the t-th step after a growth; 1 before any growth or with rewarmup=0."""
    if steps_since_growth is None or rewarmup <= 0:
        return 1.0
    return min(1.0, (steps_since_growth + 1) / rewarmup)


def register(owner: nn.Module, unit_params: Iterable[tuple[int, nn.Parameter]]) -> None:
    """Mark parameters as belonging to a unit (or REST) of `owner`, whose ``lr_factor(unit)`` is the multiplier."""
    global _hooks_installed
    ref = weakref.ref(owner)
    for unit, p in unit_params:
        _UNITS[p] = (ref, unit)
    if not _hooks_installed:
        register_optimizer_step_pre_hook(_scale_lrs)
        register_optimizer_step_post_hook(_restore_lrs)
        _hooks_installed = True


def split_groups(groups, unit_of: dict[int, int]) -> list[dict]:
    """`groups` (parameters, or dicts with "params" and options, as torch optimizers take) split so that each
    unit's parameters form groups of their own; every option is kept and empty groups are dropped. ``unit_of`` maps
    ``id(parameter)`` to its unit (missing: REST)."""
    if isinstance(groups, (torch.Tensor, dict)):
        groups = [groups]
    try:
        groups = list(groups)
    except TypeError:
        raise GrowopsTypeError(f"param_groups takes parameters or dicts with 'params', got {type(groups).__name__}")\
            from None
    if not groups:
        raise GrowopsError("param_groups got no parameters")
    if not all(isinstance(g, dict) for g in groups):
        if any(isinstance(g, dict) for g in groups):
            raise GrowopsTypeError("param_groups takes parameters or dicts with 'params', not a mix of both")
        groups = [{"params": groups}]
    out = []
    for group in groups:
        if "params" not in group:
            raise GrowopsError(f"a parameter group needs a 'params' entry, got keys {sorted(group)}")
        params = [group["params"]] if isinstance(group["params"], torch.Tensor) else list(group["params"])
        by_unit: dict[int, list] = {}
        for p in params:
            by_unit.setdefault(unit_of.get(id(p), REST), []).append(p)
        for unit in sorted(by_unit):
            out.append({**group, "params": by_unit[unit], "growops_unit": unit})
    return out


def _scale_lrs(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    _restore_lrs(optimizer, args, kwargs)  # a step that raised left its scaled values: put them back first
    saved = []
    for i, group in enumerate(optimizer.param_groups):
        owners = {(ref(), unit) for ref, unit in (_UNITS[p] for p in group["params"] if p in _UNITS)}
        owners = {(o, u) for o, u in owners if o is not None}
        if not owners:
            continue
        if any(p not in _UNITS for p in group["params"]):
            raise GrowopsError(f"optimizer parameter group {i} mixes parameters growops scales with parameters it does "
                               "not know (added after the optimizer's groups were made, an adapter say): build the "
                               "optimizer from a.param_groups(...) after every parameter exists")
        if len(owners) > 1:
            what = ("parameters of several wrapped models" if len({id(o) for o, _ in owners}) > 1 else
                    f"parameters of units {sorted(u for _, u in owners)} (-1: outside the growable units)")
            raise GrowopsError(f"optimizer parameter group {i} holds {what}, whose learning rates lr_scale/rewarmup "
                               "scale separately: build the optimizer from a.param_groups(...), which gives each "
                               "unit its own groups")
        (owner, unit), = owners
        multiplier = owner.lr_factor(unit)
        if multiplier != 1.0:
            saved.append((group, group["lr"], group["lr"] * multiplier))
    for group, _, scaled in saved:  # every group checked first: a refusal changes nothing
        group["lr"] = scaled
    if saved:
        _SAVED[optimizer] = saved


def _restore_lrs(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    for group, lr, scaled in _SAVED.pop(optimizer, ()):
        if group["lr"] is scaled:  # not set anew since (by a scheduler, after a step that raised)
            group["lr"] = lr
