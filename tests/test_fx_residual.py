"""growops.fx.residual.branch_zeros: the parameters whose zeroing makes a block the identity, found in the graph;
the blocks it cannot switch off are refused with the node."""

import pytest
import torch
from torch import nn

import growops
from growops.fx.residual import branch_zeros, zero_branches
from growops.fx.trace import trace_model
from growops.plan import find_stacks


def _names(model, example_inputs=None, index=0):
    s = find_stacks(model, example_inputs=example_inputs)[0]
    traced = trace_model(model, set(), example_inputs)
    root = model if traced.kind == "export" else traced.graph_module
    return s, sorted(branch_zeros(traced.graph_module, s, index, root))


def _identity_after_zeroing(model, x, names, path="layers"):
    block = model.get_submodule(path)[0]
    zero_branches(block, names)
    with torch.no_grad():
        return torch.equal(block(x), x)


class LayerScaleBlock(nn.Module):
    """Branch ends in a multiplication by a parameter (CaiT / ConvNeXt layer scale)."""

    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.gamma = nn.Parameter(torch.full((width,), 0.5))

    def forward(self, x):
        return x + torch.relu(self.fc(x)) * self.gamma


class MatmulBiasBlock(nn.Module):
    """Branch ends in a matmul on a weight plus a separate bias, then a view and dropout."""

    def __init__(self, width=8):
        super().__init__()
        self.w = nn.Parameter(torch.randn(width, width))
        self.b = nn.Parameter(torch.randn(width))
        self.norm = nn.LayerNorm(width)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        h = self.norm(x).flatten(0, 1) @ self.w + self.b
        return x + self.drop(h.view_as(x))


class ExpBlock(nn.Module):
    """Branch ends in exp: exp(0) = 1, so no zeroing switches it off."""

    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.exp(self.fc(x))


class PostNormBlock(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)

    def forward(self, x):
        return self.norm(x + self.fc(x))


class Net(nn.Module):
    def __init__(self, block, n=3):
        super().__init__()
        torch.manual_seed(0)
        self.layers = nn.ModuleList([block() for _ in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("block, expected", [
    (LayerScaleBlock, ["gamma"]),
    (MatmulBiasBlock, ["b", "w"]),
])
def test_branch_ends_are_found_and_zeroing_them_gives_the_identity(block, expected):
    model = Net(block).eval()
    _, names = _names(model)
    assert names == expected
    assert _identity_after_zeroing(model, torch.randn(2, 5, 8), names)


def test_the_example_gpt_zeroes_both_output_projections():
    from tests.models import tiny_gpt

    model = tiny_gpt(3)
    _, names = _names(model, index=1)
    assert names == ["attn.c_proj.bias", "attn.c_proj.weight", "mlp.c_proj.bias", "mlp.c_proj.weight"]


def test_a_residual_written_in_the_loop_makes_the_block_the_branch():
    class Loop(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = x + layer(x)
            return x

    assert _names(Loop())[1] == ["bias", "weight"]


@pytest.mark.parametrize("block, match", [
    (ExpBlock, "does not end in a layer growops can zero: walking back from it reached `exp`"),
    (PostNormBlock, "not a residual block: its output `layers_0_norm`"),
])
def test_blocks_that_cannot_be_switched_off_are_refused_with_the_node(block, match):
    with pytest.raises(growops.GrowopsError, match=match):
        _names(Net(block))


def test_a_block_the_tracer_keeps_whole_is_refused():
    model = Net(lambda: nn.Sequential(nn.Linear(4, 4), nn.ReLU()))
    with pytest.raises(growops.GrowopsError, match="not a residual block"):
        _names(model)


transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def test_llama_in_an_export_graph():
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, intermediate_size=32, vocab_size=50,
        bos_token_id=0, eos_token_id=0)).eval()
    s, names = _names(model, index=1)
    assert names == ["mlp.down_proj.weight", "self_attn.o_proj.weight"]


class ReciprocalBlock(nn.Module):
    """1 / fc(x): zeroing fc gives infinities, not zero."""

    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + 1.0 / self.fc(x)


class ParallelBlock(nn.Module):
    """GPT-J style: x + attn(ln(x)) + mlp(ln(x)), the two branches summed before the residual add."""

    def __init__(self, width=8):
        super().__init__()
        self.ln = nn.LayerNorm(width)
        self.attn = nn.Linear(width, width)
        self.mlp = nn.Linear(width, width)

    def forward(self, x):
        h = self.ln(x)
        return (self.attn(h) + torch.relu(self.mlp(h))) + x


def test_a_reciprocal_is_not_followed():
    with pytest.raises(growops.GrowopsError, match="reached `truediv`"):
        _names(Net(ReciprocalBlock))


def test_summed_branches_vanish_each():
    model = Net(ParallelBlock).eval()
    names = _names(model)[1]
    assert names == ["attn.bias", "attn.weight", "mlp.bias", "mlp.weight"]
    assert _identity_after_zeroing(model, torch.randn(2, 5, 8), names)
