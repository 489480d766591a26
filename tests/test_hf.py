"""The contract on Hugging Face models (random init, no downloads): GPT-2, BERT, LLaMA; ViT, Whisper and T5 without
example inputs."""

import copy

import pytest
import torch
from torch import nn

import growops

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()

VOCAB = 96


def gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=VOCAB,
                                                                n_positions=64, bos_token_id=0, eos_token_id=0))


def bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(num_hidden_layers=4, hidden_size=32,
                                                                num_attention_heads=2, intermediate_size=64,
                                                                vocab_size=VOCAB, max_position_embeddings=64))


def llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32,
                                                                  num_attention_heads=2, num_key_value_heads=2,
                                                                  intermediate_size=64, vocab_size=VOCAB,
                                                                  bos_token_id=0, eos_token_id=0, pad_token_id=0))


MODELS = {"gpt2": (gpt2, "transformer.h"), "bert": (bert, "bert.encoder.layer"), "llama": (llama, "model.layers")}


def _ids(seed=0, shape=(2, 10)):
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(params=sorted(MODELS))
def hf(request):
    make, path = MODELS[request.param]
    torch.manual_seed(0)
    return request.param, make, path


def test_single_stage_is_exact_and_found_by_export(hf):
    name, make, path = hf
    model = make().eval()
    ids = _ids()
    expected = model(input_ids=ids).logits
    a = growops.apollo(model, stages=(4,), stage_steps=())
    assert a.plan.stacks[0].path == path and a.mode == "container"
    assert list(a.plan.stacks[0].per_layer_values.values())[0] == (0, 1, 2, 3)  # layer_idx
    a.eval()
    assert torch.equal(a(input_ids=ids).logits, expected)


def test_trains_through_growth_and_exports(hf):
    name, make, _ = hf
    model = make()
    cls, keys = type(model), list(model.state_dict())
    a = growops.apollo(model, stages=(1, 2, 4), stage_steps=(2, 4), seed=1)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-3)
    ids = _ids()
    depths = []
    for _ in range(6):
        loss = a(input_ids=ids, labels=ids).loss
        assert torch.isfinite(loss)
        loss.backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
        depths.append(a.depth)
    assert a.unique_layers == 4 and a.stage == 2
    exported = a.export().eval()
    a.eval()
    assert type(exported) is cls and list(exported.state_dict()) == keys
    torch.testing.assert_close(exported(input_ids=ids).logits, a(input_ids=ids).logits)


@pytest.mark.parametrize("name", ["gpt2", "llama"])
def test_generate_with_kv_cache_while_sharing(name):
    """Positions that share a block get distinct layer_idx, so the KV cache keeps them apart."""
    torch.manual_seed(0)
    a = growops.apollo(MODELS[name][0](), stages=(1, 2, 4), stage_steps=(5, 10), optimizer_state="keep").eval()
    prompt = _ids(shape=(1, 4))
    kw = dict(max_new_tokens=6, do_sample=False)
    cached = a.model.generate(prompt, use_cache=True, **kw)
    uncached = a.model.generate(prompt, use_cache=False, **kw)
    assert torch.equal(cached, uncached)
    exported = a.export().eval()
    assert [blk.self_attn.layer_idx if name == "llama" else blk.attn.layer_idx
            for blk in (exported.model.layers if name == "llama" else exported.transformer.h)] == [0, 1, 2, 3]
    assert torch.equal(exported.generate(prompt, use_cache=True, **kw), cached)


def test_gradient_checkpointing_while_shared_gives_the_same_gradients():
    """GPT-2 scaled by 1 / (layer_idx + 1): a shared block recomputed in the backward gets its position's scaling."""
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=VOCAB, n_positions=64,
                                     scale_attn_by_inverse_layer_idx=True, resid_pdrop=0.0, embd_pdrop=0.0,
                                     attn_pdrop=0.0)
    ids = _ids()
    grads = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = transformers.GPT2LMHeadModel(config)
        a = growops.apollo(model, stages=(1, 4), stage_steps=(5,), sampler="full")
        assert "attn.scaling" in a.plan.stacks[0].per_layer_values  # set from layer_idx at init
        if checkpointing:
            model.activation_checkpointing_enable()
        a(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], msg=name)


def _vit():
    return transformers.ViTForImageClassification(transformers.ViTConfig(
        image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64,
        num_labels=3))


def _whisper():
    return transformers.WhisperForConditionalGeneration(transformers.WhisperConfig(
        encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=2, decoder_attention_heads=2,
        encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=VOCAB, num_mel_bins=16, max_source_positions=16,
        max_target_positions=32, pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
        suppress_tokens=None, begin_suppress_tokens=None))


def _t5():
    return transformers.T5ForConditionalGeneration(transformers.T5Config(
        num_layers=3, num_decoder_layers=3, d_model=32, d_kv=16, d_ff=64, num_heads=2, vocab_size=VOCAB,
        relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))


