"""FLOPs counted, not guessed: ``torch.utils.flop_counter.FlopCounterMode`` over one forward and backward.

The cost of a training step depends on the (unique blocks, depth) configuration it ran, so each distinct
configuration is measured once on a batch of the training shape and cached.
"""

from __future__ import annotations

import contextlib
import copy

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import growops


class StepFlops:
    """FLOPs of one training step (forward + backward) of `model` per (unique, depth) configuration."""

    def __init__(self, model: torch.nn.Module, batch: dict, autocast_dtype: torch.dtype | None = None):
        self.model = model
        self.batch = batch
        self.autocast_dtype = autocast_dtype
        self.cache: dict[tuple[int, int], int] = {}

    def __call__(self, unique: int, depth: int) -> int:
        key = (unique, depth)
        if key not in self.cache:
            self.cache[key] = self._measure(unique, depth)
        return self.cache[key]

    def _measure(self, unique: int, depth: int) -> int:
        # Measure on a throwaway copy so the real model's gradients and schedule are untouched.
        model = copy.deepcopy(self.model)
        model.train()
        if isinstance(model, growops.Apollo):
            model._configure(unique, depth)
        device = next(model.parameters()).device
        # FlopCounterMode has no formula for the CPU flash-attention kernel (it would count attention as 0): count
        # the math backend's matmuls instead, the same FLOPs the GPU kernels' formulas give.
        math_attention = sdpa_kernel([SDPBackend.MATH]) if device.type == "cpu" else contextlib.nullcontext()
        with math_attention, FlopCounterMode(display=False) as counter:
            with torch.autocast(device.type, dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None):
                loss = model(**self.batch).loss
            loss.backward()
        return counter.get_total_flops()
