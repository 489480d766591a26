import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from growops.fx.analysis import BlockStack
from growops.growth import copy_blocks, expand_blocks
from growops.maps import depth_map, growth_sources
from growops.stack import StackRuntime
from tests.models import IndexLoopNet


def _run(model, runtime, x, unique, depth):
    runtime.unique, runtime.depth = unique, depth
    scale = torch.sigmoid(x.mean())
    h = model.inp(x)
    for i, block in enumerate(runtime.positions()):
        h = block(h, scale, i)[0]
    return model.out(h)


@given(st.integers(1, 3), st.integers(2, 3), st.data())
def test_growth_by_a_multiple_keeps_the_output_at_every_depth(n, c, data):
    layers = n * c * 2
    torch.manual_seed(data.draw(st.integers(0, 100)))
    model = IndexLoopNet(layers)
    runtime = StackRuntime(model.layers)
    x = torch.randn(2, 4)
    depths = range(n * c, layers + 1)
    with torch.no_grad():
        before = {d: _run(model, runtime, x, n, d) for d in depths}
        copy_blocks(runtime.blocks, growth_sources(n, n * c))
        for d in depths:
            assert torch.allclose(_run(model, runtime, x, n * c, d), before[d], atol=1e-6), d


def test_copy_keeps_parameter_objects_and_reports_changes():
    model = IndexLoopNet(6)
    params = [id(p) for p in model.parameters()]
    old = [b.fc.weight.detach().clone() for b in model.layers]
    changed = copy_blocks(list(model.layers), (0, 1, 2, 0, 1, 2))
    assert changed == [3, 4, 5]
    assert params == [id(p) for p in model.parameters()]
    for j, s in enumerate((0, 1, 2, 0, 1, 2)):
        assert torch.equal(model.layers[j].fc.weight, old[s])


def test_expand_blocks_interpolates():
    model = IndexLoopNet(4)
    from growops.fx.analysis import BlockStack

    stack = BlockStack("layers", tuple(f"layers.{i}" for i in range(4)))
    old = [b.fc.weight.detach().clone() for b in model.layers]
    assert expand_blocks(model, stack, 2, 4) == [1, 2, 3]
    assert [torch.equal(model.layers[j].fc.weight, old[s]) for j, s in enumerate(depth_map(2, 4))] == [True] * 4


class _LayerScaled(nn.Module):
    """A block with a per-layer buffer `ls` (its layer index) besides its weights."""

    def __init__(self, i):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.register_buffer("ls", torch.tensor(float(i)))


def _scaled_stack(n):
    model = nn.Module()
    model.layers = nn.ModuleList([_LayerScaled(i) for i in range(n)])
    return model, [b.fc.weight.detach().clone() for b in model.layers]


def test_copy_blocks_keeps_per_layer_values():
    model, old = _scaled_stack(4)
    assert copy_blocks(list(model.layers), (0, 1, 0, 1), ["ls"]) == [2, 3]
    assert [b.ls.item() for b in model.layers] == [0.0, 1.0, 2.0, 3.0]
    assert all(torch.equal(b.fc.weight, old[j % 2]) for j, b in enumerate(model.layers))


def test_expand_blocks_stacks_and_keeps_per_layer_values():
    model, old = _scaled_stack(4)
    stack = BlockStack("layers", tuple(f"layers.{i}" for i in range(4)), per_layer_values={"ls": (0.0, 1.0, 2.0, 3.0)})
    assert expand_blocks(model, stack, 2, 4, growth="stack") == [2, 3]
    assert [b.ls.item() for b in model.layers] == [0.0, 1.0, 2.0, 3.0]
    assert all(torch.equal(b.fc.weight, old[j % 2]) for j, b in enumerate(model.layers))
