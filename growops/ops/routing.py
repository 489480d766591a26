"""Route the linear layers of shared blocks through ``growops::shared_linear``, and put them back exactly.

Routing changes a module's class to a subclass whose forward calls the op; parameters, buffers, hooks and
state_dict keys stay as they were, and ``unroute`` restores the original class. Routed: ``nn.Linear`` and Hugging
Face's ``Conv1D`` (GPT-2), matched by exact type, so a user's own Linear subclass (LoRA, quantized) is left alone.

Invariant: a routed module computes what the original computes (up to the fp32 summation of its weight
gradient), and ``unroute(route(m))`` leaves no trace: same class, same ``__dict__`` keys.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor, nn

from .shared_linear import compute_dtype, compute_weight, shared_linear

__all__ = ["SharedLinear", "route_shared_linears", "unroute"]

_RUNTIME = "_growops_runtime"  # instance attribute: the StackRuntime whose forwards bound the cast cache


def _cached_compute_weight(module: nn.Module, weight: Tensor, dtype: torch.dtype) -> Tensor | None:
    """The compute-dtype copy of `weight`, cast once per forward of the stack instead of once per use, as autocast
    caches its cast once per region. The cache lives in the runtime, which empties it when a forward starts and at
    every ``a.step()``: nothing keys on the weight's version counter, which fused AdamW does not bump. None (cast
    per use) without a runtime, under torch.compile (the cast is in the graph) and in inference mode (an inference
    tensor must not be saved for a later training forward)."""
    runtime = module.__dict__.get(_RUNTIME)
    if runtime is None or weight.dtype == dtype or torch.compiler.is_compiling() \
            or torch.is_inference_mode_enabled():
        return None
    key = (dtype, weight.device, weight.data_ptr())
    entry = runtime.cast_cache.get(id(module))
    if entry is None or entry[0] != key:
        entry = (key, compute_weight(weight, dtype))
        runtime.cast_cache[id(module)] = entry
    return entry[1]


class SharedLinear(nn.Linear):
    """``nn.Linear`` routed through ``growops::shared_linear`` (built by ``route_shared_linears``)."""

    _growops_original = nn.Linear

    def forward(self, x: Tensor) -> Tensor:
        lp = _cached_compute_weight(self, self.weight, compute_dtype(x))
        return shared_linear(x, self.weight, self.bias, lp)


def _conv1d_forward(self, x: Tensor) -> Tensor:
    # Hugging Face Conv1D: weight (in, out), y = x @ weight + bias.
    lp = _cached_compute_weight(self, self.weight, compute_dtype(x))
    return shared_linear(x, self.weight.t(), self.bias, None if lp is None else lp.t())


def _hf_conv1d() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None
    return Conv1D


def _shared_conv1d() -> type | None:
    """``SharedConv1D``, built once on demand (transformers is optional) under a stable module-level name, so
    pickle finds it."""
    cls = globals().get("SharedConv1D")
    conv1d = _hf_conv1d() if cls is None else None
    if conv1d is not None:
        cls = type("SharedConv1D", (conv1d,), {"forward": _conv1d_forward, "_growops_original": conv1d,
                                               "__module__": __name__, "__qualname__": "SharedConv1D"})
        globals()["SharedConv1D"] = cls
    return cls


def __getattr__(name: str):
    if name == "SharedConv1D" and _shared_conv1d() is not None:
        return globals()["SharedConv1D"]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _routed_class(module: nn.Module) -> type | None:
    if type(module) is nn.Linear:
        return SharedLinear
    conv1d = _hf_conv1d() if type(module).__name__ == "Conv1D" else None
    if conv1d is not None and type(module) is conv1d:
        return _shared_conv1d()
    return None


def route_shared_linears(blocks: Iterable[nn.Module], runtime: Any = None) -> int:
    """Route every ``nn.Linear`` / ``Conv1D`` inside `blocks` (in place); returns how many were routed.

    `runtime`: an object with a dict ``cast_cache`` that is emptied when a forward starts (apollo passes its
    ``StackRuntime``); with it, each layer casts its weight to the compute dtype once per forward, not per use."""
    routed = 0
    for block in blocks:
        for module in block.modules():
            cls = _routed_class(module)
            if cls is not None:
                module.__class__ = cls
                if runtime is not None:
                    module.__dict__[_RUNTIME] = runtime
                routed += 1
    return routed


def unroute(root: nn.Module) -> int:
    """Restore every routed module under `root` to its original class (in place); returns how many."""
    restored = 0
    for module in root.modules():
        original = type(module).__dict__.get("_growops_original")
        if original is not None:
            module.__class__ = original
            runtime = module.__dict__.pop(_RUNTIME, None)
            if runtime is not None:
                runtime.cast_cache.pop(id(module), None)
            restored += 1
    return restored
