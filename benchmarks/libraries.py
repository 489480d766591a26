"""Does growops keep its promises on models from libraries other than Hugging Face transformers? One row per model.

    python benchmarks/libraries.py                          # every model below, ~5 minutes on 2 cores
    python benchmarks/libraries.py timm_vit litgpt_gpt      # some of them
    python benchmarks/libraries.py --list                   # the models and their libraries
    python benchmarks/libraries.py --append                 # and append the table to benchmarks/RESULTS.md

The libraries are not growops' dependencies: run it with an interpreter that has them (a model whose library does
not import is reported as skipped), and growops from this tree, e.g. in a venv of its own::

    python3.11 -m venv /work/trial_venv
    /work/trial_venv/bin/pip install torch==2.13.0 numpy einops hypothesis pytest
    echo torch==2.13.0 > /tmp/c.txt
    /work/trial_venv/bin/pip install -c /tmp/c.txt timm torchvision x-transformers diffusers \\
        datasets sentencepiece tiktoken blobfile omegaconf psutil tokenizers \\
        "lightning>=2.6.1" "jsonargparse[signatures]>=4.37,<=4.41"
    /work/trial_venv/bin/pip install --no-deps torchtune==0.6.1 torchao==0.17.0 litgpt==0.5.13 torchaudio==2.11.1
    PYTHONPATH=. /work/trial_venv/bin/python benchmarks/libraries.py

(torchvision 0.28.0 and torchaudio 2.11.1 from PyPI are CUDA builds whose compiled ops do not load next to the CPU
torch; the models here use none of them, so ``_import_workarounds`` lets the pure-Python parts import. torchtune 0.6.1
wants torchao's ``dtypes.nf4tensor``, which torchao 0.18 removed.)

Each model is built tiny (width 16-32, 4-5 blocks in its stack) with a fixed seed, in its own process, and given one
batch; every parameter gets a little seeded noise (``perturb``), so that blocks cloned from one layer and
zero-initialised heads do not make the comparisons vacuous. It is planned twice:
- without inputs: ``growops.plan(model)``; where growops cannot trace without inputs (NeedsInputs), ``apollo`` is
  applied without inputs and plans at the first forward: that forward's output is compared with the model's;
- with inputs (``example_inputs=batch``), the plan the checks below use: its stacks, L and mode. A model with several
  stacks grows all of them together (``stack=(...)``) where they have the same L, else the longest.
Then
- identity: ``apollo(model, stages=(L,), stage_steps=())`` in eval against the model (largest |difference|);
- stage 0 vs model: ``stages=(L//2, L)`` (``(1, L)`` for odd L) evaluated before its growth against the model: not 0
  when the blocks matter, which makes the growth column mean something;
- growth: the evaluated output before and after the growth at step 1 (0 means function preserving);
- export: ``a.export()`` against ``a.eval()`` before the growth, and whether it has the model's class and keys;
- train: three optimizer steps at uniformly sampled depths through a growth at step 2; the output must have the
  model's structure (its tensors' shapes) at every depth, else the row says WRONG.
A refusal is a GrowopsError (its first line is shown); any other exception is a crash, a growops bug to report
unless it is the library's own.
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
import types
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LIBRARIES = ("torch", "timm", "torchvision", "x_transformers", "diffusers", "torchtune", "litgpt", "torchaudio")


def _import_workarounds() -> None:
    """Let torchvision and torchaudio import next to a CPU torch when their compiled ops (CUDA builds) do not load.

    torchvision registers fake kernels for its C++ ops at import (``torchvision._meta_registrations``), which fails
    when the ops were not loaded; torchaudio loads ``_torchaudio.so`` at import. No model here uses those ops."""
    try:
        import torchvision  # noqa: F401
    except ImportError:
        pass
    except (RuntimeError, OSError):
        for key in [k for k in sys.modules if k == "torchvision" or k.startswith("torchvision.")]:
            del sys.modules[key]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision  # noqa: F401,F811
    try:
        import torchaudio  # noqa: F401
    except ImportError:
        pass
    except (RuntimeError, OSError):
        for key in [k for k in sys.modules if k == "torchaudio" or k.startswith("torchaudio.")]:
            del sys.modules[key]
        ext = types.ModuleType("torchaudio._extension")
        ext._IS_TORCHAUDIO_EXT_AVAILABLE = False
        ext._IS_ALIGN_AVAILABLE = False
        ext.fail_if_no_align = lambda f: f
        sys.modules["torchaudio._extension"] = ext
        import torchaudio  # noqa: F401,F811


def _quiet() -> None:
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.disable(logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")


# --- the models: each builder returns (model, batch) with batch = (args, kwargs) --------------------------------------


def _ids(batch: int = 2, length: int = 8, vocab: int = 100):
    import torch

    return torch.randint(0, vocab, (batch, length), generator=torch.Generator().manual_seed(1))


def _randn(*shape):
    import torch

    return torch.randn(*shape, generator=torch.Generator().manual_seed(1))


def _image(size: int = 32):
    return _randn(2, 3, size, size)


def timm_vit():
    from timm.models.vision_transformer import VisionTransformer

    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3,
                             drop_path_rate=0.1), ((_image(),), {})  # a drop-path rate per block


def timm_beit():
    from timm.models.beit import Beit

    return Beit(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3, use_abs_pos_emb=False,
                use_rel_pos_bias=True, init_values=0.1), ((_image(),), {})


def timm_eva():
    """EVA: a rotary embedding the forward computes once and passes to every block."""
    from timm.models.eva import Eva

    return Eva(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, num_classes=3, use_rot_pos_emb=True,
               ref_feat_shape=(4, 4)), ((_image(),), {})


def timm_swin():
    from timm.models.swin_transformer import SwinTransformer

    return SwinTransformer(img_size=32, patch_size=4, embed_dim=16, depths=(2, 4), num_heads=(2, 2), window_size=4,
                           num_classes=3, drop_path_rate=0.0), ((_image(),), {})


def timm_convnext():
    from timm.models.convnext import ConvNeXt

    return ConvNeXt(depths=(1, 1, 4, 1), dims=(16, 16, 32, 32), num_classes=3, ls_init_value=0.1), \
        ((_image(),), {})


def timm_resnet():
    from timm.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 4, 1], num_classes=3, channels=(16, 16, 32, 32), stem_width=16,
                  zero_init_last=False), ((_image(),), {})


def timm_mixer():
    from timm.models.mlp_mixer import MlpMixer

    return MlpMixer(img_size=32, patch_size=8, embed_dim=32, num_blocks=4, num_classes=3), ((_image(),), {})


def tv_vit():
    from torchvision.models import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=32, mlp_dim=64,
                             num_classes=3), ((_image(),), {})


def tv_resnet():
    from torchvision.models.resnet import BasicBlock, ResNet

    return ResNet(BasicBlock, [1, 1, 4, 1], num_classes=3), ((_image(),), {})


def tv_swin():
    from torchvision.models import SwinTransformer

    # stochastic_depth_prob: a rate per block, growing with depth
    return SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 4], num_heads=[2, 2], window_size=[4, 4],
                           stochastic_depth_prob=0.1, num_classes=3), ((_image(),), {})


def xt_decoder():
    from x_transformers import Decoder, TransformerWrapper

    return TransformerWrapper(num_tokens=100, max_seq_len=32, attn_layers=Decoder(dim=32, depth=4, heads=2)), \
        ((_ids(),), {})


def diffusers_dit():
    import torch
    from diffusers import DiTTransformer2DModel

    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=16, in_channels=4, num_layers=4,
                                  sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_num_groups=4)
    return model, ((_randn(2, 4, 8, 8),), {"timestep": torch.tensor([1, 5]), "class_labels": torch.tensor([0, 3])})


def diffusers_flux():
    """Flux: a stack of dual-stream blocks (each returns two tensors) and one of single-stream blocks, grown
    together."""
    import torch
    from diffusers import FluxTransformer2DModel

    model = FluxTransformer2DModel(patch_size=1, in_channels=8, num_layers=2, num_single_layers=2,
                                   attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                   pooled_projection_dim=16, axes_dims_rope=(4, 6, 6))
    image, text = 16, 4
    kwargs = {"hidden_states": _randn(2, image, 8), "encoder_hidden_states": _randn(2, text, 16),
              "pooled_projections": _randn(2, 16), "timestep": torch.tensor([0.5, 0.25]),
              "img_ids": torch.zeros(image, 3), "txt_ids": torch.zeros(text, 3)}
    return model, ((), kwargs)


def diffusers_sd3():
    """SD3's MMDiT: the last joint block is different (context_pre_only)."""
    import torch
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=4,
                                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=16,
                                  caption_projection_dim=32, pooled_projection_dim=16, pos_embed_max_size=8)
    kwargs = {"hidden_states": _randn(2, 4, 8, 8), "encoder_hidden_states": _randn(2, 4, 16),
              "pooled_projections": _randn(2, 16), "timestep": torch.tensor([1, 5])}
    return model, ((), kwargs)


