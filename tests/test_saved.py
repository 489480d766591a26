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
from tests.models import IndexLoopNet, gpt_batch, tiny_gpt


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
                                           "1 unique blocks of .* they are positions of layers that run the same"):
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


def _at_step(seed: int, step: int):
    a = growops.apollo(tiny_gpt(4, seed=seed), stages=(1, 2, 4), stage_steps=(1, 3))
    for _ in range(step):
        a.step()
    return a


def test_shards_of_a_checkpoint_load_in_any_order_and_a_partial_state_is_refused():
    a = _at_step(0, 1)  # 2 unique blocks of 4: positions 0, 1 run unit 0; 2, 3 run unit 1
    _perturb(a, 0)
    state = a.model.state_dict()
    shards = [{k: v for k, v in state.items() if k.startswith(f"blocks.{i}.")} for i in range(4)]
    shards.append({k: v for k, v in state.items() if not k.startswith("blocks.")})
    for order in (shards, shards[::-1]):
        b = _at_step(3, 0)
        b.__dict__["_position_source"] = lambda owner: 1  # as when a Trainer loads its checkpoint of step 1
        for shard in order:
            b.model.load_state_dict(shard, strict=False)
        assert b.step_count == 1 and _same_state(b.model.state_dict(), state)
    c = _at_step(3, 1)
    before = copy.deepcopy(c.model.state_dict())
    with pytest.raises(GrowopsError, match=r"gives blocks.1.attn.c_attn.bias but not \[.blocks.0.attn.c_attn.bias.\], "
                                           r"positions of blocks that run the same block with 2 unique blocks of 4: "
                                           r"loading it would change those too"):
        c.model.load_state_dict(shards[1], strict=False)  # position 1 alone: it runs unit 0, which runs at 0 too
    assert _same_state(c.model.state_dict(), before)
    c.model.load_state_dict({**shards[0], **shards[1]}, strict=False)  # both positions of unit 0: loads
    assert torch.equal(c.model.blocks[0].attn.c_attn.weight, a.model.blocks[0].attn.c_attn.weight)
    assert _same_state(c.model.state_dict(), {**before, **shards[0], **shards[1]})


def test_a_block_loaded_on_its_own_while_blocks_are_shared_is_refused():
    a = _at_step(0, 1)
    block = copy.deepcopy(a.model.blocks[1].state_dict())
    with pytest.raises(GrowopsError, match=r"blocks.1 was loaded on its own while blocks are shared: it holds unit 1, "
                                           r"which runs at positions \[2, 3\]. Load the whole model's state dict"):
        a.model.blocks[1].load_state_dict(block)
    with pytest.raises(GrowopsError, match=r"blocks.3 .* unit 3, which runs at no position \(it is not live yet\)"):
        a.model.blocks[3].load_state_dict(block)
    attn = {k[len("attn."):]: v for k, v in block.items() if k.startswith("attn.")}
    with pytest.raises(GrowopsError, match=r"blocks.1 \(attn of it\) was loaded on its own while blocks are shared"):
        a.model.blocks[1].attn.load_state_dict(attn)  # a part of a block, likewise
    alone = copy.deepcopy(a.model.blocks[1])  # a block copied alone is a plain block
    alone.load_state_dict(block)
    a.step(), a.step()  # every block its own: a block loads as it is
    a.model.blocks[3].load_state_dict(block)
    assert torch.equal(a.model.blocks[3].attn.c_attn.weight, block["attn.c_attn.weight"])


def test_a_nan_round_trips_and_the_schedule_state_keeps_one_shape():
    a = _at_step(0, 1)
    with torch.no_grad():
        a.model.blocks[0].attn.c_attn.weight[0, 0] = float("nan")  # a diverged run still saves and resumes
    b = _at_step(3, 0)
    b.load_state_dict(a.state_dict())
    weight = a.model.blocks[0].attn.c_attn.weight
    assert torch.equal(b.model.blocks[0].attn.c_attn.weight.nan_to_num(), weight.nan_to_num())
    shapes = set()
    for step in (0, 1, 12, 12345):
        a.restore_step(step)
        shapes.add(a.state_dict()["_extra_state"].shape)
    assert len(shapes) == 1  # torch.distributed.checkpoint loads a saved state into a fresh model's shapes


def test_a_refused_load_leaves_nothing_pending():
    a = _at_step(0, 1)
    _perturb(a, 0)
    bad = a.state_dict()
    bad["model.blocks.3.attn.c_attn.weight"] = bad["model.blocks.3.attn.c_attn.weight"] + 1  # twins differ
    b = _at_step(3, 0)
    with pytest.raises(GrowopsError, match="not a model the schedule can run"):
        b.load_state_dict(bad)
    b.__dict__["_position_source"] = lambda owner: 1  # a checkpoint of step 1 being loaded
    with pytest.raises(GrowopsError, match="not a model the schedule can run"):
        b.model.load_state_dict({k[6:]: v for k, v in bad.items() if k.startswith("model.")})
    del b.__dict__["_position_source"]
    c = _at_step(5, 0)  # a later ordinary load at b's own position: neither refused load's position applies
    b.model.load_state_dict(c.model.state_dict())
    assert b.step_count == 0 and _same_state(b.model.state_dict(), c.model.state_dict())


def test_copies_follow_their_own_stack_and_a_copy_without_its_wrapper_does_not_save():
    for build in (lambda: tiny_gpt(4), lambda: IndexLoopNet(4)):  # container and graph mode
        a = growops.apollo(build(), stages=(1, 2, 4), stage_steps=(1, 3))
        b = copy.deepcopy(a)
        b.step()
        _perturb(b, 1)
        b.eval()
        assert (a.unique_layers, b.unique_layers) == (1, 2)
        assert _same_state(b.model.state_dict(), b.export().state_dict())
        with pytest.raises(GrowopsError, match="growops wrapper is gone .* for a weight average use "
                                               r"growops.AveragedExport\(a\)"):
            copy.deepcopy(a.model).state_dict()


def test_what_torch_would_refuse_after_writing_is_refused_before():
    a = _at_step(0, 1)
    state = a.model.state_dict()
    before = copy.deepcopy(state)
    bad = {**state, "wte.weight": torch.zeros(state["wte.weight"].shape[0] + 1, state["wte.weight"].shape[1])}
    with pytest.raises(GrowopsError, match=r"state_dict entry wte.weight has shape \(\d+, \d+\), this model's has"):
        a.model.load_state_dict(bad)
    missing = {k: v for k, v in state.items() if k != "blocks.0.ln_1.weight"}
    with pytest.raises(GrowopsError, match=r"missing \['blocks.0.ln_1.weight'\]"):
        a.model.load_state_dict(missing)
    with pytest.raises(GrowopsError, match=r"assign=True\) would replace the model's parameters"):
        a.model.load_state_dict(state, assign=True)
    assert _same_state(a.model.state_dict(), before) and a.step_count == 1
