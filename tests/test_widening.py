"""growops.widen: the same class at a larger width, the same function when widths grow by whole multiples (checked
on a probe and refused otherwise), copies and splits as the width plan says, optimizer state carried over."""

import dataclasses

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import growops
from growops.fx.width import DimGrowth
from growops.widening import grow_width
from tests.models import IndexLoopNet, SequentialNet, gpt_batch, tiny_gpt


def _perturbed(model, scale=0.05, seed=0):
    """Random weights everywhere (norm weights and zero biases too), so no test passes by an initialisation."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model.eval()


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch["input_ids"]).logits


@given(factor=st.integers(2, 3), seed=st.integers(0, 3))
def test_whole_multiples_preserve_the_gpt(factor, seed):
    model = _perturbed(tiny_gpt(2, seed=seed), seed=seed)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    wide = growops.widen(model, hidden=16 * factor)
    batch = gpt_batch(seed=seed)
    assert type(wide) is type(model) and wide.config.n_embd == 16 * factor and wide.config.n_head == 2 * factor
    assert torch.allclose(_logits(wide, batch), _logits(model, batch), atol=1e-5)
    assert list(wide.state_dict()) == list(model.state_dict())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    assert wide.lm_head.weight is wide.wte.weight  # the tie survives


def test_copies_and_splits_follow_the_plan():
    model = _perturbed(tiny_gpt(2))
    wide = growops.widen(model, hidden=32)
    ffn = DimGrowth(64, 128, 16).unit_map()  # 4 pieces of the hidden width, each tiled: 0..15, 0..15, 16..31, ...
    assert ffn[:32].tolist() == list(range(16)) * 2 and ffn[32:48].tolist() == list(range(16, 32))
    hid = torch.arange(32) % 16
    fc_old, fc_new = model.blocks[0].mlp.c_fc.weight, wide.blocks[0].mlp.c_fc.weight  # (64, 16) -> (128, 32)
    assert torch.allclose(fc_new, fc_old[ffn][:, hid] / 2)  # rows copied, input columns split in halves
    proj_old, proj_new = model.blocks[0].mlp.c_proj.weight, wide.blocks[0].mlp.c_proj.weight  # (16, 64) -> (32, 128)
    assert torch.allclose(proj_new, proj_old[hid][:, ffn] / 2)
    # the fused q|k|v projection is tiled piece by piece: new q rows are old q rows, twice
    qkv_old, qkv_new = model.blocks[0].attn.c_attn.bias, wide.blocks[0].attn.c_attn.bias  # 48 -> 96
    for piece in range(3):
        old = qkv_old[16 * piece:16 * (piece + 1)]
        assert torch.equal(qkv_new[32 * piece:32 * (piece + 1)], old.repeat(2))
    # the final norm stands in for the tied head's split: its weight is halved per unit
    assert torch.allclose(wide.ln_f.weight, model.ln_f.weight.repeat(2) / 2)
    assert torch.equal(wide.blocks[0].ln_1.weight, model.blocks[0].ln_1.weight.repeat(2))


@given(old=st.integers(1, 12), extra=st.integers(0, 30), pieces=st.integers(1, 4))
def test_unit_maps_tile_piece_by_piece(old, extra, pieces):
    g = DimGrowth(old * pieces, (old + extra) * pieces, old)
    m, counts = g.unit_map(), g.counts()
    assert len(m) == g.new and set(m.tolist()) == set(range(g.old))  # every old unit runs, nothing else
    for j in range(g.new):  # a new unit of piece p runs a unit of old piece p
        assert m[j] // old == j // (old + extra)
    assert int(counts.sum()) == sum(torch.bincount(m).tolist()[u] ** 2 for u in range(g.old))
    assert g.whole_multiple == (extra % old == 0)


def test_other_sizes_are_copies_and_the_output_moves():
    model = _perturbed(tiny_gpt(2))
    grown = grow_width(model, hidden=24)
    assert grown.max_difference > 1e-3  # LayerNorm statistics over a non-uniformly tiled vector change
    assert "not all whole multiples" in grown.changes[-1]
    wide = grown.model
    assert torch.equal(wide.wte.weight[:, 16:], model.wte.weight[:, :8])


@dataclasses.dataclass
class MLPConfig:
    width: int = 8
    d_ff: int = 16
    n_layer: int = 3


class NormFreeMLP(nn.Module):
    """Residual MLP blocks without normalisation: a config model whose function survives any width."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        self.inp = nn.Linear(4, config.width)
        self.blocks = nn.ModuleList([nn.Sequential(nn.Linear(config.width, config.d_ff), nn.ReLU(),
                                                   nn.Linear(config.d_ff, config.width))
                                     for _ in range(config.n_layer)])
        self.out = nn.Linear(config.width, 3)

    @property
    def dummy_inputs(self):
        return (torch.randn(5, 4, generator=torch.Generator().manual_seed(0)),)

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


