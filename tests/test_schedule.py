import math

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
    assert lvps_depth(3, 12, _Draws(1e-6)) == 12  # y = begin = r + 0.4, clipped to r
    assert lvps_depth(3, 12, _Draws(1.0)) == 3  # y = end = 0.6, clipped to 1
    assert lvps_depth(12, 12, _Draws(0.5)) == 12  # nothing to sample at the last stage
    assert lvps_depth(11, 15, _Draws(1e-6)) == 15  # 15 / 11 * 11 rounds below 15: still the full depth
    # Just inside the clips the curve decides: y * N = L - 0.5 gives L - 1, y * N = N + 1 -/+ 0.005 gives N / N + 1.
    assert lvps_depth(3, 12, _Draws(_x_at(3, 12, 11.5 / 3))) == 11
    assert lvps_depth(3, 12, _Draws(_x_at(3, 12, 3.995 / 3))) == 3
    assert lvps_depth(3, 12, _Draws(_x_at(3, 12, 4.005 / 3))) == 4


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


class _Draws:
    """A stand-in generator: ``uniform(a, b)`` checks that LVPS asks for U(1e-6, 1) and returns the chosen xs."""

    def __init__(self, *xs):
        self.xs = list(xs)

    def uniform(self, lo, hi):
        assert (lo, hi) == (1e-6, 1.0)
        return self.xs.pop(0)


def _published(unique, layers, x):
    """The authors' formula, written out independently: y = m / (x + n) clipped to [1, r], depth = floor(y * N)."""
    r = layers / unique
    begin, end, x_min = r + 0.4, 0.6, 1e-6
    n = (begin * x_min - end) / (end - begin)
    m = end * (n + 1)
    return m / (x + n), r, m, n


def _x_at(unique, layers, y):
    """The x at which the published curve reaches y."""
    _, _, m, n = _published(unique, layers, 0.5)
    return m / y - n


@pytest.mark.parametrize("unique, layers", [(1, 12), (3, 12), (2, 7), (4, 6), (5, 12), (6, 16), (11, 15), (7, 48)])
def test_lvps_depth_is_the_published_formula_between_the_clips(unique, layers):
    xs = [float(x) for x in np.concatenate([np.geomspace(1e-6, 1.0, 150), np.linspace(0.001, 0.999, 150)])]
    xs += [_x_at(unique, layers, (k + f) / unique) for k in range(unique, layers) for f in (0.1, 0.5, 0.9)]
    interior = set()
    for x in xs:
        y, r, _, _ = _published(unique, layers, x)
        expected = math.floor(min(max(y, 1.0), r) * unique)
        if 1 < y < r and abs(y * unique - round(y * unique)) > 1e-6:  # away from rounding at a depth's edge
            interior.add(expected)
            assert lvps_depth(unique, layers, _Draws(x)) == expected, x
    assert interior == set(range(unique, layers))  # every depth below L is reached strictly between the clips


@pytest.mark.parametrize("unique, layers", [(3, 12), (2, 7), (5, 12), (11, 15)])
def test_lvps_floors_a_value_just_below_a_depth(unique, layers):
    """The 1e-9 only absorbs the rounding of L / N * N: y * N a little below k still gives depth k - 1."""
    for k in range(unique + 1, layers):
        assert lvps_depth(unique, layers, _Draws(_x_at(unique, layers, (k - 1e-6) / unique))) == k - 1
        assert lvps_depth(unique, layers, _Draws(_x_at(unique, layers, (k + 1e-6) / unique))) == k


def test_lvps_probabilities_are_the_published_ones():
    """N=3, L=12: depth 3 whenever y < 4/3, i.e. x > x(4/3): P ~ 0.64; E[depth] ~ 4.2 (the docstring's figures)."""
    p3 = (1.0 - _x_at(3, 12, 4 / 3)) / (1.0 - 1e-6)
    xs = np.linspace(1e-6, 1.0, 400001)  # E[depth] by quadrature of the published formula
    mean = np.floor(np.clip(_published(3, 12, xs)[0], 1, 4) * 3 + 1e-9).mean()
    assert abs(p3 - 0.64) < 0.005 and abs(mean - 4.2) < 0.05
    rng = np.random.default_rng(7)
    depths = np.array([lvps_depth(3, 12, rng) for _ in range(200_000)])
    assert abs((depths == 3).mean() - p3) < 4 * math.sqrt(p3 * (1 - p3) / len(depths))  # ~0.0043
    assert abs(depths.mean() - mean) < 4 * depths.std() / math.sqrt(len(depths))  # ~0.009
