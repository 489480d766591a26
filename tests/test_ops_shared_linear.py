"""growops::shared_linear and growops::linear_wgrad: the reference, fake and autograd registrations (CPU)."""

import os
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st

from growops.ops import linear_wgrad, shared_linear


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(dtype, with_bias):
    """Schema, fake (meta) implementation, autograd registration and dispatch agree (torch.library.opcheck)."""
    g, x = torch.randn(7, 6, dtype=dtype), torch.randn(7, 4, dtype=dtype)
    torch.library.opcheck(torch.ops.growops.linear_wgrad.default, (g, x, with_bias))
    x3 = torch.randn(2, 5, 4, dtype=dtype, requires_grad=True)
    w = torch.randn(6, 4, requires_grad=True)
    b = torch.randn(6, requires_grad=True) if with_bias else None
    torch.library.opcheck(torch.ops.growops.shared_linear.default, (x3, w, w.detach().to(dtype), b))


def test_gradcheck_in_double():
    x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, w, b: shared_linear(x, w, b), (x, w, b))


def test_forward_equals_f_linear_with_and_without_autocast():
    torch.manual_seed(0)
    x, w, b = torch.randn(3, 5, 8), torch.randn(6, 8), torch.randn(6)
    assert torch.equal(shared_linear(x, w, b), F.linear(x, w, b))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        ours, theirs = shared_linear(x, w, b), F.linear(x, w, b)
    assert ours.dtype == theirs.dtype == torch.bfloat16
    assert torch.equal(ours, theirs)


@given(k=st.integers(1, 6), tokens=st.integers(1, 40), n_in=st.integers(1, 24), n_out=st.integers(1, 24),
       bias=st.booleans(), seed=st.integers(0, 2**16))
def test_k_uses_sum_to_the_fp64_gradient_at_fp32_accuracy(k, tokens, n_in, n_out, bias, seed):
    """Property: a weight used k times (bf16 activations, fp32 weight) gets the fp64 sum of the k uses' gradients
    to fp32 accuracy, for any k: every use adds, none overwrites."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(n_out, n_in, generator=gen, requires_grad=True)
    b = torch.randn(n_out, generator=gen, requires_grad=True) if bias else None
    xs = [torch.randn(tokens, n_in, generator=gen).bfloat16() for _ in range(k)]
    gs = [torch.randn(tokens, n_out, generator=gen).bfloat16() for _ in range(k)]
    sum(shared_linear(x, w, b).float().mul(g.float()).sum() for x, g in zip(xs, gs)).backward()
    want_w = sum(g.double().t() @ x.double() for x, g in zip(xs, gs))
    assert w.grad.dtype == torch.float32
    assert _rel(w.grad, want_w) < 1e-6
    if bias:
        want_b = sum(g.double().sum(0) for g in gs)
        assert _rel(b.grad, want_b) < 1e-6


def test_later_use_adds_to_earlier_use_instead_of_overwriting():
    """The hazard a fused accumulation must avoid: the gradient is the sum over uses (and over backward calls),
    not the last use's."""
    w = torch.zeros(2, 2, requires_grad=True)
    x1, x2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    (shared_linear(x1, w).sum() + shared_linear(x2, w).sum()).backward()
    assert torch.equal(w.grad, torch.ones(2, 2))  # use 1 fills column 0, use 2 column 1
    shared_linear(x1, w).sum().backward()  # a second micro-batch accumulates too
    assert torch.equal(w.grad, torch.tensor([[2.0, 1.0], [2.0, 1.0]]))


def test_fp32_sum_beats_autocasts_bf16_sum():
    """Why the op exists: with 12 uses under bf16 autocast, PyTorch's own path sums the weight gradient in bf16;
    shared_linear's sum is fp32-exact. (Measured on CPU; the GPU figures are in benchmarks/RESULTS.md.)"""
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(32, 48, generator=gen)
    xs = [torch.randn(64, 48, generator=gen) for _ in range(12)]
    gs = [torch.randn(64, 32, generator=gen) for _ in range(12)]
    want = sum(g.bfloat16().double().t() @ x.bfloat16().double() for x, g in zip(xs, gs))
    errors = {}
    for name, fn in (("autocast", F.linear), ("shared_linear", shared_linear)):
        p = w.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = sum((fn(x, p) * g.bfloat16()).float().sum() for x, g in zip(xs, gs))
        loss.backward()
        errors[name] = _rel(p.grad, want)
    assert errors["shared_linear"] < 1e-6
    assert errors["autocast"] > 100 * errors["shared_linear"]


