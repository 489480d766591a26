"""Shared test settings: a hypothesis profile fit for torch (no deadline, bounded examples)."""

import os
import sys

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("growops", deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "growops"))

# Tests never download: the Hugging Face models are built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))

# Under mutmut (benchmarks/mutation.py) every call into growops passes through mutmut's trampoline: growops' warnings
# pass over its frames too, as over growops' and torch's own, so the tests of where a warning points hold there.
if "mutmut" in sys.modules:
    import mutmut

    import growops.errors

    growops.errors._SKIPPED += (os.path.dirname(os.path.abspath(mutmut.__file__)) + os.sep,)
