"""Hugging Face Trainer: a callback that moves the apollo schedule once per optimizer step.

    a = growops.apollo(model, stages=(1, 3, 6, 12), stage_steps=(2000, 4000, 10000))
    trainer = Trainer(model=a.model, args=args, train_dataset=ds, callbacks=[ApolloCallback(a)])
    trainer.train()

The Trainer trains your own model object (growops replaced its block container in place, so ``a.model`` runs the
sampled depth); the callback calls ``a.step(optimizer)`` after each optimizer step (after all gradient
accumulation micro-batches), puts the schedule back at the checkpoint's step when the Trainer resumes, and adds
``growops/stage``, ``growops/unique_layers`` and ``growops/depth`` to the logs.
"""

from __future__ import annotations

import weakref

from transformers import TrainerCallback

from ..apollo import Apollo
from ..errors import GrowopsError
from ..state import STATE_VERSION, check_fingerprint

STATE_KEY = "growops"  # the schedule's fingerprint in the Trainer's state (trainer_state.json)


class ApolloCallback(TrainerCallback):
    """Drives an apollo schedule from a Hugging Face Trainer (see the module docstring)."""

    def __init__(self, apollo: Apollo):
        if not isinstance(apollo, Apollo):
            raise GrowopsError(f"ApolloCallback needs the growops.apollo wrapper, got {type(apollo).__name__}")
        if apollo._resample != "step":
            raise GrowopsError("ApolloCallback needs resample='step': the Trainer calls a.model directly, so "
                               "per-micro-batch sampling (which runs in a(...)) would never happen. Build apollo "
                               "with resample='step' (every micro-batch of an optimizer step runs the same depth)")
        if apollo.mode != "container":
            raise GrowopsError("ApolloCallback needs a model whose forward iterates its block container (every "
                               "Hugging Face model does): this one runs through a rewritten graph, train it as "
                               "`a` in your own loop instead")
        self.apollo = apollo

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._check_model(model)

    def _check_model(self, model) -> None:
        if model is self.apollo or isinstance(model, Apollo):
            raise GrowopsError("the Trainer was given the growops.apollo wrapper; give it the model: "
                               "Trainer(model=a.model, ..., callbacks=[ApolloCallback(a)]) (growops runs inside "
                               "a.model; the wrapper's state_dict holds a schedule the Trainer cannot save)")
        inner = model
        while inner is not None and inner is not self.apollo.model:  # through torch.compile or DDP wrappers
            inner = getattr(inner, "_orig_mod", None) or getattr(inner, "module", None)
        if model is not None and inner is None:
            raise GrowopsError(f"the Trainer trains a {type(model).__name__}, not a.model, the model this "
                               "ApolloCallback's wrapper grows: give the Trainer a.model")

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self._check_model(model)
        # Resuming from a Trainer checkpoint restores weights and optimizer state but not the schedule. A Trainer
        # that starts at step 0 while the schedule has moved on (trained before, or a second train() call without
        # resuming) continues the schedule: rewinding it would regrow blocks over trained weights.
        saved = state.stateful_callbacks.get(STATE_KEY) if state.global_step > 0 else None
        if saved is not None:  # resuming from a checkpoint this callback saved: the same schedule?
            check_fingerprint({"version": STATE_VERSION, **saved}, self.apollo._fingerprint())
        if state.global_step > 0 and state.global_step != self.apollo.step_count:
            self.apollo.restore_step(state.global_step)

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        # One a.step() per optimizer step, even if the callback was added twice.
        last = self.apollo.__dict__.get("_trainer_step")
        if last is not None and last[0]() is state and last[1] == state.global_step:
            return
        self.apollo.__dict__["_trainer_step"] = (weakref.ref(state), state.global_step)
        self.apollo.step(optimizer)  # unwraps accelerate's optimizer to the one that holds the state
        # The Trainer saves this in its checkpoints (trainer_state.json), so a resume can check the schedule.
        state.stateful_callbacks[STATE_KEY] = self.apollo._fingerprint()

    def on_log(self, args, state, control, logs=None, **kwargs):
        values = {"growops/stage": self.apollo.stage, "growops/unique_layers": self.apollo.unique_layers,
                  "growops/depth": self.apollo.depth}
        if logs is not None:
            logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)