@given(hidden=st.integers(8, 20), ffn=st.integers(16, 40))
def test_any_size_preserves_a_model_without_normalisation(hidden, ffn):
    torch.manual_seed(0)
    model = NormFreeMLP(MLPConfig())
    grown = grow_width(model, hidden=hidden, ffn=ffn)
    x = torch.randn(7, 4)
    assert grown.max_difference < 1e-5
    assert torch.allclose(grown.model(x), model(x), atol=1e-5)
    assert grown.model.blocks[0][0].weight.shape == (ffn, hidden)


def test_noise_breaks_the_symmetry_of_duplicated_units():
    def trained(noise):
        wide = growops.widen(_perturbed(tiny_gpt(2)), hidden=32, noise=noise)
        opt = torch.optim.SGD(wide.parameters(), lr=0.5)
        wide.train()
        for s in range(3):
            wide(**gpt_batch(seed=s)).loss.backward()
            opt.step()
            opt.zero_grad()
        w = wide.blocks[0].mlp.c_fc.weight.detach()
        m = DimGrowth(64, 128, 16).unit_map()
        twins = [(m == u).nonzero().flatten().tolist() for u in range(64)]  # rows that start as copies of one row
        return max(float((w[a] - w[b]).abs().max()) for a, b in twins)

    assert trained(0.0) < 1e-6 < 1e-3 < trained(1e-2)


def test_optimizer_state_is_widened_like_the_weights():
    model = _perturbed(tiny_gpt(2))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model.train()
    for s in range(2):
        model(**gpt_batch(seed=s)).loss.backward()
        opt.step()
        opt.zero_grad()
    wide = growops.widen(model, hidden=32)
    wide_opt = torch.optim.AdamW(wide.parameters(), lr=1e-3)
    growops.widen_optimizer_state(opt, model, wide, wide_opt)
    old, new = opt.state[model.blocks[0].mlp.c_proj.weight], wide_opt.state[wide.blocks[0].mlp.c_proj.weight]
    hid, ffn = torch.arange(32) % 16, DimGrowth(64, 128, 16).unit_map()
    assert torch.allclose(new["exp_avg"], old["exp_avg"][hid][:, ffn] / 2)  # split like the weight
    assert torch.allclose(new["exp_avg_sq"], old["exp_avg_sq"][hid][:, ffn] / 4)
    assert torch.equal(wide_opt.state[wide.blocks[0].ln_1.weight]["exp_avg"], opt.state[model.blocks[0].ln_1.weight]
                       ["exp_avg"][hid])  # copied
    assert float(new["step"]) == float(old["step"]) == 2.0
    assert new["exp_avg"] is not old["exp_avg"]
    wide(**gpt_batch()).loss.backward()
    wide_opt.step()  # a consistent state steps

    growops.widen_optimizer_state(opt, model, wide, wide_opt, policy="reset")
    assert wide.blocks[0].mlp.c_proj.weight not in wide_opt.state


def test_optimizer_state_refuses_models_that_do_not_match():
    model = tiny_gpt(2)
    wide = growops.widen(model, hidden=32)
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(growops.GrowopsError, match="widened model's parameters"):
        growops.widen_optimizer_state(opt, model, wide, opt)
    with pytest.raises(growops.GrowopsError, match="carries the width plan"):
        growops.widen_optimizer_state(opt, model, tiny_gpt(2), opt)
    with pytest.raises(growops.GrowopsError, match="unknown policy"):
        growops.widen_optimizer_state(opt, model, wide, torch.optim.AdamW(wide.parameters()), policy="copy")


@pytest.mark.parametrize("kwargs, match", [
    (dict(hidden=8), "widen grows"),
    (dict(hidden=32, heads=2), "would change the head size"),
    (dict(hidden=20), "not a multiple of GPT.s head size 8"),
    (dict(hidden=32, ffn=256), "derives its FFN size"),
    (dict(hidden=32, noise=-1.0), "noise must be"),
])
def test_bad_sizes_are_refused(kwargs, match):
    with pytest.raises(growops.GrowopsError, match=match):
        growops.widen(tiny_gpt(2), **kwargs)


