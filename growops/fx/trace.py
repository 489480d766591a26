"""Turn a model into an FX graph: ``torch.fx.symbolic_trace`` where it traces, ``torch.export`` where it does not.

Hugging Face models in transformers 5 do not symbolically trace; ``torch.export.export(strict=False)`` on
example inputs does, and tags every node with ``nn_module_stack``. The graph is used to *analyse* the model
(and, for models that index their blocks, to rewrite it); tracing never changes the model.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..errors import GrowopsError


@dataclass
class TracedModel:
    """A graph of `model`'s forward. ``kind`` is ``"symbolic"`` (runnable with the model's own signature,
    blocks as ``call_module`` leaves) or ``"export"`` (for analysis only: specialised to the example inputs)."""

    graph_module: fx.GraphModule
    kind: str
    symbolic_error: str | None = None


class _LeafTracer(fx.Tracer):
    """symbolic_trace that keeps the given modules as ``call_module`` leaves, so their insides need not trace."""

    def __init__(self, leaves: set[nn.Module] = frozenset()):
        # The default lets FX rebuild a pickled GraphModule, which constructs its tracer class with no arguments.
        super().__init__()
        self.leaves = leaves

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return any(m is leaf for leaf in self.leaves) or super().is_leaf_module(m, qualname)


def symbolic_trace(model: nn.Module, leaves: set[nn.Module] = frozenset()) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with `leaves` kept as ``call_module`` nodes."""
    graph = _LeafTracer(set(leaves)).trace(model)
    return fx.GraphModule(model, graph, type(model).__name__)


def example_inputs_for(model: nn.Module, example_inputs: Any = None) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` to run `model` on: the given example inputs, else the Hugging Face convention
    ``model.dummy_inputs``; caches are turned off (``use_cache=False``) where the forward takes that flag."""
    if example_inputs is None:
        example_inputs = getattr(model, "dummy_inputs", None)
        if example_inputs is None:
            return None
    if isinstance(example_inputs, dict):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    elif isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[1], dict):
        args, kwargs = tuple(example_inputs[0]), dict(example_inputs[1])
    elif isinstance(example_inputs, (tuple, list)):
        args, kwargs = tuple(example_inputs), {}
    else:
        raise GrowopsError(f"example_inputs must be a tensor, a tuple of args, a dict of kwargs or (args, kwargs), "
                           f"got {type(example_inputs).__name__}")
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    if "use_cache" in params and "use_cache" not in kwargs:
        kwargs["use_cache"] = False
    return args, kwargs


def trace_model(model: nn.Module, leaves: set[nn.Module] = frozenset(), example_inputs: Any = None,
                training: bool = False) -> TracedModel:
    """Trace `model` without gradients, in eval mode unless `training`; its training flags are restored afterwards.

    Tries symbolic tracing first (no inputs needed), then ``torch.export`` on the example inputs (always in eval
    mode: the export graph is used for analysis only). Raises GrowopsError naming both failures when neither works.
    """
    modes = {m: m.training for m in model.modules()}
    model.train(training)
    try:
        try:
            return TracedModel(symbolic_trace(model, leaves), "symbolic")
        except Exception as e:  # noqa: BLE001 - any tracing failure means: try export
            symbolic_error = _first_line(e)
        model.eval()
        inputs = example_inputs_for(model, example_inputs)
        if inputs is None:
            raise GrowopsError(
                f"cannot trace {type(model).__name__}: torch.fx.symbolic_trace failed ({symbolic_error}) and there are "
                "no example inputs for torch.export; pass example_inputs=(args, kwargs) (or a dict of kwargs), "
                "or give the model a `dummy_inputs` property as Hugging Face models have")
        try:
            with torch.no_grad():
                program = torch.export.export(model, inputs[0], inputs[1], strict=False)
        except Exception as e:  # noqa: BLE001
            raise GrowopsError(
                f"cannot trace {type(model).__name__}: torch.fx.symbolic_trace failed ({symbolic_error}) and "
                f"torch.export failed on the example inputs ({_first_line(e)}); check that "
                "model(*args, **kwargs) runs on the example inputs") from e
        return TracedModel(program.module(), "export", symbolic_error)
    finally:
        for m, mode in modes.items():
            m.training = mode


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
