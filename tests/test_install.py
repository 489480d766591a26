"""install / uninstall: a plan applied to a model, and taken off a copy without a trace."""

import copy

import pytest
import torch
from hypothesis import given
from torch import nn

import growops
from growops.install import install, uninstall
from growops.stack import STACK_ATTR, StackRuntime
from tests.archs import archs
from tests.models import tiny_gpt


def _traces(model: nn.Module) -> list[str]:
    """Everything growops may leave on a model: classes, attributes, hooks."""
    found = []
    for name, m in model.named_modules():
        if type(m).__module__.startswith("growops"):
            found.append(f"{name}: class {type(m).__name__}")
        if STACK_ATTR in m.__dict__ or "_growops_runtime" in m.__dict__:
            found.append(f"{name}: attribute")
        for hooks in (m._forward_pre_hooks, m._forward_hooks):
            found += [f"{name}: hook" for h in hooks.values()
                      if type(h).__module__.startswith("growops") or isinstance(getattr(h, "__self__", None),
                                                                                StackRuntime)]
    return found


@pytest.mark.filterwarnings("ignore:growops. stages")
@given(archs())
def test_uninstall_leaves_no_trace(arch):
    model = arch.build()
    keys, cls = list(model.state_dict()), type(model.layers)
    plan = growops.plan(model)
    runtimes, graph = install(model, plan, "interpolate")
    assert (graph is None) == (plan.mode == "container") and len(runtimes) == 1
    assert _traces(model)
    copied = uninstall(copy.deepcopy(model), plan)
    assert _traces(copied) == [] and type(copied.layers) is cls and list(copied.state_dict()) == keys
    x = arch.inputs()
    torch.testing.assert_close(copied(x), arch.build()(x), rtol=0, atol=0)


def test_uninstall_unroutes_shared_linears():
    a = growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(1,), shared_linear=True)
    assert any(type(m).__name__ == "SharedLinear" for m in a.model.modules())
    assert _traces(uninstall(copy.deepcopy(a.model), a.plan)) == []


class _Body(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


class _Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.body, self.head = _Body(), nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.body(x))


def test_every_module_above_a_nested_container_runs_the_positions():
    """The stack at body.layers: calling the model, or the module between it and the container directly (a Hugging
    Face base model, say), runs the shared positions."""
    model = _Outer()
    a = growops.apollo(model, stages=(1, 3), stage_steps=(5,), sampler="full")
    x = torch.randn(2, 4)
    expected = x
    for _ in range(3):
        expected = expected + model.body.layers[0](expected)
    torch.testing.assert_close(model.body(x), expected)
    torch.testing.assert_close(a(x), model.head(expected))
