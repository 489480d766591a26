"""Turn a model into an FX graph: ``torch.fx.symbolic_trace`` where it traces, ``torch.export`` where it does not.

Hugging Face models in transformers 5 do not symbolically trace; ``torch.export.export(strict=False)`` on
example inputs does, and tags every node with ``nn_module_stack``. The graph is used to *analyse* the model
(and, for models that index their blocks, to rewrite it); tracing never changes the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx, nn

from ..errors import GrowopsError


class NeedsInputs(GrowopsError):
    """No graph without inputs: neither symbolic tracing nor ``torch.export`` on the inputs the model provides worked,
    and none were given. ``apollo`` then plans at the first forward, from its batch."""


@dataclass
class TracedModel:
    """A graph of `model`'s forward. ``kind`` is ``"symbolic"`` (runnable with the model's own signature,
    blocks as ``call_module`` leaves) or ``"export"`` (for analysis only: specialised to the example inputs)."""

    graph_module: fx.GraphModule
    kind: str
    symbolic_error: str | None = None


class _LeafTracer(fx.Tracer):
    """symbolic_trace that keeps the given modules as ``call_module`` leaves, so their insides need not trace, and
    traces into torch.nn modules that hold one (``nn.TransformerEncoder``'s layers), which FX keeps as leaves by
    default. Records each node's source line, for errors that point at the user's code."""

    def __init__(self, leaves: set[nn.Module] = frozenset(), holders: set[int] = frozenset()):
        # The defaults let FX rebuild a pickled GraphModule, which constructs its tracer class with no arguments.
        super().__init__()
        self.leaves = {id(m) for m in leaves}
        self.holders = holders
        self.record_stack_traces = True

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if id(m) in self.leaves:
            return True
        return id(m) not in self.holders and super().is_leaf_module(m, qualname)


def symbolic_trace(model: nn.Module, leaves: set[nn.Module] = frozenset()) -> fx.GraphModule:
    """``torch.fx.symbolic_trace`` with `leaves` kept as ``call_module`` nodes and the modules above them traced."""
    leaf_ids = {id(m) for m in leaves}
    above = set()  # module paths above a leaf
    for path, m in model.named_modules():
        if id(m) in leaf_ids:
            parts = path.split(".") if path else []
            above.update(".".join(parts[:i]) for i in range(len(parts)))
    holders = {id(m) for path, m in model.named_modules() if path in above}
    graph = _LeafTracer(set(leaves), holders).trace(model)
    return fx.GraphModule(model, graph, type(model).__name__)


def example_inputs_for(model: nn.Module, example_inputs: Any = None) -> tuple[tuple, dict] | None:
    """``(args, kwargs)`` from `example_inputs` (a tensor, a tuple of args, a dict of kwargs or (args, kwargs)), None
    for None; caches are turned off (``use_cache=False``) where the forward takes that flag."""
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
    if "use_cache" not in kwargs and takes_use_cache(model):
        kwargs["use_cache"] = False
    return args, kwargs


def takes_use_cache(model: nn.Module) -> bool:
    """Whether `model`'s forward takes a ``use_cache`` flag: by name, or through ``**kwargs`` of a model whose config
    has one (a Hugging Face model that passes it on, a PEFT wrapper). Caches are state a trace must not build."""
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False
    if "use_cache" in params:
        return True
    var_kw = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    try:
        config = getattr(model, "config", None)
    except Exception:  # noqa: BLE001 - a config property that fails: no flag
        config = None
    return var_kw and hasattr(config, "use_cache")


# Where inputs for a model come from when none are given: functions ``model -> [(what, inputs), ...]``, or None for
# a model they do not know. The first that knows the model decides (the Hugging Face one registers itself in
# growops/__init__.py); a model none knows is tried on its ``dummy_inputs``.
InputsProvider = Callable[[nn.Module], "list[tuple[str, Any]] | None"]
_PROVIDERS: list[InputsProvider] = []


def register_inputs_provider(provider: InputsProvider) -> None:
    """Add `provider` to the sources of inputs ``trace_model`` tries when no example inputs are given."""
    if provider not in _PROVIDERS:
        _PROVIDERS.append(provider)


def _candidate_inputs(model: nn.Module, example_inputs: Any) -> list[tuple[str, Any]]:
    """``(what, inputs)`` to try torch.export on, in order: the user's example inputs alone if given; else what the
    first provider that knows the model gives; else the model's ``dummy_inputs``."""
    if example_inputs is not None:
        return [("the example inputs", example_inputs)]
    for provider in _PROVIDERS:
        found = provider(model)
        if found is not None:
            return found
    dummy = dummy_inputs(model)
    return [] if dummy is None else [("its dummy_inputs", dummy)]


def dummy_inputs(model: nn.Module) -> Any:
    """``model.dummy_inputs``, or None where it has none or it fails (several HF vision models' do)."""
    try:
        return getattr(model, "dummy_inputs", None)
    except Exception:  # noqa: BLE001 - a dummy_inputs property that fails: none
        return None


def trace_model(model: nn.Module, leaves: set[nn.Module] = frozenset(), example_inputs: Any = None,
                training: bool = False) -> TracedModel:
    """Trace `model` without gradients, in eval mode unless `training`; its training flags are restored afterwards.

    Tries symbolic tracing first (no inputs needed), then ``torch.export`` on example inputs (always in eval mode:
    the export graph is used for analysis only): `example_inputs` if given, else the model's ``dummy_inputs``, else
    (Hugging Face models) inputs built from its config. Raises GrowopsError naming every failure when none works.
    """
    state = module_state(model)
    model.train(training)
    try:
        try:
            return TracedModel(symbolic_trace(model, leaves), "symbolic")
        except Exception as e:  # noqa: BLE001 - any tracing failure means: try export
            symbolic_error = first_line(e)
        model.eval()
        candidates = _candidate_inputs(model, example_inputs)
        name = type(model).__name__
        if not candidates:
            raise NeedsInputs(
                f"cannot trace {name} without example inputs: torch.fx.symbolic_trace failed ({symbolic_error}), and "
                f"torch.export needs inputs, which {name} does not provide (no dummy_inputs it runs on); pass one "
                "batch as example_inputs= (a tensor, a tuple of args, a dict of kwargs, or (args, kwargs))")
        failures = []
        for what, inputs in candidates:
            args, kwargs = example_inputs_for(model, inputs)
            try:
                with torch.no_grad():
                    program = torch.export.export(model, args, kwargs, strict=False)
            except Exception as e:  # noqa: BLE001 - try the next inputs, report all
                failures.append(f"on {what}: {first_line(e)}")
                continue
            return TracedModel(program.module(), "export", symbolic_error)
        fix = ("check that the model runs on them" if example_inputs is not None else
               "pass one batch the model runs on as example_inputs=")
        error = GrowopsError if example_inputs is not None else NeedsInputs
        raise error(f"cannot trace {name}: torch.fx.symbolic_trace failed ({symbolic_error}) and torch.export "
                    f"failed {'; '.join(failures)}; {fix}")
    finally:
        restore_module_state(state)


def graph_trace(model: nn.Module, leaves: set[nn.Module], training: bool, paths: tuple[str, ...]) -> fx.GraphModule:
    """``symbolic_trace`` in train or eval mode (flags restored), for graph mode; a GrowopsError saying what graph mode
    needs when it fails."""
    state = module_state(model)
    model.train(training)
    try:
        return symbolic_trace(model, leaves)
    except Exception as e:  # noqa: BLE001 - any tracing failure: explain what graph mode needs
        raise GrowopsError(
            f"cannot change the depth of {type(model).__name__}: its forward does not iterate {', '.join(paths)}, "
            f"and graph rewriting needs torch.fx.symbolic_trace, which failed ({first_line(e)}). Iterate the "
            "container in forward (`for block in self.layers: ...`) or make the forward symbolically traceable") \
            from None
    finally:
        restore_module_state(state)


def module_state(model: nn.Module) -> list:
    """What running the forward to trace it may change in `model`, to put back with ``restore_module_state``: every
    module's attributes (a flag the forward sets, an attribute it adds, the training flag) and its parameter, buffer
    and submodule entries (a submodule the forward replaces). Tensors' contents are not copied: tracing runs on
    proxies or fake tensors."""
    return [(m, dict(m.__dict__), dict(m._parameters), dict(m._buffers), dict(m._modules),
             set(m._non_persistent_buffers_set), _hook_tables(m)) for m in model.modules()
            if not isinstance(m, torch.jit.ScriptModule)]  # scripted: its tables are views the forward cannot change


def _hook_tables(module: nn.Module) -> dict[str, dict]:
    """A copy of each hook table of `module` (forward, backward, state-dict hooks): a forward may register hooks
    (transformers installs its output-capturing hooks at the first call), which must not outlive the trace."""
    return {name: dict(table) for name, table in module.__dict__.items() if "hooks" in name and isinstance(table, dict)}


def restore_module_state(state: list) -> None:
    """Put back what ``module_state`` recorded: the model is as it was before the trace."""
    for module, attrs, params, buffers, modules, non_persistent, hooks in state:
        for name in [n for n in module.__dict__ if n not in attrs]:
            del module.__dict__[name]
        module.__dict__.update(attrs)
        tables = [(module._parameters, params), (module._buffers, buffers), (module._modules, modules)]
        tables += [(module.__dict__[name], saved) for name, saved in hooks.items()]
        for table, saved in tables:  # in place: hook handles hold the tables themselves
            table.clear()
            table.update(saved)
        module._non_persistent_buffers_set.clear()
        module._non_persistent_buffers_set.update(non_persistent)


def first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0] if lines else ''}"
