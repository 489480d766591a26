"""The schedule position an apollo model saves with its weights, and the checks that guard loading it.

``a.state_dict()["_extra_state"]`` holds where the schedule stands (step, stage, unique, depth) and a fingerprint of
every argument that changes training (stages, stage_steps, L, growth, sampler, seed, stacks, resample,
optimizer_state). A load is checked whole before anything is written: the fingerprint, the position's ranges and
consistency (step >= 0, stage is the stage of step, unique is that stage's count, unique <= depth <= L), every
tensor's type and shape, and (strict loads) the keys. A custom sampler is identified by its qualified name and a
digest of its code: another name is an error, the same name with other code a warning.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
import types
from typing import Any

import numpy as np
import torch

from .errors import GrowopsError, warn
from .schedule import Schedule

STATE_VERSION = 2  # 2: weights in the exported layout (growops.saved); 1: physical slots, loaded as they are
EXTRA = "_extra_state"


ENCODED = 2048  # bytes of the encoded state (zero-padded): one shape at every step, as torch.distributed.checkpoint
# needs to load a saved state into a fresh model's


def encode_state(state: dict) -> torch.Tensor:
    """The schedule state as a uint8 tensor of its JSON text, zero-padded to a multiple of ENCODED bytes:
    tensors-only formats (safetensors through accelerate's ``save_state``, a Trainer's) store it like a weight.
    ``decode_state`` reads it back."""
    text = json.dumps(state, sort_keys=True).encode()
    size = -(-len(text) // ENCODED) * ENCODED
    return torch.tensor(list(text.ljust(size, b"\0")), dtype=torch.uint8)


def decode_state(value: Any) -> Any:
    """The schedule state saved as `value`: a tensor from ``encode_state`` read back, a dict (a state saved before,
    or edited by hand) as it is; anything else is returned for ``check_fingerprint`` to refuse."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.uint8 and value.dim() == 1:
        try:
            return json.loads(bytes(value.tolist()).rstrip(b"\0").decode())
        except ValueError:
            return value
    return value


def sampler_identity(name: str, sampler: Any) -> dict:
    """``{"sampler": name, "sampler_code": digest}``; builtin samplers have no digest."""
    return {"sampler": name, "sampler_code": None if isinstance(sampler, str) else _digest(sampler)}


def check_position(state: dict, schedule: Schedule, layers: int) -> None:
    """Raise a GrowopsError unless the saved position is one this schedule can be at."""
    for key in ("step", "stage", "unique", "depth"):
        value = state.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise GrowopsError(f"saved growops state has {key}={value!r}; it must be a non-negative int")
    step, stage, unique, depth = (state[k] for k in ("step", "stage", "unique", "depth"))
    if stage != schedule.stage_at(step):
        raise GrowopsError(f"saved growops state is at step {step} in stage {stage}, but step {step} belongs to stage "
                           f"{schedule.stage_at(step)} of this schedule (stage_steps={list(schedule.stage_steps)})")
    if unique != schedule.stages[stage]:
        raise GrowopsError(f"saved growops state has unique={unique} in stage {stage}, which holds "
                           f"{schedule.stages[stage]} unique blocks")
    if not unique <= depth <= layers:
        raise GrowopsError(f"saved growops state has depth={depth}; it must lie in [unique={unique}, L={layers}]")


# Fingerprint fields added after STATE_VERSION 1 shipped, with the value that every state saved before had.
SAVED_BEFORE = {"lr_scale": "none", "rewarmup": 0}


