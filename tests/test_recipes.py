"""growops.recipes: G_stack and progressive stacking as configurations of the one wrapper."""

import pytest
import torch

import growops
from growops import GrowopsError
from tests.models import gpt_batch, tiny_gpt, train_steps

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
