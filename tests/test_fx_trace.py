import pytest
import torch
from torch import nn

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
