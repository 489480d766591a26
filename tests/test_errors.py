import os
import sys
import warnings

import pytest
import torch

import growops
from growops.errors import warn
from tests.models import tiny_gpt


def _caught(call) -> warnings.WarningMessage:
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        call()
    assert len(record) == 1, [str(w.message) for w in record]
    return record[0]


def test_a_warning_is_blamed_on_the_innermost_caller_outside_growops_and_torch():
    line = _caught(lambda: warn("growops: direct")).lineno  # called from this file: this line
    assert line == sys._getframe().f_lineno - 1
    inside_torch = compile("warn('growops: via torch')", os.path.join(os.path.dirname(torch.__file__), "x.py"), "exec")
    caught = _caught(lambda: exec(inside_torch, {"warn": warn}))  # a frame in torch/ is passed over too
    assert caught.filename == __file__ and str(caught.message) == "growops: via torch"


def test_growops_warnings_point_at_the_users_call():
    """Warnings raised deep inside apollo() (stages that do not preserve the function) point at the user's line."""
    caught = _caught(lambda: growops.apollo(tiny_gpt(4), stages=(3, 4), stage_steps=(1,)))
    assert caught.filename == __file__ and "grow by a non-multiple (3 -> 4)" in str(caught.message)
    with pytest.warns(UserWarning, match="non-multiple") as record:
        growops.apollo(tiny_gpt(4), stages=(3, 4), stage_steps=(1,))
    assert record[0].lineno == test_growops_warnings_point_at_the_users_call.__code__.co_firstlineno + 5
