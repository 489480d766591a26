"""Hugging Face Trainer: a callback that moves the apollo schedule once per optimizer step.

    a = growops.apollo(model, stages=(1, 3, 6, 12), stage_steps=(2000, 4000, 10000))
    trainer = Trainer(model=a.model, args=args, train_dataset=ds, callbacks=[ApolloCallback(a)])
    trainer.train()

The Trainer trains your own model object (growops replaced its block container in place, so ``a.model`` runs the
sampled depth); the callback calls ``a.step(optimizer)`` after each optimizer step (after all gradient
accumulation micro-batches), writes ``growops_config.json`` into every checkpoint (``growops.from_pretrained`` reads
it), and adds
``growops/stage``, ``growops/unique_layers`` and ``growops/depth`` to the logs. The Trainer calls callbacks in list
order and puts its reporting callbacks (TensorBoard, W&B, ...) before yours, so the callback moves itself to the front
of that list (``ApolloCallback._run_first``): every reporter logs these values (TensorBoard as
``train/growops/stage``, ...).

Every checkpoint's weights are the model ``a.eval()`` computed at its step (``growops.saved``). When the Trainer loads
one of its checkpoints into ``a.model`` (resuming, or reloading the best model at the end), ``trainer_checkpoint_step``
reads the checkpoint's step and schedule fingerprint from its ``trainer_state.json`` during the load: a checkpoint of
another schedule raises before any weight is written, and the schedule moves to that step with the weights.
"""

from __future__ import annotations

import json
import os
import sys
import weakref

from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import CallbackHandler
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from ..apollo import Apollo
from ..config import save_config
from ..errors import GrowopsError, warn
from ..saved import check_whole
from ..state import STATE_VERSION, check_fingerprint

STATE_KEY = "growops"  # the schedule's fingerprint in the Trainer's state (trainer_state.json)


class ApolloCallback(TrainerCallback):
    """Drives an apollo schedule from a Hugging Face Trainer:
    ``Trainer(model=a.model, ..., callbacks=[ApolloCallback(a)])``.

    After each optimizer step it calls ``a.step(optimizer)`` (once, even if added twice); it writes
    ``growops_config.json`` into every ``checkpoint-N``, logs ``growops/stage``, ``growops/unique_layers`` and
    ``growops/depth`` (ahead of the reporting callbacks, so TensorBoard and W&B get them), and when the Trainer loads
    one of its checkpoints (resume, best model) weights and schedule move together to its step, checked first. Needs
    ``resample="step"`` and a model whose forward iterates its block container (every Hugging Face model's does)."""

    def __init__(self, apollo: Apollo):
        if not isinstance(apollo, Apollo):
            raise GrowopsError(f"ApolloCallback needs the growops.apollo wrapper, got {type(apollo).__name__}")
        if apollo._resample != "step":
            raise GrowopsError("ApolloCallback needs resample='step': the Trainer calls a.model directly, so "
                               "per-micro-batch sampling (which runs in a(...)) would never happen. Build apollo "
                               "with resample='step' (every micro-batch of an optimizer step runs the same depth)")
        if apollo.planned and apollo.mode != "container":  # planned at the first forward: container mode then
            raise GrowopsError("ApolloCallback needs a model whose forward iterates its block container (every "
                               "Hugging Face model does): this one runs through a rewritten graph, train it as "
                               "`a` in your own loop instead")
        self.apollo = apollo
        # A Trainer that loads one of its checkpoints into a.model (resume, best model) loads the weights of that
        # checkpoint's step: growops reads the step there, checks the schedule and moves it with the weights.
        apollo.__dict__["_position_source"] = trainer_checkpoint_step

    def on_init_end(self, args, state, control, model=None, **kwargs):
        self._check_model(model)
        self._run_first()

    def on_step_begin(self, args, state, control, **kwargs):
        self._run_first()  # a callback added after the Trainer was built (trainer.add_callback) saw no on_init_end

    def _run_first(self) -> None:
        """Move this callback to the front of the Trainer's callback list, so the values ``on_log`` adds reach the
        reporting callbacks (TensorBoard, W&B, ...), which the Trainer puts before the user's and calls in list order.
        The list is the ``CallbackHandler`` whose ``call_event`` called this callback's ``on_init_end`` (callbacks
        given to the Trainer) or ``on_step_begin`` (callbacks added later or moved back), found on the stack: before
        any training log. Were it not found (Trainer internals changed), a warning says how to do it by hand."""
        frame, handler = sys._getframe(1), None
        for _ in range(4):  # _run_first <- on_init_end / on_step_begin <- CallbackHandler.call_event
            if frame is None:
                break
            if isinstance(frame.f_locals.get("self"), CallbackHandler):
                handler = frame.f_locals["self"]
                break
            frame = frame.f_back
        at = next((i for i, c in enumerate(handler.callbacks) if c is self), None) if handler is not None else None
        if at is None:
            if not self.__dict__.get("_warned_order"):
                self._warned_order = True
                warn("growops: ApolloCallback could not find the Trainer's callback list, so it cannot run ahead of "
                     "the reporting callbacks: growops/stage, growops/unique_layers and growops/depth reach "
                     "trainer.state.log_history but not TensorBoard or W&B. Put it first by hand: "
                     "trainer.callback_handler.callbacks.insert(0, trainer.pop_callback(ApolloCallback))")
            return
        if all(isinstance(c, ApolloCallback) for c in handler.callbacks[:at]):
            return  # first already (behind another ApolloCallback at most)
        # call_event is iterating this list: moving the current entry to the front leaves the entries after it at
        # their indices, so every callback still runs once for this event.
        handler.callbacks.insert(0, handler.callbacks.pop(at))

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
        # Resuming: the load of the checkpoint's weights moved the schedule already (trainer_checkpoint_step); this
        # covers loads that bypass load_state_dict. The schedule's own step is saved beside the fingerprint (a
        # wrapper trained by an earlier Trainer is ahead of this one's global_step). A Trainer that starts at step 0
        # while the schedule has moved on (trained before, or a second train() call without resuming) continues the
        # schedule: rewinding it would regrow blocks over trained weights.
        saved = state.stateful_callbacks.get(STATE_KEY) if state.global_step > 0 else None
        if saved is not None:  # resuming from a checkpoint this callback saved: the same schedule?
            check_fingerprint({"version": STATE_VERSION, **saved}, self.apollo._fingerprint())
        step = _saved_step(saved, state.global_step)
        if state.global_step > 0 and step != self.apollo.step_count:
            self.apollo.restore_step(step)

    def on_save(self, args, state, control, **kwargs):
        # Beside the weights: the arguments and the step, so growops.from_pretrained(model, checkpoint) rebuilds `a`.
        folder = os.path.join(args.output_dir, f"{PREFIX_CHECKPOINT_DIR}-{state.global_step}")
        if args.should_save and os.path.isdir(folder):
            save_config(folder, self.apollo.config, self.apollo.step_count, self.apollo._fingerprint())

    def on_step_end(self, args, state, control, optimizer=None, **kwargs):
        # One a.step() per optimizer step, even if the callback was added twice.
        last = self.apollo.__dict__.get("_trainer_step")
        if last is not None and last[0]() is state and last[1] == state.global_step:
            return
        self.apollo.__dict__["_trainer_step"] = (weakref.ref(state), state.global_step)
        self.apollo.step(optimizer)  # unwraps accelerate's optimizer to the one that holds the state
        # The Trainer saves this in its checkpoints (trainer_state.json), so a resume can check the schedule and
        # find its step.
        state.stateful_callbacks[STATE_KEY] = {**self.apollo._fingerprint(), "step": self.apollo.step_count}

    def on_log(self, args, state, control, logs=None, **kwargs):
        # This callback runs first (_run_first), so every reporting callback after it logs these values too.
        values = {"growops/stage": self.apollo.stage, "growops/unique_layers": self.apollo.unique_layers,
                  "growops/depth": self.apollo.depth}
        if logs is not None:
            logs.update(values)
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(values)


