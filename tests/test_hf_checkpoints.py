"""Whatever the Trainer saves or reloads mid-schedule is the model `a.eval()` computes: checkpoints, resume, best
model; and `growops.from_pretrained` rebuilds the wrapper from any of its checkpoints."""

import json

import pytest
import torch

import growops

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from growops.integrations.hf import ApolloCallback  # noqa: E402

transformers.logging.set_verbosity_error()
CONFIG = dict(n_layer=4, n_embd=32, n_head=2, vocab_size=96, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0)
PROBE = torch.arange(24).reshape(2, 12) % 96


def _model(seed=0):
    torch.manual_seed(seed)
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))


def _apollo(seed=0, **kwargs):
    return growops.apollo(_model(seed), **{"stages": (1, 2, 4), "stage_steps": (2, 4), "seed": 1, **kwargs})


def _data():
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": (ids := torch.randint(0, 96, (12,), generator=g)), "labels": ids} for _ in range(32)]


def _trainer(a, out, callbacks=(), **kwargs):
    options = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=2, gradient_accumulation_steps=2,
                   logging_steps=1, report_to=[], use_cpu=True, learning_rate=1e-2, seed=0, save_strategy="steps",
                   save_steps=1)
    args = transformers.TrainingArguments(**{**options, **kwargs})
    return transformers.Trainer(model=a.model, args=args, train_dataset=_data(), eval_dataset=_data()[:4],
                                callbacks=[ApolloCallback(a), *callbacks])


def _logits(model):
    was = model.training
    model.eval()
    with torch.no_grad():
        out = model(input_ids=PROBE).logits
    model.train(was)
    return out


class _RecordEval(transformers.TrainerCallback):
    """What a.eval() computes at each checkpoint the Trainer saves."""

    def __init__(self, a):
        self.a, self.seen = a, {}

    def on_save(self, args, state, control, **kwargs):
        self.seen[state.global_step] = (_logits(self.a.model), self.a.unique_layers)


def test_every_trainer_checkpoint_loads_as_the_model_a_eval_computed(tmp_path):
    a = _apollo()
    record = _RecordEval(a)
    _trainer(a, tmp_path, callbacks=[record]).train()
    assert sorted(record.seen) == [1, 2, 3, 4, 5, 6]
    assert {step: unique for step, (_, unique) in record.seen.items()} == {1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4}
    for step, (expected, _) in record.seen.items():
        plain = transformers.GPT2LMHeadModel.from_pretrained(str(tmp_path / f"checkpoint-{step}"))
        torch.testing.assert_close(_logits(plain), expected, rtol=0, atol=0, msg=f"checkpoint-{step}")
        config = json.loads((tmp_path / f"checkpoint-{step}" / "growops_config.json").read_text())
        assert config["step"] == step and config["config"]["stage_steps"] == [2, 4]