@pytest.mark.parametrize("make, stack, fixed", [
    (_vit, None, 0),  # dummy_inputs (input_ids) cannot run a vision model: inputs come from the config
    (_whisper, ("model.encoder.layers", "model.decoder.layers"), 0),  # audio encoder-decoder, both stacks grow
    (_t5, ("encoder.block", "decoder.block"), 1),  # block 0 of each stack owns the relative-position table: fixed
])
def test_vision_audio_and_encoder_decoder_models_need_no_example_inputs(make, stack, fixed):
    from growops.integrations.hf_inputs import config_inputs

    torch.manual_seed(0)
    model = make().eval()
    inputs = config_inputs(model)
    reference = model(**inputs)[0]
    plan = growops.plan(model, stack=stack)
    assert all(s.layout.prefix == fixed for s in plan.stacks) and len(plan.stacks) == (1 if stack is None else 2)
    layers = plan.layers
    whole = growops.apollo(copy.deepcopy(model), stages=(layers,), stage_steps=(), plan=plan).eval()
    assert torch.equal(whole(**inputs)[0], reference)  # one stage of all blocks is the model
    a = growops.apollo(model, stages=(layers // 2, layers), stage_steps=(1,), optimizer_state="keep", plan=plan).eval()
    before = a(**inputs)[0]
    a.step()  # growth by a multiple keeps the function
    torch.testing.assert_close(a(**inputs)[0], before, rtol=0, atol=1e-6)
    exported = a.export().eval()
    assert type(exported) is type(model) and list(exported.state_dict()) == list(model.state_dict())
    torch.testing.assert_close(exported(**inputs)[0], a(**inputs)[0], rtol=0, atol=1e-6)


def test_gpt_neo_per_layer_mask_buffers():
    """GPT-Neo's local layers bake their window into a causal-mask buffer: a per-layer value, given by position."""
    config = transformers.GPTNeoConfig(num_layers=4, hidden_size=32, num_heads=2, vocab_size=VOCAB,
                                       max_position_embeddings=64, attention_types=[[["global", "local"], 2]],
                                       window_size=4)
    torch.manual_seed(0)
    model = transformers.GPTNeoForCausalLM(config).eval()
    ids = _ids(shape=(2, 12))
    reference = model(input_ids=ids).logits
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), optimizer_state="keep").eval()
    assert "attn.attention.bias" in a.plan.stacks[0].per_layer_values
    before = a(input_ids=ids).logits
    a.step()
    torch.testing.assert_close(a(input_ids=ids).logits, before, rtol=0, atol=1e-6)  # 2 -> 4: a multiple
    exported = a.export().eval()
    torch.testing.assert_close(exported(input_ids=ids).logits, a(input_ids=ids).logits, rtol=0, atol=1e-6)
    masks = [blk.attn.attention.bias for blk in exported.transformer.h]
    assert not torch.equal(masks[0], masks[1]) and torch.equal(masks[1], masks[3])  # global, local, global, local
    assert reference.shape == before.shape


class _TwoInputs(nn.Module):
    """A vision-language model's shape: image and text inputs, the text's sizes in config.text_config."""

    main_input_name = "pixel_values"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(3, 3)

    def forward(self, pixel_values=None, input_ids=None):
        return self.fc(pixel_values.mean((2, 3)))


def test_config_inputs_read_the_text_config_and_every_length_limit():
    """The probe inputs built from a config: text ids for a model with a text_config, no longer than any limit found
    in the config or its text_config (max_position_embeddings, n_positions, max_target_positions)."""
    from types import SimpleNamespace

    from growops.integrations.hf_inputs import config_inputs

    vision = SimpleNamespace(image_size=4, num_channels=3)
    for text, length in ((SimpleNamespace(vocab_size=50, max_position_embeddings=5), 5),
                         (SimpleNamespace(vocab_size=50, n_positions=3), 3),
                         (SimpleNamespace(vocab_size=50, max_target_positions=6), 6),
                         (SimpleNamespace(vocab_size=50), 8)):
        inputs = config_inputs(_TwoInputs(SimpleNamespace(vision_config=vision, text_config=text)))
        assert sorted(inputs) == ["input_ids", "pixel_values"] and inputs["pixel_values"].shape == (2, 3, 4, 4)
        assert inputs["input_ids"].shape == (2, length) and int(inputs["input_ids"].max()) < 50


class _Audio(nn.Module):
    """A wav2vec2-like shape: raw audio in, its length set by the feature extractor's convolutions."""

    main_input_name = "input_values"

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.fc = nn.Linear(3, 3, device="meta")

    def forward(self, input_values=None):
        return input_values


def test_config_inputs_size_raw_audio_by_the_convolutions_on_the_model_device():
    """input_values long enough for 16 frames after the convolutions (kernel k, stride s: (n - 1) * s + k, last
    layer first), made on the model's device."""
    from types import SimpleNamespace

    from growops.integrations.hf_inputs import config_inputs

    inputs = config_inputs(_Audio(SimpleNamespace(conv_kernel=[10, 3], conv_stride=[5, 2])))
    assert list(inputs) == ["input_values"] and inputs["input_values"].shape == (2, ((16 - 1) * 2 + 3 - 1) * 5 + 10)
    assert inputs["input_values"].device.type == "meta"
    assert config_inputs(_Audio(SimpleNamespace(conv_kernel=[10, 3]))) is None  # no strides: no input