@pytest.mark.parametrize("make", [lambda: IndexLoopNet(3), lambda: SequentialNet(3)])
@given(factor=st.integers(2, 3))
def test_models_without_a_config_grow_the_width_tied_to_their_blocks(make, factor):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(5, 4)
    grown = grow_width(model, hidden=8 * factor, example_inputs=(x,))
    wide = grown.model
    assert type(wide) is type(model) and list(wide.state_dict()) == list(model.state_dict())
    assert torch.allclose(wide(x), model(x), atol=1e-5)
    assert wide.inp.weight.shape == (8 * factor, 4) and wide.inp.out_features == 8 * factor
    assert wide.out.weight.shape == (3, 8 * factor) and wide.out.in_features == 8 * factor
    assert model.inp.weight.shape == (8, 4)  # untouched


@dataclasses.dataclass
class OddConfig:
    width: int = 8
    d_ff: int = 16
    n_layer: int = 3
    n_head: object = None
    hidden_size: int = 8  # looked for before `width`, and the model ignores it


class IgnoresHiddenSize(NormFreeMLP):
    def __init__(self, config: OddConfig):
        super().__init__(MLPConfig(config.width, config.d_ff, config.n_layer))
        self.config = config


def test_config_fields_that_do_not_size_the_model_are_refused():
    with pytest.raises(growops.GrowopsError, match="same tensors as before: its width is set by another field of its "
                                                   "config than the ones growops changed"):
        growops.widen(IgnoresHiddenSize(OddConfig()), hidden=16)
    with pytest.raises(growops.GrowopsError, match="not one head count"):
        growops.widen(IgnoresHiddenSize(OddConfig(n_head=[2, 4])), hidden=16)


def test_a_model_without_a_config_grows_its_hidden_width_only():
    with pytest.raises(growops.GrowopsError, match=r"hidden width only \(the width of its blocks' outputs and "
                                                   r"everything tied to it\); leave ffn and heads None"):
        growops.widen(IndexLoopNet(), hidden=16, ffn=32, example_inputs=(torch.randn(2, 4),))
    with pytest.raises(growops.GrowopsError, match="needs an input"):
        growops.widen(IndexLoopNet(), hidden=16)


def test_attention_widths_behind_a_reshape_stay():
    """A config-less attention model: q/k/v and heads are behind unflatten, which the groups do not follow, so only
    the residual width grows and attention is untouched."""
    class NoConfigGPT(nn.Module):
        def __init__(self):
            super().__init__()
            self.gpt = tiny_gpt(2)

        @property
        def dummy_inputs(self):
            return (gpt_batch()["input_ids"],)

        def forward(self, ids):
            return self.gpt(ids).logits

    model = _perturbed(NoConfigGPT())
    wide = growops.widen(model, hidden=32)
    ids = gpt_batch()["input_ids"]
    with torch.no_grad():
        assert torch.allclose(wide(ids), model(ids), atol=1e-5)
    assert wide.gpt.blocks[0].attn.c_attn.weight.shape == (48, 32)  # input grows, the heads' width stays
    assert wide.gpt.blocks[0].attn.c_proj.weight.shape == (32, 16)


class Ramped(NormFreeMLP):
    """Scales its hidden units by a ramp computed from the width: a value the plan does not see. (A roll or a flip of
    the units would not do: tiling commutes with them.)"""

    def forward(self, x):
        h = self.inp(x)
        h = h * torch.linspace(0.5, 1.5, h.shape[-1])
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


def test_a_function_the_plan_cannot_follow_is_refused_by_the_probe():
    model = _perturbed(Ramped(MLPConfig()), scale=0.5)
    with pytest.raises(growops.GrowopsError, match=r"changed its output .*computed from the width\)\. Widen it by "
                                                   "hand, or report the model to growops"):
        growops.widen(model, hidden=16)


# ---------------------------------------------------------------- Hugging Face models
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _hf(name):
    torch.manual_seed(0)
    common = dict(vocab_size=64, bos_token_id=0, eos_token_id=0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32,
                                                                    **common))
    if name == "llama":  # grouped-query attention: 4 query heads, 2 key/value heads
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
            pad_token_id=0, **common))
    return transformers.BertForMaskedLM(transformers.BertConfig(num_hidden_layers=2, hidden_size=16,
                                                                num_attention_heads=2, intermediate_size=32,
                                                                vocab_size=64, max_position_embeddings=32))


@pytest.mark.parametrize("name, kwargs", [("gpt2", dict(hidden=32)), ("gpt2", dict(hidden=32, ffn=128)),
                                          ("llama", dict(hidden=32, ffn=64)), ("bert", dict(hidden=48, ffn=96))])
def test_hf_models_keep_their_function_and_round_trip(name, kwargs, tmp_path):
    model = _perturbed(_hf(name))
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    wide = growops.widen(model, **kwargs)
    assert type(wide) is type(model) and wide.config.hidden_size == kwargs["hidden"]
    assert list(wide.state_dict()) == list(model.state_dict())
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.allclose(wide(ids).logits, expected, atol=1e-5)
        wide.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        assert torch.allclose(loaded(ids).logits, expected, atol=1e-5)
    assert model.config.hidden_size == 16


