from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from growops.structure import Layout, block_containers, difference, explain_fixed, find_layout


@given(st.integers(0, 3), st.lists(st.sampled_from("ABC"), min_size=1, max_size=3), st.integers(2, 5),
       st.integers(0, 3))
def test_layout_finds_a_planted_core(prefix, pattern, units, suffix):
    """A pattern repeated `units` times between fixed blocks of another kind ("X", "Y") is found as the core, or a
    core at least as large (a tie goes to the shorter period, then the earlier start)."""
    signatures = ["X"] * prefix + pattern * units + ["Y"] * suffix
    layout = find_layout(signatures)
    assert layout is not None and layout.size == len(signatures)
    assert layout.units >= 2 and layout.period * layout.units >= len(pattern) * units
    core = [signatures[i] for i in layout.core()]
    unit = core[:layout.period]
    assert core == unit * layout.units  # the units are interchangeable


@given(st.lists(st.sampled_from("AB"), min_size=2, max_size=12))
def test_layout_invariants(signatures):
    layout = find_layout(signatures)
    if layout is None:  # no pattern repeats twice in a row anywhere
        assert all(signatures[i:i + p] != signatures[i + p:i + 2 * p]
                   for p in range(1, len(signatures) // 2 + 1) for i in range(len(signatures) - 2 * p + 1))
        return
    assert layout.size == len(signatures) and layout.units >= 2
    assert layout.prefix + layout.period * layout.units + layout.suffix == len(signatures)
    for u in range(1, layout.units):
        assert [signatures[i] for i in layout.unit(u)] == [signatures[i] for i in layout.unit(0)]


def test_layout_examples():
    assert find_layout("AAAA") == Layout(0, 1, 4, 0)
    assert find_layout("ABBBBB") == Layout(1, 1, 5, 0)  # T5: block 0 owns the relative-position table
    assert find_layout("AABBBB") == Layout(2, 1, 4, 0)  # first two dense, then mixture-of-experts
    assert find_layout("ABAB") == Layout(0, 2, 2, 0)  # alternating kinds grow as one super-block
    assert find_layout("AABAAB") == Layout(0, 3, 2, 0)
    assert find_layout("ABABA") == Layout(0, 2, 2, 1)
    assert find_layout("AB") is None
    assert find_layout("ABBB", indexed=False) is None  # named children must all be alike


def _block(extra=False):
    block = nn.Sequential(nn.LayerNorm(4), nn.Linear(4, 4))
    if extra:
        block.add_module("bias_table", nn.Embedding(3, 2))
    return block


def test_containers_and_what_differs():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([_block(extra=True)] + [_block() for _ in range(3)])
            self.pair = nn.ModuleDict({"a": nn.Linear(2, 2), "b": nn.Linear(2, 3)})

    model = Model()
    found = block_containers(model)
    assert found["layers"] == (tuple(f"layers.{i}" for i in range(4)), Layout(1, 1, 3, 0))
    assert "pair" not in found  # named children that differ: not a stack
    assert explain_fixed(found["layers"][0], list(model.layers), Layout(1, 1, 3, 0)) == [
        "layers.0: it has an extra bias_table (a Embedding)"]
    assert difference(nn.Linear(2, 2), nn.Linear(2, 3)) == "its parameter bias is (3,) torch.float32, not (2,) " \
                                                            "torch.float32"
    assert difference(nn.LayerNorm(2), nn.Identity()) == "it is a Identity, not a LayerNorm"
