"""Growth recipes from the literature as configurations of the one wrapper (``growops.Apollo``).

- ``apollo``: Apollo (Pan et al., AAAI 2024): stages of 1, 3, 6, ... unique blocks, LVPS depth sampling, weights
  shared by interpolation, growth by interpolation (``growops.apollo``).
- ``gstack``: G_stack (Du et al., NeurIPS 2024, "Stacking Your Transformers"): train L/g blocks as a model of their
  own, then stack them g times (block j copies block j mod L/g) and train the full model; g = 4 by default.
- ``stackbert``: progressive stacking (Gong et al., ICML 2019): double the depth by stacking at each stage.

Invariant: a recipe only chooses ``stages``, ``sampler`` and ``growth``; everything else (``lr_scale``, ``rewarmup``,
``optimizer_state``, ``stack``, ...) passes through, and the result is an ``Apollo`` that saves, resumes, exports and
compiles like any other.
"""

from __future__ import annotations

import math

from torch import nn

from .apollo import Apollo
from .errors import GrowopsError, check_int
from .plan import make_plan

FIXED = ("stages", "sampler", "growth")


def gstack(model: nn.Module, grow_step: int, factor: int = 4, **options) -> Apollo:
    """G_stack: train ``L / factor`` blocks until optimizer step `grow_step`, then stack them `factor` times.

    The small model runs its own blocks once (no sharing, sampler ``"unique"``); at `grow_step` the blocks are
    stacked (``growth="stack"``). The paper's growth factor is 4; for the growth point it fits
    ``gstack_growth_tokens`` on models of 410M-7B parameters (billions of tokens): at smaller scale measure it
    (benchmarks/RESULTS.md has ours). `options` are ``growops.apollo``'s other arguments.
    """
    factor = check_int("factor", factor, 2)
    _refuse_fixed(options, "gstack")
    layers = _layers(model, options)
    if layers % factor:
        raise GrowopsError(f"gstack stacks L/factor blocks factor times, but L={layers} is not a multiple of "
                           f"factor={factor}: pick a factor that divides {layers}")
    return Apollo(model, stages=(layers // factor, layers), stage_steps=(check_int("grow_step", grow_step, 1),),
                  sampler="unique", growth="stack", **options)


def stackbert(model: nn.Module, stage_steps, stages=None, **options) -> Apollo:
    """Progressive stacking: each stage doubles the unique blocks by stacking them (StackBERT: 3, 6, 12 for a
    12-layer BERT), running only the unique blocks. `stages` defaults to L/4, L/2, L; `stage_steps` gives the step at
    which each later stage begins. `options` are ``growops.apollo``'s other arguments."""
    _refuse_fixed(options, "stackbert")
    if stages is None:
        layers = _layers(model, options)
        if layers % 4:
            raise GrowopsError(f"stackbert's default stages are L/4, L/2, L, but L={layers} is not a multiple of 4: "
                               "pass stages=(...) yourself")
        stages = (layers // 4, layers // 2, layers)
    return Apollo(model, stages=stages, stage_steps=stage_steps, sampler="unique", growth="stack", **options)


def gstack_growth_tokens(parameters: float, flops: float) -> float:
    """The G_stack paper's fitted growth point, in training tokens of the small model:
    ``log10(d) = 0.88 log10(N) + 163.27 / log10(C) - 5.74`` for a target of N parameters trained with C FLOPs.
    Fitted on 410M-7B models; it does not extrapolate to small models (for 160k parameters it asks for more
    tokens than the whole run)."""
    if parameters <= 1 or flops <= 10:
        raise GrowopsError(f"gstack_growth_tokens needs parameters > 1 and flops > 10, got {parameters}, {flops}")
    return 10 ** (0.88 * math.log10(parameters) + 163.27 / math.log10(flops) - 5.74)


def _refuse_fixed(options: dict, recipe: str) -> None:
    fixed = [k for k in FIXED if k in options]
    if fixed:
        raise GrowopsError(f"{recipe} chooses {', '.join(fixed)} itself: use growops.apollo(...) to set "
                           f"{'them' if len(fixed) > 1 else 'it'}")


def _layers(model: nn.Module, options: dict) -> int:
    """L, from the plan the wrapper will use (found once: it is passed on as ``plan=``)."""
    if options.get("plan") is None:
        options["plan"] = make_plan(model, options.pop("stack", None), options.get("example_inputs"))
    return options["plan"].layers
