"""Routing a model's linear layers through growops::shared_linear: invisible, reversible, wired into apollo."""

import copy
import io
import types

import pytest
import torch
from torch import nn

import growops
from growops.ops import SharedLinear, route_shared_linears, unroute
from tests.models import IndexLoopNet, gpt_batch, tiny_gpt


class MyLinear(nn.Linear):
    """A user's own Linear subclass (LoRA, quantized...): never routed."""


def test_route_keeps_parameters_keys_and_outputs_and_unroute_leaves_no_trace():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.GELU(), MyLinear(8, 4))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    dict_keys = [sorted(m.__dict__) for m in model.modules()]
    x = torch.randn(3, 4)
    want = model(x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want_bf16 = model(x)
    params = list(model.parameters())
    assert route_shared_linears([model]) == 1
    assert type(model[0]) is SharedLinear and type(model[2]) is MyLinear
    assert list(model.parameters()) == params and list(model.state_dict()) == list(before)
    assert torch.equal(model(x), want)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(model(x), want_bf16)
    assert unroute(model) == 1
    assert type(model[0]) is nn.Linear
    assert [sorted(m.__dict__) for m in model.modules()] == dict_keys
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_cast_weight_is_reused_within_a_forward_and_renewed_at_the_next():
    """The bf16 copy lives for one forward of the stack (the runtime empties its cache when a forward starts), not
    for one version of the weight: fused AdamW updates parameters in place without bumping their version counter."""
    torch.manual_seed(0)
    runtime = types.SimpleNamespace(cast_cache={})  # what a StackRuntime provides
    layer = nn.Linear(8, 8)
    route_shared_linears([layer], runtime=runtime)
    opt = torch.optim.AdamW(layer.parameters(), lr=0.1, fused=True)
    x = torch.randn(4, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        first = layer(x)
        cached = runtime.cast_cache[id(layer)][1]
        assert torch.equal(layer(x), first) and runtime.cast_cache[id(layer)][1] is cached  # reused
    first.float().square().mean().backward()
    version = layer.weight._version
    opt.step()
    assert layer.weight._version == version  # why the version counter cannot be the key
    runtime.cast_cache.clear()  # the next forward
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_no_cast_is_cached_in_inference_mode():
    runtime = types.SimpleNamespace(cast_cache={})
    layer = nn.Linear(8, 8)
    route_shared_linears([layer], runtime=runtime)
    x = torch.randn(4, 8)
    with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x)
    assert runtime.cast_cache == {}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        layer(x).float().sum().backward()  # would fail on a cached inference tensor
    assert layer.weight.grad is not None


def test_hf_gpt2_conv1d_is_routed_and_computes_the_same():
    transformers = pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    config = transformers.GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(config).eval()
    ids = torch.randint(0, 64, (2, 8))
    want = model(input_ids=ids, labels=ids)
    want.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    assert route_shared_linears(model.transformer.h) == 8  # c_attn, c_proj, c_fc, c_proj per block
    assert all(type(m).__name__ == "SharedConv1D" for m in model.transformer.h.modules() if isinstance(m, Conv1D))
    got = model(input_ids=ids, labels=ids)
    got.loss.backward()
    torch.testing.assert_close(got.logits, want.logits)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, grads[n], rtol=1e-5, atol=1e-6, msg=n)
    buffer = io.BytesIO()
    torch.save(model, buffer)  # the routed class pickles under a stable name
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    torch.testing.assert_close(loaded(input_ids=ids).logits, want.logits)


def test_apollo_shared_linear_trains_like_the_plain_path_and_exports_plain_modules():
    batch = gpt_batch()
    losses = {}
    for routed in (False, True):
        a = growops.apollo(tiny_gpt(6), stages=(1, 2, 6), stage_steps=(3, 6), sampler="uniform", seed=0,
                           shared_linear=routed)
        assert any(type(m) is SharedLinear for m in a.modules()) == routed
        opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
        losses[routed] = []
        for _ in range(8):  # through two growths
            loss = a(**batch).loss
            loss.backward()
            opt.step()
            opt.zero_grad()
            a.step(opt)
            losses[routed].append(loss.item())
        exported = a.export()
        assert not any(type(m) is SharedLinear for m in exported.modules())
        assert not any("_growops_runtime" in m.__dict__ for m in exported.modules())
        assert list(exported.state_dict()) == list(tiny_gpt(6).state_dict())
    assert losses[True] == pytest.approx(losses[False], rel=1e-5)