def test_a_hf_model_whose_config_was_dropped_is_refused():
    model = _hf("gpt2")
    model.config = None
    with pytest.raises(growops.GrowopsError, match=r"rebuilds GPT2LMHeadModel from its config .*and it has none "
                                                   r"\(growops knows Hugging Face configs and a dataclass in "
                                                   r"model\.config that type\(model\)\(config\) builds from"):
        growops.widen(model, hidden=32)


def test_widen_then_deepen():
    model = _perturbed(_hf("llama"))
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    grown = growops.deepen(growops.widen(model, hidden=32), layers=4)
    with torch.no_grad():
        assert torch.allclose(grown(ids).logits, model(ids).logits, atol=1e-5)


def test_a_base_model_whose_output_is_the_hidden_state():
    """LlamaModel returns last_hidden_state, which widening widens: it is compared on its leading (copied) units."""
    torch.manual_seed(0)
    model = _perturbed(transformers.LlamaModel(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=4, num_key_value_heads=2, intermediate_size=32,
        vocab_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0)))
    grown = grow_width(model, hidden=32)
    ids = torch.randint(1, 64, (2, 7), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        old, new = model(ids).last_hidden_state, grown.model(ids).last_hidden_state
    assert grown.max_difference < 1e-5 and new.shape[-1] == 32
    assert torch.allclose(new[..., :16], old, atol=1e-5) and torch.allclose(new[..., 16:], old, atol=1e-5)


class FunctionalBlock(nn.Module):
    """A block written with functional ops on its own parameters (get_attr nodes in the graph, no torch.nn layers)."""

    def __init__(self, width: int):
        super().__init__()
        self.norm_w, self.norm_b = nn.Parameter(1 + 0.1 * torch.randn(width)), nn.Parameter(0.1 * torch.randn(width))
        self.w1, self.b1 = nn.Parameter(torch.randn(width, 2 * width) / 3), nn.Parameter(torch.randn(2 * width))
        self.w2t, self.w5 = nn.Parameter(torch.randn(8, 2 * width) / 4), nn.Parameter(torch.randn(width, 8) / 3)
        self.w3, self.b3 = nn.Parameter(torch.randn(width, width) / 3), nn.Parameter(torch.randn(width))
        self.gain = nn.Parameter(torch.randn(width))

    def forward(self, h):
        z = F.layer_norm(h, (h.shape[-1],), self.norm_w, self.norm_b)
        u = F.gelu(torch.addmm(self.b1, z, self.w1))  # (tokens, 2 width)
        v = (self.w2t @ u.t()).t()  # matmul and t: (tokens, 8), a width of its own
        out = (self.w5 @ v.t()).t() + F.linear(z, self.w3, self.b3)  # back to the hidden width, and from it
        return h + out.transpose(0, 1).transpose(0, 1) * self.gain


class FunctionalNet(nn.Module):
    """Embeddings (tokens, positions), blocks and an output head tied to the token embedding, through a hand-written
    norm (mul, add)."""

    def __init__(self, n_layer: int = 3, width: int = 8, vocab: int = 11):
        super().__init__()
        self.emb, self.pos = nn.Parameter(torch.randn(vocab, width)), nn.Parameter(torch.randn(5, width))
        self.seq_gain = nn.Parameter(torch.rand(5) + 0.5)
        self.blocks = nn.ModuleList([FunctionalBlock(width) for _ in range(n_layer)])
        self.final_w, self.final_b = nn.Parameter(1 + 0.1 * torch.randn(width)), nn.Parameter(0.1 * torch.randn(width))

    def forward(self, ids):
        h = F.embedding(ids, self.emb) + F.embedding(torch.arange(ids.shape[0]), self.pos)
        h = (h.t() * self.seq_gain).t()  # a parameter along the token dimension, which must not grow
        for block in self.blocks:
            h = block(h)
        mean = h.mean(-1, keepdim=True)
        normed = (h - mean) * torch.rsqrt(((h - mean) ** 2).mean(-1, keepdim=True) + 1e-5)
        return F.linear(normed * self.final_w + self.final_b, self.emb)  # the head is the embedding


@pytest.mark.parametrize("factor", [2, 3])
def test_functional_models_grow_through_every_op_the_width_pass_follows(factor):
    """Parameters read by functional ops (layer_norm, addmm, matmul, t, transpose, linear, embedding, mul and add by
    a parameter) grow along the hidden width and only there, the model computes what it did, and the tied head's
    norm is scaled (its weight and bias) instead of splitting the embedding."""
    torch.manual_seed(0)
    model = FunctionalNet()
    ids = torch.tensor([1, 4, 2, 9, 0])
    wide = grow_width(model, hidden=8 * factor, example_inputs=(ids,)).model
    w = 8 * factor
    assert torch.allclose(wide(ids), model(ids), atol=1e-5)
    assert wide.emb.shape == (11, w) and wide.pos.shape == (5, w) and wide.seq_gain.shape == (5,)
    assert wide.final_w.shape == wide.final_b.shape == (w,)
    block, old = wide.blocks[1], model.blocks[1]
    shapes = {n: tuple(p.shape) for n, p in block.named_parameters()}
    assert shapes == {"norm_w": (w,), "norm_b": (w,), "w1": (w, 16), "b1": (16,), "w2t": (8, 16), "w5": (w, 8),
                      "w3": (w, w), "b3": (w,), "gain": (w,)}  # v = w2t @ u.t() has a width of its own (8)
    assert torch.equal(wide.emb, model.emb.repeat(1, factor))  # tied: copied, not split
    assert torch.allclose(wide.final_w, model.final_w.repeat(factor) / factor)  # the norm feeding the head scaled
    assert torch.allclose(wide.final_b, model.final_b.repeat(factor) / factor)
    assert torch.allclose(block.w1, old.w1.repeat(factor, 1) / factor)  # contracted over the hidden width: split
    assert torch.equal(block.b1, old.b1) and torch.equal(block.gain, old.gain.repeat(factor))


def test_noise_is_relative_to_each_weight_and_seeded():
    """noise=σ adds N(0, σ·std(W)) to each grown weight W (a tiny weight gets tiny noise), from generator `seed`
    (default 0): the same seed gives the same model."""
    model = tiny_gpt(2)
    with torch.no_grad():
        model.blocks[0].mlp.c_fc.weight.mul_(1e-3)
    plain = growops.widen(model, hidden=32)
    noisy = growops.widen(model, hidden=32, noise=0.1)
    for name in ("blocks.0.mlp.c_fc.weight", "blocks.1.mlp.c_fc.weight"):
        w, added = plain.get_parameter(name), noisy.get_parameter(name) - plain.get_parameter(name)
        assert 0.08 < float(added.std() / w.std()) < 0.12, name
    assert all(torch.equal(p, q) for p, q in zip(noisy.parameters(), growops.widen(model, hidden=32, noise=0.1,
                                                                                   seed=0).parameters()))
    other = growops.widen(model, hidden=32, noise=0.1, seed=1)
    assert not torch.equal(other.blocks[0].mlp.c_fc.weight, noisy.blocks[0].mlp.c_fc.weight)


@pytest.mark.parametrize("kwargs, match", [(dict(hidden=0), "hidden must be an int >= 1"),
                                           (dict(hidden=32, ffn=0), "ffn must be an int >= 1"),
                                           (dict(hidden=32, heads=0), "heads must be an int >= 1"),
                                           (dict(hidden=32, seed=-1), "seed must be an int >= 0")])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(growops.GrowopsError, match=match):
        growops.widen(tiny_gpt(2), **kwargs)


def test_optimizer_state_is_carried_past_parameters_that_have_none():
    """Parameters without optimizer state (no gradient yet) are skipped, and the ones after them still carried."""
    model = tiny_gpt(2)
    first = next(model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(**gpt_batch()).loss.backward()
    first.grad = None  # no state for it after the step
    opt.step()
    wide = growops.widen(model, hidden=32)
    wide_opt = torch.optim.AdamW(wide.parameters(), lr=1e-3)
    growops.widen_optimizer_state(opt, model, wide, wide_opt)
    assert next(wide.parameters()) not in wide_opt.state
    assert all(p in wide_opt.state for p in list(wide.parameters())[1:])


class WithSpareWeight(NormFreeMLP):
    """A config model holding a weight its forward never reads (a head kept for later, say)."""

    def __init__(self, config: MLPConfig):
        super().__init__(config)
        self.spare = nn.Parameter(torch.randn(config.width, 2))


def test_a_weight_the_forward_never_reads_grows_by_tiling():
    torch.manual_seed(0)
    model = WithSpareWeight(MLPConfig())
    wide = growops.widen(model, hidden=16)
    x = torch.randn(3, 4)
    assert torch.allclose(wide(x), model(x), atol=1e-5)
    assert torch.equal(wide.spare, model.spare.repeat(2, 1))  # nothing contracts it: copied, not split


def test_the_report_says_when_a_widening_is_not_by_whole_multiples():
    torch.manual_seed(0)
    assert grow_width(NormFreeMLP(MLPConfig()), hidden=12).changes[-1].endswith(" (not all whole multiples)")
    assert grow_width(NormFreeMLP(MLPConfig()), hidden=16).changes[-1] == "widened dimensions: 8 -> 16"


class _SequenceGainBlock(nn.Module):
    """Scales each sequence position by a parameter, behind a transpose of a 3-d activation."""

    def __init__(self, width: int = 8, seq: int = 5):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.seq_gain = nn.Parameter(torch.randn(seq))

    def forward(self, h):  # (batch, seq, width)
        return h + (self.fc(h).transpose(1, 2) * self.seq_gain).transpose(1, 2)


class _SequenceGainNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.blocks = nn.ModuleList([_SequenceGainBlock() for _ in range(3)])

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.out(h)


def test_a_transpose_carries_the_dimensions_it_swaps():
    """transpose(1, 2) of a 3-d activation: the hidden width goes to dimension 1 and back, and the sequence
    dimension (scaled by a parameter of its own size) does not grow."""
    torch.manual_seed(0)
    model, x = _SequenceGainNet(), torch.randn(2, 5, 4)
    wide = grow_width(model, hidden=16, example_inputs=(x,)).model
    assert torch.allclose(wide(x), model(x), atol=1e-5)
    assert wide.blocks[0].seq_gain.shape == (5,) and wide.blocks[0].fc.weight.shape == (16, 16)


def test_reset_drops_the_moments_of_grown_parameters_only():
    """policy="reset": the grown parameters start without state, the others keep theirs, wherever they are."""
    torch.manual_seed(0)
    model = NormFreeMLP(MLPConfig())
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(5, 4)).sum().backward()
    opt.step()
    wide = growops.widen(model, hidden=16, ffn=16)  # the FFN keeps its size: its biases do not grow
    wide_opt = torch.optim.AdamW(wide.parameters(), lr=1e-3)
    growops.widen_optimizer_state(opt, model, wide, wide_opt, policy="reset")
    assert wide.inp.weight not in wide_opt.state and wide.blocks[0][0].weight not in wide_opt.state
    for kept, old in ((wide.blocks[2][0].bias, model.blocks[2][0].bias), (wide.out.bias, model.out.bias)):
        assert torch.equal(wide_opt.state[kept]["exp_avg"], opt.state[old]["exp_avg"])


def test_grow_width_draws_its_noise_from_seed_0_by_default():
    model = tiny_gpt(2)
    a, b = grow_width(model, hidden=32, noise=0.1).model, grow_width(model, hidden=32, noise=0.1, seed=0).model
    assert all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters()))