def check_fingerprint(state: Any, here: dict) -> None:
    """Raise a GrowopsError unless `state` was saved under the same arguments (`here`); warn if only a custom
    sampler's code differs."""
    if not isinstance(state, dict) or state.get("version") not in (1, STATE_VERSION):
        raise GrowopsError(f"unrecognised growops state {_short(state)}: expected a dict saved by a.state_dict()")
    saved = {**SAVED_BEFORE, **state}
    diff = {k: (saved.get(k), v) for k, v in here.items() if k != "sampler_code" and not _same(saved.get(k), v)}
    moved = diff.get("sampler", (None, None))
    if isinstance(moved[0], str) and isinstance(moved[1], str) and ":" in moved[0] and \
            moved[0].split(":", 1)[1] == moved[1].split(":", 1)[1]:  # the same function, imported another way
        del diff["sampler"]
        warn(f"growops: this state was saved with the sampler {moved[0]}, here it is {moved[1]}: the same "
             "name from another module; resuming with it")
    if diff:
        detail = "; ".join(f"{k}: saved {a!r}, here {b!r}" for k, (a, b) in diff.items())
        raise GrowopsError(f"this state was saved under another schedule or model ({detail}); build apollo with "
                           "the same arguments and model to resume")
    if state.get("sampler_code") != here.get("sampler_code"):
        warn(f"growops: the sampler {here['sampler']} has other code than the one this state was saved "
             "with; the depths drawn from here on may differ from the original run's")


def check_tensors(own: dict, incoming: dict, strict: bool, prefix: str = "") -> None:
    """Raise a GrowopsError unless every entry of `incoming` fits the module whose state is `own` (both without
    `prefix`, which the messages add back): tensors where tensors are, same shapes, and (strict) the same keys."""
    if strict:
        missing = [prefix + k for k in sorted(set(own) - set(incoming))]
        unexpected = [prefix + k for k in sorted(set(incoming) - set(own))]
        if missing or unexpected:
            raise GrowopsError(f"state_dict does not match this model: missing {missing[:5]}, unexpected "
                               f"{unexpected[:5]}; was it saved from another model? "
                               "(load_state_dict(..., strict=False) loads what matches)")
    for key, value in incoming.items():
        mine = own.get(key) if key != EXTRA else None  # the schedule state is checked by check_fingerprint
        if not isinstance(mine, torch.Tensor):
            continue
        if not isinstance(value, torch.Tensor):
            raise GrowopsError(f"state_dict entry {prefix + key} is a {type(value).__name__}, not a tensor")
        if value.layout != torch.strided or value.is_meta or value.is_nested:
            kind = "a meta tensor" if value.is_meta else f"a {value.layout} tensor"
            raise GrowopsError(f"state_dict entry {prefix + key} is {kind}, which holds no values to load: save the "
                               "state from a model with real weights")
        if value.is_quantized != mine.is_quantized or _subclass(value) != _subclass(mine):
            fix = ("load a state saved from a model quantized the same way" if value.is_quantized != mine.is_quantized
                   else "a sharded (DTensor) state loads into the sharded model, a full one into an unsharded model")
            raise GrowopsError(f"state_dict entry {prefix + key} is a {_kind(value)}, this model's is a {_kind(mine)}: "
                               f"{fix}")
        if value.shape != mine.shape:
            raise GrowopsError(f"state_dict entry {prefix + key} has shape {tuple(value.shape)}, this model's has "
                               f"{tuple(mine.shape)}; was it saved from another model?")


def load_options() -> tuple[bool, bool]:
    """``(strict, assign)`` of the ``nn.Module.load_state_dict`` call now loading (torch passes strict=True down to
    every ``_load_from_state_dict`` whatever its caller asked, and a wrapper's load goes through its own call)."""
    code = torch.nn.Module.load_state_dict.__code__
    frame = running_frame(code)
    if frame is None:
        return True, False
    return bool(frame.f_locals.get("strict", True)), bool(frame.f_locals.get("assign", False))


def loading() -> bool:
    """Whether an ``nn.Module.load_state_dict`` call is running (its load post-hooks will run)."""
    return running_frame(torch.nn.Module.load_state_dict.__code__) is not None


