"""Does growops keep its promises on Hugging Face architectures it was not written for? One row per model.

    python benchmarks/architectures.py                  # every model below, ~8 minutes on 2 cores
    python benchmarks/architectures.py gpt2 t5 jamba    # some of them
    python benchmarks/architectures.py --append         # and append the table to benchmarks/RESULTS.md

Each model is built from a tiny random config (nothing is downloaded) and checked in its own process, with no
example inputs given: the plan growops finds (stacks, fixed blocks, units, per-layer values), then
- identity: one stage of all units equals the original model, bit for bit;
- growth: the largest |difference| of the evaluated output across a growth by a multiple (0 means preserved);
- export: the largest |difference| between ``a.export()`` and ``a.eval()`` mid-schedule, and whether the exported
  model has the original class and state_dict keys;
- train: three optimizer steps at sampled depths through a growth.
A model with several stacks grows all of them together (``stack=(...)``).
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2)
LLAMA = dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1,
             vocab_size=100, max_position_embeddings=64, **TOKENS)
DEEPSEEK = dict(num_hidden_layers=5, hidden_size=32, intermediate_size=64, moe_intermediate_size=16,
                num_attention_heads=2, num_key_value_heads=2, n_routed_experts=4, num_experts_per_tok=2,
                n_shared_experts=1, kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8,
                v_head_dim=8, n_group=1, topk_group=1, vocab_size=100, max_position_embeddings=64, **TOKENS)
BERT = dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, intermediate_size=64, vocab_size=100,
            max_position_embeddings=66)
AUDIO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16, 16),
             conv_stride=(5, 2, 2), conv_kernel=(10, 3, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
             vocab_size=100, **TOKENS)
SEQ2SEQ = dict(encoder_layers=2, decoder_layers=2, d_model=32, encoder_attention_heads=2, decoder_attention_heads=2,
               encoder_ffn_dim=64, decoder_ffn_dim=64, vocab_size=100)

# name: (config class, model class, config, stack= or None)
MODELS = {
    "gpt2": ("GPT2Config", "GPT2LMHeadModel", dict(n_layer=4, n_embd=32, n_head=2, vocab_size=100, n_positions=64)),
    "gpt_neo": ("GPTNeoConfig", "GPTNeoForCausalLM",
                dict(num_layers=4, hidden_size=32, num_heads=2, vocab_size=100, max_position_embeddings=64,
                     attention_types=[[["global", "local"], 2]], window_size=8)),
    "gptj": ("GPTJConfig", "GPTJForCausalLM", dict(n_layer=4, n_embd=32, n_head=2, rotary_dim=8, vocab_size=100,
                                                   n_positions=64)),
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",
                 dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=2, intermediate_size=64,
                      vocab_size=100, max_position_embeddings=64)),
    "opt": ("OPTConfig", "OPTForCausalLM", dict(num_hidden_layers=4, hidden_size=32, ffn_dim=64, num_attention_heads=2,
                                                vocab_size=100, max_position_embeddings=64, word_embed_proj_dim=32)),
    "bloom": ("BloomConfig", "BloomForCausalLM", dict(n_layer=4, hidden_size=32, n_head=2, vocab_size=100)),
    "falcon": ("FalconConfig", "FalconForCausalLM", dict(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                                                         vocab_size=100)),
    "llama": ("LlamaConfig", "LlamaForCausalLM", LLAMA),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(LLAMA, sliding_window=8)),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(LLAMA, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", LLAMA),
    "qwen2_moe": ("Qwen2MoeConfig", "Qwen2MoeForCausalLM",
                  dict(LLAMA, num_hidden_layers=5, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                       shared_expert_intermediate_size=32, decoder_sparse_step=1, mlp_only_layers=[0])),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(LLAMA, head_dim=16)),
    "gemma": ("GemmaConfig", "GemmaForCausalLM", dict(LLAMA, head_dim=16)),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(LLAMA, head_dim=16, sliding_window=8)),
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(LLAMA, num_hidden_layers=6, head_dim=16,
                                                                   sliding_window=8)),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(num_hidden_layers=4, hidden_size=32, intermediate_size=64,
                                                num_attention_heads=2, vocab_size=100, max_position_embeddings=64)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", LLAMA),
    "stablelm": ("StableLmConfig", "StableLmForCausalLM", LLAMA),
    "deepseek_v2": ("DeepseekV2Config", "DeepseekV2ForCausalLM", dict(DEEPSEEK, first_k_dense_replace=1)),
    "deepseek_v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM", dict(DEEPSEEK, first_k_dense_replace=1)),
    "jamba": ("JambaConfig", "JambaForCausalLM",
              dict(LLAMA, num_experts=2, num_experts_per_tok=1, expert_layer_period=2, expert_layer_offset=1,
                   attn_layer_period=2, attn_layer_offset=1, mamba_d_state=8, mamba_d_conv=4, mamba_expand=2,
                   mamba_dt_rank=8, use_mamba_kernels=False)),
    "bert": ("BertConfig", "BertForMaskedLM", BERT),
    "roberta": ("RobertaConfig", "RobertaForMaskedLM", dict(BERT, pad_token_id=1)),
    "distilbert": ("DistilBertConfig", "DistilBertForMaskedLM",
                   dict(n_layers=4, dim=32, n_heads=2, hidden_dim=64, vocab_size=100, max_position_embeddings=64)),
    "electra": ("ElectraConfig", "ElectraForMaskedLM", dict(BERT, embedding_size=16)),
    "deberta_v2": ("DebertaV2Config", "DebertaV2ForMaskedLM",
                   dict(BERT, relative_attention=True, position_buckets=16, pos_att_type=["p2c", "c2p"])),
    "modernbert": ("ModernBertConfig", "ModernBertForMaskedLM",
                   dict(num_hidden_layers=5, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                        vocab_size=100, max_position_embeddings=64, global_attn_every_n_layers=2, local_attention=8,
                        **TOKENS)),
    "albert": ("AlbertConfig", "AlbertForMaskedLM", dict(BERT, embedding_size=16)),
    "t5": ("T5Config", "T5ForConditionalGeneration",
           dict(num_layers=3, num_decoder_layers=3, d_model=32, d_kv=16, d_ff=64, num_heads=2, vocab_size=100,
                relative_attention_num_buckets=8, decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)),
    "bart": ("BartConfig", "BartForConditionalGeneration",
             dict(SEQ2SEQ, max_position_embeddings=64, pad_token_id=1, bos_token_id=0, eos_token_id=2,
                  decoder_start_token_id=2, forced_eos_token_id=2)),
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration",
                dict(SEQ2SEQ, num_mel_bins=16, max_source_positions=16, max_target_positions=32,
                     decoder_start_token_id=1, suppress_tokens=None, begin_suppress_tokens=None, **TOKENS)),
    "vit": ("ViTConfig", "ViTForImageClassification",
            dict(image_size=32, patch_size=8, hidden_size=32, num_hidden_layers=4, num_attention_heads=2,
                 intermediate_size=64, num_labels=3)),
    "clip": ("CLIPConfig", "CLIPModel",
             dict(text_config=dict(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                   num_attention_heads=2, max_position_embeddings=32, **TOKENS),
                  vision_config=dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2), projection_dim=16)),
    "swin": ("SwinConfig", "SwinForImageClassification",
             dict(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=2,
                  num_labels=3)),
    "wav2vec2": ("Wav2Vec2Config", "Wav2Vec2ForCTC", AUDIO),
    "hubert": ("HubertConfig", "HubertForCTC", AUDIO),
    "longformer": ("LongformerConfig", "LongformerForMaskedLM",
                   dict(BERT, max_position_embeddings=70, attention_window=[4, 4, 4, 4], pad_token_id=1)),
}


def _first_float(out):
    """The first floating-point tensor of a model output (logits, say)."""
    import torch

    if torch.is_tensor(out):
        return out if out.is_floating_point() else None
    items = out.to_tuple() if hasattr(out, "to_tuple") else (out.values() if isinstance(out, dict) else out)
    for item in items:
        found = _first_float(item) if item is not None else None
        if found is not None:
            return found
    return None


def check(name: str) -> dict:
    """Build `name`, apply growops as a user would (no example inputs), check the invariants; a row of results."""
    import torch
    import transformers

    import growops
    from growops.integrations.hf_inputs import config_inputs

    transformers.logging.set_verbosity_error()
    config_cls, model_cls, config = MODELS[name]
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    row = {"model": model_cls}
    try:
        plan = growops.plan(model)
    except growops.GrowopsError as e:
        several = re.findall(r"'([\w.]+)' \(\d+ blocks\)", str(e))
        if "several block stacks" not in str(e):
            return row | {"refused": str(e)}
        plan = growops.plan(model, stack=tuple(several))
    row |= {"stacks": [s.describe() for s in plan.stacks], "mode": plan.mode,
            "per_layer": sorted({p for s in plan.stacks for p in s.per_layer_values})}
    inputs = config_inputs(model)
    inputs |= {"use_cache": False} if "use_cache" in model.forward.__code__.co_varnames else {}
    layers = plan.layers
    stages = (layers // 2, layers) if layers % 2 == 0 else (1, layers)
    with torch.no_grad():
        reference = _first_float(model(**inputs))
        whole = growops.apollo(copy.deepcopy(model), stages=(layers,), stage_steps=(), plan=plan).eval()
        row["identity"] = bool(torch.equal(_first_float(whole(**inputs)), reference))
        a = growops.apollo(copy.deepcopy(model), stages=stages, stage_steps=(1,), optimizer_state="keep",
                           plan=plan).eval()
        before = _first_float(a(**inputs))
        exported = a.export().eval()
        row["export"] = float((_first_float(exported(**inputs)) - before).abs().max())
        row["export_class_keys"] = type(exported) is type(model) and \
            list(exported.state_dict()) == list(model.state_dict())
        a.step()
        row["growth"] = float((_first_float(a(**inputs)) - before).abs().max())
    a = growops.apollo(copy.deepcopy(model), stages=stages, stage_steps=(2,), sampler="uniform", seed=1,
                       plan=plan).train()
    opt = torch.optim.AdamW(a.parameters(), lr=1e-3)
    for _ in range(3):
        _first_float(a(**inputs)).float().square().mean().backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
    row["train"] = f"{a.step_count} steps, unique {a.unique_layers}/{a.layers}"
    return row


def _run_one(name: str, timeout: int) -> dict:
    start = time.time()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT))
    try:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, env=env,
                             timeout=timeout)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    except subprocess.TimeoutExpired:
        row = {"error": f"timed out after {timeout} s"}
    return {"name": name, "seconds": round(time.time() - start, 1)} | row


def table(rows: list[dict]) -> str:
    lines = ["| model | what grows | per-layer values | identity | growth max diff | export max diff (class, keys) "
             "| train |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        if "refused" in r or "error" in r:
            text = (r.get("refused") or r.get("error")).replace("|", "/")
            lines.append(f"| {r['name']} | {'refused' if 'refused' in r else 'error'}: {text[:300]} | | | | | |")
            continue
        lines.append(f"| {r['name']} | {'; '.join(r['stacks'])} ({r['mode']}) | {', '.join(r['per_layer']) or '-'} "
                     f"| {'yes' if r['identity'] else 'NO'} | {r['growth']:.1e} | {r['export']:.1e} "
                     f"({'yes' if r['export_class_keys'] else 'NO'}) | {r['train']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to check (default: all {len(MODELS)})")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=240, help="seconds per model")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(check(args.one)))
        return
    rows = [_run_one(name, args.timeout) for name in (args.names or MODELS)]
    text = table(rows)
    print(text)
    if args.append:
        import torch
        import transformers

        command = "python benchmarks/architectures.py" + (" " + " ".join(args.names) if args.names else "")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n### architectures: {datetime.date.today()}, CPU ({platform.machine()}), torch "
                    f"{torch.__version__}, transformers {transformers.__version__}\n\n`{command}` (no example "
                    f"inputs given; one process per model; {sum(r['seconds'] for r in rows):.0f} s in all)\n\n"
                    f"{text}\n")


if __name__ == "__main__":
    main()