def diffusers_unet():
    import torch
    from diffusers import UNet2DModel

    model = UNet2DModel(sample_size=16, in_channels=3, out_channels=3, block_out_channels=(16, 32),
                        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                        layers_per_block=2, norm_num_groups=4)
    return model, ((_randn(2, 3, 16, 16), torch.tensor([1, 5])), {})


def torchtune_llama3():
    from torchtune.models.llama3 import llama3

    return llama3(vocab_size=100, num_layers=4, num_heads=2, num_kv_heads=1, embed_dim=32, max_seq_len=64,
                  intermediate_dim=64), ((_ids(),), {})


def torchtune_llama3_hidden0():
    """torchtune's output_hidden_states=[0]: the forward returns the embeddings (layer 0's input) with the logits, a
    value of no block, which does not change with depth."""
    model, batch = torchtune_llama3()
    model.output_hidden_states = [0]
    return model, batch


def torchtune_llama3_hidden3():
    """output_hidden_states=[3]: the forward returns layer 3's input (layer 2's output) with the logits, which at a
    depth under 4 is not there."""
    model, batch = torchtune_llama3()
    model.output_hidden_states = [3]
    return model, batch


def torchtune_qwen2_tied():
    from torchtune.models.qwen2 import qwen2

    return qwen2(vocab_size=100, num_layers=4, num_heads=2, num_kv_heads=1, embed_dim=32, intermediate_dim=64,
                 max_seq_len=64, tie_word_embeddings=True), ((_ids(),), {})


