"""The one exception family growops raises for bad input, and its warnings.

Every message names the value that was wrong and how to fix it, in the spirit of einops. A warning points at the
user's line that led to it (the innermost caller outside growops and torch: a forward or a backward reached through
torch is blamed on the user's call), however deep inside growops it is raised.
"""

import os
import sys
import warnings

import torch

_SKIPPED = tuple(os.path.dirname(os.path.abspath(m.__file__)) + os.sep for m in (sys.modules[__package__], torch))


class GrowopsError(ValueError):
    """Bad input to growops: the message says what was expected, what came, and the fix."""


class GrowopsTypeError(GrowopsError, TypeError):
    """An argument of the wrong type (still a GrowopsError, so one `except` catches everything)."""


def check_choice(what: str, value, choices: tuple[str, ...]) -> str:
    """`value` if it is one of the strings `choices`; a GrowopsTypeError for a non-string, a GrowopsError otherwise."""
    if not isinstance(value, str):
        raise GrowopsTypeError(f"{what} must be one of {', '.join(map(repr, choices))}, got a {type(value).__name__}")
    if value not in choices:
        raise GrowopsError(f"unknown {what} {value!r}: use one of {', '.join(map(repr, choices))}")
    return value


def check_int(what: str, value, minimum: int = 0) -> int:
    """`value` as an int if it is an integer (Python or NumPy, not bool) >= `minimum`."""
    import numbers

    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise GrowopsTypeError(f"{what} must be an int >= {minimum}, got {value!r} ({type(value).__name__})")
    if value < minimum:
        raise GrowopsError(f"{what} must be an int >= {minimum}, got {value!r}")
    return int(value)


def warn(message: str) -> None:
    """``warnings.warn(message)`` attributed to the innermost caller outside the growops and torch packages."""
    frame, level = sys._getframe(1), 1
    while frame is not None and os.path.abspath(frame.f_code.co_filename).startswith(_SKIPPED):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, stacklevel=level + 1)
