"""The wrapper's arguments travel with its checkpoints: a.config, a.save_pretrained(folder) and
growops.from_pretrained(model, folder), for any model."""

import json

import pytest
import torch

import growops
from growops import GrowopsError
from growops.config import ApolloConfig
from tests.models import gpt_batch, tiny_gpt, train_steps


def _train(a, steps):
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    train_steps(a, opt, steps, lambda m, step: m(**gpt_batch(seed=step)).loss)
    return a


def _logits(a):
    a.eval()
    with torch.no_grad():
        return a(**gpt_batch(seed=9)).logits


def test_config_holds_every_argument_that_decides_training():
    a = growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(3, 6), sampler="uniform", growth="stack",
                       optimizer_state="copy", seed=7, stack="blocks", lr_scale="sqrt", rewarmup=2)
    assert a.config == ApolloConfig(stages=(1, 2, 4), stage_steps=(3, 6), sampler="uniform", growth="stack",
                                    optimizer_state="copy", seed=7, stack="blocks", resample="step",
                                    shared_linear="auto", lr_scale="sqrt", rewarmup=2)
    assert ApolloConfig.from_dict(json.loads(json.dumps(a.config.to_dict()))) == a.config
    b = growops.apollo(tiny_gpt(4), **a.config.kwargs())
    assert b._fingerprint() == a._fingerprint()


def test_save_pretrained_and_from_pretrained_continue_where_the_wrapper_stood(tmp_path):
    a = _train(growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(2, 4), seed=3), 3)
    expected = _logits(a)
    a.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["growops_config.json", "model.safetensors"]
    b = growops.from_pretrained(tiny_gpt(4, seed=5), tmp_path / "ckpt")
    assert (b.step_count, b.stage, b.unique_layers, b.depth) == (a.step_count, a.stage, a.unique_layers, a.depth)
    assert torch.equal(_logits(b), expected)
    a.train(), b.train()
    _train(a, 3), _train(b, 3)  # on through a growth: the same run
    assert torch.equal(_logits(a), _logits(b))
    plain = tiny_gpt(4, seed=6)  # the saved weights, as a plain model, are the function a.eval() computed
    from safetensors.torch import load_file
    weights = load_file(str(tmp_path / "ckpt" / "model.safetensors"))
    plain.load_state_dict(weights, strict=False)
    with torch.no_grad():
        assert torch.equal(plain.eval()(**gpt_batch(seed=9)).logits, expected)


def _choose_full(unique, layers, rng):
    return layers


def test_what_the_config_cannot_hold_is_named_and_given_again(tmp_path):
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,), sampler=_choose_full)
    assert a.config.sampler is None and a.config.sampler_callable.endswith(":_choose_full")
    a.save_pretrained(tmp_path)
    model = tiny_gpt(4)
    with pytest.raises(GrowopsError, match=r"trained with the callable sampler .*:_choose_full, which a config file "
                                           r"cannot hold: pass it again, growops.from_pretrained\(model, folder, "
                                           r"sampler=your_sampler\)"):
        growops.from_pretrained(model, tmp_path)
    assert not hasattr(model.blocks, "runtime")  # untouched
    b = growops.from_pretrained(model, tmp_path, sampler=_choose_full)
    assert b.depth == 4


def test_a_refused_from_pretrained_leaves_the_model_as_it_was(tmp_path):
    a = _train(growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(2, 4)), 3)
    a.save_pretrained(tmp_path)
    with pytest.raises(GrowopsError, match="has no growops_config.json"):
        growops.from_pretrained(tiny_gpt(4), tmp_path / "nowhere")
    config = json.loads((tmp_path / "growops_config.json").read_text())
    (tmp_path / "growops_config.json").write_text(json.dumps({**config, "step": 0}))  # weights of step 3, position 0
    model = tiny_gpt(4, seed=5)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(GrowopsError, match="not a model the schedule can run"):
        growops.from_pretrained(model, tmp_path)
    assert type(model.blocks) is torch.nn.ModuleList and not model.blocks._forward_pre_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    growops.apollo(model, stages=(1, 4), stage_steps=(2,))  # and it can be wrapped again
    (tmp_path / "growops_config.json").write_text(json.dumps({**config, "config": {**config["config"], "x": 1}}))
    with pytest.raises(GrowopsError, match=r"fields this version does not know: \['x'\]"):
        growops.from_pretrained(tiny_gpt(4), tmp_path)
    (tmp_path / "growops_config.json").write_text("{")
    with pytest.raises(GrowopsError, match="growops_config.json is damaged"):
        growops.from_pretrained(tiny_gpt(4), tmp_path)
    with pytest.raises(GrowopsError, match="is a file; give a folder"):
        a.save_pretrained(tmp_path / "growops_config.json")


def test_from_pretrained_takes_again_only_what_does_not_change_the_schedule(tmp_path):
    a = _train(growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(2, 4)), 3)
    a.save_pretrained(tmp_path)
    for override in ({"seed": 9}, {"stage_steps": (1, 2)}, {"growth": "stack"}, {"optimizer_state": "copy"}):
        with pytest.raises(GrowopsError, match=rf"from_pretrained continues the schedule saved in .*; "
                                               rf"\['{next(iter(override))}'\] cannot be given again"):
            growops.from_pretrained(tiny_gpt(4), tmp_path, **override)
    with pytest.raises(GrowopsError, match="sampler=full given again, but .* was trained with 'lvps': give that one"):
        growops.from_pretrained(tiny_gpt(4), tmp_path, sampler="full")
    b = growops.from_pretrained(tiny_gpt(4), tmp_path, shared_linear=False)
    assert b.step_count == 3


def test_from_pretrained_checks_what_the_saved_wrapper_resolved(tmp_path):
    a = _train(growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(2, 4), stack="blocks"), 3)
    a.save_pretrained(tmp_path)
    b = growops.from_pretrained(tiny_gpt(4), tmp_path, plan=growops.plan(tiny_gpt(4)))  # a plan given again
    assert b.step_count == 3 and b.plan.paths == ("blocks",)
    config = json.loads((tmp_path / "growops_config.json").read_text())
    assert config["fingerprint"]["stack"] == ["blocks"]
    config["fingerprint"]["stack"] = ["layers"]  # as if the saved wrapper had grown another stack
    (tmp_path / "growops_config.json").write_text(json.dumps(config))
    model = tiny_gpt(4)
    with pytest.raises(GrowopsError, match=r"stack: saved \['layers'\], here \['blocks'\]"):
        growops.from_pretrained(model, tmp_path)
    assert type(model.blocks) is torch.nn.ModuleList
