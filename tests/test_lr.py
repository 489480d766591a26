"""growops.lr: growth-aware learning rates (lr_scale, rewarmup) applied only while the optimizer steps."""

import copy
import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import growops
from growops import GrowopsError, GrowopsTypeError
from growops.lr import REST
from growops.state import decode_state
from tests.models import gpt_batch, tiny_gpt

BATCH = gpt_batch()


def loss(a):
    return a(**BATCH).loss


def record(opt):
    """A pre-hook that records each group's lr as the optimizer's step sees it (global hooks run first)."""
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append([g["lr"] for g in o.param_groups]))
    return seen


def expected(a, group) -> float:
    """The multiplier by hand: 1/uses**power of the unit at this step's depth, times the re-warmup ramp."""
    unit = group["growops_unit"]
    uses = a.mapping().count(unit) if unit != REST else 0
    power = {"none": 0, "sqrt": 0.5, "linear": 1}[a._lr_scale]
    factor = uses ** -power if uses else 1.0
    if a.stage and a._rewarmup:
        since = a.step_count - a._schedule.stage_steps[a.stage - 1]
        factor *= min(1.0, (since + 1) / a._rewarmup)
    return factor


@pytest.mark.parametrize("lr_scale,rewarmup", [("linear", 0), ("sqrt", 0), ("none", 3), ("sqrt", 2)])
def test_step_sees_scaled_lr_and_lr_is_untouched_between_steps(lr_scale, rewarmup):
    a = growops.apollo(tiny_gpt(6), stages=(1, 2, 6), stage_steps=(3, 6), lr_scale=lr_scale, rewarmup=rewarmup,
                       sampler="uniform")
    opt = torch.optim.AdamW(a.param_groups(), lr=0.01)
    seen = record(opt)
    checked = 0
    for _ in range(10):
        want = [0.01 * expected(a, g) for g in opt.param_groups]
        loss(a).backward()
        opt.step()
        opt.zero_grad()
        assert seen[-1] == pytest.approx(want)
        assert all(g["lr"] == 0.01 for g in opt.param_groups)
        checked += sum(w != 0.01 for w in want)
        a.step(opt)
    assert checked > 0  # some step did scale


def test_linear_scaling_divides_a_units_sgd_update_by_its_uses():
    torch.manual_seed(0)
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(100,), sampler="full", lr_scale="linear")
    opt = torch.optim.SGD(a.param_groups(), lr=0.1)
    block = a.model.blocks[0]
    weight = block.mlp.c_fc.weight
    before = weight.detach().clone()
    loss(a).backward()
    grad = weight.grad.clone()
    opt.step()
    assert a.mapping() == (0, 0, 0, 0)
    torch.testing.assert_close(weight.detach(), before - 0.1 / 4 * grad)


def test_composes_with_a_scheduler():
    a = growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(2, 4), lr_scale="linear", rewarmup=2)
    opt = torch.optim.AdamW(a.param_groups(), lr=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=8)  # recursive form: reads group["lr"]
    plain = torch.optim.lr_scheduler.CosineAnnealingLR(torch.optim.AdamW(tiny_gpt(4).parameters(), lr=0.01), 8)
    seen = record(opt)
    for _ in range(7):
        want = [plain.get_last_lr()[0] * expected(a, g) for g in opt.param_groups]
        loss(a).backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
        assert seen[-1] == pytest.approx(want)
        sched.step()
        plain.optimizer.step()
        plain.step()
        assert [g["lr"] for g in opt.param_groups] == pytest.approx([plain.get_last_lr()[0]] * len(opt.param_groups))


def test_one_group_over_every_unit_is_refused_before_the_step():
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,), lr_scale="sqrt")
    opt = torch.optim.AdamW(a.parameters(), lr=0.01)
    before = copy.deepcopy(a.state_dict())
    loss(a).backward()
    with pytest.raises(GrowopsError, match=r"a\.param_groups"):
        opt.step()
    for k, v in a.state_dict().items():
        if isinstance(v, torch.Tensor):
            assert torch.equal(v, before[k]), k
    assert opt.param_groups[0]["lr"] == 0.01 and not opt.state


