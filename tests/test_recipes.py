"""growops.recipes: G_stack and progressive stacking as configurations of the one wrapper."""

import re

import pytest
import torch

import growops
from growops import GrowopsError
from tests.models import EncoderDecoder, SequentialNet, gpt_batch, tiny_gpt, train_steps

BATCH = gpt_batch()


def blocks(a):
    return a.model.blocks


def test_gstack_trains_a_quarter_then_stacks_it_four_times():
    a = growops.gstack(tiny_gpt(8), grow_step=3, factor=4)
    assert (a.unique_layers, a.layers, a.depth, a.mapping()) == (2, 8, 2, (0, 1))
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    train_steps(a, opt, 2, lambda a, step: a(**BATCH).loss)
    small = [{k: v.clone() for k, v in blocks(a)[i].state_dict().items()} for i in range(2)]
    train_steps(a, opt, 1, lambda a, step: a(**BATCH).loss)  # step 3 begins: growth
    assert (a.unique_layers, a.depth) == (8, 8)
    trained = [{k: v.clone() for k, v in blocks(a)[i].state_dict().items()} for i in range(2)]
    assert not all(torch.equal(small[0][k], trained[0][k]) for k in small[0])  # step 3's update came first
    for j in range(8):  # block j copies block j mod 2 of the small model
        for k, v in blocks(a)[j].state_dict().items():
            torch.testing.assert_close(v, trained[j % 2][k])
    exported = a.export()
    assert len(exported.blocks) == 8


def test_gstack_refuses_what_it_cannot_do_and_leaves_the_model_alone():
    model = tiny_gpt(6)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GrowopsError, match="factor=4"):
        growops.gstack(model, grow_step=10)
    with pytest.raises(GrowopsError, match="chooses sampler"):
        growops.gstack(model, grow_step=10, factor=2, sampler="lvps")
    with pytest.raises(GrowopsError):
        growops.gstack(model, grow_step=0, factor=2)
    assert type(model.blocks) is torch.nn.ModuleList
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    a = growops.gstack(model, grow_step=10, factor=3, lr_scale="sqrt", optimizer_state="keep")
    assert a.unique_layers == 2 and a._policy == "keep"


def test_stackbert_doubles_by_stacking():
    a = growops.stackbert(tiny_gpt(8), stage_steps=(2, 4))
    assert a._schedule.stages == (2, 4, 8)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    train_steps(a, opt, 4, lambda a, step: a(**BATCH).loss)
    assert a.unique_layers == 8 and a.mapping() == tuple(range(8))
    with pytest.raises(GrowopsError, match="multiple of 4"):
        growops.stackbert(tiny_gpt(6), stage_steps=(2, 4))
    assert growops.stackbert(tiny_gpt(6), stage_steps=(2,), stages=(3, 6))._schedule.stages == (3, 6)


def test_a_recipe_checkpoint_resumes_only_into_the_same_recipe():
    a = growops.gstack(tiny_gpt(8), grow_step=3, factor=4)
    state = a.state_dict()
    growops.gstack(tiny_gpt(8), grow_step=3, factor=4).load_state_dict(state)
    with pytest.raises(GrowopsError, match="another schedule"):
        growops.gstack(tiny_gpt(8), grow_step=3, factor=2).load_state_dict(state)


def test_gstack_growth_tokens_is_the_papers_fit():
    # A 7B model trained on 300B tokens (C = 6 N D): the fit asks for about 20B tokens, in the range the paper uses.
    tokens = growops.gstack_growth_tokens(7e9, 6 * 7e9 * 300e9)
    assert 1e10 < tokens < 3e10
    assert growops.gstack_growth_tokens(1e9, 1e21) < growops.gstack_growth_tokens(7e9, 1e21)
    with pytest.raises(GrowopsError):
        growops.gstack_growth_tokens(0, 1e21)


def _snapshot(a, n):
    return [{k: v.clone() for k, v in blocks(a)[i].state_dict().items()} for i in range(n)]


