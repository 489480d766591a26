import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from growops import GrowopsError
from growops.fx import find_block_stacks, insert_depth_gate, tie_blocks, trace_model
from growops.maps import depth_map
from tests.models import IndexLoopNet


def _traced(n_layer=4):
    model = IndexLoopNet(n_layer)
    leaves = set(model.layers)
    gm = trace_model(model, leaves).graph_module
    (stack,) = find_block_stacks(gm, model)
    return model, gm, stack


def _untied_reference(model, x, mapping):
    """Run `model` by hand with position i using block mapping[i] (and per-layer constant i)."""
    scale = torch.sigmoid(x.mean())
    h = model.inp(x)
    for i, m in enumerate(mapping):
        h = model.layers[m](h, scale, i)[0]
    return model.out(h)


def test_gate_at_identity_is_exact():
    model, gm, stack = _traced()
    x = torch.randn(3, 4)
    gated = insert_depth_gate(gm, stack)
    assert torch.equal(gated(x), model(x))
    assert "growops_gate" in gated.code and "layers_0" not in gated.code
    assert "layers_0" in gm.code  # the input graph module was not modified (copy by default)


@given(st.integers(1, 4), st.data())
def test_gate_runs_the_depth_map(unique, data):
    model, gm, stack = _traced(4)
    gated = insert_depth_gate(gm, stack)
    depth = data.draw(st.integers(unique, 4))
    gated.growops_gate.runtime.unique, gated.growops_gate.runtime.depth = unique, depth
    x = torch.randn(2, 4)
    assert torch.allclose(gated(x), _untied_reference(model, x, depth_map(unique, depth)))


def test_tie_blocks_identity_and_mapping():
    model, gm, stack = _traced(4)
    x = torch.randn(2, 4)
    same = tie_blocks(gm, stack, range(4))
    assert same.code == gm.code
    tied = tie_blocks(gm, stack, (0, 0, 1, 1))
    assert torch.allclose(tied(x), _untied_reference(model, x, (0, 0, 1, 1)))
    with pytest.raises(GrowopsError, match="one unit index"):
        tie_blocks(gm, stack, (0, 1))


def test_gate_rejects_outputs_used_outside_the_chain():
    class Collect(IndexLoopNet):
        def forward(self, x):
            scale = torch.sigmoid(x.mean())
            h, hs = self.inp(x), []
            for i in range(self.n_layer):
                h = self.layers[i](h, scale, i)[0]
                hs.append(h)
            return self.out(h), hs

    model = Collect(3)
    leaves = set(model.layers)
    gm = trace_model(model, leaves).graph_module
    (stack,) = find_block_stacks(gm, model)
    with pytest.raises(GrowopsError, match="used outside the chain"):
        insert_depth_gate(gm, stack)


def test_gate_needs_call_module_blocks():
    model = IndexLoopNet(3)
    ep = torch.export.export(model, (torch.randn(2, 4),), strict=False).module()
    (stack,) = find_block_stacks(ep, model)
    with pytest.raises(GrowopsError, match="call_module"):
        insert_depth_gate(ep, stack)
