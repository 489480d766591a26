"""A wrapped model's state dict is the model `a.eval()` computes (the exported layout), whenever it is taken; loading
maps it back onto the live units, or refuses a state the schedule cannot run and changes nothing."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import growops
from growops import GrowopsError
from tests.archs import archs
from tests.models import gpt_batch, tiny_gpt


def _stages(units: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    return ((1, units // 2, units), (2, 4)) if units >= 4 else ((1, units), (2,))


def _perturb(a, seed: int) -> None:
    """Move every weight (live or not), as training would move the live ones."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in a.model.parameters():
            p.add_(0.3 * torch.randn(p.shape, generator=g))


def _wrapped(arch, growth, seed=0, steps=0):
    stages, stage_steps = _stages(arch.units)
    a = growops.apollo(arch.build(seed), stages=stages, stage_steps=stage_steps, growth=growth, sampler="full")
    for t in range(steps):
        _perturb(a, seed * 100 + t)
        a.step()
    _perturb(a, seed * 100 + steps)
    return a.eval()


def _same_state(x: dict, y: dict) -> bool:
    return x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


@given(arch=archs(), growth=st.sampled_from(["interpolate", "stack"]), steps=st.integers(0, 5))
def test_a_plain_model_loads_the_state_dict_as_the_function_eval_computes(arch, growth, steps):
    a = _wrapped(arch, growth, steps=steps)
    x = arch.inputs()
    with torch.no_grad():
        expected = a(x)
        plain = arch.build(seed=5).eval()
        plain.load_state_dict(a.model.state_dict())
        assert torch.equal(plain(x), expected)
        assert _same_state(plain.state_dict(), a.export().state_dict())


@given(arch=archs(), growth=st.sampled_from(["interpolate", "stack"]), steps=st.integers(0, 5))
def test_a_wrapper_state_resumes_the_same_live_units_and_a_plain_state_loads_at_its_position(arch, growth, steps):
    a = _wrapped(arch, growth, steps=steps)
    x = arch.inputs()
    b = _wrapped(arch, growth, seed=3)
    b.load_state_dict(a.state_dict())
    live = [p for r in a._runtimes for u in range(r.unique) for block in r.unit(u) for p in block.parameters()]
    again = [p for r in b._runtimes for u in range(r.unique) for block in r.unit(u) for p in block.parameters()]
    assert all(torch.equal(p, q) for p, q in zip(live, again, strict=True))  # bit for bit
    assert _same_state(b.state_dict(), a.state_dict())
    c = _wrapped(arch, growth, seed=4, steps=steps)  # at the same position: a plain state loads
    c.model.load_state_dict(a.export().state_dict())
    with torch.no_grad():
        assert torch.equal(b(x), a(x)) and torch.equal(c(x), a(x))


@given(arch=archs(), growth=st.sampled_from(["interpolate", "stack"]))
def test_a_state_the_schedule_cannot_run_is_refused_and_changes_nothing(arch, growth):
    a = _wrapped(arch, growth)  # one unique block: positions share it
    before = copy.deepcopy(a.model.state_dict())
    other = arch.build(seed=9).state_dict()  # every block its own weights
    with pytest.raises(GrowopsError, match="not a model the schedule can run: layers.* and layers.* differ, but with "
                                           "1 unique blocks of .* run the same block"):
        a.model.load_state_dict(other)
    assert _same_state(a.model.state_dict(), before)


def test_the_state_dict_is_the_export_at_every_stage_and_parameters_stay_physical():
    a = growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(1, 2))
    opt = torch.optim.SGD(a.parameters(), lr=0.5)
    for _ in range(3):
        a.eval()
        assert _same_state(a.model.state_dict(), a.export().state_dict())
        a.train()
        a(**gpt_batch()).loss.backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
    kept = a.model.state_dict(keep_vars=True)  # the parameters themselves, as they sit
    assert all(kept[name] is p for name, p in a.model.named_parameters())


def test_a_load_under_the_container_alone_is_mapped_too():
    a = growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(1, 2))
    a.step()
    _perturb(a, 0)
    a.eval()
    state = {k[len("blocks."):]: v for k, v in a.model.state_dict().items() if k.startswith("blocks.")}
    b = growops.apollo(tiny_gpt(4, seed=3), stages=(1, 2, 4), stage_steps=(1, 2))
    b.step()
    b.model.blocks.load_state_dict(state)  # blocks.1 (unit 1) takes position 2's weights
    assert torch.equal(b.model.blocks[1].attn.c_attn.weight, a.model.blocks[1].attn.c_attn.weight)
    with pytest.raises(GrowopsError, match="not a model the schedule can run: 0.attn.c_attn.weight and "
                                           "1.attn.c_attn.weight"):
        b.model.blocks.load_state_dict(tiny_gpt(4).blocks.state_dict())


def test_a_state_saved_before_the_exported_layout_loads_as_it_was_saved():
    a = growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(1, 2))
    a.step()
    _perturb(a, 0)
    old = {f"model.{k}": v for k, v in a.model.state_dict(keep_vars=True).items()}  # physical slots, as version 1
    old = {k: v.detach().clone() for k, v in old.items()}
    old["_extra_state"] = {**growops.state.decode_state(a.state_dict()["_extra_state"]), "version": 1}
    b = growops.apollo(tiny_gpt(4, seed=3), stages=(1, 2, 4), stage_steps=(1, 2))
    b.load_state_dict(old)
    assert b.step_count == 1 and all(torch.equal(v, b.model.state_dict(keep_vars=True)[k[6:]]) for k, v in old.items()
                                     if k != "_extra_state")