def running_frame(code):
    """The innermost frame on the stack now running `code` (a function's ``__code__``), or None."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code is code:
            return frame
        frame = frame.f_back
    return None


def _kind(t: torch.Tensor) -> str:
    """'plain tensor', 'quantized plain tensor', 'DTensor', ... (what a load must match)."""
    return f"{'quantized ' if t.is_quantized else ''}{_subclass(t) or 'plain tensor'}"


def _subclass(t: torch.Tensor) -> str:
    """The tensor subclass of `t` ('' for a plain tensor or Parameter), e.g. 'DTensor'."""
    cls = type(t.data) if isinstance(t, torch.nn.Parameter) else type(t)
    return "" if cls is torch.Tensor else cls.__name__


def _same(saved: Any, here: Any) -> bool:
    """Whether a saved fingerprint field equals ours (a hand-edited state may hold anything, arrays included)."""
    try:
        return type(saved) is type(here) and bool(saved == here)
    except Exception:  # noqa: BLE001 - a comparison that cannot answer: not the same
        return False


def _digest(sampler: Any) -> str:
    """A digest of what a callable computes: its code, constants, defaults, closure values, the plain globals it
    reads; a partial's arguments; a bound method's or callable object's attributes; recursively, for callables among
    them."""
    return hashlib.sha256(_stable(sampler, 0).encode()).hexdigest()[:16]


def _stable(value: Any, depth: int) -> str:
    """A text that stays the same for the same value across processes (no memory addresses, sorted sets and
    dicts), and differs where the value would compute differently."""
    if depth > 4:
        return "..."
    if isinstance(value, (int, float, str, bool, bytes, type(None))):
        return repr(value)
    if isinstance(value, (tuple, list)):
        return f"{type(value).__name__}({', '.join(_stable(v, depth + 1) for v in value)})"
    if isinstance(value, (set, frozenset)):
        return f"set({', '.join(sorted(_stable(v, depth + 1) for v in value))})"
    if isinstance(value, dict):
        items = sorted(f"{_stable(k, depth + 1)}: {_stable(v, depth + 1)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    if isinstance(value, np.ndarray):
        return f"array({value.dtype}, {value.shape}, {hashlib.sha256(value.tobytes()).hexdigest()[:12]})"
    if isinstance(value, torch.Tensor):
        return f"tensor({value.dtype}, {tuple(value.shape)})"
    if isinstance(value, functools.partial):
        return f"partial({_stable(value.func, depth + 1)}, {_stable((value.args, value.keywords), depth + 1)})"
    if isinstance(value, types.MethodType):
        return f"method({_stable(value.__func__, depth + 1)}, {_stable(vars(value.__self__), depth + 1)})" \
            if hasattr(value.__self__, "__dict__") else f"method({_stable(value.__func__, depth + 1)})"
    if isinstance(value, types.FunctionType):
        code = value.__code__
        reads = {name: value.__globals__[name] for name in code.co_names if name in value.__globals__ and
                 isinstance(value.__globals__[name], (int, float, str, bool, tuple))}
        cells = tuple(c.cell_contents for c in value.__closure__ or ())
        return (f"function({value.__qualname__}, {_code(code)}, {_stable(value.__defaults__, depth + 1)}, "
                f"{_stable(cells, depth + 1)}, {_stable(reads, depth + 1)})")
    if isinstance(value, (type, types.BuiltinFunctionType, types.ModuleType)):
        return f"<{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', value.__name__)}>"
    call = type(value).__dict__.get("__call__")
    state = _stable(vars(value), depth + 1) if hasattr(value, "__dict__") else ""
    return f"<{type(value).__module__}.{type(value).__qualname__} {_stable(call, depth + 1) if call else ''} {state}>"


def _code(code) -> str:
    consts = [_code(c) if hasattr(c, "co_code") else repr(c) if isinstance(c, (int, float, str, bool, bytes,
              type(None), tuple)) else type(c).__name__ for c in code.co_consts]
    return hashlib.sha256(code.co_code + repr((code.co_names, consts)).encode()).hexdigest()[:12]


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
