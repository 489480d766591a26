import math

import pytest
import torch
from torch import nn

from examples.gpt import GPT, Block, GPTConfig, GPTOutput


@pytest.fixture
def small() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, n_layer=4, n_head=4, n_embd=32)).eval()


def run_by_hand(model: GPT, input_ids: torch.Tensor, blocks: list[nn.Module]) -> torch.Tensor:
    """The GPT forward with an explicit list of blocks, to check what GPT.forward runs."""
    pos = torch.arange(input_ids.size(1))
    x = model.wte(input_ids) + model.wpe(pos)
    for block in blocks:
        x = block(x)
    return model.lm_head(model.ln_f(x))


def test_default_config():
    c = GPTConfig()
    fields = (c.vocab_size, c.block_size, c.n_layer, c.n_head, c.n_embd, c.dropout, c.bias)
    assert fields == (256, 128, 12, 4, 64, 0.0, True)


def test_shapes_and_no_loss_without_labels(small: GPT):
    out = small(torch.randint(0, 256, (3, 16)))
    assert isinstance(out, GPTOutput)
    assert out.logits.shape == (3, 16, 256)
    assert out.loss is None


def test_block_maps_btc_to_btc():
    block = Block(GPTConfig(n_embd=32))
    x = torch.randn(2, 5, 32)
    assert block(x).shape == (2, 5, 32)


def test_loss_at_init_is_close_to_uniform():
    torch.manual_seed(0)
    model = GPT(GPTConfig())  # the default 12-layer config
    x = torch.randint(0, 256, (4, 128))
    y = torch.randint(0, 256, (4, 128))
    loss = model(x, labels=y).loss
    assert torch.isfinite(loss)
    assert abs(loss.item() - math.log(256)) < 0.1


def test_loss_is_cross_entropy_of_unshifted_labels_and_ignores_minus_100(small: GPT):
    x = torch.randint(0, 256, (2, 8))
    y = torch.full((2, 8), -100)
    y[1, 3] = 42  # the only counted target: token 42 at position 3 of row 1
    out = small(x, labels=y)
    expected = -torch.log_softmax(out.logits[1, 3], dim=-1)[42]
    torch.testing.assert_close(out.loss, expected)


def test_weights_are_tied(small: GPT):
    assert small.lm_head.weight is small.wte.weight
    n = small.num_params()
    with_duplicates = sum(p.numel() for _, p in small.named_parameters(remove_duplicate=False))
    assert n == with_duplicates - small.wte.weight.numel()  # the shared matrix is counted once
    assert small.num_params(non_embedding=True) == n - small.wpe.weight.numel()


def test_residual_projections_get_scaled_init():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=8, n_embd=128))
    target = 0.02 / math.sqrt(2 * 8)
    for block in model.blocks:
        for w in (block.attn.c_proj.weight, block.mlp.c_proj.weight):
            assert abs(w.std().item() - target) < 0.15 * target
    assert abs(model.blocks[0].mlp.c_fc.weight.std().item() - 0.02) < 0.002


def test_causal(small: GPT):
    x = torch.randint(0, 256, (1, 16))
    x2 = x.clone()
    x2[0, 10] = (x[0, 10] + 1) % 256
    a, b = small(x).logits, small(x2).logits
    torch.testing.assert_close(a[:, :10], b[:, :10])
    assert not torch.allclose(a[:, 10:], b[:, 10:])


def test_forward_iterates_the_blocks_container(small: GPT):
    x = torch.randint(0, 256, (2, 8))
    blocks = list(small.blocks)
    torch.testing.assert_close(small(x).logits, run_by_hand(small, x, blocks))

    small.blocks = nn.ModuleList(blocks[:2])  # a shallower model: only the depth changes
    torch.testing.assert_close(small(x).logits, run_by_hand(small, x, blocks[:2]))

    class Reordered(nn.ModuleList):
        """Iteration yields a sequence different from indexing and len(): blocks 1, 1, 0."""

        def __iter__(self):
            return iter([self[1], self[1], self[0]])

    small.blocks = Reordered(blocks[:2])
    torch.testing.assert_close(small(x).logits, run_by_hand(small, x, [blocks[1], blocks[1], blocks[0]]))


def test_dummy_inputs_run(small: GPT):
    inputs = small.dummy_inputs
    assert inputs["input_ids"].shape == (2, 8)
    assert inputs["input_ids"].dtype == torch.long
    assert inputs["input_ids"].device == small.wte.weight.device
    assert small(**inputs).logits.shape == (2, 8, 256)


def test_gradients_reach_every_parameter(small: GPT):
    small.train()
    x = torch.randint(0, 256, (2, 16))
    small(x, labels=x.roll(-1, dims=1)).loss.backward()
    for name, p in small.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_fx_symbolic_trace_matches_eager(small: GPT):
    traced = torch.fx.symbolic_trace(small, concrete_args={"labels": None})
    x = small.dummy_inputs["input_ids"]
    torch.testing.assert_close(traced(x).logits, small(x).logits)
