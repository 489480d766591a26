from collections import OrderedDict

import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from growops.maps import depth_map
from growops.stack import SharedBlockList, SharedBlockSequential, StackRuntime, shared_container


def _blocks(n=4):
    blocks = [nn.Linear(3, 3) for _ in range(n)]
    for i, b in enumerate(blocks):
        b.layer_idx = i
    return blocks


@given(st.integers(1, 6), st.data(), st.booleans(), st.sampled_from(["interpolate", "stack"]))
def test_iteration_runs_the_map_and_places_per_layer_values(unique, data, training, growth):
    blocks = _blocks(6)
    runtime = StackRuntime(blocks, {"layer_idx": tuple(range(6))}, growth)
    container = shared_container(nn.ModuleList(blocks), runtime)
    container.train(training)
    runtime.unique, runtime.depth = unique, data.draw(st.integers(unique, 6))
    expected = depth_map(unique, runtime.depth if training else 6, growth)
    seen = []
    for position, block in enumerate(container):
        assert block.layer_idx == position  # set just before the loop body runs the block
        seen.append(blocks.index(block))
    assert tuple(seen) == expected
    assert [blocks.index(b) for b in container[1:3]] == list(expected[1:3])
    assert len(container[:2]) == 2


def test_indexing_len_and_state_dict_stay_physical():
    blocks = _blocks()
    original = nn.ModuleList(blocks)
    runtime = StackRuntime(blocks)
    runtime.unique, runtime.depth = 1, 2
    shared = shared_container(original, runtime)
    assert isinstance(shared, SharedBlockList) and isinstance(shared, nn.ModuleList)
    assert len(shared) == 4 and shared[3] is blocks[3]
    assert list(shared.state_dict()) == list(original.state_dict())
    assert len(list(shared)) == 2
    assert "unique=1, depth=2" in repr(shared)


def test_sequential_keeps_names_and_runs_positions():
    blocks = _blocks(3)
    original = nn.Sequential(OrderedDict((f"b{i}", b) for i, b in enumerate(blocks)))
    runtime = StackRuntime(blocks)
    shared = shared_container(original, runtime)
    assert isinstance(shared, SharedBlockSequential)
    assert list(shared.state_dict()) == list(original.state_dict())
    x = torch.randn(2, 3)
    assert torch.equal(shared(x), original(x))
    runtime.unique = runtime.depth = 1
    assert torch.equal(shared(x), blocks[0](x))


def test_other_containers_are_not_replaced():
    class MyList(nn.ModuleList):
        pass

    assert shared_container(MyList(_blocks()), StackRuntime(_blocks())) is None


def test_training_flag_follows_the_blocks():
    blocks = _blocks(4)
    runtime = StackRuntime(blocks)
    runtime.unique, runtime.depth = 2, 2
    container = shared_container(nn.ModuleList(blocks), runtime)
    container.eval()
    assert runtime.mapping() == (0, 0, 1, 1)
    container.train()
    assert runtime.mapping() == (0, 1)
