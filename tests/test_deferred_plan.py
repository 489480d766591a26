"""Planning at the first forward: ``growops.apollo(model)`` for a model that cannot be traced without inputs (and
none given) is planned from its first batch, through the wrapper or the model itself; until then everything that
needs the plan says so, and a failed first plan changes nothing."""

import copy
import gc

import pytest
import torch
from torch import nn

import growops
from growops import GrowopsError

X = torch.randint(0, 50, (2, 7))


class EncoderLM(nn.Module):
    """A user LM on nn.TransformerEncoder with control flow on its input's shape: symbolic tracing fails, and export
    needs inputs, which it does not provide. Every layer gets its own weights (TransformerEncoder clones one)."""

    def __init__(self, layers: int = 4, width: int = 16):
        super().__init__()
        self.emb = nn.Embedding(50, width)
        layer = nn.TransformerEncoderLayer(width, 2, 32, dropout=0.0, batch_first=True)
        self.enc = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        for p in self.enc.layers.parameters():
            nn.init.normal_(p, std=0.3)
        self.head = nn.Linear(width, 50)

    def forward(self, ids):
        h = self.emb(ids)
        if ids.shape[1] > 64:  # symbolic tracing fails here
            raise ValueError("sequence too long")
        return self.head(self.enc(h))


def _untied(model: EncoderLM, mapping) -> EncoderLM:
    """A plain copy of `model` whose position i holds a copy of layer mapping[i]."""
    ref = copy.deepcopy(model)
    ref.enc.layers = nn.ModuleList(copy.deepcopy(model.enc.layers[u]) for u in mapping)
    ref.enc.num_layers = len(mapping)
    return ref


def _plan_hooks(model: nn.Module) -> int:
    return sum(type(h).__name__ == "_PlanAtFirstCall" for h in model._forward_pre_hooks.values())


def test_a_model_that_needs_inputs_is_planned_from_its_first_batch():
    torch.manual_seed(0)
    model = EncoderLM()
    original = copy.deepcopy(model)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(2,), sampler="uniform", seed=3)
    assert not a.planned
    opt = torch.optim.SGD(a.param_groups(), lr=0.1)  # no lr options: plain groups work before the plan
    out = a(X)  # plans, then runs this step's depth
    assert a.planned and a.mode == "container" and a.plan.stacks[0].path == "enc.layers"
    torch.testing.assert_close(out, _untied(original, a.mapping())(X), rtol=0, atol=1e-6)
    for _ in range(3):  # through the growth at step 2
        opt.zero_grad()
        a(X).square().mean().backward()
        opt.step()
        a.step(opt)
    assert a.unique_layers == 4
    a.eval()
    torch.testing.assert_close(a.export()(X), a(X), rtol=0, atol=1e-6)


@pytest.mark.parametrize("read", [lambda a: a.layers, lambda a: a.plan, lambda a: a.depth, lambda a: a.mapping(),
                                  lambda a: a.state_dict(), lambda a: a.export(), lambda a: a.config,
                                  lambda a: a.step()])
def test_what_needs_the_plan_says_how_to_get_it(read):
    a = growops.apollo(EncoderLM(), stages=(2, 4), stage_steps=(2,))
    with pytest.raises(GrowopsError, match=r"has not planned EncoderLM yet.*run one forward first.*example_inputs="):
        read(a)
    assert not a.planned and a.step_count == 0


def test_the_model_itself_plans_at_its_first_call():
    """The Trainer calls a.model: its first call plans; a copy of the model made before runs as a plain model."""
    torch.manual_seed(0)
    model = EncoderLM()
    a = growops.apollo(model, stages=(2, 4), stage_steps=(2,))
    plain = copy.deepcopy(model)
    plain(X)
    assert not a.planned
    a.eval()
    a.model(X)
    assert a.planned and a.mapping() == (0, 0, 1, 1)
    torch.testing.assert_close(a.model(X), _untied(plain, (0, 0, 1, 1))(X), rtol=0, atol=1e-6)


def test_a_first_batch_that_fails_to_plan_changes_nothing():
    torch.manual_seed(0)
    model = EncoderLM()
    before = copy.deepcopy(model.state_dict())
    a = growops.apollo(model, stages=(2, 4), stage_steps=(2,))
    with pytest.raises(GrowopsError, match="cannot trace EncoderLM"):
        a(X.repeat(1, 10))  # the forward raises on this batch, so its trace does too
    assert not a.planned and _plan_hooks(model) == 1
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    a(X)
    assert a.planned and _plan_hooks(model) == 0


def test_arguments_are_checked_before_deferring():
    with pytest.raises(GrowopsError, match="stages must strictly increase"):
        growops.apollo(EncoderLM(), stages=(2, 2), stage_steps=(2,))
    with pytest.raises(GrowopsError, match="lr_scale and rewarmup need the plan.*example_inputs"):
        growops.apollo(EncoderLM(), stages=(2, 4), stage_steps=(2,), lr_scale="sqrt")
    a = growops.apollo(EncoderLM(), stages=(2, 5), stage_steps=(2,))  # L is known at the first forward only
    with pytest.raises(GrowopsError, match="the last stage must hold all L=4 blocks"):
        a(X)
    assert not a.planned


def test_plan_still_needs_inputs_up_front():
    with pytest.raises(GrowopsError, match="cannot trace EncoderLM without example inputs"):
        growops.plan(EncoderLM())
    assert growops.apollo(EncoderLM(), stages=(2, 4), stage_steps=(2,), example_inputs=X).planned


class _LossLM(EncoderLM):
    def forward(self, input_ids, labels=None):
        logits = super().forward(input_ids)
        return {"loss": nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten()), "logits": logits}


def test_a_trainer_plans_at_its_first_step(tmp_path):
    transformers = pytest.importorskip("transformers")
    from growops.integrations.hf import ApolloCallback

    torch.manual_seed(0)
    a = growops.apollo(_LossLM(), stages=(2, 4), stage_steps=(2,))
    data = [{"input_ids": X[0], "labels": X[0]} for _ in range(8)]
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=3, per_device_train_batch_size=2,
                                          report_to=[], use_cpu=True, save_strategy="no")
    trainer = transformers.Trainer(model=a.model, args=args, train_dataset=data, callbacks=[ApolloCallback(a)])
    assert not a.planned
    trainer.train()
    assert a.planned and a.step_count == 3 and a.unique_layers == 4


def test_a_model_waiting_for_its_plan_is_not_wrapped_twice():
    model = EncoderLM()
    a = growops.apollo(model, stages=(2, 4), stage_steps=(2,))
    with pytest.raises(GrowopsError, match="already managed by a growops.apollo wrapper"):
        growops.apollo(model, stages=(2, 4), stage_steps=(2,), example_inputs=X)
    with pytest.raises(GrowopsError, match="already managed by a growops.apollo wrapper"):
        growops.plan(model, example_inputs=X)
    assert not a.planned
    torch.export.export(model, (X,), strict=False)  # a trace of the model does not plan it
    assert not a.planned
    del a  # a dropped wrapper lets go
    gc.collect()  # (the errors above hold this frame)
    assert growops.apollo(model, stages=(2, 4), stage_steps=(2,), example_inputs=X).planned
