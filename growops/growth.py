"""Expanding a stack: new block j takes the weights of old block ``sources[j]``.

Invariant: blocks keep their Parameter objects (weights are copied in place), so an optimizer built over
the model's parameters before a growth still holds every parameter after it.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from .fx.analysis import BlockStack
from .maps import growth_sources


@torch.no_grad()
def copy_blocks(blocks: Sequence[nn.Module], sources: Sequence[int]) -> list[int]:
    """Copy parameters and buffers of block ``sources[j]`` into block ``j``; return the j that changed."""
    changed = [j for j, s in enumerate(sources) if s != j]
    # Snapshot the sources first: a source may itself be overwritten (stacking maps 3 -> 6 as 0,1,2,0,1,2).
    snapshot = {s: {k: v.detach().clone() for k, v in blocks[s].state_dict().items()}
                for s in {sources[j] for j in changed}}
    for j in changed:
        for name, tensor in blocks[j].state_dict(keep_vars=True).items():
            tensor.copy_(snapshot[sources[j]][name])
    return changed


def expand_blocks(root: nn.Module, stack: BlockStack, n_old: int, n_new: int, growth: str = "interpolate") -> list[int]:
    """Grow `stack` of `root` from `n_old` to `n_new` live blocks in place, by interpolation or stacking.

    Block j < n_new takes the weights of block ``growth_sources(n_old, n_new, growth)[j]``; blocks at and past
    n_new are untouched. Returns the indices of the blocks whose weights changed.
    """
    blocks = [root.get_submodule(b) for b in stack.blocks]
    return copy_blocks(blocks, growth_sources(n_old, n_new, growth))
