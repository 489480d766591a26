"""growops.deepen: a copy of the same class with more blocks; "zero" preserves the function, "interpolate" and
"stack" copy the blocks their maps name; the input model is untouched; what it cannot do it refuses by name."""

import copy

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import growops
from growops.deepening import grow_depth
from growops.maps import growth_sources
from tests.models import IndexLoopNet, SequentialNet, gpt_batch, tiny_gpt


def _logits(model, batch):
    model.eval()
    with torch.no_grad():
        return model(batch["input_ids"]).logits


def _trained(model, steps=3):
    """A few SGD steps so that no two blocks are alike and no projection is at its initial scale."""
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    for s in range(steps):
        model(**gpt_batch(seed=s)).loss.backward()
        opt.step()
        opt.zero_grad()
    return model


@given(n=st.integers(2, 4), extra=st.integers(0, 8))
def test_zero_preserves_the_gpt_at_any_depth(n, extra):
    model = _trained(tiny_gpt(n))
    before = copy.deepcopy(model.state_dict())
    deep = growops.deepen(model, layers=n + extra)
    batch = gpt_batch()
    assert type(deep) is type(model) and len(deep.blocks) == n + extra and deep.config.n_layer == n + extra
    assert torch.equal(_logits(deep, batch), _logits(model, batch))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and len(model.blocks) == n
    assert deep.wte.weight is deep.lm_head.weight  # the tie survives


@pytest.mark.parametrize("method", ["interpolate", "stack"])
@given(n=st.integers(2, 4), extra=st.integers(0, 8))
def test_copies_follow_the_growth_map(method, n, extra):
    model = _trained(tiny_gpt(n))
    deep = growops.deepen(model, layers=n + extra, method=method)
    for j, src in enumerate(growth_sources(n, n + extra, method)):
        new, old = deep.blocks[j].state_dict(), model.blocks[src].state_dict()
        assert new.keys() == old.keys() and all(torch.equal(new[k], old[k]) for k in new)
    # fresh tensors: training the grown model leaves the original alone
    params = {id(p) for p in model.parameters()}
    assert not any(id(p) in params for p in deep.parameters())
    keys = set(deep.state_dict())
    assert keys == {k for k in model.state_dict() if not k.startswith("blocks.")} | \
        {f"blocks.{j}.{k}" for j in range(n + extra) for k in model.blocks[0].state_dict()}