def _litgpt(**extra):
    from litgpt import GPT, Config

    config = Config(**{**dict(block_size=64, vocab_size=100, padded_vocab_size=100, n_layer=4, n_head=2, n_embd=32),
                       **extra})
    return GPT(config), ((_ids(),), {})


def litgpt_gpt():
    return _litgpt(rotary_percentage=0.5, parallel_residual=True)


def litgpt_gemma3():
    """Gemma 3's layout: sliding-window and global layers alternating, with a RoPE of their own (rope_indices, read
    by the forward's loop), post-norms and qk-norm."""
    from litgpt import GPT, Config

    config = Config.from_name("Gemma-3-1b-it", block_size=64, vocab_size=100, padded_vocab_size=100, n_layer=4,
                              n_head=2, n_embd=32, head_size=16, intermediate_size=64, sliding_window_size=4,
                              sliding_window_indices=[1, 0, 1, 0], rope_indices=[1, 0, 1, 0])
    return GPT(config), ((_ids(),), {})


def litgpt_moe():
    """A mixture of experts whose first block is dense (DeepSeek's first_k_dense_replace)."""
    return _litgpt(n_layer=5, n_query_groups=1, bias=False, parallel_residual=False, norm_class_name="RMSNorm",
                   mlp_class_name="LLaMAMoE", intermediate_size=32, moe_intermediate_size=32, n_expert=4,
                   n_expert_per_token=2, first_k_dense_replace=1)


