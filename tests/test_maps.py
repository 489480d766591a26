import doctest

import pytest
from hypothesis import given
from hypothesis import strategies as st

import growops.maps
from growops import GrowopsError
from growops.maps import depth_map, growth_sources, preserves_function


@st.composite
def unique_depth(draw, max_unique=12, max_factor=4):
    unique = draw(st.integers(1, max_unique))
    depth = draw(st.integers(unique, unique * max_factor))
    return unique, depth


def test_doctests():
    assert doctest.testmod(growops.maps).failed == 0


def test_examples_from_the_design():
    assert depth_map(3, 8) == (0, 0, 0, 1, 1, 1, 2, 2)
    assert depth_map(3, 4, "stack") == (0, 1, 2, 2)
    assert growth_sources(1, 3) == (0, 0, 0)


@given(unique_depth(), st.sampled_from(["interpolate", "stack"]))
def test_map_length_range_and_every_block_used(ud, growth):
    unique, depth = ud
    m = depth_map(unique, depth, growth)
    assert len(m) == depth
    assert set(m) == set(range(unique))


@given(unique_depth())
def test_interpolation_is_monotone_and_balanced(ud):
    unique, depth = ud
    m = depth_map(unique, depth)
    assert all(a <= b for a, b in zip(m, m[1:]))
    counts = [m.count(b) for b in range(unique)]
    assert max(counts) - min(counts) <= 1


@given(unique_depth())
def test_stack_is_cyclic_and_ends_on_the_top_block(ud):
    unique, depth = ud
    m = depth_map(unique, depth, "stack")
    cycles = depth // unique
    assert m[: cycles * unique] == tuple(range(unique)) * cycles
    assert m[-1] == unique - 1
    rest = m[cycles * unique:]
    assert rest == tuple(range(unique - len(rest), unique))


@given(st.integers(1, 8), st.integers(1, 4), st.data())
def test_interpolation_composition_law(n, c, data):
    """Expanding N to cN then mapping to depth d equals mapping N to d."""
    d = data.draw(st.integers(c * n, 4 * c * n))
    src = growth_sources(n, c * n)
    assert tuple(src[j] for j in depth_map(c * n, d)) == depth_map(n, d)
    assert preserves_function(n, c * n)


@given(st.integers(1, 6), st.integers(1, 4), st.integers(1, 4))
def test_stack_composes_at_depths_that_are_multiples(n, c, k):
    d = k * c * n
    src = growth_sources(n, c * n, "stack")
    assert tuple(src[j] for j in depth_map(c * n, d, "stack")) == depth_map(n, d, "stack")


def test_non_multiple_does_not_preserve():
    assert not preserves_function(3, 5)
    # and it really does not compose: some depth maps to different blocks
    src = growth_sources(3, 5)
    assert any(tuple(src[j] for j in depth_map(5, d)) != depth_map(3, d) for d in range(5, 13))


@pytest.mark.parametrize("args", [(0, 3), (4, 3), (-1, 2)])
def test_bad_maps_raise(args):
    with pytest.raises(GrowopsError, match="unique <= depth"):
        depth_map(*args)


def test_unknown_growth_and_shrinking_raise():
    with pytest.raises(GrowopsError, match="unknown growth 'grow'.*'interpolate'"):
        depth_map(2, 4, "grow")
    with pytest.raises(GrowopsError, match="shrink"):
        growth_sources(6, 3)
