"""The training schedule: stages of unique blocks, and the depth sampled at each optimizer step.

Invariants:
- ``stages`` strictly increase and the last equals the model's depth L; stage s begins at optimizer step
  ``stage_steps[s - 1]`` (stage 0 at step 0).
- A sampled depth always lies in ``[unique, L]`` and depends only on ``(seed, step)``: every process of a
  distributed run draws the same depth without communicating, and a resumed run draws the same depths again.
"""

from __future__ import annotations

import functools
import math
from bisect import bisect_right
from collections.abc import Callable
from dataclasses import dataclass
from typing import Union

import numpy as np

from .errors import GrowopsError, GrowopsTypeError

# A sampler maps (unique blocks, full depth L, rng) to a depth in [unique, L].
Sampler = Callable[[int, int, np.random.Generator], int]
SamplerSpec = Union[str, Sampler]


def lvps_depth(unique: int, layers: int, rng: np.random.Generator) -> int:
    """Low-value-prioritized sampling, the formula of the Apollo authors' released sampler.

    ``y = m / (x + n)`` with ``x ~ U(x_min, 1)`` falls from ``begin = r + 0.4`` to ``end = 0.6`` (r = L / N),
    is clipped to ``[1, r]``, and the depth is ``floor(y * N)``: low depths are the most likely
    (for N=3, L=12: P(depth=3) ~ 0.64, E[depth] ~ 4.2), yet every depth up to L keeps some probability.
    """
    r = layers / unique
    begin, end, x_min = r + 0.4, 0.6, 1e-6
    n = (begin * x_min - end) / (end - begin)
    m = end * (n + 1)
    x = rng.uniform(x_min, 1.0)
    y = min(max(m / (x + n), 1.0), r)
    # The epsilon keeps y == r from landing on L - 1 through rounding of L / N * N.
    return min(layers, max(unique, math.floor(y * unique + 1e-9)))


def uniform_depth(unique: int, layers: int, rng: np.random.Generator) -> int:
    """Every depth in [unique, L] equally likely."""
    return int(rng.integers(unique, layers + 1))


def full_depth(unique: int, layers: int, rng: np.random.Generator) -> int:
    """Always the full depth L."""
    return layers


def unique_depth(unique: int, layers: int, rng: np.random.Generator) -> int:
    """Always as deep as the unique blocks: classic progressive training (StackBERT)."""
    return unique


SAMPLERS: dict[str, Sampler] = {
    "lvps": lvps_depth, "uniform": uniform_depth, "full": full_depth, "unique": unique_depth}


def resolve_sampler(sampler: SamplerSpec) -> tuple[str, Sampler]:
    """``(name, function)`` for a sampler name or callable; a callable is named by its module and qualified name
    (its class's for a callable object)."""
    if isinstance(sampler, str):
        if sampler not in SAMPLERS:
            raise GrowopsError(f"unknown sampler {sampler!r}: use one of {', '.join(map(repr, SAMPLERS))} "
                               "or a callable (unique, L, rng) -> depth")
        return sampler, SAMPLERS[sampler]
    if callable(sampler):
        named = sampler.func if isinstance(sampler, functools.partial) else sampler
        named = named if hasattr(named, "__qualname__") else type(named)
        return f"{getattr(named, '__module__', None) or '?'}:{named.__qualname__}", sampler
    raise GrowopsTypeError(
        f"sampler must be a name or a callable (unique, L, rng) -> depth, got {type(sampler).__name__}")


def step_rng(seed: int, step: int, micro_batch: int = 0) -> np.random.Generator:
    """The generator for one optimizer step (and micro-batch, when each draws its own depth): a pure function of
    (seed, step, micro_batch), no global state. Micro-batch 0 uses the step's own generator."""
    return np.random.default_rng([seed, step] if micro_batch == 0 else [seed, step, micro_batch])


@dataclass(frozen=True)
class Schedule:
    """Unique-block counts per stage and the optimizer step at which each later stage begins."""

    stages: tuple[int, ...]
    stage_steps: tuple[int, ...]

    @classmethod
    def checked(cls, stages, stage_steps, layers: int | None) -> Schedule:
        """Validate against a model of `layers` blocks (None: not known yet, every rule but the last stage's is
        checked); every rule has its own message and fix."""
        stages, stage_steps = _int_tuple(stages, "stages"), _int_tuple(stage_steps, "stage_steps")
        if not stages:
            raise GrowopsError(f"stages is empty: give the unique-block count of each stage, ending at L={layers}, "
                               f"e.g. stages=(1, {layers})")
        if stages[0] < 1:
            raise GrowopsError(f"stages must start at 1 or more unique blocks, got stages={stages}")
        if any(b <= a for a, b in zip(stages, stages[1:])):
            raise GrowopsError(f"stages must strictly increase, got stages={stages}")
        if layers is not None and stages[-1] != layers:
            raise GrowopsError(f"the last stage must hold all L={layers} blocks of the model, got stages={stages}: "
                               f"end them with {layers}")
        if len(stage_steps) != len(stages) - 1:
            raise GrowopsError(f"stage_steps needs one step per stage after the first ({len(stages) - 1} for "
                               f"stages={stages}), got {len(stage_steps)}: stage_steps={stage_steps}")
        if stage_steps and stage_steps[0] < 1:
            raise GrowopsError(f"stage_steps must be positive (stage 0 begins at step 0), got {stage_steps}")
        if any(b <= a for a, b in zip(stage_steps, stage_steps[1:])):
            raise GrowopsError(f"stage_steps must strictly increase, got stage_steps={stage_steps}")
        return cls(stages, stage_steps)

    def stage_at(self, step: int) -> int:
        """Index of the stage that optimizer step `step` belongs to."""
        return bisect_right(self.stage_steps, step)


def _int_tuple(values, name: str) -> tuple[int, ...]:
    try:
        out = tuple(values)
    except TypeError:
        raise GrowopsTypeError(f"{name} must be a sequence of ints, got {values!r}") from None
    if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in out):
        raise GrowopsTypeError(f"{name} must hold ints, got {values!r}")
    return tuple(int(v) for v in out)
