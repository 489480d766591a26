import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from growops import GrowopsError, GrowopsTypeError
from growops.schedule import SAMPLERS, Schedule, lvps_depth, resolve_sampler, step_rng, uniform_depth


@st.composite
def unique_layers(draw):
    unique = draw(st.integers(1, 16))
    return unique, draw(st.integers(unique, 48))


@given(unique_layers(), st.integers(0, 2**31), st.integers(0, 10**6), st.sampled_from(sorted(SAMPLERS)))
def test_depth_in_range_and_deterministic_per_seed_and_step(ul, seed, step, name):
    unique, layers = ul
    sampler = SAMPLERS[name]
    depth = sampler(unique, layers, step_rng(seed, step))
    assert unique <= depth <= layers
    assert depth == sampler(unique, layers, step_rng(seed, step))


def test_lvps_matches_the_published_figures():
    """N=3, L=12: P(depth=3) ~ 0.64 and E[depth] ~ 4.2 (the authors' sampler)."""
    depths = np.array([lvps_depth(3, 12, step_rng(0, t)) for t in range(20000)])
    assert abs((depths == 3).mean() - 0.637) < 0.015
    assert abs(depths.mean() - 4.2) < 0.1
    assert depths.max() == 12 and depths.min() == 3


def test_lvps_formula_at_its_ends():
    class Fixed:
        def __init__(self, x):
            self.x = x

        def uniform(self, lo, hi):
            return self.x

    assert lvps_depth(3, 12, Fixed(1e-6)) == 12  # y = begin = r + 0.4, clipped to r
    assert lvps_depth(3, 12, Fixed(1.0)) == 3  # y = end = 0.6, clipped to 1
    assert lvps_depth(12, 12, Fixed(0.5)) == 12  # nothing to sample at the last stage


def test_uniform_covers_every_depth():
    seen = {uniform_depth(2, 6, step_rng(1, t)) for t in range(400)}
    assert seen == set(range(2, 7))


def test_seeds_differ():
    a = [lvps_depth(1, 12, step_rng(0, t)) for t in range(50)]
    b = [lvps_depth(1, 12, step_rng(1, t)) for t in range(50)]
    assert a != b


def test_schedule_stage_at():
    s = Schedule.checked((1, 3, 6, 12), (10, 20, 40), 12)
    assert [s.stage_at(t) for t in (0, 9, 10, 19, 20, 39, 40, 10**6)] == [0, 0, 1, 1, 2, 2, 3, 3]


@pytest.mark.parametrize("stages, steps, match", [
    ((), (), "stages is empty"),
    ((0, 12), (5,), "start at 1"),
    ((3, 3, 12), (1, 2), "strictly increase"),
    ((6, 3, 12), (1, 2), "strictly increase"),
    ((1, 3, 6), (1, 2), "last stage must hold all L=12"),
    ((1, 3, 12), (5,), "one step per stage after the first"),
    ((1, 3, 12), (5, 6, 7), "one step per stage after the first"),
    ((1, 3, 12), (0, 5), "positive"),
    ((1, 3, 12), (6, 5), "stage_steps must strictly increase"),
])
def test_bad_schedules_raise(stages, steps, match):
    with pytest.raises(GrowopsError, match=match):
        Schedule.checked(stages, steps, 12)


def test_bad_types_raise():
    with pytest.raises(GrowopsTypeError, match="stages must hold ints"):
        Schedule.checked((1.5, 12), (3,), 12)
    with pytest.raises(GrowopsTypeError, match="sequence of ints"):
        Schedule.checked(12, (), 12)


def test_resolve_sampler():
    assert resolve_sampler("lvps")[1] is lvps_depth
    with pytest.raises(GrowopsError, match="unknown sampler 'lvsp'.*'lvps'"):
        resolve_sampler("lvsp")
    with pytest.raises(GrowopsTypeError, match="name or a callable"):
        resolve_sampler(3)
    name, fn = resolve_sampler(lambda u, n, rng: n)
    assert fn(1, 5, None) == 5 and "lambda" in name