def test_param_groups_keep_the_users_options_and_split_by_unit():
    a = growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(2,), lr_scale="linear")
    decay = [p for p in a.parameters() if p.dim() >= 2]
    no_decay = [p for p in a.parameters() if p.dim() < 2]
    groups = a.param_groups([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}])
    assert sum(len(g["params"]) for g in groups) == len(list(a.parameters()))
    assert {g["growops_unit"] for g in groups} == {REST, 0, 1, 2, 3}
    for g in groups:
        assert g["weight_decay"] == (0.1 if g["params"][0].dim() >= 2 else 0.0)
        assert all(p.dim() >= 2 for p in g["params"]) or all(p.dim() < 2 for p in g["params"])
    block1 = {id(p) for p in a.model.blocks[1].parameters()}
    assert all(g["growops_unit"] == 1 for g in groups if id(g["params"][0]) in block1)
    torch.optim.AdamW(groups, lr=0.01)  # a valid optimizer spec
    with pytest.raises(GrowopsTypeError,
                       match="^param_groups takes parameters or dicts with 'params', not a mix of both$"):
        a.param_groups([decay[0], {"params": no_decay}])
    with pytest.raises(GrowopsTypeError, match="param_groups takes parameters or dicts with 'params', got int"):
        a.param_groups(123)
    with pytest.raises(GrowopsError, match="param_groups got no parameters"):
        a.param_groups([])
    with pytest.raises(GrowopsError, match=r"a parameter group needs a 'params' entry, got keys \['lr'\]"):
        a.param_groups([{"lr": 0.1}])


def test_param_groups_take_one_parameter_or_one_group_and_name_the_rest_by_rest():
    a = growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(2,), lr_scale="linear")
    head, block = a.model.lm_head.weight, a.model.blocks[1].mlp.c_fc.weight

    def summary(groups):
        return [({k: v for k, v in g.items() if k != "params"}, [id(p) for p in g["params"]]) for g in groups]

    assert summary(a.param_groups(head)) == [({"growops_unit": REST}, [id(head)])]
    assert summary(a.param_groups({"params": block, "lr": 0.1})) == [({"lr": 0.1, "growops_unit": 1}, [id(block)])]
    assert summary(a.param_groups([head, block])) == [({"growops_unit": REST}, [id(head)]),
                                                      ({"growops_unit": 1}, [id(block)])]
    foreign = torch.nn.Parameter(torch.zeros(2))  # not the model's: outside the units too
    assert summary(a.param_groups([foreign, block])) == [({"growops_unit": REST}, [id(foreign)]),
                                                         ({"growops_unit": 1}, [id(block)])]


def test_the_scaling_hooks_are_installed_once_for_every_wrapper(monkeypatch):
    """Global optimizer hooks, installed by the first wrapper that scales and never twice."""
    from collections import OrderedDict

    import torch.optim.optimizer as optimizer_module

    from growops import lr

    monkeypatch.setattr(lr, "_hooks_installed", False)
    monkeypatch.setattr(optimizer_module, "_global_optimizer_pre_hooks", OrderedDict())
    monkeypatch.setattr(optimizer_module, "_global_optimizer_post_hooks", OrderedDict())
    for _ in range(2):
        growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(2,), lr_scale="linear")
    assert lr._hooks_installed is True
    assert list(optimizer_module._global_optimizer_pre_hooks.values()) == [lr._scale_lrs]
    assert list(optimizer_module._global_optimizer_post_hooks.values()) == [lr._restore_lrs]


def test_bad_options_are_refused():
    with pytest.raises(GrowopsError, match="^unknown lr_scale 'cube': use one of 'none', "):
        growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,), lr_scale="cube")
    with pytest.raises(GrowopsError, match="resample"):
        growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,), lr_scale="sqrt", resample="micro_batch")
    with pytest.raises(GrowopsError, match="rewarmup"):
        growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,), rewarmup=-1)


def test_the_options_are_part_of_the_checkpoint():
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,), lr_scale="sqrt")
    state = a.state_dict()
    b = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,))
    with pytest.raises(GrowopsError, match="lr_scale"):
        b.load_state_dict(state)
    old = b.state_dict()  # a state saved before the options existed loads where they are off
    extra = next(k for k in old if k.endswith("_extra_state"))
    old[extra] = decode_state(old[extra])
    for field in ("lr_scale", "rewarmup"):
        del old[extra][field]
    growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,)).load_state_dict(old)
    with pytest.raises(GrowopsError, match="lr_scale"):
        a.load_state_dict(old)


