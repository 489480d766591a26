"""Depth maps: which unique block runs at each position, and where grown blocks copy from.

A *depth map* for `unique` blocks at `depth` positions is a tuple `m` of length `depth` with
`m[i]` the unique block that position `i` runs. Two growth rules are supported:

- ``"interpolate"`` (Apollo): ``m[i] = floor(i * unique / depth)``; e.g. unique=3, depth=8 gives
  ``(0, 0, 0, 1, 1, 1, 2, 2)``. Monotone, and every block is used when ``depth >= unique``.
- ``"stack"`` (StackBERT, the authors' code): whole cycles ``0..unique-1``, then a last partial cycle of
  ``r`` positions runs the top ``r`` blocks ``unique-r..unique-1``; e.g. unique=3, depth=4 gives ``(0, 1, 2, 2)``.
  The last position always runs the top block.

Growing from `n_old` to `n_new` unique blocks uses the same rule: new block ``j`` copies old block
``depth_map(n_old, n_new, growth)[j]``. For ``"interpolate"`` and ``n_new = c * n_old`` this composes:
``depth_map(n_new, d)`` followed by the copy map equals ``depth_map(n_old, d)`` for every depth ``d``,
so growth by a multiple leaves the function unchanged at every depth.
"""

from __future__ import annotations

from functools import lru_cache
from typing import Literal

from .errors import GrowopsError, check_choice

Growth = Literal["interpolate", "stack"]
GROWTHS: tuple[str, ...] = ("interpolate", "stack")


def check_growth(growth: str) -> str:
    return check_choice("growth", growth, GROWTHS)


@lru_cache(maxsize=4096)
def depth_map(unique: int, depth: int, growth: str = "interpolate") -> tuple[int, ...]:
    """Unique block run at each of `depth` positions: ``floor(i * unique / depth)`` for ``"interpolate"``; for
    ``"stack"``, whole cycles of ``0..unique-1``, then a last partial cycle on the top blocks.

    >>> depth_map(3, 8)
    (0, 0, 0, 1, 1, 1, 2, 2)
    >>> depth_map(3, 8, "stack")
    (0, 1, 2, 0, 1, 2, 1, 2)
    """
    check_growth(growth)
    if unique < 1 or depth < unique:
        raise GrowopsError(f"a depth map needs 1 <= unique <= depth, got unique={unique}, depth={depth}")
    if growth == "interpolate":
        return tuple(i * unique // depth for i in range(depth))
    cycles, rest = divmod(depth, unique)
    return tuple(range(unique)) * cycles + tuple(range(unique - rest, unique))


def growth_sources(n_old: int, n_new: int, growth: str = "interpolate") -> tuple[int, ...]:
    """Old block that each of the `n_new` new blocks copies: ``depth_map(n_old, n_new, growth)``.

    >>> growth_sources(3, 6)
    (0, 0, 1, 1, 2, 2)
    >>> growth_sources(3, 6, "stack")
    (0, 1, 2, 0, 1, 2)
    """
    if n_new < n_old:
        raise GrowopsError(f"growth must not shrink the model: {n_old} -> {n_new} unique blocks")
    return depth_map(n_old, n_new, growth)


def preserves_function(n_old: int, n_new: int, growth: str = "interpolate") -> bool:
    """True when growing `n_old` -> `n_new` keeps the output at every depth (interpolation by a multiple).

    Stacking keeps it only at depths that are multiples of `n_new`, so it returns False for ``"stack"``
    unless nothing changes.
    """
    if n_old == n_new:
        return True
    return growth == "interpolate" and n_new % n_old == 0
