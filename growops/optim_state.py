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
from collections.abc import Sequence

import torch
from torch import nn

from .errors import GrowopsError

POLICIES: tuple[str, ...] = ("copy", "reset", "keep")


def check_policy(policy: str) -> str:
    if policy not in POLICIES:
        raise GrowopsError(f"unknown optimizer_state {policy!r}: use one of {', '.join(map(repr, POLICIES))}")
    return policy


def remap_optimizer_state(optimizer: torch.optim.Optimizer, blocks: Sequence[nn.Module], sources: Sequence[int],
                          policy: str) -> None:
    """Apply `policy` to `optimizer`'s state after block j took block ``sources[j]``'s weights."""
    check_policy(policy)
    if policy == "keep":
        return
    changed = [j for j, s in enumerate(sources) if s != j]
    held = {p for group in optimizer.param_groups for p in group["params"]}
    params = [[p for _, p in block.named_parameters(remove_duplicate=False)] for block in blocks]
    # A parameter that an unchanged block also holds (tied across blocks) keeps its state.
    unchanged = {p for j, ps in enumerate(params) if j not in changed for p in ps}
    # "copy" snapshots the sources before writing (a source block may also be a destination); "reset" needs none.
    before = {s: [copy.deepcopy(optimizer.state.get(p)) for p in params[s]] for s in {sources[j] for j in changed}} \
        if policy == "copy" else {}
    for j in changed:
        for i, p in enumerate(params[j]):
            if p not in held or p in unchanged:
                continue
            optimizer.state.pop(p, None)
            state = before[sources[j]][i] if policy == "copy" else None
            if state:
                optimizer.state[p] = copy.deepcopy(state)
