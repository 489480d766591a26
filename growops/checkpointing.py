"""Activation wrappers around blocks: torch's ``CheckpointWrapper`` / ``OffloadWrapper``, which
``apply_activation_checkpointing`` (the FSDP recipe) puts in place of a module, after growops wrapped the model too.

Such a wrapper holds the module it replaces (``_checkpoint_wrapped_module``) and computes what that module computes,
recomputed in the backward or with its activations offloaded; its state-dict hooks strip its own key prefix, so the
keys stay the module's. growops keeps running the module inside (its unit, weights and per-layer values) and hands the
wrapper out for a position, so the checkpointing applies.
"""

from __future__ import annotations

import sys

from torch import nn

_WRAPPERS = "torch.distributed.algorithms._checkpoint.checkpoint_wrapper"
HELD = "_checkpoint_wrapped_module"


def held(module: nn.Module) -> nn.Module | None:
    """The module `module` runs when it is an activation wrapper, else None."""
    wrappers = sys.modules.get(_WRAPPERS)  # not imported: no such wrapper exists (and torch.distributed may be absent)
    if wrappers is not None and isinstance(module, wrappers.ActivationWrapper):
        return module._modules.get(HELD)
    return None


def layers(module: nn.Module) -> list[nn.Module]:
    """`module`, then the module each activation wrapper in it holds, outermost first."""
    out = [module]
    while (inner := held(out[-1])) is not None:
        out.append(inner)
    return out


def core(module: nn.Module) -> nn.Module:
    """The module inside every activation wrapper around `module` (`module` itself if none)."""
    return layers(module)[-1]