def _runs_unique_blocks_then_stacks(a, steps, small):
    """Step `a` without an optimizer: every step before growth runs exactly the unique blocks (sampler "unique"); at
    growth, block j copies block j mod `small` (stacking, not interpolation)."""
    for _ in range(steps):
        assert a.depth == a.unique_layers == small, a.step_count
        before = _snapshot(a, small)
        a.step()
    assert a.unique_layers == 2 * small
    for j in range(2 * small):
        for k, v in blocks(a)[j].state_dict().items():
            assert torch.equal(v, before[j % small][k]), (j, k)


def test_gstack_runs_only_the_unique_blocks_then_stacks():
    _runs_unique_blocks_then_stacks(growops.gstack(tiny_gpt(8), grow_step=12, factor=2), 12, 4)


def test_stackbert_runs_only_the_unique_blocks_and_doubles_by_stacking():
    _runs_unique_blocks_then_stacks(growops.stackbert(tiny_gpt(8), stage_steps=(12, 20)), 12, 2)


def test_recipe_arguments_are_checked_by_name():
    model = tiny_gpt(4)
    with pytest.raises(GrowopsError, match="factor must be an int >= 2, got 1"):
        growops.gstack(model, grow_step=10, factor=1)
    with pytest.raises(GrowopsError, match="grow_step must be an int >= 1, got 0"):
        growops.gstack(model, grow_step=0, factor=2)
    assert growops.gstack(tiny_gpt(4), grow_step=1, factor=2)._schedule.stage_steps == (1,)
    with pytest.raises(GrowopsError, match=r"gstack chooses sampler itself: use growops.apollo\(...\) to set it"):
        growops.gstack(model, grow_step=10, factor=2, sampler="lvps")
    with pytest.raises(GrowopsError, match=r"stackbert chooses sampler, growth itself: use growops.apollo\(...\) to "
                                           "set them"):
        growops.stackbert(model, stage_steps=(2, 4), sampler="lvps", growth="stack")


@pytest.mark.parametrize("recipe", [lambda m, **o: growops.gstack(m, grow_step=2, factor=2, **o),
                                    lambda m, **o: growops.stackbert(m, stage_steps=(2,), stages=(1, 2), **o)],
                         ids=["gstack", "stackbert"])
def test_recipes_grow_the_stack_named_by_stack_or_plan(recipe):
    model = EncoderDecoder()
    with pytest.raises(GrowopsError, match="several block stacks"):
        recipe(model)
    a = recipe(model, stack="decoder", optimizer_state="keep")
    assert a.plan.paths == ("decoder",) and (a.layers, a.unique_layers) == (2, 1) and a._policy == "keep"
    plan = growops.plan(EncoderDecoder(), stack="decoder")
    assert recipe(EncoderDecoder(), plan=plan).plan is plan


class _Checked(SequentialNet):
    """Data-dependent control flow: symbolic tracing fails, so growops needs example_inputs to find the stack."""

    def forward(self, x):
        if x.dim() != 2:
            raise ValueError("expected (batch, 4) inputs")
        return super().forward(x)


def test_recipes_find_the_stack_with_example_inputs():
    x = torch.randn(2, 4)
    with pytest.raises(GrowopsError, match="example_inputs"):
        growops.gstack(_Checked(), grow_step=2, factor=2)
    assert growops.gstack(_Checked(), grow_step=2, factor=2, example_inputs=(x,)).layers == 4
    assert growops.stackbert(_Checked(), stage_steps=(2, 4), example_inputs=(x,))._schedule.stages == (1, 2, 4)


def test_gstack_growth_tokens_fit_and_its_bounds():
    assert growops.gstack_growth_tokens(1e9, 1e21) == pytest.approx(10 ** 9.954761904761905, rel=1e-12)  # 9.01e9
    assert growops.gstack_growth_tokens(1e8, 1e20) == pytest.approx(2907367959.444239, rel=1e-12)
    for parameters, flops in [(1, 1e21), (1e9, 10)]:
        with pytest.raises(GrowopsError, match=re.escape(f"gstack_growth_tokens needs parameters > 1 and flops > 10, "
                                                         f"got {parameters}, {flops}")):
            growops.gstack_growth_tokens(parameters, flops)
    assert growops.gstack_growth_tokens(2, 1e21) > 0 and growops.gstack_growth_tokens(1e9, 11) > 0
