import re

import pytest
import torch
from torch import nn

import growops
from growops.fx import find_block_stacks, trace_model
from growops.fx.analysis import analyse, call_sequence
from growops.structure import block_containers
from tests.models import EncoderDecoder, IndexLoopNet, NoStack, ParallelExperts, SequentialNet, tiny_gpt


def _leaves(model):
    return {model.get_submodule(b) for blocks, _ in block_containers(model).values() for b in blocks}


def _stacks(model, example_inputs=None):
    traced = trace_model(model, _leaves(model), example_inputs)
    return traced, find_block_stacks(traced.graph_module, model)


def test_symbolic_trace_finds_gpt_blocks():
    model = tiny_gpt(4)
    traced, stacks = _stacks(model)
    assert traced.kind == "symbolic"
    assert [s.path for s in stacks] == ["blocks"]
    assert stacks[0].blocks == tuple(f"blocks.{i}" for i in range(4))


def test_export_finds_the_same_stack_when_symbolic_trace_fails():
    model = tiny_gpt(4)
    ep = torch.export.export(model, (), model.dummy_inputs, strict=False).module()
    stacks = find_block_stacks(ep, model)
    assert [s.blocks for s in stacks] == [tuple(f"blocks.{i}" for i in range(4))]
    # every compute node of a block is tagged with its index
    tagged = {n.meta["growops_block"][1] for n in ep.graph.nodes if "growops_block" in n.meta}
    assert tagged == {0, 1, 2, 3}


def test_index_loop_shared_inputs_and_per_layer_constants():
    model = IndexLoopNet(5)
    _, stacks = _stacks(model)
    (stack,) = stacks
    assert stack.path == "layers" and stack.layers == 5
    assert len(stack.shared_inputs) == 1  # the sigmoid scale, read by every block


def test_sequential_stack():
    model = SequentialNet(3)
    _, stacks = _stacks(model)
    assert [s.path for s in stacks] == ["blocks"]


def test_two_stacks_are_both_reported():
    _, stacks = _stacks(EncoderDecoder())
    assert sorted(s.path for s in stacks) == ["decoder", "encoder"]


def test_parallel_identical_modules_are_not_a_stack():
    model = ParallelExperts()
    traced = trace_model(model, _leaves(model))
    stacks, notes = analyse(traced.graph_module, model)
    assert stacks == []
    assert "experts" in notes[0] and "not a chain" in notes[0]


def test_no_repeated_container():
    assert block_containers(NoStack()) == {}


def test_stacks_nested_in_blocks_are_ignored():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.sub = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

        def forward(self, x):
            for s in self.sub:
                x = s(x)
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Inner() for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = Outer()
    ep = torch.export.export(model, (torch.randn(2, 4),), strict=False).module()
    assert [s.path for s in find_block_stacks(ep, model)] == ["layers"]


def test_call_sequence_ignores_weights_only_and_counts_repeats():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

        def forward(self, x):
            x = self.layers[0](self.layers[0](x))
            return x + self.layers[2].weight.sum()  # reads block 2's weight, never calls it

    model = Reuse()
    names = ("layers.0", "layers.1", "layers.2")
    ep = torch.export.export(model, (torch.randn(2, 4),), strict=False).module()
    assert call_sequence(ep, names) == [0, 0]
    gm = trace_model(model, set(model.layers)).graph_module
    assert call_sequence(gm, names) == [0, 0]


class _ReadsABlockWeight(nn.Module):
    """Reads block 0's weight after the loop: while blocks are shared, which block's weight would that be?"""

    def __init__(self):
        super().__init__()
        self.n = 4
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])

    def forward(self, x):
        for i in range(self.n):
            x = self.layers[i](x)
        return x * self.layers[0].weight.sum()


def test_a_block_tensor_read_outside_the_block_is_refused_by_name():
    with pytest.raises(growops.GrowopsError, match=r"the forward reads layers.0.weight, a tensor of layers.0, outside "
                                                   r"the block \(`mul` \(at .*Read it inside the block"):
        growops.plan(_ReadsABlockWeight(), example_inputs=(torch.randn(2, 4),))


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


class _SameBlockThrice(nn.Module):
    def __init__(self):
        super().__init__()
        block = _Residual()
        self.layers = nn.ModuleList([block, block, block])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _Reversed(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Residual() for _ in range(3)])

    def forward(self, x):
        for layer in reversed(self.layers):
            x = layer(x)
        return x


@pytest.mark.parametrize("model, why", [
    (_SameBlockThrice, "layers.0 and layers.1 are the same module: its blocks already share their weights, and "
                       "growops grows stacks of distinct blocks"),
    (_Reversed, "not a chain: layers.0 reads layers.1's output, but the blocks must run in the container's order, "
                "layers.0 first (reversed or reordered iteration is not supported)"),
])
def test_containers_that_are_not_stacks_are_refused_saying_why(model, why):
    with pytest.raises(growops.GrowopsError, match=re.escape(f"(layers (3 x _Residual): {why})")):
        growops.plan(model())
