"""Expanding a stack: new unit j takes the weights of old unit ``sources[j]``.

Invariants: blocks keep their Parameter objects (weights are copied in place), so an optimizer built over the
model's parameters before a growth still holds every parameter after it; per-layer values (``growops.values``) are
never copied, so every block keeps its own. State that belongs to a weight is copied with it (a pruning mask, a
parametrization's, normalization statistics: all in the state dict); what prune recomputes from them is recomputed.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn.utils.prune import BasePruningMethod

from .fx.analysis import BlockStack
from .maps import growth_sources
from .values import read

Unit = Sequence[nn.Module]  # the blocks of one growable unit (one block for period-1 stacks)


@torch.no_grad()
def copy_units(units: Sequence[Unit], sources: Sequence[int], per_layer: Sequence[str] = ()) -> list[int]:
    """Copy the parameters and buffers of unit ``sources[j]`` into unit ``j``, except the per-layer values at unit
    paths `per_layer`; return the j that changed."""
    changed = [j for j, s in enumerate(sources) if s != j]
    # Per-layer buffers are recognised by identity, not by name: a wrapper may rename state_dict keys.
    own = {id(v) for u in {*changed, *(sources[j] for j in changed)} for p in per_layer
           if isinstance(v := read(units[u], p), torch.Tensor)}
    # Snapshot the sources first: a source may itself be overwritten (stacking maps 3 -> 6 as 0,1,2,0,1,2).
    snapshot = {s: [{k: v.detach().clone() for k, v in block.state_dict(keep_vars=True).items()
                     if isinstance(v, torch.Tensor) and id(v) not in own}
                    for block in units[s]] for s in {sources[j] for j in changed}}
    for j in changed:
        for r, block in enumerate(units[j]):
            source = snapshot[sources[j]][r]
            for name, tensor in block.state_dict(keep_vars=True).items():
                if name in source and id(tensor) not in own:
                    tensor.copy_(source[name])
            _recompute_pruned(block)
    return changed


def _recompute_pruned(block: nn.Module) -> None:
    """Recompute the tensors ``torch.nn.utils.prune`` derives from a weight and its mask (``weight`` from
    ``weight_orig * weight_mask``) in `block`, whose weights and masks were just copied: read between calls, they
    show the copied weights, as after prune's own call (each call recomputes them anyway)."""
    for module in block.modules():
        for hook in module._forward_pre_hooks.values():
            if isinstance(hook, BasePruningMethod):
                setattr(module, hook._tensor_name, hook.apply_mask(module))


def copy_blocks(blocks: Sequence[nn.Module], sources: Sequence[int], per_layer: Sequence[str] = ()) -> list[int]:
    """``copy_units`` for a stack whose units are single blocks."""
    return copy_units([(b,) for b in blocks], sources, per_layer)


def expand_blocks(root: nn.Module, stack: BlockStack, n_old: int, n_new: int, growth: str = "interpolate") -> list[int]:
    """Grow `stack` of `root` from `n_old` to `n_new` live units in place, by interpolation or stacking.

    Unit j < n_new takes the weights of unit ``growth_sources(n_old, n_new, growth)[j]`` (per-layer values stay);
    units at and past n_new are untouched. Returns the indices of the units whose weights changed.
    """
    units = [[root.get_submodule(b) for b in stack.unit(u)] for u in range(stack.layers)]
    return copy_units(units, growth_sources(n_old, n_new, growth), list(stack.per_layer_values))
