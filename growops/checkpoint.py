"""Save and load an apollo model: one safetensors file (``save_safetensors``: the wrapper's state, the schedule position
as metadata), or a folder (``a.save_pretrained`` / ``from_pretrained``: the model as ``a.eval()`` computes it, which
its class loads as a plain model, and ``growops_config.json``, from which the wrapper is rebuilt).

safetensors stores tensors only and refuses tensors that share memory (a Hugging Face LM head tied to its token
embedding): the schedule goes into the file's metadata as JSON, and each tied name is stored once and recorded as
an alias of the other.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections import Counter
from pathlib import Path

import torch
from torch import nn

from .apollo import Apollo
from .config import load_config, save_config
from .errors import GrowopsError, GrowopsTypeError
from .state import EXTRA, STATE_VERSION, check_fingerprint, decode_state


def _check_wrapper(a, path, what: str) -> None:
    if not isinstance(a, Apollo):
        raise GrowopsTypeError(f"{what} takes the growops.apollo wrapper `a`, got a {type(a).__name__}; for a plain "
                               "model use safetensors.torch.save_model / load_model")
    if not isinstance(path, (str, os.PathLike)):
        raise GrowopsTypeError(f"{what} takes a file path, got {type(path).__name__}")
    if Path(path).is_dir():
        raise GrowopsError(f"{what}: {path} is a directory; give the path of a .safetensors file")


def save_safetensors(a: Apollo, path: str | Path) -> None:
    """Write `a`'s weights and schedule position to `path` (a ``.safetensors`` file)."""
    from safetensors.torch import save_file

    _check_wrapper(a, path, "save_safetensors")
    if not Path(path).parent.is_dir():
        raise GrowopsError(f"save_safetensors: the folder of {path} does not exist; create it first")
    state = a.state_dict()
    schedule = decode_state(state.pop(EXTRA))
    tensors, aliases = _storable(state)
    save_file(tensors, str(path), metadata={"growops": json.dumps(schedule), "aliases": json.dumps(aliases)})


def _storable(state: dict) -> tuple[dict, dict]:
    """``(tensors, aliases)``: what safetensors can store of `state`. Identical views of one storage are saved once
    and restored as aliases; other tensors that share memory (a slice or a dtype view of another) are saved as
    copies, since safetensors refuses overlapping tensors."""
    tensors, aliases, first = {}, {}, {}
    for name, tensor in state.items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tuple(tensor.stride()), tensor.dtype)
        if where in first:
            aliases[name] = first[where]
            continue
        first[where] = name
        tensors[name] = tensor
    shared = Counter(t.untyped_storage().data_ptr() for t in tensors.values())
    tensors = {name: t.clone(memory_format=torch.contiguous_format) if shared[t.untyped_storage().data_ptr()] > 1
               else t.contiguous() for name, t in tensors.items()}
    return tensors, aliases