def test_zero_inserts_after_each_block_its_copy_with_branches_off():
    model = _trained(tiny_gpt(3))
    deep = growops.deepen(model, layers=6)
    zeroed = {"attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"}
    for j in range(6):
        new, old = deep.blocks[j].state_dict(), model.blocks[j // 2].state_dict()
        for k in new:
            if j % 2 and k in zeroed:
                assert not new[k].any(), (j, k)
            else:
                assert torch.equal(new[k], old[k]), (j, k)


def test_inserted_blocks_train_and_diverge_from_their_source():
    model = _trained(tiny_gpt(2))
    deep = growops.deepen(model, layers=4)
    _trained(deep, steps=2)
    assert deep.blocks[1].mlp.c_proj.weight.abs().sum() > 0  # zero projections get gradients
    assert not torch.equal(deep.blocks[0].attn.c_attn.weight, deep.blocks[1].attn.c_attn.weight)


def test_index_loop_model_gets_its_depth_attribute_updated():
    torch.manual_seed(0)
    model = IndexLoopNet(n_layer=3)
    x = torch.randn(5, 4)
    grown = grow_depth(model, 7, example_inputs=(x,))
    deep = grown.model
    assert deep.n_layer == 7 and model.n_layer == 3 and len(deep.layers) == 7
    assert grown.max_difference == 0.0 and torch.equal(deep(x), model(x))
    assert "IndexLoopNet.n_layer: 3 -> 7" in grown.changes


class _Counted(nn.Module):
    """Loops over a count whose name growops does not recognise as a depth."""

    def __init__(self):
        super().__init__()
        self.count = 3
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

    def forward(self, x):
        for i in range(self.count):
            x = x + self.layers[i](x)
        return x


def test_a_depth_growops_cannot_update_is_refused():
    with pytest.raises(growops.GrowopsError, match="calls layers's blocks"):
        growops.deepen(_Counted(), layers=6)


class _IndexedBlock(nn.Module):
    def __init__(self, i):
        super().__init__()
        self.layer_idx = i
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


class _Indexed(nn.Module):
    def __init__(self, idx=(0, 1, 2)):
        super().__init__()
        self.layers = nn.ModuleList([_IndexedBlock(i) for i in idx])

    def forward(self, x):
        for block in self.layers:
            x = block(x)
        return x


def test_layer_indices_continue_on_new_blocks():
    deep = growops.deepen(_Indexed(), layers=5, method="stack")
    assert [b.layer_idx for b in deep.layers] == [0, 1, 2, 3, 4]


def test_per_layer_values_growops_cannot_continue_are_refused():
    """The message names the value and shows its first four entries."""
    with pytest.raises(growops.GrowopsError, match=r"^layers: the blocks hold a per-layer value at layer_idx "
                                                   r"\(\(0, 5, 1, 2\)\.\.\.\) that growops cannot continue to new "
                                                   r"layers \(only integers that step by a constant"):
        growops.deepen(_Indexed((0, 5, 1, 2, 3)), layers=6)


class _ScaledOut(nn.Module):
    """Divides its output by its depth: inserting identity blocks changes it."""

    def __init__(self):
        super().__init__()
        self.n_layer = 2
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    @property
    def dummy_inputs(self):
        return (torch.ones(2, 4),)

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x / self.n_layer


def test_zero_refuses_when_the_probe_shows_a_changed_function():
    model = _ScaledOut()
    with pytest.raises(growops.GrowopsError, match="changed its output"):
        growops.deepen(model, layers=4)
    assert model.n_layer == 2 and len(model.layers) == 2


def test_fixed_blocks_stay_in_place():
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 8), *[_IndexedBlock(0) for _ in range(3)]])
            for b in self.layers[1:]:
                b.fc = nn.Linear(8, 8)

        def forward(self, x):
            for layer in self.layers:
                x = layer(x) if isinstance(layer, nn.Linear) else layer(x)
            return x

    torch.manual_seed(0)
    model = Model()
    x = torch.randn(2, 4)
    deep = growops.deepen(model, layers=7, example_inputs=(x,))
    assert isinstance(deep.layers[0], nn.Linear) and len(deep.layers) == 7
    assert torch.equal(deep(x), model(x))


@pytest.mark.parametrize("kwargs, match", [
    (dict(layers=2), "fewer than"),
    (dict(layers=6, method="grow"), "unknown method"),
    (dict(layers=6, stack=("blocks", "blocks")), "one stack per call"),
    (dict(layers=True), "layers must be an int"),
])
def test_bad_arguments_are_refused(kwargs, match):
    with pytest.raises(growops.GrowopsError, match=match):
        growops.deepen(tiny_gpt(3), **kwargs)


def test_a_non_residual_block_cannot_be_zero_inserted():
    with pytest.raises(growops.GrowopsError, match="not a residual block"):
        growops.deepen(SequentialNet(3), layers=6)
    assert len(growops.deepen(SequentialNet(3), layers=6, method="stack").blocks) == 6


def test_a_wrapped_model_is_refused_with_the_way_out():
    model = tiny_gpt(4)
    a = growops.apollo(model, stages=(1, 2, 4), stage_steps=(2, 4))
    for target in (a, a.model):
        with pytest.raises(growops.GrowopsError, match=r"deepen\(a.export\(\), ...\)"):
            growops.deepen(target, layers=8)
        with pytest.raises(growops.GrowopsError, match=r"widen\(a.export\(\), ...\)"):
            growops.widen(target, hidden=32)
    assert len(growops.deepen(a.export(), layers=8).blocks) == 8