def nn_transformer_encoder():
    from torch import nn

    layer = nn.TransformerEncoderLayer(32, 2, 64, dropout=0.0, batch_first=True)
    return nn.TransformerEncoder(layer, 4, enable_nested_tensor=False), ((_randn(2, 8, 32),), {})


def nn_transformer():
    from torch import nn

    model = nn.Transformer(d_model=32, nhead=2, num_encoder_layers=4, num_decoder_layers=4, dim_feedforward=64,
                           dropout=0.0, batch_first=True)
    return model, ((_randn(2, 8, 32), _randn(2, 6, 32)), {})


def torchaudio_conformer():
    import torch
    from torchaudio.models import Conformer

    return Conformer(input_dim=32, num_heads=2, ffn_dim=64, num_layers=4, depthwise_conv_kernel_size=3), \
        ((_randn(2, 10, 32), torch.tensor([10, 8])), {})


def torchaudio_wav2vec2():
    from torchaudio.models import wav2vec2_model

    model = wav2vec2_model("group_norm", [(16, 10, 5), (16, 3, 2), (16, 3, 2)], False, 32, 0.0, 16, 2, 4, 2, 0.0,
                           64, 0.0, 0.0, False, 0.0, 10)
    return model, ((_randn(2, 800),), {})


# name: (library, builder, blocks it was built with: the stages of the no-inputs check where growops finds no plan)
MODELS = {
    "timm_vit": ("timm", timm_vit, 4),
    "timm_beit": ("timm", timm_beit, 4),
    "timm_eva": ("timm", timm_eva, 4),
    "timm_swin": ("timm", timm_swin, 4),
    "timm_convnext": ("timm", timm_convnext, 4),
    "timm_resnet": ("timm", timm_resnet, 3),
    "timm_mixer": ("timm", timm_mixer, 4),
    "tv_vit": ("torchvision", tv_vit, 4),
    "tv_resnet": ("torchvision", tv_resnet, 3),
    "tv_swin": ("torchvision", tv_swin, 4),
    "xt_decoder": ("x_transformers", xt_decoder, 4),
    "diffusers_dit": ("diffusers", diffusers_dit, 4),
    "diffusers_flux": ("diffusers", diffusers_flux, 2),
    "diffusers_sd3": ("diffusers", diffusers_sd3, 3),
    "diffusers_unet": ("diffusers", diffusers_unet, 2),
    "torchtune_llama3": ("torchtune", torchtune_llama3, 4),
    "torchtune_llama3_hidden0": ("torchtune", torchtune_llama3_hidden0, 4),
    "torchtune_llama3_hidden3": ("torchtune", torchtune_llama3_hidden3, 4),
    "torchtune_qwen2_tied": ("torchtune", torchtune_qwen2_tied, 4),
    "litgpt_gpt": ("litgpt", litgpt_gpt, 4),
    "litgpt_gemma3": ("litgpt", litgpt_gemma3, 4),
    "litgpt_moe": ("litgpt", litgpt_moe, 4),
    "nn_transformer_encoder": ("torch", nn_transformer_encoder, 4),
    "nn_transformer": ("torch", nn_transformer, 4),
    "torchaudio_conformer": ("torchaudio", torchaudio_conformer, 4),
    "torchaudio_wav2vec2": ("torchaudio", torchaudio_wav2vec2, 4),
}


# --- the checks -----------------------------------------------------------------------------------------------------