def load_safetensors(a: Apollo, path: str | Path) -> None:
    """Load weights and schedule position written by ``save_safetensors``; checked like ``a.load_state_dict``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    _check_wrapper(a, path, "load_safetensors")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
        state: dict = load_file(str(path))
    except FileNotFoundError:
        raise
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error types for damaged files
        raise GrowopsError(f"cannot read {path} as a safetensors file ({type(e).__name__}: {e}); was it written "
                           "completely, by growops.save_safetensors?") from None
    if "growops" not in metadata:
        raise GrowopsError(f"{path} has no growops schedule in its metadata: it was not written by "
                           "growops.save_safetensors; load plain weights with a.model.load_state_dict(...)")
    try:
        aliases, schedule = json.loads(metadata.get("aliases", "{}")), json.loads(metadata["growops"])
        for alias, name in aliases.items():
            state[alias] = state[name]
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        raise GrowopsError(f"{path} has damaged growops metadata ({type(e).__name__}: {e}); it was not written by "
                           "this version of growops.save_safetensors") from None
    state[EXTRA] = schedule
    a.load_state_dict(state)




WEIGHTS = "model.safetensors"


def save_pretrained(a: Apollo, folder: str | os.PathLike) -> None:
    """``a.save_pretrained``: the model in the exported layout (a Hugging Face model through its own
    ``save_pretrained``, so ``from_pretrained`` of its class loads it as a plain model; any other model as
    ``model.safetensors``) and ``growops_config.json``. Checked first: a folder path that is not a file."""
    from safetensors.torch import save_file

    if not isinstance(folder, (str, os.PathLike)):
        raise GrowopsTypeError(f"save_pretrained takes a folder path, got {type(folder).__name__}")
    if Path(folder).is_file():
        raise GrowopsError(f"save_pretrained: {folder} is a file; give a folder")
    config = a.config
    Path(folder).mkdir(parents=True, exist_ok=True)
    if _is_hf(a.model):
        a.model.save_pretrained(str(folder))
    else:
        tensors, aliases = _storable(a.model.state_dict())
        save_file(tensors, str(Path(folder) / WEIGHTS), metadata={"format": "pt", "aliases": json.dumps(aliases)})
    save_config(folder, config, a.step_count, a._fingerprint())


def from_pretrained(model: nn.Module, folder: str | os.PathLike, **overrides) -> Apollo:
    """Wrap `model` (freshly built, of the class that was trained) with the arguments saved in `folder` by
    ``a.save_pretrained`` or the Trainer's ``ApolloCallback`` (a checkpoint folder), and load the folder's weights
    and schedule position: the result continues where the saved wrapper stood. `overrides` are ``growops.apollo``
    arguments given again: what the config cannot hold (a callable ``sampler``, the one saved; an edited ``plan``;
    ``example_inputs``) and ``shared_linear``; nothing that changes the schedule.

        a = growops.from_pretrained(GPT2LMHeadModel(config), "out/checkpoint-500")

    Everything is read and checked before the model is touched; if the load is refused, the model is as it was.
    """
    from .apollo import Apollo, apollo
    from .install import uninstall

    if not isinstance(model, nn.Module) or isinstance(model, Apollo):
        raise GrowopsTypeError(f"from_pretrained takes the model to wrap (not wrapped yet), got a "
                               f"{type(model).__name__}")
    config, step, fingerprint = load_config(folder)
    schedule = sorted(set(overrides) - OVERRIDABLE)
    if schedule:
        raise GrowopsError(f"from_pretrained continues the schedule saved in {folder}; {schedule} cannot be given "
                           f"again (only {sorted(OVERRIDABLE)}). To train under other arguments, build "
                           "growops.apollo(model, ...) yourself and load plain weights before wrapping")
    if "sampler" in overrides:  # a callable sampler given again: the one saved
        from .schedule import resolve_sampler

        name, _ = resolve_sampler(overrides["sampler"])
        if config.sampler_callable is None or name != config.sampler_callable:
            raise GrowopsError(f"sampler={name} given again, but {folder} was trained with "
                               f"{config.sampler_callable or repr(config.sampler)}: give that one")
        config = dataclasses.replace(config, sampler_callable=None)
    kwargs = {**config.kwargs(), **overrides}
    if "plan" in overrides:  # the plan chose the stacks (checked against the saved ones below)
        kwargs.pop("stack")
    weights = _read_weights(model, Path(folder))
    a = apollo(model, **kwargs)
    try:
        if fingerprint is not None:  # what the saved wrapper resolved (its stacks, a sampler's code) is what this has
            check_fingerprint({"version": STATE_VERSION, **fingerprint}, a._fingerprint())
        state = {f"model.{k}": v for k, v in weights.items()}
        state[EXTRA] = a._state_at(step)
        _load_tied(a, state)
    except Exception:
        uninstall(model, a.plan)  # the model as it was (no weight was written: every load check comes first)
        raise
    return a


OVERRIDABLE = {"sampler", "plan", "example_inputs", "shared_linear"}  # what from_pretrained may be given again


def _load_tied(a: Apollo, state: dict) -> None:
    """``a.load_state_dict(state)``, where keys missing from `state` are allowed only for tensors tied to one that
    is present (a Hugging Face LM head saved once, as its embedding)."""
    own = a.state_dict(keep_vars=True)
    missing = [k for k in own if k not in state and k != EXTRA]
    present = {own[k].untyped_storage().data_ptr() for k in state if isinstance(own.get(k), torch.Tensor)}
    untied = [k for k in missing if own[k].untyped_storage().data_ptr() not in present]
    if untied:
        raise GrowopsError(f"the saved weights lack {untied[:5]}{' ...' if len(untied) > 5 else ''}: was the folder "
                           "saved from another model?")
    a.load_state_dict(state, strict=not missing)


def _read_weights(model: nn.Module, folder: Path) -> dict:
    """The state dict saved in `folder` (exported layout), keys as ``model.state_dict()`` has them."""
    if _is_hf(model) and (folder / "config.json").is_file():
        saved_type = json.loads((folder / "config.json").read_text()).get("model_type")
        if saved_type != getattr(model.config, "model_type", None):
            raise GrowopsError(f"{folder} holds a {saved_type!r} model, this is a {model.config.model_type!r} "
                               f"({type(model).__name__}): build the model the folder was saved from")
        # The model's own loader (shards, renamed keys, tied weights), on the model's own config: a missing or
        # mismatched weight is refused, never initialised afresh.
        plain, info = type(model).from_pretrained(str(folder), config=model.config, output_loading_info=True)
        wrong = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if wrong:
            raise GrowopsError(f"{folder} does not fit this {type(model).__name__}: {wrong}; build the model the "
                               "folder was saved from (same class and config)")
        return plain.state_dict()
    path = folder / WEIGHTS
    if not path.is_file():
        raise GrowopsError(f"{folder} has no {WEIGHTS}: save with a.save_pretrained(folder)")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    state = load_file(str(path))
    for alias, name in json.loads(metadata.get("aliases", "{}")).items():
        state[alias] = state[name]
    return state


def _is_hf(model: nn.Module) -> bool:
    return hasattr(model, "save_pretrained") and hasattr(type(model), "from_pretrained") and \
        hasattr(model, "config")
