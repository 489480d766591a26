"""A linear layer whose weight gradient is computed and summed in fp32, however many times it is used per step.

Apollo runs one block at several positions in a step, so every linear layer in a shared block has k uses. Under
autocast PyTorch casts the fp32 weight to bf16 once and sums the k uses' weight gradients into that bf16 copy, so
the sum carries bf16 rounding (relative error ~3e-3). Here each use returns its weight gradient in fp32 and autograd
sums the k of them into the fp32 parameter's ``.grad``: the sum is fp32-exact.

Two ops, declared once here (``torch.library``), each with a reference implementation in plain torch, a fake
(meta) implementation for tracing, and, for the backward op, a CUDA kernel registered by
``growops.ops.extension`` when the ``growops_cuda`` extension builds:

    growops::shared_linear(x, weight, weight_lp, bias) -> y      y = x @ weight_lp.T + bias   (autograd below)
    growops::linear_wgrad(grad_out, x, with_bias) -> (dW, db)    dW = grad_out.T @ x, db = grad_out.sum(0), fp32

``weight`` is the parameter (the gradient goes to it); ``weight_lp`` is the same values in x's dtype, cast once per
weight update rather than once per use (see ``compute_weight``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor
from torch.utils.flop_counter import register_flop_formula

__all__ = ["compute_dtype", "compute_weight", "linear_wgrad", "shared_linear"]


# ---------------------------------------------------------------------------------------------------- linear_wgrad
@torch.library.custom_op("growops::linear_wgrad", mutates_args=())
def linear_wgrad(grad_out: Tensor, x: Tensor, with_bias: bool) -> tuple[Tensor, Tensor]:
    """Weight and bias gradient of one use of a linear layer, accumulated and returned in fp32.

    grad_out (N, out) and x (N, in) in the compute dtype -> dW (out, in), db (out,) (empty without bias), both fp32
    (fp64 for fp64 inputs). Invariant: dW equals ``grad_out.double().T @ x.double()`` to fp32 accuracy, whatever
    the input dtype.
    """
    return _wgrad_reference(grad_out, x, with_bias)


_MM_OUT_DTYPE = [True]  # torch.mm(..., out_dtype=) works here; set False the first time it does not


def _accumulate_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.promote_types(dtype, torch.float32)


def _wgrad_reference(grad_out: Tensor, x: Tensor, with_bias: bool) -> tuple[Tensor, Tensor]:
    acc = _accumulate_dtype(grad_out.dtype)
    dw = None
    if grad_out.is_cuda and grad_out.dtype in (torch.bfloat16, torch.float16) and _MM_OUT_DTYPE[0]:
        # cuBLAS with fp32 output: low-precision inputs, fp32 accumulation, no fp32 copies of the inputs.
        try:
            dw = torch.mm(grad_out.t(), x, out_dtype=torch.float32)  # (out, in)
        except (NotImplementedError, TypeError):  # a torch without mm(out_dtype=) for these inputs
            _MM_OUT_DTYPE[0] = False
    if dw is None:
        # Products of bf16/fp16 values are exact in fp32, so upcasting first is the fp32-accumulation reference.
        dw = grad_out.to(acc).t() @ x.to(acc)  # (out, in)
    db = grad_out.sum(0, dtype=acc) if with_bias else grad_out.new_empty(0, dtype=acc)
    return dw, db


@linear_wgrad.register_fake
def _(grad_out: Tensor, x: Tensor, with_bias: bool) -> tuple[Tensor, Tensor]:
    acc = _accumulate_dtype(grad_out.dtype)
    dw = grad_out.new_empty(grad_out.shape[1], x.shape[1], dtype=acc)
    db = grad_out.new_empty(grad_out.shape[1] if with_bias else 0, dtype=acc)
    return dw, db


# --------------------------------------------------------------------------------------------------- shared_linear
@torch.library.custom_op("growops::shared_linear", mutates_args=())
def _shared_linear(x: Tensor, weight: Tensor, weight_lp: Tensor, bias: Tensor | None) -> Tensor:
    return F.linear(x, weight_lp, None if bias is None else bias.to(x.dtype))


@_shared_linear.register_fake
def _(x: Tensor, weight: Tensor, weight_lp: Tensor, bias: Tensor | None) -> Tensor:
    return x.new_empty(*x.shape[:-1], weight_lp.shape[0])


def _setup_context(ctx, inputs, output) -> None:
    x, weight, weight_lp, bias = inputs
    ctx.save_for_backward(x, weight_lp, weight)
    ctx.bias_dtype = None if bias is None else bias.dtype


def _backward(ctx, grad: Tensor):
    x, weight_lp, weight = ctx.saved_tensors
    need_x, need_w, _, need_b = ctx.needs_input_grad
    grad = grad.to(x.dtype)
    g2, x2 = rearrange(grad, "... o -> (...) o"), rearrange(x, "... i -> (...) i")  # (N, out), (N, in)
    acc = _accumulate_dtype(x.dtype)
    if torch.is_grad_enabled():
        # backward(create_graph=True), e.g. a gradient penalty: differentiable ops, the same values.
        grad_x = grad @ weight.to(x.dtype) if need_x else None
        grad_w = (g2.to(acc).t() @ x2.to(acc)).to(weight.dtype) if need_w else None
        grad_b = g2.sum(0, dtype=acc).to(ctx.bias_dtype) if need_b else None
        return grad_x, grad_w, None, grad_b
    grad_x = grad @ weight_lp if need_x else None  # (..., in)
    grad_w = grad_b = None
    if need_w:
        dw, db = linear_wgrad(g2, x2, need_b)
        grad_w = dw.to(weight.dtype)  # fp32 for an fp32 parameter: the k uses are summed in fp32
        grad_b = db.to(ctx.bias_dtype) if need_b else None
    elif need_b:  # a frozen weight with a trainable bias (BitFit): no weight GEMM
        grad_b = g2.sum(0, dtype=acc).to(ctx.bias_dtype)
    return grad_x, grad_w, None, grad_b


torch.library.register_autograd("growops::shared_linear", _backward, setup_context=_setup_context)


# FlopCounterMode sees a custom op as one call it has no formula for (it would count 0): give it the GEMMs' FLOPs.
@register_flop_formula(torch.ops.growops.shared_linear)
def _shared_linear_flops(x_shape, weight_shape, weight_lp_shape, bias_shape, *args, **kwargs) -> int:
    return 2 * math.prod(x_shape[:-1]) * weight_lp_shape[0] * weight_lp_shape[1]


@register_flop_formula(torch.ops.growops.linear_wgrad)
def _linear_wgrad_flops(grad_out_shape, x_shape, *args, **kwargs) -> int:
    return 2 * grad_out_shape[0] * grad_out_shape[1] * x_shape[1]


def _is_dtensor(t: Tensor | None) -> bool:
    # By name, so that checking never imports torch.distributed.
    return t is not None and type(t).__name__ == "DTensor"


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype F.linear would compute in for input `x`: the autocast dtype under autocast (fp64 stays fp64)."""
    device_type = x.device.type
    if torch.is_autocast_enabled(device_type) and x.is_floating_point() and x.dtype != torch.float64:
        return torch.get_autocast_dtype(device_type)
    return x.dtype


def compute_weight(weight: Tensor, dtype: torch.dtype) -> Tensor:
    """``weight`` in `dtype`, detached: the copy the GEMMs read (the gradient goes to ``weight`` itself)."""
    return weight.detach() if weight.dtype == dtype else weight.detach().to(dtype)


def shared_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None, weight_lp: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` whose weight and bias gradients are fp32 sums over every use.

    Under autocast x is cast to the autocast dtype as ``F.linear`` would be, and the GEMMs run in it; without
    autocast they run in x's dtype. ``weight_lp`` may pass a cached ``compute_weight(weight, dtype)``.

        >>> w = torch.randn(3, 4, requires_grad=True); x = torch.randn(2, 5, 4)
        >>> shared_linear(x, w).shape
        torch.Size([2, 5, 3])
    """
    if _is_dtensor(x) or _is_dtensor(weight):
        return F.linear(x, weight, bias)  # tensor parallelism: the op has no sharding rule, PyTorch's path has
    x = x.to(compute_dtype(x))
    if weight_lp is None or weight_lp.dtype != x.dtype:
        weight_lp = compute_weight(weight, x.dtype)
    return _shared_linear(x, weight, weight_lp, bias)
