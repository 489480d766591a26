"""PEFT: an adapter-only checkpoint of a model growops grows would go with a base it does not carry: refused; the
whole model saves as a.eval() computes it."""

import pytest
import torch

import growops

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
transformers.logging.set_verbosity_error()
CONFIG = dict(n_layer=4, n_embd=32, n_head=2, vocab_size=96, n_positions=32, resid_pdrop=0.0, embd_pdrop=0.0,
              attn_pdrop=0.0)
IDS = torch.arange(24).reshape(2, 12) % 96


def test_an_adapter_only_save_is_refused_and_the_export_is_the_model(tmp_path):
    torch.manual_seed(0)
    model = peft.get_peft_model(transformers.GPT2LMHeadModel(transformers.GPT2Config(**CONFIG)),
                                peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    a = growops.apollo(model, stages=(1, 2, 4), stage_steps=(1, 3))  # traced on inputs built for its base model
    opt = torch.optim.AdamW([p for p in a.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        a(input_ids=IDS, labels=IDS, use_cache=False).loss.backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
    with pytest.raises(growops.GrowopsError, match=r"an adapter-only checkpoint \(PEFT's save_pretrained\) of a model "
                                                   r"growops grows would go with a base model it does not carry"):
        model.save_pretrained(str(tmp_path / "adapter"))
    assert not (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    a.eval()
    with torch.no_grad():
        expected = a(input_ids=IDS, use_cache=False).logits
        merged = a.export().merge_and_unload().eval()
        torch.testing.assert_close(merged(input_ids=IDS, use_cache=False).logits, expected, rtol=1e-5, atol=1e-5)
