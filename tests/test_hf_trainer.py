"""Hugging Face Trainer drives the schedule through ApolloCallback, resumes it from its own checkpoints."""

import pytest
import torch

import growops

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from growops.integrations.hf import ApolloCallback  # noqa: E402
from tests.models import IndexLoopNet  # noqa: E402

transformers.logging.set_verbosity_error()
CONFIG = dict(n_layer=4, n_embd=32, n_head=2, vocab_size=96, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0)


def _apollo():
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    return growops.apollo(model, stages=(1, 2, 4), stage_steps=(2, 4), seed=1)


def _data():
    g = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(32):
        ids = torch.randint(0, 96, (12,), generator=g)
        rows.append({"input_ids": ids, "labels": ids})
    return rows


def _trainer(a, out, report_to=(), **kwargs):
    args = transformers.TrainingArguments(output_dir=str(out), max_steps=6, per_device_train_batch_size=2,
                                          gradient_accumulation_steps=2, logging_steps=1, report_to=list(report_to),
                                          use_cpu=True, learning_rate=1e-3, seed=0, **kwargs)
    return transformers.Trainer(model=a.model, args=args, train_dataset=_data(), callbacks=[ApolloCallback(a)])


def test_trainer_steps_the_schedule_once_per_optimizer_step(tmp_path):
    a = _apollo()
    trainer = _trainer(a, tmp_path, save_strategy="no")
    trainer.train()
    assert (a.step_count, a.stage, a.unique_layers) == (6, 2, 4)  # 6 optimizer steps of 2 micro-batches each
    logged = [(h["step"], h["growops/stage"]) for h in trainer.state.log_history if "loss" in h]
    assert logged == [(1, 0), (2, 1), (3, 1), (4, 2), (5, 2), (6, 2)]


def test_trainer_resume_restores_the_schedule(tmp_path):
    a = _apollo()
    _trainer(a, tmp_path / "full", save_strategy="steps", save_steps=3).train()
    b = _apollo()
    seen = []

    class Record(transformers.TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):
            seen.append((b.step_count, b.stage, b.unique_layers))

    trainer = _trainer(b, tmp_path / "resumed", save_strategy="no")
    trainer.add_callback(Record())
    trainer.train(resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert seen == [(3, 1, 2)]
    assert (b.step_count, b.stage, b.unique_layers, b.depth) == (a.step_count, a.stage, a.unique_layers, a.depth)
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_new_trainer_continues_a_schedule_that_has_moved_on(tmp_path):
    """A Trainer at step 0 (a second train() without resuming) must not rewind a grown schedule: rewinding would
    regrow blocks over trained weights."""
    a = _apollo()
    _trainer(a, tmp_path / "first", save_strategy="no").train()
    assert (a.step_count, a.stage) == (6, 2)
    trainer = _trainer(a, tmp_path / "second", save_strategy="no")
    trainer.train()
    assert (a.step_count, a.stage, a.unique_layers) == (12, 2, 4)


def test_callback_rejects_what_it_cannot_drive():
    with pytest.raises(growops.GrowopsError, match="needs the growops.apollo wrapper"):
        ApolloCallback(transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)))
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    a = growops.apollo(model, stages=(1, 2, 4), stage_steps=(2, 4), resample="micro_batch")
    with pytest.raises(growops.GrowopsError, match="needs resample='step'"):
        ApolloCallback(a)
    graph = growops.apollo(IndexLoopNet(4), stages=(2, 4), stage_steps=(1,))
    with pytest.raises(growops.GrowopsError, match=r"^ApolloCallback needs a model whose forward iterates its block "
                                                   r"container \(every Hugging Face model does\): this one runs "
                                                   r"through a rewritten graph, train it as `a` in your own loop"):
        ApolloCallback(graph)


def test_giving_the_trainer_the_wrapper_is_refused_before_training(tmp_path):
    a = _apollo()
    args = transformers.TrainingArguments(output_dir=str(tmp_path), max_steps=2, report_to=[], use_cpu=True)
    with pytest.raises(growops.GrowopsError, match="given the growops.apollo wrapper; give it the model: "
                                                   "Trainer\\(model=a.model"):
        transformers.Trainer(model=a, args=args, train_dataset=_data(), callbacks=[ApolloCallback(a)])
    assert a.step_count == 0


def test_a_callback_added_twice_steps_once_and_another_model_is_refused(tmp_path):
    a = _apollo()
    trainer = _trainer(a, tmp_path / "twice", save_strategy="no")
    trainer.add_callback(ApolloCallback(a))
    trainer.train()
    assert a.step_count == 6  # one a.step() per optimizer step
    other = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "other"), max_steps=2, report_to=[], use_cpu=True)
    with pytest.raises(growops.GrowopsError, match="the Trainer trains a GPT2LMHeadModel, not a.model"):
        transformers.Trainer(model=other, args=args, train_dataset=_data(), callbacks=[ApolloCallback(_apollo())])


def test_resuming_a_trainer_checkpoint_under_another_schedule_is_refused(tmp_path):
    a = _apollo()
    _trainer(a, tmp_path / "full", save_strategy="steps", save_steps=3).train()
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG))
    b = growops.apollo(model, stages=(1, 2, 4), stage_steps=(3, 5), seed=1)  # other stage_steps
    with pytest.raises(growops.GrowopsError, match="stage_steps: saved \\[2, 4\\], here \\[3, 5\\]"):
        _trainer(b, tmp_path / "resumed", save_strategy="no").train(
            resume_from_checkpoint=str(tmp_path / "full" / "checkpoint-3"))
    assert b.step_count == 0


@pytest.mark.parametrize("added", [False, True])
def test_the_schedule_reaches_tensorboard_at_every_logged_step(tmp_path, added):
    """The Trainer's reporting callbacks (TensorBoard, W&B, ...) come before the user's in its list; the growops
    values must be in the logs before they see them, for a callback given to the Trainer or added to it later."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    a = _apollo()
    trainer = _trainer(a, tmp_path / "out", save_strategy="no", report_to=["tensorboard"])
    if added:  # last in the list, after the progress callback too; no on_init_end
        trainer.add_callback(trainer.pop_callback(ApolloCallback))
    assert isinstance(trainer.callback_handler.callbacks[-1 if added else 0], ApolloCallback)
    trainer.train()
    assert isinstance(trainer.callback_handler.callbacks[0], ApolloCallback)
    events = sorted((tmp_path / "out").rglob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0].parent), size_guidance={"scalars": 0})
    acc.Reload()
    expected = _apollo()
    for name in ("stage", "unique_layers", "depth"):
        logged = [(e.step, e.value) for e in acc.Scalars(f"train/growops/{name}")]
        want = []
        for step in range(1, 7):
            expected.restore_step(step)
            want.append((step, float(getattr(expected, name))))
        assert sorted(set(logged)) == want, name  # the final summary log (train_runtime, ...) repeats step 6
    assert [e.step for e in acc.Scalars("train/loss")] == list(range(1, 7))
