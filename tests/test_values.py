import dataclasses
import enum
import functools

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import growops
from growops.values import classify, read, write
from tests.models import tiny_gpt


class Kind(enum.Enum):
    LOCAL = 1
    GLOBAL = 2


class Helper:
    """A plain object per block (compared by its attributes)."""

    def __init__(self, base):
        self.base = base


class Opaque:
    """Identity equality and no attributes: growops cannot compare two of these."""

    __slots__ = ()


def _block(i: int) -> nn.Module:
    block = nn.Sequential(nn.Linear(2, 2))
    attn = block[0]
    attn.layer_idx = i
    attn.window = (4, 4) if i % 2 else None  # a tuple in some layers, None in others
    attn.kind = Kind.LOCAL if i % 2 else Kind.GLOBAL
    attn.scale = torch.tensor(1.0 / (i + 1))  # a 0-d tensor attribute
    attn.same_list = [1, 2]  # equal in every block
    attn.act = functools.partial(torch.nn.functional.gelu, approximate="tanh")  # equal, distinct objects
    attn.helper = Helper(10.0 * (i % 2))
    attn.same_helper = Helper(3)
    attn.self_ref = [attn.weight]  # the block's own tensor: the same in every block
    attn.register_buffer("rope_base", torch.tensor([1e4 if i % 2 else 1e6]))  # persistent, per layer
    attn.register_buffer("mask", torch.tril(torch.ones(3, 3)) * (i % 2 + 1), persistent=False)
    attn.register_buffer("causal", torch.ones(3, 3), persistent=False)  # equal in every block
    return block


def test_every_kind_of_differing_value_is_per_layer():
    per_layer, undecided = classify([[_block(i)] for i in range(4)])
    assert set(per_layer) == {"0.layer_idx", "0.window", "0.kind", "0.scale", "0.helper", "0.rope_base", "0.mask"}
    assert per_layer["0.layer_idx"] == (0, 1, 2, 3) and per_layer["0.window"] == (None, (4, 4), None, (4, 4))
    assert undecided == {}


def test_norm_running_statistics_are_state_not_per_layer():
    blocks = [nn.Sequential(nn.BatchNorm1d(2)) for _ in range(3)]
    blocks[1][0].running_mean += 1
    assert classify([[b] for b in blocks]) == ({}, {})


def test_incomparable_values_are_undecided():
    blocks = [_block(0) for _ in range(3)]
    for b in blocks:
        b[0].handle = Opaque()
    per_layer, undecided = classify([[b] for b in blocks])
    assert set(undecided) == {"0.handle"} and per_layer == {}


def test_periodic_units_name_values_by_their_block():
    units = [[_block(2 * u), _block(2 * u + 1)] for u in range(3)]
    per_layer, _ = classify(units)
    assert per_layer["0.0.layer_idx"] == (0, 2, 4) and per_layer["1.0.layer_idx"] == (1, 3, 5)
    assert "0.0.window" not in per_layer  # block 0 of every unit has window None


@given(st.integers(0, 5), st.integers(0, 5))
def test_write_then_read_round_trips_and_keeps_buffers_buffers(i, j):
    a, b = _block(i), _block(j)
    for path in ("0.layer_idx", "0.rope_base", "0.mask", "0.window"):
        write([a], path, read([b], path))
        assert read([a], path) is read([b], path)
    assert "rope_base" in a[0]._buffers and "rope_base" in a[0].state_dict()
    assert "mask" not in a[0].state_dict()  # still non-persistent


class _Closures(nn.Module):
    def __init__(self, i: int):
        super().__init__()
        self.fc = nn.Linear(2, 2)
        self.act = lambda t: torch.tanh(self.fc(t))  # reaches into its own block: part of it
        self.wt = self.fc.weight.t()  # a view of its own weight: part of it
        scale = 1.0 + i
        self.scale_fn = lambda t: t * scale  # self-contained, differs per layer: per layer
        self.mixed = lambda t: self.fc(t) * scale  # differs and reaches into its block: undecided


def test_closures_and_views_are_compared_relative_to_their_block():
    per_layer, undecided = classify([[_Closures(i)] for i in range(3)])
    assert set(per_layer) == {"scale_fn"} and set(undecided) == {"mixed"}


def _nested(value, levels: int, wrap) -> object:
    for _ in range(levels):
        value = wrap(value)
    return value