class _LearnedQueries(nn.Module):
    """Scores its tokens with learned queries: a parameter used as the input of F.linear, contracted over the hidden
    width like an activation."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])
        self.queries = nn.Parameter(torch.randn(2, 8))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return F.linear(self.queries, h)


def test_a_parameter_used_where_the_pass_does_not_know_how_is_refused_by_name():
    with pytest.raises(growops.GrowopsError, match=r"queries grows along dimension\(s\) \[1\] and is used by "
                                                   r"`linear` \(linear\) .*does not know how to widen"):
        growops.widen(_LearnedQueries(), hidden=16, example_inputs=(torch.randn(5, 4),))


def test_width_groups_reads_shapes_from_shape_prop():
    """growops.fx.width_groups on a symbolic trace with ShapeProp's tensor_meta (no torch.export): a layer's output
    width is tied through the norm that reads it to the next layer's input width, not to its own input width."""
    from torch.fx.passes.shape_prop import ShapeProp

    model = SequentialNet(3)
    gm = torch.fx.symbolic_trace(model)
    ShapeProp(gm).propagate(torch.randn(5, 4))
    groups = growops.fx.width_groups(gm, model)
    first, last = model.blocks[0], model.blocks[2]
    hidden = groups.find((id(model.inp.weight), 0))
    assert groups.find((id(first[0].weight), 0)) == groups.find((id(first[1].weight), 1)) == hidden
    assert groups.find((id(model.out.weight), 1)) == groups.find((id(last[1].weight), 0))
    assert groups.find((id(model.inp.weight), 1)) != hidden != groups.find((id(first[1].weight), 0))


