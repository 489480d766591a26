import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from growops import GrowopsError
from growops.maps import growth_sources
from growops.optim_state import remap_optimizer_state
from tests.models import IndexLoopNet


def _trained(n_layer, live, make_opt):
    torch.manual_seed(0)
    model = IndexLoopNet(n_layer)
    opt = make_opt(model.parameters())
    for _ in range(2):
        h = model.inp(torch.randn(3, 4))
        for block in list(model.layers)[:live]:  # only live blocks get gradients, hence state
            h = block(h, 1.0)[0]
        h.square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


def _state(opt, p):
    return {k: v.clone() if torch.is_tensor(v) else v for k, v in opt.state.get(p, {}).items()}


OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9),
}


@given(st.sampled_from([(1, 2), (1, 4), (2, 4), (2, 3), (3, 6)]), st.sampled_from(["interpolate", "stack"]),
       st.sampled_from(sorted(OPTIMIZERS)))
def test_copy_gives_each_block_its_source_state(grow, growth, name):
    n_old, n_new = grow
    model, opt = _trained(6, n_old, OPTIMIZERS[name])
    blocks = list(model.layers)
    sources = growth_sources(n_old, n_new, growth)
    before = [[_state(opt, p) for p in b.parameters()] for b in blocks]
    remap_optimizer_state(opt, blocks, sources, "copy")
    for j, s in enumerate(sources):
        for p, expected in zip(blocks[j].parameters(), before[s]):
            got = _state(opt, p)
            assert got.keys() == expected.keys()
            for k in got:
                assert torch.equal(torch.as_tensor(got[k]), torch.as_tensor(expected[k])), (j, k)
            if expected and j != s:
                assert opt.state[p] is not opt.state[list(blocks[s].parameters())[0]]


@given(st.sampled_from([(1, 2), (2, 4), (2, 3), (3, 6)]), st.sampled_from(["interpolate", "stack"]))
def test_reset_clears_changed_blocks_and_keeps_the_rest(grow, growth):
    n_old, n_new = grow
    model, opt = _trained(6, 6, OPTIMIZERS["adamw"])  # every block has state
    blocks = list(model.layers)
    sources = growth_sources(n_old, n_new, growth)
    before = [[_state(opt, p) for p in b.parameters()] for b in blocks]
    remap_optimizer_state(opt, blocks, sources, "reset")
    for j, block in enumerate(blocks):
        for p, old in zip(block.parameters(), before[j]):
            if j < n_new and sources[j] != j:
                assert p not in opt.state or not opt.state[p]
            else:
                assert torch.equal(_state(opt, p)["exp_avg"], old["exp_avg"])


def test_keep_changes_nothing():
    model, opt = _trained(4, 4, OPTIMIZERS["adam"])
    before = {p: _state(opt, p) for p in model.parameters()}
    remap_optimizer_state(opt, list(model.layers), growth_sources(2, 4), "keep")
    for p in model.parameters():
        assert all(torch.equal(torch.as_tensor(_state(opt, p)[k]), torch.as_tensor(v)) for k, v in before[p].items())


def test_unknown_policy():
    model, opt = _trained(2, 2, OPTIMIZERS["sgd"])
    with pytest.raises(GrowopsError, match="unknown optimizer_state 'zero'.*'copy'"):
        remap_optimizer_state(opt, list(model.layers), (0, 0), "zero")


def test_a_parameter_tied_across_blocks_keeps_its_state_while_an_unchanged_block_holds_it():
    torch.manual_seed(0)
    model = IndexLoopNet(4)
    gate = torch.nn.Parameter(torch.ones(8))
    for block in model.layers:
        block.gate = gate  # one Parameter registered in every block
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    h = model.inp(torch.randn(3, 4))
    for block in model.layers:
        h = block(h, 1.0)[0] * block.gate
    h.square().mean().backward()
    opt.step()
    before = _state(opt, gate)
    remap_optimizer_state(opt, list(model.layers), growth_sources(2, 4), "reset")
    assert torch.equal(_state(opt, gate)["exp_avg"], before["exp_avg"])  # block 0 is unchanged and holds it
    assert not opt.state.get(model.layers[2].fc.weight)  # an ordinary changed parameter is reset


@settings(max_examples=settings.default.max_examples // 2)  # each example trains two models
@given(st.sampled_from([(1, 2), (1, 4), (2, 4), (2, 6), (3, 6)]), st.sampled_from(["interpolate", "stack"]),
       st.sampled_from(sorted(OPTIMIZERS)))
def test_copy_gives_every_grown_block_a_state_of_its_own(grow, growth, name):
    n_old, n_new = grow
    model, opt = _trained(6, n_old, OPTIMIZERS[name])
    sources = growth_sources(n_old, n_new, growth)
    # The reference: a copy whose states are copied by hand, one fresh copy per parameter, from the states before.
    ref_model, ref_opt = copy.deepcopy((model, opt))
    ref_blocks = list(ref_model.layers)
    before = {p: _state(ref_opt, p) for p in ref_model.parameters()}
    for j, s in ((j, s) for j, s in enumerate(sources) if j != s):
        for p, q in zip(ref_blocks[j].parameters(), ref_blocks[s].parameters()):
            ref_opt.state.pop(p, None)
            if before[q]:
                ref_opt.state[p] = copy.deepcopy(before[q])
    remap_optimizer_state(opt, list(model.layers), sources, "copy")

    states = [opt.state[p] for p in model.parameters() if p in opt.state]
    assert len({id(s) for s in states}) == len(states)  # no two parameters share one state
    storages = [v.untyped_storage().data_ptr() for s in states for v in s.values() if torch.is_tensor(v)]
    assert len(set(storages)) == len(storages)  # nor any state tensor
    steps = {p: float(opt.state[p].get("step", 0)) if p in opt.state else 0.0 for p in model.parameters()}

    x = torch.randn(5, 4)  # one more optimizer step of the whole model, and of the reference
    for m, o in ((model, opt), (ref_model, ref_opt)):
        m(x).square().mean().backward()
        o.step()
    for p, r in zip(model.parameters(), ref_model.parameters()):
        if name != "sgd":
            assert float(opt.state[p]["step"]) == steps[p] + 1
        assert opt.state[p].keys() == ref_opt.state[r].keys()
        for k, v in opt.state[p].items():
            assert torch.equal(torch.as_tensor(v), torch.as_tensor(ref_opt.state[r][k])), k
        assert torch.equal(p, r)