# ---------------------------------------------------------------- Hugging Face models
transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _hf(name):
    torch.manual_seed(0)
    common = dict(vocab_size=64, bos_token_id=0, eos_token_id=0)
    if name == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, n_positions=32,
                                                                    **common))
    if name == "llama":
        return transformers.LlamaForCausalLM(transformers.LlamaConfig(
            num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            pad_token_id=0, **common))
    if name == "qwen2":  # per-layer attention kinds in config.layer_types
        return transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            num_hidden_layers=3, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
            use_sliding_window=True, sliding_window=4, max_window_layers=1, pad_token_id=0, **common))
    return transformers.BertForMaskedLM(transformers.BertConfig(num_hidden_layers=2, hidden_size=16,
                                                                num_attention_heads=2, intermediate_size=32,
                                                                vocab_size=64, max_position_embeddings=32))


def _perturbed(model):
    """Random weights everywhere, zero-initialised projections included, so that no test passes by an init."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return model.eval()


@pytest.mark.parametrize("name", ["gpt2", "llama", "qwen2"])
def test_zero_preserves_hf_models_and_round_trips(name, tmp_path):
    model = _perturbed(_hf(name))
    ids = torch.randint(1, 64, (2, 12), generator=torch.Generator().manual_seed(0))
    grown = grow_depth(model, 5 if name != "qwen2" else 7)
    deep = grown.model
    assert type(deep) is type(model) and deep.config.num_hidden_layers == len(deep.base_model.layers
                                                                              if name != "gpt2" else deep.transformer.h)
    assert grown.max_difference == 0.0
    with torch.no_grad():
        expected = model(ids).logits
        assert torch.equal(deep(ids).logits, expected)
        deep.save_pretrained(tmp_path)
        loaded = type(model).from_pretrained(tmp_path).eval()
        assert torch.equal(loaded(ids).logits, expected)
    assert model.config.num_hidden_layers in (2, 3)  # untouched


def test_layer_types_follow_their_blocks():
    model = _hf("qwen2")
    grown = grow_depth(model, layers=6)
    deep = grown.model
    assert model.config.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
    assert deep.config.layer_types == ["full_attention"] * 2 + ["sliding_attention"] * 4
    assert "config.layer_types: per-layer list extended to 6 entries" in grown.changes


def test_bert_is_post_norm_so_zero_is_refused_but_stacking_works():
    model = _hf("bert")
    with pytest.raises(growops.GrowopsError, match="post-norm"):
        growops.deepen(model, layers=4)
    deep = growops.deepen(model, layers=4, method="stack")
    assert deep.config.num_hidden_layers == 4 and len(deep.bert.encoder.layer) == 4
    assert torch.equal(deep.bert.encoder.layer[2].output.dense.weight, model.bert.encoder.layer[0].output.dense.weight)


def test_hf_dtypes_are_kept():
    model = _hf("llama").to(torch.bfloat16)
    deep = growops.deepen(model, layers=3)
    assert {p.dtype for p in deep.parameters()} == {torch.bfloat16}



def test_opt_views_its_stream_back_to_its_shape():
    """OPT (pre-norm) returns (residual + hidden).view(shape): a view back to the stream's own shape."""
    torch.manual_seed(0)
    model = _perturbed(transformers.OPTForCausalLM(transformers.OPTConfig(
        num_hidden_layers=2, hidden_size=16, ffn_dim=32, num_attention_heads=2, vocab_size=64,
        max_position_embeddings=32, word_embed_proj_dim=16)))
    grown = grow_depth(model, 4)
    assert grown.max_difference == 0.0 and len(grown.model.model.decoder.layers) == 4