class _Holder:
    def __init__(self, inner):
        self.inner = inner


@pytest.mark.parametrize("wrap", [lambda v: (v,), lambda v: [v], lambda v: {"k": v}, _Holder],
                         ids=["tuple", "list", "dict", "object"])
def test_a_reference_nested_deep_in_a_differing_value_is_still_found(wrap):
    """A per-layer index next to one of the block's own modules nested 3 or 7 levels deep in containers or objects:
    the reference is found (undecided). An index next to an object shared by every block (equal by identity) that
    nests deeper than growops looks (12 levels) is undecided too: growops cannot tell whether it reaches a block."""
    blocks = [nn.Sequential(nn.Linear(2, 2)) for _ in range(3)]
    for levels in (3, 7):
        for i, block in enumerate(blocks):
            block[0].helper = (i, _nested(block[0], levels, wrap))
        per_layer, undecided = classify([[b] for b in blocks])
        assert "0.helper" in undecided and "0.helper" not in per_layer, levels
    for i, block in enumerate(blocks):
        block[0].helper = (i, _nested("no module here", 3, wrap))
    per_layer, undecided = classify([[b] for b in blocks])
    assert "0.helper" in per_layer and "0.helper" not in undecided
    shared = _nested("no module here", 12, wrap)
    for i, block in enumerate(blocks):
        block[0].helper = (i, shared)
    per_layer, undecided = classify([[b] for b in blocks])
    assert "0.helper" in undecided and "0.helper" not in per_layer


def test_values_that_differ_and_reach_into_their_block_are_undecided():
    """A value that differs per block (a layer index) and holds one of the block's own modules (in a dict) cannot be
    handed to another position, which would then run the weights of the block it reaches: growops asks to declare
    it. The same dict without the index is part of the block (each refers to its own module at the same path)."""
    model = tiny_gpt(4)
    for i, block in enumerate(model.blocks):
        block.attn.helper = {"proj": block.attn.c_proj, "index": i}
    with pytest.raises(growops.GrowopsError, match=r"the blocks hold different values at attn.helper"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,))
    for block in model.blocks:
        del block.attn.helper["index"]
    stack = growops.plan(model).stacks[0]
    assert "attn.helper" not in stack.undecided_values and "attn.helper" not in stack.per_layer_values


class _Ema(nn.Module):
    """Not a normalization layer: its running_mean buffer is a per-layer value like any other."""

    def __init__(self, i):
        super().__init__()
        self.register_buffer("running_mean", torch.full((2,), float(i)))


@dataclasses.dataclass(eq=False)
class _Settings:
    window: int = 4


def test_running_statistics_names_outside_norm_layers_and_defaults_of_closures_are_compared():
    """A buffer named running_mean is trained state only in a normalization layer; a lambda per block that differs
    only in a default argument differs; a dataclass with eq=False compares by identity, as its class says."""
    blocks = []
    for i in range(3):
        block = nn.Sequential(nn.Linear(2, 2), _Ema(i))
        block[0].act = lambda t, s=float(i): t * s
        block[0].same_act = lambda t, s=1.0: t * s
        block[0].settings = _Settings()
        blocks.append(block)
    per_layer, undecided = classify([[b] for b in blocks])
    assert set(per_layer) == {"1.running_mean", "0.act", "0.settings"} and not undecided


@pytest.mark.parametrize("transform", ["spectral_norm", "weight_norm"])
def test_a_weights_parametrization_state_is_shared_and_grown_with_it(transform):
    """spectral_norm's power-iteration vectors differ per layer, yet belong to their weight: a shared unit runs with
    its own (as a.export() does), and training while shared is not refused."""
    from torch.nn.utils.parametrizations import spectral_norm, weight_norm

    from tests.models import gpt_batch, tiny_gpt

    torch.manual_seed(0)
    model = tiny_gpt(4)
    for block in model.blocks:
        (spectral_norm if transform == "spectral_norm" else weight_norm)(block.mlp.c_fc)
    a = growops.apollo(model, stages=(1, 2, 4), stage_steps=(1, 2), sampler="full")
    assert not [p for p in a.plan.stacks[0].per_layer_values if "c_fc" in p]
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for step in range(3):
        a.eval()
        with torch.no_grad():
            torch.testing.assert_close(a(**gpt_batch()).logits, a.export().eval()(**gpt_batch()).logits)
        a.train()
        a(**gpt_batch(seed=step)).loss.backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