class _TiedWithoutNorm(nn.Module):
    """An output head tied to the embedding, fed by the last block's sum directly (no norm to scale)."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Parameter(torch.randn(11, 8))
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, ids):
        h = F.embedding(ids, self.emb)
        for block in self.blocks:
            h = h + block(h)
        return F.linear(h, self.emb)


def test_a_tied_head_without_a_norm_before_it_is_refused_naming_what_feeds_it():
    with pytest.raises(growops.GrowopsError, match=r"emb \(also used elsewhere\) is used both as an embedding and as "
                                                   r"a weight contracted over the widened dimension at `linear`.*but "
                                                   r"found `add_2` \(at "):
        growops.widen(_TiedWithoutNorm(), hidden=16, example_inputs=(torch.tensor([1, 2, 3]),))


class _TiedModules(nn.Module):
    """nn.Embedding and an output nn.Linear sharing one weight (two names), no norm before the head."""

    def __init__(self):
        super().__init__()
        self.wte, self.head = nn.Embedding(11, 8), nn.Linear(8, 11, bias=False)
        self.head.weight = self.wte.weight
        self.blocks = nn.ModuleList([nn.Linear(8, 8) for _ in range(3)])

    def forward(self, ids):
        h = self.wte(ids)
        for block in self.blocks:
            h = h + block(h)
        return self.head(h)


class _SharedNorm(_TiedModules):
    """One LayerNorm applied to the embedding and before the tied head: scaling it would change both."""

    def __init__(self):
        super().__init__()
        self.norm = nn.LayerNorm(8)

    def forward(self, ids):
        h = self.norm(self.wte(ids))
        for block in self.blocks:
            h = h + block(h)
        return self.head(self.norm(h))


def test_a_weight_tied_under_two_names_is_refused_naming_both():
    with pytest.raises(growops.GrowopsError, match=r"wte\.weight \(also head\.weight\) is used both as an embedding "
                                                   r"and as a weight contracted over the widened dimension at `head`"):
        growops.widen(_TiedModules(), hidden=16, example_inputs=(torch.tensor([[1, 2, 3]]),))


def test_a_norm_feeding_a_tied_head_and_more_is_refused():
    with pytest.raises(growops.GrowopsError, match="norm that feeds a tied contraction is used elsewhere too: growops "
                                                   "cannot scale it for that contraction alone. Untie the weights "
                                                   "before widening"):
        growops.widen(_SharedNorm(), hidden=16, example_inputs=(torch.tensor([[1, 2, 3]]),))


class _HalvingBlock(nn.Module):
    """Halves the sequence (pools pairs of positions), as a funnel encoder does."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, h):  # (batch, seq, width) -> (batch, seq / 2, width)
        h = h + self.fc(h)
        return (h[:, 0::2] + h[:, 1::2]) / 2