def test_a_deep_copy_scales_its_own_optimizer():
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,), sampler="full", lr_scale="linear")
    b = copy.deepcopy(a)
    opt = torch.optim.SGD(b.param_groups(), lr=0.1)
    seen = record(opt)
    loss(b).backward()
    opt.step()
    assert min(seen[-1]) == pytest.approx(0.1 / 4)


def test_a_step_that_raises_leaves_a_schedulers_new_lr_alone():
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,), sampler="full", lr_scale="linear")
    opt = torch.optim.SGD(a.param_groups(), lr=0.1)

    def fail(o, args, kwargs):
        raise RuntimeError("boom")

    handle = opt.register_step_pre_hook(fail)
    loss(a).backward()
    with pytest.raises(RuntimeError):
        opt.step()
    handle.remove()
    for g in opt.param_groups:
        g["lr"] = 0.05  # a scheduler sets the next value
    seen = record(opt)
    opt.step()
    assert all(g["lr"] == 0.05 for g in opt.param_groups)
    assert min(seen[-1]) == pytest.approx(0.05 / 4)


@given(unique=st.integers(1, 6), extra=st.integers(0, 6), power=st.sampled_from(["sqrt", "linear"]))
def test_uses_sum_to_depth_and_multipliers_follow_them(unique, extra, power):
    """Invariant: every position is one use of one unit, and a unit's multiplier is uses**-power."""
    depth = unique + extra
    mapping = growops.depth_map(unique, depth)
    uses = [mapping.count(u) for u in range(unique)]
    assert sum(uses) == depth and min(uses) >= 1
    p = growops.lr.LR_SCALES[power]
    for u in uses:
        assert math.isclose(growops.lr.scale(u, p) * u ** p, 1.0)


def test_a_group_over_two_units_or_two_wrappers_is_refused_naming_what_it_mixes():
    a = growops.apollo(tiny_gpt(4), stages=(4,), stage_steps=(), lr_scale="linear")
    b = growops.apollo(tiny_gpt(4), stages=(4,), stage_steps=(), lr_scale="linear")
    two_units = [*a.model.blocks[0].parameters(), *a.model.blocks[1].parameters()]
    two_wrappers = [*a.model.blocks[0].parameters(), *b.model.blocks[0].parameters()]
    for params, what in [(two_units, r"parameters of units \[0, 1\]"),
                         (two_wrappers, "parameters of several wrapped models")]:
        opt = torch.optim.SGD(params, lr=0.01)
        with pytest.raises(GrowopsError, match=f"optimizer parameter group 0 holds {what}"):
            opt.step()


def test_groups_after_a_group_of_foreign_parameters_are_still_scaled():
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,), lr_scale="linear", sampler="full")
    foreign = torch.nn.Parameter(torch.zeros(3))  # not the model's: its group is left alone
    opt = torch.optim.SGD([{"params": [foreign]}, *a.param_groups()], lr=0.01)
    seen = record(opt)
    loss(a).backward()
    opt.step()
    assert seen[0][0] == 0.01
    assert seen[0][1:] == pytest.approx([0.01 * expected(a, g) for g in opt.param_groups[1:]])
    assert any(expected(a, g) != 1.0 for g in opt.param_groups[1:])


def test_parameters_added_after_wrapping_are_scaled_or_refused_never_left_at_the_full_rate():
    torch.manual_seed(0)
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(100,), sampler="full", lr_scale="linear")
    block = a.model.blocks[0]
    block.mlp.adapter = torch.nn.Parameter(torch.zeros(block.mlp.c_fc.weight.shape[0]))  # an adapter, say
    hook = block.mlp.register_forward_hook(lambda m, args, out: out + m.adapter.sum())
    opt = torch.optim.SGD(a.param_groups([{"params": [block.mlp.adapter]}]), lr=0.1)  # the adapter trains alone
    loss(a).backward()
    grad = block.mlp.adapter.grad.clone()
    opt.step()
    assert grad.abs().max() > 0
    torch.testing.assert_close(block.mlp.adapter.detach(), -0.1 / 4 * grad, rtol=1e-5, atol=0)  # unit 0 runs 4 times
    hook.remove()
    late = torch.nn.Parameter(torch.zeros(3))
    groups = a.param_groups()
    groups[1]["params"].append(late)  # a group of unit 0 with a parameter made later
    opt = torch.optim.SGD(groups, lr=0.1)
    with pytest.raises(GrowopsError, match="optimizer parameter group 1 mixes parameters growops scales with "
                                           "parameters it does not know"):
        opt.step()