def test_apollo_auto_routes_only_where_cuda_is_available():
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,))
    assert any(type(m) is SharedLinear for m in a.modules()) == torch.cuda.is_available()


@pytest.mark.parametrize("bad", ["yes", 1, None])
def test_apollo_rejects_a_bad_shared_linear_switch_before_touching_the_model(bad):
    model = tiny_gpt(4)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(growops.GrowopsError, match="shared_linear must be True, False or 'auto'"):
        growops.apollo(model, stages=(1, 4), stage_steps=(2,), shared_linear=bad)
    assert not any(type(m) is SharedLinear for m in model.modules())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("impl", [{"foreach": True}, {"fused": True}, {"foreach": False}])
def test_routed_layers_see_every_optimizer_update_under_apollo(impl):
    """Through apollo, under bf16 autocast, every routed layer's output equals F.linear on its current weights at
    every step, whatever the optimizer implementation."""
    a = growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(2, 4), sampler="uniform", shared_linear=True)
    checked = []

    def check(module, inputs, output):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = torch.nn.functional.linear(inputs[0], module.weight, module.bias)
        assert torch.equal(output, want)
        checked.append(1)

    for m in a.modules():
        if type(m) is SharedLinear:
            m.register_forward_hook(check)
    opt = torch.optim.AdamW(a.parameters(), lr=0.05, **impl)
    batch = gpt_batch()
    for _ in range(5):  # through two growths
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = a(**batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
    assert len(checked) > 0


def _tiny_gpt2(n_layer=4):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=n_layer, n_embd=32, n_head=2, vocab_size=64, n_positions=16)
    torch.manual_seed(0)
    return transformers.GPT2LMHeadModel(config)


