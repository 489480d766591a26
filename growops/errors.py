"""The one exception family growops raises for bad input.

Every message names the value that was wrong and how to fix it, in the spirit of einops.
"""


class GrowopsError(ValueError):
    """Bad input to growops: the message says what was expected, what came, and the fix."""


class GrowopsTypeError(GrowopsError, TypeError):
    """An argument of the wrong type (still a GrowopsError, so one `except` catches everything)."""