def first_float(out):
    """The first floating-point tensor of a model output (logits, say)."""
    import torch

    if torch.is_tensor(out):
        return out if out.is_floating_point() else None
    if hasattr(out, "to_tuple"):
        items = out.to_tuple()
    elif isinstance(out, dict):
        items = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        return None
    for item in items:
        found = first_float(item) if item is not None else None
        if found is not None:
            return found
    return None


def structure(out) -> list:
    """The shapes of an output's tensors, in order (None where the output holds None): what a(...) must return at any
    depth, as model(...) does."""
    import torch

    if out is None:
        return [None]
    if torch.is_tensor(out):
        return [tuple(out.shape)]
    if hasattr(out, "to_tuple"):
        items = out.to_tuple()
    elif isinstance(out, dict):
        items = out.values()
    elif isinstance(out, (tuple, list)):
        items = out
    else:
        return [type(out).__name__]
    return [shape for item in items for shape in structure(item)]


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0]


def _outcome(e: BaseException, phase: str) -> dict:
    """A refusal (a GrowopsError: what growops says it cannot do) or a crash (anything else: a bug to report)."""
    import growops

    if isinstance(e, growops.GrowopsError):
        return {"refused": f"{phase}: {_first_line(e)}"}
    import traceback

    where = [f for f in traceback.extract_tb(e.__traceback__)]
    own = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(where) if "/growops/" in f.filename), "?")
    return {"crash": f"{phase}: {type(e).__name__}: {_first_line(e)} (last growops frame {own})"}


def _several(error: str) -> tuple[str, ...] | None:
    """The stacks a 'several block stacks' refusal names, those of the most common length first (all of them where
    they agree), else the longest alone."""
    if "several block stacks" not in error:
        return None
    found = [(path, int(n)) for path, n in re.findall(r"'([\w.\[\]:]+)' \((\d+) blocks\)", error)]
    if not found:
        return None
    lengths = {n for _, n in found}
    if len(lengths) == 1:
        return tuple(p for p, _ in found)
    return (max(found, key=lambda pn: pn[1])[0],)


def _run(model, batch, shapes: list | None = None):
    """The first float tensor of model(batch); the output's structure appended to `shapes` if given."""
    args, kwargs = batch
    out = model(*args, **kwargs)
    if shapes is not None:
        shapes.append(structure(out))
    return first_float(out)


def _diff(x, y) -> float:
    if x is None or y is None:
        return float("nan")
    if x.shape != y.shape:
        return float("inf")
    return float((x.double() - y.double()).abs().max())


def _plan(model, example_inputs, chosen: list):
    """growops.plan(model) with the stacks chosen as described in the module docstring (appended to `chosen`)."""
    import growops

    try:
        return growops.plan(model, example_inputs=example_inputs)
    except growops.GrowopsError as e:
        stack = _several(str(e))
        if stack is None:
            raise
        chosen.append(stack)
        return growops.plan(model, stack=stack, example_inputs=example_inputs)


def perturb(model, seed: int = 0, std: float = 0.02) -> None:
    """Add N(0, std^2) noise to every parameter, so that blocks cloned from one layer (nn.TransformerEncoder) and
    zero-initialised heads (torchvision's ViT, timm's Mixer) do not make the comparisons vacuous."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)


def _without_inputs(model, batch, reference, layers: int, stack) -> dict:
    """What growops does with no example inputs: a plan found at once, or (NeedsInputs) ``apollo`` planning at the
    first forward, whose output is compared with the model's; a refusal or a crash."""
    import torch

    import growops
    from growops.fx.trace import NeedsInputs

    try:
        try:
            growops.plan(model, stack=stack)
            return {"no_inputs": "plans at once"}
        except NeedsInputs:
            pass
        a = growops.apollo(copy.deepcopy(model), stages=(layers,), stage_steps=(), stack=stack).eval()
        if a.planned:
            return {"no_inputs": "apollo plans at once (plan() needs inputs)"}
        with torch.no_grad():
            out = _run(a, batch)
        if not a.planned:
            return {"no_inputs": "NOT planned by the first forward"}
        return {"no_inputs": f"plans at first forward (identity {_diff(out, reference):.1e})"}
    except Exception as e:  # noqa: BLE001 - reported
        r = _outcome(e, "no inputs")
        return {"no_inputs": f"refused: {r['refused']}"} if "refused" in r else \
            {"no_inputs": "CRASH", "crash": r["crash"]}