def test_routed_gpt2_conv1d_uses_the_cast_cache_and_sees_every_update_under_apollo():
    """GPT-2's Conv1D (weight (in, out)) under apollo and bf16 autocast: every routed layer's output is x @ W + b on
    its current weights at every step, through two growths, and it reads its weight from the runtime's cast cache."""
    from growops.ops.routing import SharedConv1D

    a = growops.apollo(_tiny_gpt2(), stages=(1, 2, 4), stage_steps=(2, 4), sampler="uniform", shared_linear=True)
    runtime = a._runtimes[0]
    checked = []

    def check(module, inputs, output):
        key, cached = runtime.cast_cache[id(module)]  # cast once per forward, kept by the runtime
        assert key == (torch.bfloat16, module.weight.device, module.weight.data_ptr())
        assert torch.equal(cached, module.weight.detach().to(torch.bfloat16))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            want = torch.nn.functional.linear(inputs[0], module.weight.t(), module.bias)  # x @ W + b
        assert output.shape == want.shape and torch.equal(output, want)
        checked.append(module)

    routed = [m for m in a.modules() if type(m) is SharedConv1D]
    assert len(routed) == 16  # c_attn, attn.c_proj, c_fc, mlp.c_proj in each of 4 blocks
    for m in routed:
        m.register_forward_hook(check)
    opt = torch.optim.AdamW(a.parameters(), lr=0.05, fused=True)
    ids = torch.randint(0, 64, (2, 8), generator=torch.Generator().manual_seed(1))
    for _ in range(5):  # through two growths
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = a(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
    assert a.unique_layers == 4 and len(checked) >= 5 * 4


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_the_forward_computes_with_the_cached_weight(kind):
    """Whatever the cache holds for this forward is what the layer multiplies by (for Conv1D, the cached (in, out)
    copy transposed): put 2W there and the output is x @ (2W) + b."""
    runtime = types.SimpleNamespace(cast_cache={})
    torch.manual_seed(0)
    if kind == "linear":
        layer = nn.Linear(8, 8)
    else:
        # weight (in, out), square so that a missing transpose runs (and computes the wrong thing)
        layer = pytest.importorskip("transformers.pytorch_utils").Conv1D(8, 8)
        torch.nn.init.normal_(layer.bias)
    route_shared_linears([layer], runtime=runtime)
    w = layer.weight.detach()
    doubled = (2 * w).to(torch.bfloat16)
    runtime.cast_cache[id(layer)] = ((torch.bfloat16, w.device, w.data_ptr()), doubled)
    x = torch.randn(3, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = layer(x)
        want = torch.nn.functional.linear(x, 2 * w if kind == "linear" else (2 * w).t(), layer.bias)
        plain = torch.nn.functional.linear(x, w if kind == "linear" else w.t(), layer.bias)
    assert runtime.cast_cache[id(layer)][1] is doubled
    assert torch.equal(got, want) and not torch.allclose(got, plain)


@pytest.mark.parametrize("make, inputs", [(lambda: tiny_gpt(4), lambda: gpt_batch()),
                                          (lambda: IndexLoopNet(4), lambda: {"x": torch.randn(3, 4)})],
                         ids=["container", "graph"])
def test_the_cast_cache_is_emptied_when_a_forward_starts_and_at_step(make, inputs):
    """A weight changed in place between two forwards (no a.step(); the key, the weight's address, is unchanged) is
    seen by the next forward; a.step() frees every cached cast."""
    a = growops.apollo(make(), stages=(2, 4), stage_steps=(9,), shared_linear=True)
    runtime, x = a._runtimes[0], inputs()
    layers = [m for m in a.modules() if type(m) is SharedLinear]
    checked = []

    def check(module, args, output):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert torch.equal(output, torch.nn.functional.linear(args[0], module.weight, module.bias))
        checked.append(module)

    for m in layers:
        m.register_forward_hook(check)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a(**x)
    assert runtime.cast_cache  # the casts outlive the forward
    with torch.no_grad():
        for m in layers:
            m.weight.add_(1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        a(**x)
    assert runtime.cast_cache and len(checked) >= 2 * 2  # two forwards of at least two positions
    a.step()
    assert runtime.cast_cache == {}


def test_a_users_own_class_named_conv1d_is_not_routed():
    class Conv1D(nn.Module):  # not Hugging Face's: same name, other class
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, 4))

        def forward(self, x):
            return x @ self.weight

    model = nn.Sequential(Conv1D(), nn.Linear(4, 4))
    assert route_shared_linears([model]) == 1
    assert type(model[0]) is Conv1D and type(model[1]) is SharedLinear


def test_the_routed_conv1d_class_is_built_once_under_a_stable_importable_name(monkeypatch):
    """Built on first use (transformers is optional), named so that pickle finds it as
    growops.ops.routing.SharedConv1D, and a subclass of Conv1D whose forward is the routed one."""
    pytest.importorskip("transformers")
    from transformers.pytorch_utils import Conv1D

    from growops.ops import routing

    monkeypatch.delitem(routing.__dict__, "SharedConv1D", raising=False)
    cls = routing.SharedConv1D  # built by the module's __getattr__
    assert routing.__dict__["SharedConv1D"] is cls and routing.SharedConv1D is cls  # and kept
    assert (cls.__name__, cls.__qualname__, cls.__module__) == ("SharedConv1D", "SharedConv1D", "growops.ops.routing")
    assert cls.__bases__ == (Conv1D,) and cls._growops_original is Conv1D and cls.forward is routing._conv1d_forward
    layer = Conv1D(6, 4)
    route_shared_linears([layer])
    assert type(layer) is cls
    buffer = io.BytesIO()
    torch.save(layer, buffer)
    buffer.seek(0)
    x = torch.randn(2, 4)
    assert torch.equal(torch.load(buffer, weights_only=False)(x), layer(x))
    with pytest.raises(AttributeError, match="growops.ops.routing' has no attribute 'SharedLinear2'"):
        routing.SharedLinear2  # noqa: B018 - only SharedConv1D is built on demand


def test_unroute_counts_every_layer_and_drops_their_cached_casts():
    runtime = types.SimpleNamespace(cast_cache={})
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
    assert route_shared_linears([model], runtime=runtime) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(torch.randn(2, 4))
    assert set(runtime.cast_cache) == {id(model[0]), id(model[1])}
    assert unroute(model) == 2
    assert runtime.cast_cache == {}


def test_a_block_replaced_after_wrapping_gets_routed_linears_tied_to_its_stack():
    """shared_linear=True routes the blocks' linears; a block the user replaces later (structurally the same) is
    adopted at the next forward with its linears routed too, casting once per forward through the stack's cache."""
    model = tiny_gpt(4)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), shared_linear=True)
    replacement = copy.deepcopy(tiny_gpt(4).blocks[1])
    model.blocks[1] = replacement
    a(**gpt_batch())
    linears = [m for m in replacement.modules() if isinstance(m, nn.Linear)]
    assert linears and all(isinstance(m, SharedLinear) for m in linears)
    assert all(m.__dict__["_growops_runtime"] is a._runtimes[0] for m in linears)