class _FunnelNet(_SequenceGainNet):
    """_SequenceGainNet's input, output and loop, over halving blocks."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_HalvingBlock() for _ in range(3)])


def test_blocks_whose_outputs_differ_in_shape_are_refused_showing_them():
    """The block outputs' shapes, sequence length included, must agree for widen to read one hidden width."""
    with pytest.raises(growops.GrowopsError, match=r"^cannot read one hidden width from the blocks' outputs "
                                                   r"\(blocks.0: \(2, 4, 8\), blocks.1: \(2, 2, 8\), blocks.2: "
                                                   r"\(2, 1, 8\)\): widen grows stacks whose blocks keep the shape "
                                                   r"of what they pass on; widen this model by hand$"):
        growops.widen(_FunnelNet(), hidden=16, example_inputs=(torch.randn(2, 8, 4),))


class _AddmmQueries(_LearnedQueries):
    """Learned queries in the form the pass follows: addmm(bias, queries, hᵀ) contracts them over the hidden width."""

    def __init__(self):
        super().__init__()
        self.query_bias = nn.Parameter(torch.randn(2, 1))

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + block(h)
        return torch.addmm(self.query_bias, self.queries, h.t())


def test_queries_contracted_by_addmm_are_split():
    torch.manual_seed(0)
    model, x = _AddmmQueries(), torch.randn(5, 4)
    wide = grow_width(model, hidden=16, example_inputs=(x,)).model
    assert torch.allclose(wide(x), model(x), atol=1e-5)
    assert torch.allclose(wide.queries, model.queries.repeat(1, 2) / 2)


class _AuxBlock(nn.Module):
    """Returns its hidden state and an auxiliary value that only the model's output collects."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        y = x + self.fc(x)
        return y, torch.tanh(y)


class _AuxNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.blocks = nn.ModuleList([_AuxBlock() for _ in range(3)])

    def forward(self, x):
        h, aux = self.inp(x), []
        for block in self.blocks:
            h, a = block(h)
            aux.append(a)
        return self.out(h), aux


def test_the_hidden_state_is_the_block_output_later_code_reads():
    """Of a block's two outputs, the one the next block reads is the hidden state, not the one only returned."""
    torch.manual_seed(0)
    model, x = _AuxNet(), torch.randn(5, 4)
    wide = growops.widen(model, hidden=16, example_inputs=(x,))
    assert torch.allclose(wide(x)[0], model(x)[0], atol=1e-5) and wide.blocks[0].fc.weight.shape == (16, 16)


