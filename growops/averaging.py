"""Weight averages (EMA, SWA) of the function an apollo model computes, not of its physical slots.

``torch.optim.swa_utils.AveragedModel(a)`` would average each physical slot: a slot not grown yet averages weights
that never trained, and after a growth moves units, a slot's average mixes two units. ``AveragedExport`` averages
``a.export()`` instead, reading each position's weights from the live unit it runs, with no copy per step:

    ema = growops.AveragedExport(a, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    ...  # after each a.step(opt):
    ema.update_parameters(a)
    ema.module  # a plain model (the class of a.model): the EMA of a.export() over the steps

Invariant: after the same updates, ``ema.module`` holds what ``AveragedModel`` over a fresh ``a.export()`` at every
step would hold. ``AveragedModel(a)`` and ``AveragedModel(a.model)`` raise, naming this class.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from .errors import GrowopsError, GrowopsTypeError
from .saved import exported_sources, per_layer_tensors


class AveragedExport(AveragedModel):
    """``AveragedModel`` of ``a.export()``, updated from the wrapper: ``update_parameters(a)`` (module docstring).
    Takes ``AveragedModel``'s arguments after `a`."""

    def __init__(self, a: nn.Module, device=None, avg_fn=None, multi_avg_fn=None, use_buffers: bool = False):
        from .apollo import Apollo

        if not isinstance(a, Apollo):
            raise GrowopsTypeError(f"AveragedExport averages a growops.apollo wrapper, got a {type(a).__name__}; "
                                   "for a plain model use torch.optim.swa_utils.AveragedModel")
        super().__init__(a.export(), device, avg_fn, multi_avg_fn, use_buffers)

    def update_parameters(self, model: nn.Module) -> None:
        """Average in the model `model` (the ``Apollo`` wrapper) computes now, ``model.export()``; call it after
        each ``a.step()``."""
        from .apollo import Apollo

        if not isinstance(model, Apollo):
            raise GrowopsTypeError(f"AveragedExport.update_parameters takes the apollo wrapper `a`, got a "
                                   f"{type(model).__name__}")
        super().update_parameters(ExportedView(model))


class ExportedView:
    """What ``a.export()`` would hold, as the live tensors themselves: ``parameters()`` and ``buffers()`` in the
    export's order, each position's entries read from the unit it runs (per-layer buffers: the slot's own)."""

    def __init__(self, a):
        self.a = a

    def _sources(self, named: dict[str, torch.Tensor]) -> dict[str, str]:
        """name -> the name whose tensor the export holds there."""
        out = {}
        for runtime in self.a._runtimes:
            own = per_layer_tensors(runtime)
            pairs = exported_sources(runtime.unique, runtime.layers, runtime.growth, runtime.layout.unit)
            for target, source in pairs:
                head, src = f"{runtime.path}.{runtime.names[target]}.", f"{runtime.path}.{runtime.names[source]}."
                for name, tensor in named.items():
                    if name.startswith(head) and id(tensor) not in own:
                        out[name] = src + name[len(head):]
        return out

    def _view(self, named: dict[str, torch.Tensor]) -> Iterator[torch.Tensor]:
        sources = self._sources(named)
        for name, tensor in named.items():
            yield named[sources[name]] if name in sources else tensor

    def parameters(self) -> Iterator[torch.Tensor]:
        return self._view(dict(self.a.model.named_parameters()))

    def buffers(self) -> Iterator[torch.Tensor]:
        return self._view(dict(self.a.model.named_buffers()))


def refuse_averaged_copy() -> None:
    """Raise if the wrapper, or a model it manages, is being deep-copied by ``AveragedModel.__init__``."""
    code = AveragedModel.__init__.__code__
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code and not isinstance(frame.f_locals.get("self"), AveragedExport):
            raise GrowopsError(
                "AveragedModel(a) (or of a.model) would average the model's physical slots: slots not grown yet hold "
                "weights that never trained, and growth moves units between slots, so the average is not one of the "
                "model a.eval() computes. Use growops.AveragedExport(a, ...) (the same arguments) and "
                "ema.update_parameters(a): it averages a.export()")
        frame = frame.f_back
