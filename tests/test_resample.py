"""resample="micro_batch": the k-th training forward of optimizer step t runs the depth drawn from (seed, t, k)."""

import numpy as np
import pytest
import torch

import growops
from growops.schedule import uniform_depth
from tests.models import IndexLoopNet, gpt_batch, tiny_gpt

L = 12
MODELS = {
    "container": (lambda: tiny_gpt(L), lambda a: a.model.blocks, lambda k: gpt_batch(seed=k)),
    "graph": (lambda: IndexLoopNet(L), lambda a: a.model.layers, lambda k: {"x": torch.randn(2, 4)}),
}


def _expected(seed: int, step: int, k: int) -> int:
    """The depth growops documents: the sampler on numpy's generator seeded [seed, step], or [seed, step, k] for
    k > 0."""
    return uniform_depth(1, L, np.random.default_rng([seed, step] if k == 0 else [seed, step, k]))


def _wrap(kind: str, seed: int):
    build, blocks, batch = MODELS[kind]
    a = growops.apollo(build(), stages=(1, L), stage_steps=(1000,), sampler="uniform", seed=seed,
                       resample="micro_batch")
    calls = []
    for block in blocks(a):  # after wrapping: one call per position run
        block.register_forward_hook(lambda *_: calls.append(1))

    def run(k):  # one training forward; the depth it ran
        calls.clear()
        a(**batch(k))
        return len(calls)

    return a, run


def _run_steps(kind: str, seed: int, steps: int, micro: int) -> list[list[int]]:
    a, run = _wrap(kind, seed)
    depths = []
    for _ in range(steps):
        depths.append([run(k) for k in range(micro)])
        a.step()
    return depths


@pytest.mark.parametrize("kind, steps, micro", [("container", 4, 3), ("graph", 6, 4)])
def test_the_kth_forward_of_step_t_runs_the_depth_of_seed_t_k(kind, steps, micro):
    depths = _run_steps(kind, 3, steps, micro)
    assert depths == [[_expected(3, t, k) for k in range(micro)] for t in range(steps)]
    # What that rules out: the step left out of the generator (every step's micro-batches alike) and a count of
    # micro-batches that does not restart at each step (step t's forwards drawing k = micro * t, ...).
    assert len({tuple(row[1:]) for row in depths}) == steps
    assert depths[1:] != [[_expected(3, t, micro * t + k) for k in range(micro)] for t in range(1, steps)]


def test_another_seed_draws_other_depths():
    depths = {seed: _run_steps("graph", seed, 6, 4) for seed in (0, 1)}
    for seed, rows in depths.items():
        assert rows == [[_expected(seed, t, k) for k in range(4)] for t in range(6)]
    assert sum(a != b for x, y in zip(depths[0], depths[1]) for a, b in zip(x, y)) > 12  # most of 24 differ


def test_restoring_a_step_restarts_its_micro_batches():
    a, run = _wrap("graph", seed=3)
    for _ in range(3):
        run(0)  # some micro-batches of step 0; then step 4 by restore_step, step 2 by load_state_dict
    a.restore_step(4)
    assert [run(k) for k in range(3)] == [_expected(3, 4, k) for k in range(3)]
    source, _ = _wrap("graph", seed=3)
    for _ in range(2):
        source.step()
    a.load_state_dict(source.state_dict())
    assert [run(k) for k in range(3)] == [_expected(3, 2, k) for k in range(3)]
    a.eval()
    with torch.no_grad():
        assert run(0) == L  # evaluation runs every position and draws nothing
    a.train()
    assert run(3) == _expected(3, 2, 3)
