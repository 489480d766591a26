"""examples/flops.py: FlopCounterMode per (unique, depth) configuration, attention included on CPU."""

import pytest
import torch

import growops
from examples.flops import StepFlops
from examples.gpt import GPT, GPTConfig


@pytest.mark.parametrize("routed", [False, True])
def test_one_more_position_costs_exactly_one_blocks_matmuls_including_attention(routed):
    """Also with the blocks' linears routed through growops' custom ops, which register their FLOP formulas."""
    B, T, C = 2, 16, 32
    a = growops.apollo(GPT(GPTConfig(n_layer=4, n_embd=32, n_head=2, block_size=T)), stages=(1, 4),
                       stage_steps=(5,), shared_linear=routed)
    batch = {"input_ids": torch.randint(0, 50, (B, T)), "labels": torch.randint(0, 50, (B, T))}
    before = (a.unique_layers, a.depth, a.step_count)
    flops = StepFlops(a, batch)
    # Per block, forward: 2*B*T*12*C^2 for the four projections, 4*B*T^2*C for QK^T and AV; backward twice that.
    per_block = 3 * (2 * B * T * 12 * C * C + 4 * B * T * T * C)
    assert flops(1, 2) - flops(1, 1) == per_block
    assert flops(2, 4) - flops(1, 1) == 3 * per_block  # which block a position runs does not change its cost
    assert (a.unique_layers, a.depth, a.step_count) == before  # measuring ran on a copy
