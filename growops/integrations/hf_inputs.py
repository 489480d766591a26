"""Example inputs for a Hugging Face model, built from its config and ``main_input_name`` (no download, no data).

``PreTrainedModel.dummy_inputs`` is ``{"input_ids": ...}`` for nearly every model in transformers 5, which vision,
audio and two-tower models cannot run on. These inputs follow what each kind of model takes (checked on 38
architectures; the survey's notes are in the issue history):

- ``input_ids`` / ``decoder_input_ids``: token ids below ``vocab_size`` (``text_config``'s for two-tower models),
  a short sequence within the position limit;
- ``pixel_values``: ``(2, num_channels, image_size, image_size)`` from the config or ``vision_config``;
- ``input_values`` (wav2vec2-style audio): enough samples for the convolutional feature extractor to give 16 frames;
- ``input_features`` (Whisper): ``(2, num_mel_bins, 2 * max_source_positions)``, the length its encoder checks.

Importing this module does not import transformers.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

_BATCH, _LENGTH, _FRAMES, _IMAGE = 2, 8, 16, 64


def is_hf_model(model: nn.Module) -> bool:
    """A transformers ``PreTrainedModel`` (checked by its classes' modules, without importing transformers)."""
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__) and hasattr(model, "config")


def hf_model(model: nn.Module) -> nn.Module | None:
    """The transformers model that decides `model`'s inputs: `model` itself, or the base model a PEFT wrapper
    (``get_base_model()``) holds; None for other models."""
    if is_hf_model(model):
        return model
    base = getattr(model, "get_base_model", None)
    if callable(base):
        try:
            inner = base()
        except Exception:  # noqa: BLE001 - not a PEFT wrapper after all
            return None
        return inner if isinstance(inner, nn.Module) and is_hf_model(inner) else None
    return None


def candidate_inputs(model: nn.Module) -> list[tuple[str, Any]] | None:
    """Inputs to trace a Hugging Face model (or a PEFT wrapper of one) on, for ``growops.fx.trace``: its
    ``dummy_inputs`` where they hold its main input, then inputs built from its config; None for other models."""
    from ..fx.trace import dummy_inputs

    hf = hf_model(model)
    if hf is None:
        return None
    out = []
    dummy = dummy_inputs(model)
    if dummy is not None and runs_on(model, dummy):
        out.append(("its dummy_inputs", dummy))
    built = config_inputs(hf)
    if built is not None:
        out.append(("inputs built from its config", built))
    return out


def runs_on(model: nn.Module, inputs: Any) -> bool:
    """False where `inputs` are keyword inputs that lack the model's main input (a ResNet's ``dummy_inputs`` hold
    ``input_ids``, its forward takes ``pixel_values``): not worth a trace."""
    hf = hf_model(model)
    main = getattr(hf, "main_input_name", None) if hf is not None else None
    return not (isinstance(inputs, dict) and isinstance(main, str) and main not in inputs)


def config_inputs(model: nn.Module) -> dict[str, torch.Tensor] | None:
    """Keyword inputs `model` runs on, built from its config; None where the main input is of an unknown kind."""
    config = model.config
    try:
        params = inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        params = {}
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    main = getattr(model, "main_input_name", "input_ids")
    wanted = [main]
    if _get(config, "vision_config") is not None and "pixel_values" in params:
        wanted.append("pixel_values")
    if _get(config, "text_config") is not None and "input_ids" in params:
        wanted.append("input_ids")
    if _get(config, "is_encoder_decoder") and "decoder_input_ids" in params:
        wanted.append("decoder_input_ids")
    inputs = {}
    for name in dict.fromkeys(wanted):
        value = _build(name, config, device)
        if value is None:
            return None
        inputs[name] = value
    return inputs


def _build(name: str, config: Any, device: torch.device) -> torch.Tensor | None:
    g = torch.Generator().manual_seed(0)
    if name in ("input_ids", "decoder_input_ids"):
        vocab = _get(config, "vocab_size") or _get(_get(config, "text_config"), "vocab_size")
        if not vocab:
            return None
        limits = [_get(c, k) for c in (config, _get(config, "text_config"))
                  for k in ("max_position_embeddings", "n_positions", "max_target_positions")]
        length = min([_LENGTH] + [n for n in limits if isinstance(n, int) and n > 0])
        return torch.randint(1, vocab, (_BATCH, length), generator=g).to(device)
    if name == "pixel_values":
        vision = _get(config, "vision_config") or config
        # No image_size (ResNet-style convolutional models take any size): one that survives a /32 downsampling.
        size, channels = _get(vision, "image_size") or _IMAGE, _get(vision, "num_channels") or 3
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return torch.randn(_BATCH, channels, h, w, generator=g).to(device)
    if name == "input_values":
        kernels, strides = _get(config, "conv_kernel"), _get(config, "conv_stride")
        if not kernels or not strides:
            return None
        length = _FRAMES
        for k, s in reversed(list(zip(kernels, strides))):  # the input length that yields _FRAMES frames
            length = (length - 1) * s + k
        return torch.randn(_BATCH, length, generator=g).to(device)
    if name == "input_features":
        mels, positions = _get(config, "num_mel_bins"), _get(config, "max_source_positions")
        if not mels or not positions:
            return None
        return torch.randn(_BATCH, mels, 2 * positions, generator=g).to(device)
    return None


def _get(config: Any, key: str) -> Any:
    return None if config is None else getattr(config, key, None)
