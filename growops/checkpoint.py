"""Save and load an apollo model as safetensors: the weights as tensors, the schedule position as metadata.

safetensors stores tensors only and refuses tensors that share memory (a Hugging Face LM head tied to its token
embedding): the schedule goes into the file's metadata as JSON, and each tied name is stored once and recorded as
an alias of the other.
"""

from __future__ import annotations

import json
from pathlib import Path

from .apollo import Apollo
from .errors import GrowopsError

EXTRA = "_extra_state"


def save_safetensors(a: Apollo, path: str | Path) -> None:
    """Write `a`'s weights and schedule position to `path` (a ``.safetensors`` file)."""
    from safetensors.torch import save_file

    state = a.state_dict()
    schedule = state.pop(EXTRA)
    tensors, aliases, first = {}, {}, {}
    for name, tensor in state.items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape),
                 tuple(tensor.stride()), tensor.dtype)
        if where in first:
            aliases[name] = first[where]
            continue
        first[where] = name
        tensors[name] = tensor.contiguous()
    save_file(tensors, str(path), metadata={"growops": json.dumps(schedule), "aliases": json.dumps(aliases)})


def load_safetensors(a: Apollo, path: str | Path) -> None:
    """Load weights and schedule position written by ``save_safetensors``; checked like ``a.load_state_dict``."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
    if "growops" not in metadata:
        raise GrowopsError(f"{path} has no growops schedule in its metadata: it was not written by "
                           "growops.save_safetensors; load plain weights with a.model.load_state_dict(...)")
    state: dict = load_file(str(path))
    for alias, name in json.loads(metadata.get("aliases", "{}")).items():
        state[alias] = state[name]
    state[EXTRA] = json.loads(metadata["growops"])
    a.load_state_dict(state)


