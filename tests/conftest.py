"""Shared test settings: a hypothesis profile fit for torch (no deadline, bounded examples)."""

import os

import torch
from hypothesis import HealthCheck, settings

settings.register_profile("growops", deadline=None, max_examples=25, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("thorough", deadline=None, max_examples=300)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "growops"))

# Tests never download: the Hugging Face models are built from configs.
os.environ.setdefault("HF_HUB_OFFLINE", "1")

torch.set_num_threads(min(2, torch.get_num_threads()))