def test_a_grown_model_that_fails_where_the_model_runs_is_reported_as_growops_fault():
    """The function-preservation probe: a grown model that raises on an input the model runs on is an error that
    says so (not "pass example_inputs"); an input neither runs on is skipped."""
    from growops.deepening import _probe_difference

    model, broken = nn.Linear(4, 3), nn.Linear(5, 3)
    with pytest.raises(growops.GrowopsError, match=r"grown Linear fails on .* which the model runs on: .*shapes"):
        _probe_difference(model, broken, (torch.randn(2, 4),))
    assert _probe_difference(model, broken, (torch.randn(2, 7),)) is None  # the model fails too: no probe
    diff, scale, _ = _probe_difference(model, model, (torch.randn(2, 4),))
    assert diff == 0 and scale > 0


def test_two_layer_indices_are_enough_to_continue():
    deep = growops.deepen(_Indexed((0, 1)), layers=4, method="stack")
    assert [b.layer_idx for b in deep.layers] == [0, 1, 2, 3]


def test_the_report_shows_twelve_sources_then_an_ellipsis():
    """grow_depth's change line lists which old unit each new one copies: all of them up to 12, then '...'."""
    changes = grow_depth(_Indexed(), layers=14, method="stack").changes[0]
    assert changes.endswith("unit j copies unit (0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2, ...))"), changes
    changes = grow_depth(_Indexed(), layers=12, method="stack").changes[0]
    assert changes.endswith("unit j copies unit (0, 1, 2, 0, 1, 2, 0, 1, 2, 0, 1, 2))"), changes


def test_the_depth_field_of_a_sub_config_is_the_one_set():
    """An encoder-decoder Hugging Face model keeps each stack's depth in a sub-config (config.encoder,
    config.decoder): deepening one stack sets its own field and leaves the other's."""
    sizes = dict(vocab_size=50, hidden_size=16, num_attention_heads=2, intermediate_size=32, max_position_embeddings=32)
    enc = transformers.BertConfig(num_hidden_layers=2, **sizes)
    dec = transformers.BertConfig(num_hidden_layers=3, is_decoder=True, add_cross_attention=True, **sizes)
    config = transformers.EncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    config.decoder_start_token_id = config.pad_token_id = 0
    torch.manual_seed(0)
    model = transformers.EncoderDecoderModel(config).eval()
    ids = torch.tensor([[1, 2, 3, 4]])
    inputs = dict(input_ids=ids, decoder_input_ids=ids)
    grown = grow_depth(model, layers=4, stack="encoder.encoder.layer", method="stack", example_inputs=inputs)
    assert grown.changes[1] == "config.encoder.num_hidden_layers: 2 -> 4"
    assert len(grown.model.encoder.encoder.layer) == grown.model.config.encoder.num_hidden_layers == 4
    assert grown.model.config.decoder.num_hidden_layers == 3 and model.config.encoder.num_hidden_layers == 2
    grown = grow_depth(model, layers=6, stack="decoder.bert.encoder.layer", method="stack", example_inputs=inputs)
    assert grown.changes[1] == "config.decoder.num_hidden_layers: 3 -> 6"


class _Alternating(nn.Module):
    """Blocks of two kinds, alternating: the stack grows in units of two blocks."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) if i % 2 == 0 else nn.Sequential(nn.Linear(4, 4), nn.Tanh())
                                     for i in range(4)])

    def forward(self, x):
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_a_depth_that_splits_a_unit_is_refused():
    with pytest.raises(growops.GrowopsError, match=r"layers grows in units of 2: layers must be 0 plus a multiple "
                                                   r"of 2, got 5$"):
        growops.deepen(_Alternating(), layers=5, example_inputs=(torch.randn(3, 4),))
    assert len(growops.deepen(_Alternating(), layers=6, example_inputs=(torch.randn(3, 4),)).layers) == 6


def test_zero_without_a_probe_input_says_the_function_was_not_checked(monkeypatch):
    model = tiny_gpt(3)
    monkeypatch.setattr(type(model), "dummy_inputs", None)  # no probe input of its own, not a Hugging Face model
    with pytest.warns(UserWarning, match=r"could not check that GPT's function is preserved.*example_inputs="):
        grown = growops.deepen(model, layers=6)
    assert len(grown.blocks) == 6