class _CastsAlongBlock(nn.Module):
    """Casts a value from before the stack and hands the cast on to the next block (as Hugging Face blocks do with
    position embeddings)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x, pos):
        pos = pos.to(x.dtype)
        return x + self.fc(x) * pos, pos


class _CastsAlongNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.blocks = nn.ModuleList([_CastsAlongBlock() for _ in range(3)])

    def forward(self, x):
        h, pos = self.inp(x), torch.ones(x.shape[0], 1, dtype=torch.float64)
        for block in self.blocks:
            h, pos = block(h, pos)
        return self.out(h)


def test_a_cast_handed_along_the_blocks_is_not_their_hidden_state():
    torch.manual_seed(0)
    model, x = _CastsAlongNet(), torch.randn(5, 4)
    wide = growops.widen(model, hidden=16, example_inputs=(x,))
    assert torch.allclose(wide(x), model(x), atol=1e-5) and wide.blocks[0].fc.weight.shape == (16, 16)


class _Conv1DNet(nn.Module):
    """GPT-2's Conv1D layers (weight stored in x features) in a model without a config."""

    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        self.inp, self.out = nn.Linear(4, 8), nn.Linear(8, 3)
        self.blocks = nn.ModuleList([Conv1D(8, 8) for _ in range(3)])

    def forward(self, x):
        h = self.inp(x)
        for block in self.blocks:
            h = h + torch.tanh(block(h))
        return self.out(h)


def test_conv1d_layers_in_a_model_without_a_config_are_refused_clearly():
    """Not supported yet (Conv1D flattens its input with a view the pass does not follow, and keeps its width in
    `nf`): the widened copy fails on the example input, and widen says so instead of returning it."""
    pytest.importorskip("transformers")
    with pytest.raises(growops.GrowopsError, match=r"the grown _Conv1DNet fails on the example inputs, which the "
                                                   r"model runs on: RuntimeError: .*report the model to growops"):
        growops.widen(_Conv1DNet(), hidden=16, example_inputs=(torch.randn(5, 4),))


def test_width_groups_ties_a_conv1d_leaf_by_its_transposed_weight():
    """A graph traced with GPT-2's Conv1D as a leaf (weight stored in x out): its input width is the weight's
    dimension 0, its output width dimension 1 and the bias."""
    pytest.importorskip("transformers")
    from torch.fx.passes.shape_prop import ShapeProp
    from transformers.pytorch_utils import Conv1D

    class _Leaves(torch.fx.Tracer):
        def is_leaf_module(self, module, name):
            return isinstance(module, Conv1D) or super().is_leaf_module(module, name)

    model = _Conv1DNet()
    gm = torch.fx.GraphModule(model, _Leaves().trace(model))
    ShapeProp(gm).propagate(torch.randn(5, 4))
    groups = growops.fx.width_groups(gm, model)
    block = model.blocks[0]
    assert groups.find((id(model.inp.weight), 0)) == groups.find((id(block.weight), 0))
    assert groups.find((id(block.weight), 1)) == groups.find((id(block.bias), 0)) == \
        groups.find((id(model.blocks[1].weight), 0))
    assert groups.find((id(model.inp.weight), 1)) != groups.find((id(block.weight), 0))


def test_a_probe_the_traced_forward_fails_on_is_named_in_the_error():
    """Symbolic tracing follows the branch of arguments that are given: a batch without labels runs the traced
    labels branch with labels=None. The error says so, not just "pass example_inputs"."""

    class WithLabels(nn.Module):
        def __init__(self):
            super().__init__()
            self.inp = nn.Linear(4, 8)
            self.blocks = nn.Sequential(*[nn.Sequential(nn.Linear(8, 8), nn.Tanh()) for _ in range(3)])
            self.out = nn.Linear(8, 3)

        def forward(self, x, labels=None):
            y = self.out(self.blocks(self.inp(x)))
            if labels is None:
                return y
            return (y - labels).square().mean()

    x, labels = torch.randn(2, 4), torch.randn(2, 3)
    with pytest.raises(growops.GrowopsError, match=r"its symbolically traced forward failed on the example inputs: "
                                                   r"TypeError.*every argument the traced forward reads"):
        growops.widen(WithLabels(), hidden=16, example_inputs=(x,))
    assert growops.widen(WithLabels(), hidden=16, example_inputs=(x, labels)).blocks[0][0].weight.shape == (16, 16)
