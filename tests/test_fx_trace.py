import pytest
import torch
from torch import nn

import growops
from growops import GrowopsError
from growops.fx.trace import first_line, trace_model


class Picky(nn.Module):
    """Refuses, with an error without a message, a width it never gets (symbolic tracing cannot evaluate the check)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[-1] != 5:
            raise ValueError()
        return self.fc(x)


def test_first_line_is_the_error_type_and_its_first_non_blank_line():
    assert first_line(ValueError("\n  bad width\nmore detail")) == "ValueError: bad width"
    assert first_line(AssertionError()) == "AssertionError: "


def test_a_failure_without_a_message_is_reported_by_its_type():
    """A check failing on the example inputs: the error names both tracers' failures."""
    with pytest.raises(GrowopsError) as info:
        trace_model(Picky(), example_inputs=torch.randn(2, 4))
    message = str(info.value)
    assert "cannot trace Picky: torch.fx.symbolic_trace failed (TraceError: " in message
    assert "torch.export failed on the example inputs: ValueError: ;" in message, message


def test_example_inputs_of_a_wrong_type_are_refused_even_where_no_trace_needs_them():
    """A model whose container apollo finds without tracing still refuses example_inputs it could never run on."""
    from tests.models import tiny_gpt

    for call in (growops.plan, lambda m, **kw: growops.apollo(m, stages=(2, 4), stage_steps=(1,), **kw)):
        with pytest.raises(GrowopsError, match=r"^example_inputs must be a tensor, a tuple of args, a dict of kwargs "
                                               r"or \(args, kwargs\), got int$"):
            call(tiny_gpt(4), example_inputs=3)


def test_graph_mode_without_a_symbolic_trace_is_refused_saying_what_it_needs():
    """Blocks reached by index (only a graph rewrite can change the depth) in a forward torch.fx cannot trace (len()
    of a tensor): export still analyses it from example inputs, and apollo says what graph mode needs."""
    from tests.models import IndexLoopNet

    class Untraceable(IndexLoopNet):
        def forward(self, x):
            return super().forward(x[:len(x)])

    with pytest.raises(GrowopsError, match=r"^growops cannot change the depth of Untraceable: with fewer positions "
                                           r"in layers its forward fails \(on the example inputs: IndexError.*by an "
                                           r"index of its own.*graph rewriting needs torch.fx.symbolic_trace, which "
                                           r"failed \(RuntimeError: 'len' is not supported in symbolic tracing.*\)\. "
                                           r"Iterate the container in forward"):
        growops.apollo(Untraceable(4), stages=(2, 4), stage_steps=(1,), example_inputs=torch.randn(2, 4))


def test_a_model_whose_own_dummy_inputs_fail_is_asked_for_example_inputs():
    class PickyWithDummies(Picky):
        @property
        def dummy_inputs(self):
            return torch.randn(2, 4)

    with pytest.raises(GrowopsError, match=r"torch.export failed on its dummy_inputs: ValueError: ; pass one batch the "
                                           r"model runs on as example_inputs=$"):
        trace_model(PickyWithDummies())


def test_hugging_face_models_plan_without_inputs_where_the_defaults_fall_short():
    """use_cache taken only through **kwargs (GraniteMoE) is turned off for the trace; dummy_inputs that lack the
    model's main input (ResNet's input_ids) are skipped for inputs built from its config."""
    transformers = pytest.importorskip("transformers")
    from growops.fx.trace import takes_use_cache
    from growops.integrations.hf_inputs import runs_on

    granite = transformers.GraniteMoeForCausalLM(transformers.GraniteMoeConfig(
        num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
        num_local_experts=4, num_experts_per_tok=2, vocab_size=100, max_position_embeddings=64))
    assert takes_use_cache(granite) and growops.plan(granite).layers == 4
    resnet = transformers.ResNetModel(transformers.ResNetConfig(embedding_size=8, hidden_sizes=[8, 16],
                                                                depths=[3, 3], num_channels=3))
    assert not runs_on(resnet, resnet.dummy_inputs)
    assert growops.plan(resnet, stack="encoder.stages.0.layers").layers == 3


def test_a_forward_without_use_cache_gets_none():
    class Plain(nn.Module):
        config = type("Config", (), {"use_cache": True})()

        def forward(self, x):
            return x

    class Kwargs(Plain):
        def forward(self, x, **kwargs):
            return x

    from growops.fx.trace import example_inputs_for
    assert example_inputs_for(Plain(), torch.ones(1)) == ((torch.ones(1),), {})
    assert example_inputs_for(Kwargs(), torch.ones(1))[1] == {"use_cache": False}


class ShapeChecked(nn.Module):
    """Checks its input's width: symbolic tracing fails, torch.export on a batch works."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        if x.shape[-1] != 4:
            raise ValueError("expected width 4")
        return self.fc(x)


class Unknown(ShapeChecked):
    pass


def test_the_tracer_asks_its_inputs_providers_and_never_imports_integrations(monkeypatch):
    """growops.fx is below the integrations: inputs come from registered providers (the Hugging Face one is
    registered by growops itself); the first provider that knows a model decides."""
    from pathlib import Path

    from growops.fx import trace

    fx_dir = Path(trace.__file__).parent
    assert not any("integrations" in f.read_text() for f in fx_dir.glob("*.py"))
    monkeypatch.setattr(trace, "_PROVIDERS", list(trace._PROVIDERS))
    x = torch.randn(2, 4)
    trace.register_inputs_provider(lambda m: [("a test batch", (x,))] if type(m) is ShapeChecked else None)
    assert trace.trace_model(ShapeChecked()).kind == "export"
    with pytest.raises(GrowopsError, match="does not provide"):
        trace.trace_model(Unknown())