def test_resume_loads_weights_and_schedule_together_and_continues_bit_for_bit(tmp_path):
    a = _apollo()
    _trainer(a, tmp_path / "full").train()
    b = _apollo(seed=7)  # other initial weights: all must come from the checkpoint
    steps = []

    class Record(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            steps.append((b.step_count, b.unique_layers))

    _trainer(b, tmp_path / "resumed", callbacks=[Record()]).train(
        resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert steps == [(3, 2)]  # the schedule moved with the weights, before training went on
    assert (b.step_count, b.unique_layers, b.depth) == (a.step_count, a.unique_layers, a.depth)
    torch.testing.assert_close(_logits(b.model), _logits(a.model), rtol=0, atol=0)
    for (name, p), q in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(p, q), name


def test_a_refused_resume_changes_nothing(tmp_path):
    a = _apollo()
    _trainer(a, tmp_path / "full").train()
    b = _apollo(stage_steps=(3, 5))  # another schedule
    before = {k: v.clone() for k, v in b.model.state_dict().items()}
    with pytest.raises(growops.GrowopsError, match=r"checkpoint-3: this state was saved under another schedule or "
                                                   r"model \(stage_steps: saved \[2, 4\], here \[3, 5\]\)"):
        _trainer(b, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert b.step_count == 0
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in before.items())


def test_the_best_model_reloaded_at_the_end_is_the_best_checkpoint_with_its_schedule(tmp_path):
    a = _apollo()
    record = _RecordEval(a)

    class Metric(transformers.TrainerCallback):  # make step 3 the best, whatever the losses
        def on_evaluate(self, args, state, control, metrics=None, **kwargs):
            metrics["eval_score"] = -abs(state.global_step - 3)

    trainer = _trainer(a, tmp_path, callbacks=[record, Metric()], eval_strategy="steps", eval_steps=1,
                       load_best_model_at_end=True, metric_for_best_model="score", greater_is_better=True)
    trainer.train()
    assert trainer.state.best_model_checkpoint.endswith("checkpoint-3")
    assert (a.step_count, a.unique_layers) == (3, 2)  # the schedule of the weights reloaded
    torch.testing.assert_close(_logits(a.model), record.seen[3][0], rtol=0, atol=0)
    export = a.export()
    torch.testing.assert_close(_logits(export), record.seen[3][0], rtol=0, atol=0)


def test_from_pretrained_rebuilds_the_wrapper_from_a_trainer_checkpoint(tmp_path):
    a = _apollo()
    record = _RecordEval(a)
    _trainer(a, tmp_path, callbacks=[record]).train()
    b = growops.from_pretrained(_model(seed=9), tmp_path / "checkpoint-3")
    assert (b.step_count, b.unique_layers, b.config) == (3, 2, a.config)
    torch.testing.assert_close(_logits(b.model), record.seen[3][0], rtol=0, atol=0)


def test_accelerate_save_state_and_load_state_with_safetensors_resume_weights_and_schedule(tmp_path):
    from accelerate import Accelerator

    def prepared(seed):
        a = _apollo(seed)
        accelerator = Accelerator(cpu=True)
        opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
        wrapped, opt = accelerator.prepare(a, opt)
        return accelerator, a, wrapped, opt

    accelerator, a, wrapped, opt = prepared(0)
    for step in range(3):
        ids = torch.randint(0, 96, (2, 12), generator=torch.Generator().manual_seed(step))
        accelerator.backward(wrapped(input_ids=ids, labels=ids).loss)
        opt.step()
        opt.zero_grad()
        a.step(opt)
    expected = _logits(a)
    accelerator.save_state(str(tmp_path))  # safe_serialization=True: tensors only
    assert (tmp_path / "model.safetensors").is_file()
    accelerator, b, _, _ = prepared(5)
    accelerator.load_state(str(tmp_path))
    assert (b.step_count, b.unique_layers, b.depth) == (3, 2, a.depth)
    torch.testing.assert_close(_logits(b), expected, rtol=0, atol=0)


def test_a_second_trainer_on_a_grown_wrapper_resumes_at_the_schedule_s_own_step(tmp_path):
    a = _apollo(stage_steps=(2, 8))
    _trainer(a, tmp_path / "first", save_strategy="no", max_steps=4).train()
    _trainer(a, tmp_path / "second").train()  # Trainer steps 1..6 are growops steps 5..10: grows at 8
    b = _apollo(stage_steps=(2, 8))
    _trainer(b, tmp_path / "first-b", save_strategy="no", max_steps=4).train()
    _trainer(b, tmp_path / "resumed").train(resume_from_checkpoint=str(tmp_path / "second" / "checkpoint-3"))
    assert (b.step_count, b.unique_layers) == (a.step_count, a.unique_layers) == (10, 4)
    torch.testing.assert_close(_logits(b.model), _logits(a.model), rtol=0, atol=0)


def test_from_pretrained_refuses_a_folder_of_another_model(tmp_path):
    a = _apollo()
    a.save_pretrained(tmp_path)
    head = transformers.GPT2ForSequenceClassification(transformers.GPT2Config(**CONFIG, num_labels=2))
    with pytest.raises(growops.GrowopsError, match=r"does not fit this GPT2ForSequenceClassification: "
                                                   r"\{'missing_keys': \{'score.weight'\}\}"):
        growops.from_pretrained(head, tmp_path)
    llama = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2))
    with pytest.raises(growops.GrowopsError, match="holds a 'gpt2' model, this is a 'llama'"):
        growops.from_pretrained(llama, tmp_path)


def test_a_sharded_checkpoint_is_checked_whole_before_its_first_shard_is_written(tmp_path, monkeypatch):
    from safetensors.torch import load_file, save_file

    save = transformers.PreTrainedModel.save_pretrained
    monkeypatch.setattr(transformers.PreTrainedModel, "save_pretrained",
                        lambda self, *args, **kw: save(self, *args, **{**kw, "max_shard_size": "60KB"}))
    a = _apollo()
    _trainer(a, tmp_path / "full").train()
    folder = tmp_path / "full" / "checkpoint-3"  # 2 unique blocks of 4: positions 0 and 1 run one block
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    first, second = index["transformer.h.0.mlp.c_fc.weight"], index["transformer.h.1.mlp.c_fc.weight"]
    assert first != second  # the two copies sit in different shards
    b = _apollo(seed=7)
    _trainer(b, tmp_path / "good", max_steps=4).train(resume_from_checkpoint=str(folder))
    assert (b.step_count, b.unique_layers) == (4, 4)
    shard = load_file(str(folder / second))
    shard["transformer.h.1.mlp.c_fc.weight"] += 0.5  # the copies now differ, across shards
    save_file(shard, str(folder / second), metadata={"format": "pt"})
    c = _apollo(seed=7)
    before = {k: v.clone() for k, v in c.model.state_dict().items()}
    with pytest.raises(growops.GrowopsError, match="transformer.h.0.mlp.c_fc.weight and "
                                                   "transformer.h.1.mlp.c_fc.weight differ"):
        _trainer(c, tmp_path / "bad").train(resume_from_checkpoint=str(folder))
    assert c.step_count == 0 and all(torch.equal(v, c.model.state_dict()[k]) for k, v in before.items())