def test_linear_wgrad_shapes_and_dtypes():
    dw, db = linear_wgrad(torch.randn(5, 3, dtype=torch.bfloat16), torch.randn(5, 2, dtype=torch.bfloat16), False)
    assert dw.shape == (3, 2) and dw.dtype == torch.float32 and db.numel() == 0
    dw, db = linear_wgrad(torch.randn(0, 3), torch.randn(0, 2), True)  # no tokens: zero gradient
    assert torch.equal(dw, torch.zeros(3, 2)) and torch.equal(db, torch.zeros(3))


def test_second_order_gradients_equal_f_linears():
    """backward(create_graph=True) (a gradient penalty) runs differentiable ops and matches F.linear."""
    grads = []
    for fn in (F.linear, shared_linear):
        torch.manual_seed(0)
        x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        b = torch.randn(5, dtype=torch.float64, requires_grad=True)
        y = fn(x, w, b)
        (gx,) = torch.autograd.grad(y.tanh().sum(), x, create_graph=True)
        (y.square().sum() + gx.square().sum()).backward()
        grads.append((w.grad, b.grad, x.grad))
    for ours, theirs in zip(grads[1], grads[0]):
        torch.testing.assert_close(ours, theirs)


def test_frozen_weight_trainable_bias():
    torch.manual_seed(0)
    x, w = torch.randn(6, 4), torch.randn(3, 4)
    b = torch.randn(3, requires_grad=True)
    (shared_linear(x, w, b) * torch.arange(3.0)).sum().backward()
    assert w.grad is None
    torch.testing.assert_close(b.grad, torch.arange(3.0) * 6)


def test_fp64_input_stays_fp64_under_autocast_like_f_linear():
    x, w = torch.randn(2, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert shared_linear(x, w).dtype == F.linear(x, w).dtype == torch.float64


DTENSOR_SCRIPT = """
import os, tempfile, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import Shard, distribute_tensor
from growops.ops import shared_linear
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
mesh = init_device_mesh("cpu", (1,))
w = distribute_tensor(torch.randn(6, 4), mesh, [Shard(0)]).requires_grad_()
x = distribute_tensor(torch.randn(3, 4), mesh, [Shard(0)])
y = shared_linear(x, w)
y.sum().backward()
torch.testing.assert_close(y.full_tensor(), torch.nn.functional.linear(x.full_tensor(), w.full_tensor()))
dist.destroy_process_group()
print("dtensor ok")
"""


def test_dtensor_parameters_take_pytorchs_path():
    """Tensor parallelism: the op has no sharding rule, so DTensors go through F.linear (1 process, gloo)."""
    if not dist.is_available() or not dist.is_gloo_available():
        pytest.skip("needs gloo")
    out = subprocess.run([sys.executable, "-c", DTENSOR_SCRIPT], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "GLOO_SOCKET_IFNAME": "lo"})
    assert out.returncode == 0 and "dtensor ok" in out.stdout, out.stderr[-3000:]


def test_second_order_weight_gradient_equals_f_linears():
    """A gradient penalty on the weight's own gradient: backward(create_graph=True) returns a differentiable weight
    gradient equal to F.linear's, and differentiating it reaches x and the bias as F.linear's does."""
    results = []
    for fn in (F.linear, shared_linear):
        torch.manual_seed(0)
        x = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
        w = torch.randn(5, 4, dtype=torch.float64, requires_grad=True)
        b = torch.randn(5, dtype=torch.float64, requires_grad=True)
        (gw,) = torch.autograd.grad(fn(x, w, b).tanh().sum(), w, create_graph=True)
        gw.square().sum().backward()
        results.append((gw.detach(), x.grad, b.grad))
    for ours, theirs in zip(results[1], results[0]):
        torch.testing.assert_close(ours, theirs)


def test_dtensor_in_process_takes_pytorchs_path(monkeypatch):
    """The DTensor route, in this process (1-rank gloo group, torn down after): the same output and weight gradient
    as F.linear on the full tensors."""
    if not dist.is_available() or not dist.is_gloo_available() or dist.is_initialized():
        pytest.skip("needs gloo and no process group of the test run's own")
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    monkeypatch.setenv("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        mesh = init_device_mesh("cpu", (1,))
        torch.manual_seed(0)
        w_full, x_full = torch.randn(6, 4, requires_grad=True), torch.randn(3, 4)
        w = distribute_tensor(w_full.detach(), mesh, [Shard(0)]).requires_grad_()
        y = shared_linear(distribute_tensor(x_full, mesh, [Shard(0)]), w)
        y.sum().backward()
        F.linear(x_full, w_full).sum().backward()
        torch.testing.assert_close(y.full_tensor(), F.linear(x_full, w_full.detach()))
        torch.testing.assert_close(w.grad.full_tensor(), w_full.grad)
    finally:
        dist.destroy_process_group()