def trainer_checkpoint_step(a: Apollo) -> int | None:
    """The optimizer step of the Trainer checkpoint being loaded into ``a.model`` now (``Trainer`` resuming, or
    reloading its best model), after checking that it was saved under `a`'s schedule; None when no Trainer is
    loading one of its checkpoints, or the checkpoint holds no growops schedule."""
    found = _trainer_checkpoint()
    if found is None:
        return None
    folder, loading = found
    try:
        with open(os.path.join(folder, "trainer_state.json")) as f:
            trainer_state = json.load(f)
    except (OSError, ValueError):
        return None
    saved = (trainer_state.get("stateful_callbacks") or {}).get(STATE_KEY)
    if not isinstance(saved, dict):
        return None
    step = _saved_step(saved, trainer_state.get("global_step"))
    if not isinstance(step, int):
        return None
    try:
        check_fingerprint({"version": STATE_VERSION, **saved}, a._fingerprint())
        _check_shards(a, folder, loading, a._schedule.stages[a._schedule.stage_at(step)])
    except GrowopsError as e:
        raise GrowopsError(f"{folder}: {e}") from None
    return step


def _check_shards(a: Apollo, folder: str, loading, unique: int) -> None:
    """A sharded checkpoint is loaded shard by shard (in an order that varies from run to run): check it whole once,
    before its first shard is written (shapes, and positions that run one block holding equal tensors across
    shards), so a bad checkpoint changes nothing. `loading`: the Trainer's frame loading it (checked once per load)."""
    index = next((os.path.join(folder, n) for n in ("model.safetensors.index.json", "pytorch_model.bin.index.json")
                  if os.path.isfile(os.path.join(folder, n))), None)
    if index is None or a.__dict__.get("_checked_shards") == (folder, id(loading)):
        return
    with open(index) as f:
        files = sorted(set(json.load(f)["weight_map"].values()))
    state = {}
    for name in files:
        path = os.path.join(folder, name)
        if name.endswith(".safetensors"):
            from safetensors.torch import load_file

            state.update(load_file(path))
        else:
            import torch

            state.update(torch.load(path, map_location="cpu", weights_only=True))
    check_whole(a.model, a._runtimes, state, unique)
    a.__dict__["_checked_shards"] = (folder, id(loading))


def _saved_step(saved: dict | None, global_step):
    """The schedule's step saved beside the fingerprint, or the Trainer's (checkpoints of growops before it saved one,
    where the two were the same)."""
    step = (saved or {}).get("step", global_step)
    return step if isinstance(step, int) and not isinstance(step, bool) else global_step


def _trainer_checkpoint():
    """``(folder, frame)``: the checkpoint folder a ``Trainer`` is loading weights from now and the Trainer's frame
    doing it, read from the stack; None when no Trainer is loading a checkpoint."""
    codes = {Trainer._load_from_checkpoint.__code__: "resume", Trainer._load_best_model.__code__: "best"}
    frame = sys._getframe(1)
    while frame is not None:
        kind = codes.get(frame.f_code)
        if kind == "resume":
            folder = frame.f_locals.get("resume_from_checkpoint")
            return (folder, frame) if folder is not None else None
        if kind == "best":
            trainer = frame.f_locals.get("self")
            folder = getattr(getattr(trainer, "state", None), "best_model_checkpoint", None)
            return (folder, frame) if folder is not None else None
        frame = frame.f_back
    return None
