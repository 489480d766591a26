"""Where growops' runtime leaves ``torch.compile``'s graphs, applied when first needed rather than at import.

The schedule's bookkeeping (which block runs at a position, the depth of this step) must run eagerly under
``torch.compile``: inside a graph it would be specialised to one depth. Methods that do it are marked
``@eager``; ``compile_boundaries(cls)`` wraps the marked methods of `cls` and its bases in
``torch.compiler.disable`` when the first instance is built. Doing it at class definition would import
``torch._dynamo`` with growops (about a second, doubling ``import growops``); nothing can be compiling growops'
code before an instance exists.

Invariant: once ``compile_boundaries(cls)`` ran, every marked method of `cls` is disabled exactly once, with
``COMPILE_ADVICE`` as the reason dynamo shows when ``fullgraph=True`` meets it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import torch

F = TypeVar("F", bound=Callable)

# The reason dynamo prints where fullgraph=True meets growops, in place of "remove the torch.compiler.disable call".
COMPILE_ADVICE = ("growops runs the stack's positions outside the graph: compile without fullgraph=True, or compile "
                  "the blocks (regional compilation, see the torch.compile guide); to export, export a.export()")

_MARK = "_growops_eager"
_DONE = "_growops_eager_applied"


def eager(fn: F) -> F:
    """Mark a method to run outside torch.compile's graphs (applied by ``compile_boundaries``)."""
    setattr(fn, _MARK, True)
    return fn


def compile_boundaries(cls: type) -> None:
    """Wrap the ``@eager`` methods of `cls` and its bases in ``torch.compiler.disable``, once per class."""
    for klass in cls.__mro__:
        if klass.__dict__.get(_DONE) or not klass.__module__.startswith("growops"):
            continue
        for name, value in list(vars(klass).items()):
            if getattr(value, _MARK, False) and not getattr(value, "_torchdynamo_disable", False):
                setattr(klass, name, torch.compiler.disable(value, reason=COMPILE_ADVICE))
        setattr(klass, _DONE, True)