def check(name: str) -> dict:
    """Build `name` with a fixed seed, apply growops as a user would, check the invariants; a row of results."""
    _quiet()
    _import_workarounds()
    import torch

    import growops

    torch.set_num_threads(1)  # tiny models on shared cores: more threads only contend
    library, builder, blocks = MODELS[name]
    row: dict = {"library": library}
    torch.manual_seed(0)
    try:
        model, batch = builder()
    except Exception as e:  # noqa: BLE001 - the library, not growops
        return row | {"skipped": f"build: {type(e).__name__}: {_first_line(e)}"}
    perturb(model)
    model = model.eval()
    row["model"] = type(model).__name__
    expected: list = []
    with torch.no_grad():
        reference = _run(model, batch, expected)
    chosen: list = []
    try:
        plan = _plan(model, batch, chosen)
    except Exception as e:  # noqa: BLE001 - reported
        return row | _outcome(e, "plan") | _without_inputs(model, batch, reference, blocks, (chosen or [None])[0])
    stack = (chosen or [None])[0]
    layers = plan.layers
    row |= {"stacks": [s.describe() for s in plan.stacks], "mode": plan.mode, "L": layers,
            "per_layer": sorted({p for s in plan.stacks for p in s.per_layer_values})}
    row |= _without_inputs(model, batch, reference, layers, stack)
    stages = (layers // 2, layers) if layers % 2 == 0 else (1, layers)
    row["stages"] = list(stages)
    try:
        with torch.no_grad():
            phase = "identity"
            whole = growops.apollo(copy.deepcopy(model), stages=(layers,), stage_steps=(), plan=plan,
                                   example_inputs=batch).eval()
            row["identity"] = _diff(_run(whole, batch), reference)
            phase = "growth"
            a = growops.apollo(copy.deepcopy(model), stages=stages, stage_steps=(1,), optimizer_state="keep",
                               plan=plan, example_inputs=batch).eval()
            before = _run(a, batch)
            row["shared"] = _diff(before, reference)  # > 0: the blocks matter, so a growth diff of 0 says something
            phase = "export"
            exported = a.export().eval()
            row["export"] = _diff(_run(exported, batch), before)
            row["export_class_keys"] = type(exported) is type(model) and \
                list(exported.state_dict()) == list(model.state_dict())
            phase = "growth"
            a.step()
            row["growth"] = _diff(_run(a, batch), before)
        phase = "train"
        a = growops.apollo(copy.deepcopy(model), stages=stages, stage_steps=(2,), sampler="uniform", seed=1,
                           plan=plan, example_inputs=batch).train()
        opt = torch.optim.AdamW(a.parameters(), lr=1e-3)
        depths, shapes = [], []
        for _ in range(3):
            depths.append(a.depth)
            loss = _run(a, batch, shapes).float().square().mean()
            if shapes[-1] != expected[0] and "wrong" not in row:
                row["wrong"] = f"train: at depth {a.depth} of {a.layers} the output is {shapes[-1]}, the model's is " \
                    f"{expected[0]}"
            loss.backward()
            opt.step()
            opt.zero_grad()
            a.step(opt)
        finite = bool(torch.isfinite(loss))
        row["train"] = f"depths {','.join(map(str, depths))}, unique {a.unique_layers}/{a.layers}" + \
            ("" if finite else ", loss NOT finite")
    except Exception as e:  # noqa: BLE001 - reported
        row |= _outcome(e, phase)
    return row


def _run_one(name: str, timeout: int) -> dict:
    start = time.time()
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])))
    try:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, env=env,
                             timeout=timeout)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {
            "crash": "process: " + (out.stderr.strip().splitlines() or ["?"])[-1]}
    except subprocess.TimeoutExpired:
        row = {"crash": f"timed out after {timeout} s"}
    return {"name": name, "library": MODELS[name][0], "seconds": round(time.time() - start, 1)} | row


