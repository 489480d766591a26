"""Save and load an apollo model as safetensors: the weights as tensors, the schedule position as metadata.

safetensors stores tensors only and refuses tensors that share memory (a Hugging Face LM head tied to its token
embedding): the schedule goes into the file's metadata as JSON, and each tied name is stored once and recorded as
an alias of the other.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path

import torch

from .apollo import Apollo
from .errors import GrowopsError, GrowopsTypeError
from .state import EXTRA


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
    schedule = state.pop(EXTRA)
    # Identical views of one storage are saved once and restored as aliases; other tensors that share memory (a
    # slice or a dtype view of another) are saved as copies, since safetensors refuses overlapping tensors.
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
    save_file(tensors, str(path), metadata={"growops": json.dumps(schedule), "aliases": json.dumps(aliases)})


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


