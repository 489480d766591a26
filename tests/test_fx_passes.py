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
    with pytest.raises(GrowopsError, match=r"layers.0's output is also used outside the chain of blocks \(by "
                                           r"`output`\): a value collected over the layers .* is written into the "
                                           r"graph once per layer, for L layers, .*A forward that iterates the "
                                           r"container"):
        insert_depth_gate(gm, stack)


def test_gate_needs_call_module_blocks():
    model = IndexLoopNet(3)
    ep = torch.export.export(model, (torch.randn(2, 4),), strict=False).module()
    (stack,) = find_block_stacks(ep, model)
    with pytest.raises(GrowopsError, match="call_module"):
        insert_depth_gate(ep, stack)


class _AuxFirstBlock(torch.nn.Module):
    """Returns (aux, hidden) and scales its update by a per-layer constant passed in by the parent."""

    def __init__(self, width=8):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)

    def forward(self, aux_in, x, layer_scale):
        h = x + torch.tanh(self.fc(x)) * layer_scale
        return torch.sigmoid(x) * (layer_scale + aux_in), h


class _AuxFirstNet(torch.nn.Module):
    """Per-layer constants 1, 2, 3, ... passed in the parent's forward; the hidden state is item 1 of each output."""

    def __init__(self, n_layer=4):
        super().__init__()
        self.n_layer = n_layer
        self.inp = torch.nn.Linear(4, 8)
        self.layers = torch.nn.ModuleList([_AuxFirstBlock() for _ in range(n_layer)])

    def forward(self, x):
        aux_in = x.mean()
        h = self.inp(x)
        for i in range(self.n_layer):
            h = self.layers[i](aux_in, h, float(i + 1))[1]
        return h


def test_gate_passes_each_position_its_own_per_layer_argument_and_takes_the_hidden_item():
    """Position i runs block floor(i * unique / depth) with the per-layer argument of position i (not of the block it
    runs), and feeds item 1 (not item 0) of each output to the next position."""
    torch.manual_seed(0)
    model = _AuxFirstNet(4)
    gm = trace_model(model, set(model.layers)).graph_module
    (stack,) = find_block_stacks(gm, model)
    gated = insert_depth_gate(gm, stack)
    x = torch.randn(3, 4)
    for unique, depth in [(4, 4), (1, 3), (2, 4), (2, 3), (3, 4), (1, 4)]:
        gated.growops_gate.runtime.unique, gated.growops_gate.runtime.depth = unique, depth
        h = model.inp(x)
        for i in range(depth):
            h = model.layers[i * unique // depth](x.mean(), h, float(i + 1))[1]
        assert torch.equal(gated(x), h), (unique, depth)


class _KeywordBlock(torch.nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc = torch.nn.Linear(width, width)

    def forward(self, x, *, scale, layer_scale):
        return x + torch.tanh(self.fc(x)) * scale * layer_scale


class _KeywordNet(torch.nn.Module):
    """Calls its blocks by index with keyword arguments: a shared `scale` and a per-layer `layer_scale`."""

    def __init__(self, n_layer=4):
        super().__init__()
        self.n_layer = n_layer
        self.inp = torch.nn.Linear(4, 8)
        self.layers = torch.nn.ModuleList([_KeywordBlock() for _ in range(n_layer)])

    def forward(self, x):
        scale = torch.sigmoid(x.mean())
        h = self.inp(x)
        for i in range(self.n_layer):
            h = self.layers[i](h, scale=scale, layer_scale=float(i + 1))
        return h


def test_gate_passes_keyword_arguments_shared_and_per_layer_to_every_position():
    torch.manual_seed(0)
    model = _KeywordNet(4)
    gm = trace_model(model, set(model.layers)).graph_module
    (stack,) = find_block_stacks(gm, model)
    gated = insert_depth_gate(gm, stack)
    x = torch.randn(3, 4)
    for unique, depth in [(4, 4), (1, 3), (2, 4), (3, 4)]:
        gated.growops_gate.runtime.unique, gated.growops_gate.runtime.depth = unique, depth
        h = model.inp(x)
        for i in range(depth):
            h = model.layers[i * unique // depth](h, scale=torch.sigmoid(x.mean()), layer_scale=float(i + 1))
        assert torch.equal(gated(x), h), (unique, depth)
