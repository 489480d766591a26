"""examples/report.py: savings to scratch's final loss, or the loss gap at equal FLOPs, never only "not reached"."""

import pytest

from examples import report

# (step, flops, seconds, val loss)
SCRATCH = [(0, 0.0, 0.0, 4.0), (10, 10.0, 10.0, 3.0), (20, 20.0, 20.0, 2.0)]
FAST = [(0, 0.0, 0.0, 4.0), (10, 5.0, 6.0, 2.5), (20, 10.0, 12.0, 1.5)]  # reaches 2.0 at 7.5 FLOPs
SLOW = [(0, 0.0, 0.0, 4.0), (10, 4.0, 5.0, 3.5), (20, 8.0, 10.0, 2.5)]  # ends at 2.5, scratch got there at 15


def test_loss_at_interpolates_between_evaluations():
    assert report.loss_at(SCRATCH, 5.0) == pytest.approx(3.5)
    assert report.loss_at(SCRATCH, 20.0) == pytest.approx(2.0)
    assert report.loss_at(SCRATCH, 99.0) == pytest.approx(2.0)


def test_summary_and_verdicts():
    target, rows = report.summary({"scratch": SCRATCH, "fast": FAST, "slow": SLOW})
    by = {r["arm"]: r for r in rows}
    assert target == 2.0
    assert by["fast"]["reached"] and by["fast"]["flops_saving"] == pytest.approx(62.5)
    assert by["fast"]["time_saving"] == pytest.approx(55.0)
    assert not by["slow"]["reached"]
    assert by["slow"]["flops_share"] == pytest.approx(40.0)
    assert by["slow"]["scratch_at_equal_flops"] == pytest.approx(3.2)
    assert by["slow"]["scratch_share_to_same_loss"] == pytest.approx(75.0)
    assert report.verdict(target, by["fast"]) == \
        "fast: 62.5% fewer FLOPs, 55.0% less wall-clock than scratch to val loss 2.0000"
    assert report.verdict(target, by["slow"]) == \
        "slow: val loss 2.5000 at 40% of scratch's FLOPs; scratch reaches that loss at 75%"
    assert report.headline(target, rows).startswith("fast:")
    _, rows = report.summary({"scratch": SCRATCH, "slow": SLOW})
    assert report.headline(target, rows).startswith("slow: val loss 2.5000")
    table = report.markdown_table(target, rows)
    assert "75% of its FLOPs" in table and "not reached" in table