def _number(x) -> str:
    return "-" if x is None else f"{x:.1e}"


def table(rows: list[dict]) -> str:
    lines = ["| library | model | outcome | what grows (mode) | without inputs | identity | stage 0 vs model "
             "| growth | export (class, keys) | train |", "|" + " --- |" * 10]
    for r in rows:
        if "skipped" in r:
            lines.append(f"| {r['library']} | {r['name']} | skipped: {r['skipped'][:200]} | | | | | | | |")
            continue
        outcome = "pass"
        if "refused" in r:
            outcome = f"refused: {r['refused'][:300]}"
        if "wrong" in r:
            outcome = f"**WRONG** {r['wrong'][:300]}"
        if "crash" in r:
            outcome = f"**CRASH** {r['crash'][:300]}"
        what = f"{'; '.join(r['stacks'])} ({r['mode']})" if "stacks" in r else ""
        what += f"; per layer: {', '.join(r['per_layer'])}" if r.get("per_layer") else ""
        no_inputs = r.get("no_inputs", "")
        if "refused" in r and no_inputs.partition(": ")[2].partition(": ")[2] == r["refused"].partition(": ")[2]:
            no_inputs = "the same refusal"
        export = f"{_number(r['export'])} ({'yes' if r['export_class_keys'] else 'NO'})" if "export" in r else ""
        shared = f"{_number(r['shared'])} (stages {tuple(r['stages'])})" if "shared" in r else ""
        cells = [r["library"], f"{r['name']} ({r.get('model', '?')})", outcome, what, no_inputs[:300],
                 _number(r.get("identity")) if "identity" in r else "", shared,
                 _number(r.get("growth")) if "growth" in r else "", export, r.get("train", "")]
        lines.append("| " + " | ".join(str(c).replace("|", "/").replace("\n", " ") for c in cells) + " |")
    return "\n".join(lines)


def versions() -> str:
    """The installed versions of the libraries (by distribution metadata: importing them is the checks' business)."""
    from importlib import metadata

    found = []
    for module in LIBRARIES:
        try:
            found.append(f"{module} {metadata.version(module.replace('_', '-'))}")
        except metadata.PackageNotFoundError:
            found.append(f"{module} missing")
    return ", ".join(found)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to check (default: all {len(MODELS)})")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--list", action="store_true", help="list the models and exit")
    parser.add_argument("--timeout", type=int, default=150, help="seconds per model")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(check(args.one)))
        return
    if args.list:
        for name, (library, _, _) in MODELS.items():
            print(f"{name:24s} {library}")
        return
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        parser.error(f"unknown models {unknown}; --list shows them")
    rows = []
    for name in args.names or MODELS:
        rows.append(_run_one(name, args.timeout))
        r = rows[-1]
        print(f"{name}: {r.get('crash') or r.get('wrong') or r.get('refused') or r.get('skipped') or 'pass'} "
              f"({r['seconds']} s)", file=sys.stderr, flush=True)
    text = table(rows)
    print(text)
    if args.append:
        command = "python benchmarks/libraries.py" + (" " + " ".join(args.names) if args.names else "")
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n### libraries: {datetime.date.today()}, CPU ({platform.machine()}, {os.cpu_count()} cores), "
                    f"Python {platform.python_version()}; {versions()}\n\n`{command}` (example inputs given; one "
                    f"process per model; {sum(r['seconds'] for r in rows):.0f} s in all)\n\n{text}\n")


if __name__ == "__main__":
    main()
