"""Tests for the bugs a developer writes while changing growops (docs/testing.md, "Realistic bug patterns").

Each test here kills at least one hand-written patch of ``benchmarks/bug_patches/`` that the rest of the suite let
through; the patch's name is in the test's docstring. They check what a user sees (outputs, the state after an error,
what a load accepts, the training flags left on the model) rather than growops' internals where they can.
"""

import copy
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import growops
from growops import GrowopsError
from growops.maps import depth_map, growth_sources, preserves_function
from growops.structure import Layout
from tests.models import SequentialNet, gpt_batch, tiny_gpt

BATCH = gpt_batch()
ROOT = Path(__file__).resolve().parents[1]


def _loss(a):
    return a(**BATCH).loss


def _logits(module):
    return module(BATCH["input_ids"]).logits


# ---------------------------------------------------------------- order of checks and changes
def test_a_growth_the_optimizer_refuses_leaves_the_model_as_it_was():
    """apollo-grow-copies-before-optimizer-check: an optimizer state that cannot be copied, or an optimizer that
    holds none of the model's parameters, is refused at the stage boundary before any weight moves."""
    model = tiny_gpt(4)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), optimizer_state="copy")
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    _loss(a).backward()
    opt.step()
    opt.zero_grad()
    a.eval()
    with torch.no_grad():
        before = _logits(a)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    first = next(model.blocks[0].parameters())
    opt.state[first]["lock"] = threading.Lock()  # state a grown block would copy, which does not deep-copy
    with pytest.raises(GrowopsError, match="cannot copy the optimizer's state"):
        a.step(opt)
    del opt.state[first]["lock"]
    with pytest.raises(GrowopsError, match="hold none of"):
        a.step(torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1))
    assert (a.step_count, a.stage, a.unique_layers) == (0, 0, 2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    with torch.no_grad():
        torch.testing.assert_close(_logits(a), before, rtol=0, atol=0)
        torch.testing.assert_close(_logits(a.export()), before)
    a.step(opt)  # the retry grows
    assert a.unique_layers == 4


class _IndexedBlock(nn.Module):
    """A residual block that reads its per-layer index; raises at position `fail_at` (a class attribute: no value of
    the block's own) to stand for an error in the middle of a forward (a caught OOM, say)."""

    fail_at = None

    def __init__(self, width: int, index: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.layer_idx = index

    def forward(self, x):
        if self.layer_idx == type(self).fail_at:
            raise FloatingPointError(f"failed at position {self.layer_idx}")
        return x + torch.tanh(self.fc(x)) * (1 + self.layer_idx)


class _IndexedNet(nn.Module):
    """Reaches its blocks by index in a loop: graph mode, where a depth gate runs the positions."""

    def __init__(self, n_layer: int = 4, width: int = 8):
        super().__init__()
        self.n_layer = n_layer
        self.inp = nn.Linear(4, width)
        self.layers = nn.ModuleList([_IndexedBlock(width, i) for i in range(n_layer)])
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for i in range(self.n_layer):
            h = self.layers[i](h)
        return self.out(h)


def test_a_forward_that_raises_inside_the_depth_gate_leaves_each_block_its_own_values(monkeypatch):
    """gate-exit-not-in-finally: after a forward that raised at a shared position, the runtime is outside a forward
    again, every block holds its own per-layer values, and export() and evaluation agree."""
    torch.manual_seed(0)
    a = growops.apollo(_IndexedNet(), stages=(1, 4), stage_steps=(5,), sampler="full")
    assert a.mode == "graph"
    x = torch.randn(2, 4)
    monkeypatch.setattr(_IndexedBlock, "fail_at", 2)
    with pytest.raises(FloatingPointError):
        a(x)
    monkeypatch.setattr(_IndexedBlock, "fail_at", None)
    assert [block.layer_idx for block in a.model.layers] == [0, 1, 2, 3]
    assert [block.layer_idx for block in a.export().layers] == [0, 1, 2, 3]
    a.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), a.export()(x))
    assert [block.layer_idx for block in a.model.layers] == [0, 1, 2, 3]


def test_a_step_that_raised_leaves_no_scaled_learning_rate_behind():
    """lr-no-restore-after-failed-step: a step that raised left its scaled learning rates; the next step puts back
    the lr that was set before scaling it again, so the rate is not scaled twice and stays the user's after."""
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,), sampler="full", lr_scale="linear")
    opt = torch.optim.SGD(a.param_groups(), lr=0.1)
    _loss(a).backward()

    def fail():
        raise RuntimeError("the closure failed")

    with pytest.raises(RuntimeError, match="closure failed"):
        opt.step(fail)
    seen = []
    opt.register_step_pre_hook(lambda o, args, kwargs: seen.append([g["lr"] for g in o.param_groups]))
    opt.step()
    assert min(seen[-1]) == pytest.approx(0.1 / 4)  # unit 0 runs at 4 positions: scaled once
    assert all(g["lr"] == 0.1 for g in opt.param_groups)


def test_a_step_refused_for_a_mixed_group_leaves_every_learning_rate_as_it_was():
    """lr-scaled-before-every-group-checked: an optimizer group that mixes two units is refused before any group's
    lr is scaled, so the groups before it keep the lr the user set."""
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,), sampler="full", lr_scale="linear")
    groups = a.param_groups()
    by_unit = {g["growops_unit"]: g for g in groups}
    mixed = {"params": [*by_unit[1]["params"], *by_unit[2]["params"]]}  # last: the groups before it come first
    opt = torch.optim.SGD([g for g in groups if g["growops_unit"] not in (1, 2)] + [mixed], lr=0.1)
    _loss(a).backward()
    with pytest.raises(GrowopsError, match=r"holds parameters of units \[1, 2\]"):
        opt.step()
    assert [g["lr"] for g in opt.param_groups] == [0.1] * len(opt.param_groups)


# ---------------------------------------------------------------- loosened guards
class _Residual(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + self.fc(torch.tanh(x))


class _DepthScaledOut(nn.Module):
    """Its output depends a little (a relative 1e-4 per block) on how many blocks it holds: inserting zero blocks
    moves it by far less than 1e-2 yet far more than round-off."""

    def __init__(self, n_layer: int = 3, width: int = 8, scale: float = 1e-4):
        super().__init__()
        self.scale = scale
        self.inp = nn.Linear(4, width)
        self.layers = nn.ModuleList([_Residual(width) for _ in range(n_layer)])
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h) * (1 + self.scale * len(self.layers))


def test_deepen_zero_refuses_a_small_change_of_the_function():
    """deepen-probe-tolerance-loosened: a change of the output well above round-off is refused, however small."""
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    deep = growops.deepen(_DepthScaledOut(scale=0.0), layers=6, example_inputs=x)  # no dependence: preserved
    assert len(deep.layers) == 6
    model = _DepthScaledOut()
    with torch.no_grad():
        assert 1e-5 < float((model(x) * 3e-4 / (1 + 3e-4)).abs().max()) < 1e-3  # the change deepening makes
    with pytest.raises(GrowopsError, match="changed its output"):
        growops.deepen(model, layers=6, example_inputs=x)


def test_load_safetensors_refuses_a_file_that_lacks_a_tensor(tmp_path):
    """load-safetensors-not-strict: a file missing a weight is refused, and the model keeps its weights."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    a = growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(2,))
    path = tmp_path / "a.safetensors"
    growops.save_safetensors(a, path)
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    tensors = load_file(str(path))
    del tensors["model.blocks.1.mlp.c_fc.weight"]
    save_file(tensors, str(tmp_path / "short.safetensors"), metadata=metadata)
    b = growops.apollo(tiny_gpt(4, seed=1), stages=(2, 4), stage_steps=(2,))
    weights = {k: v.clone() for k, v in b.model.state_dict().items()}
    with pytest.raises(GrowopsError, match="missing .*blocks.1.mlp.c_fc.weight"):
        growops.load_safetensors(b, tmp_path / "short.safetensors")
    assert all(torch.equal(v, b.model.state_dict()[k]) for k, v in weights.items())
    growops.load_safetensors(b, path)  # the whole file loads
    assert torch.equal(b.model.blocks[1].mlp.c_fc.weight, a.model.blocks[1].mlp.c_fc.weight)


# ---------------------------------------------------------------- per-layer and layout bookkeeping
class _GainBlock(nn.Module):
    def __init__(self, width: int, gain: float):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.gain = gain

    def forward(self, x):
        return x + self.gain * torch.tanh(self.fc(x))


class _GainNet(nn.Module):
    def __init__(self, gains=(1.0, 2.0, 1.0), width: int = 8):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.layers = nn.ModuleList([_GainBlock(width, g) for g in gains])
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


@pytest.mark.parametrize("gains", [(1.0, 2.0, 1.0), (2.0, 1.0, 1.0), (1.0, 1.0, 2.0), (1.0, 2.0, 3.0, 1.0)])
def test_a_value_that_differs_in_any_one_block_is_per_layer(gains):
    """values-all-equal-keeps-last-comparison: a value that differs only in a middle block (the last equal to the first)
    is still per layer, so each position runs with its own and evaluation equals export()."""
    torch.manual_seed(0)
    model = _GainNet(gains)
    a = growops.apollo(model, stages=(1, len(gains)), stage_steps=(5,))
    assert a.plan.stacks[0].per_layer_values == {"gain": gains}
    x = torch.randn(2, 4)
    a.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), a.export()(x))


class _Uniform(nn.Module):
    def __init__(self, n: int = 5, width: int = 8):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.layers = nn.ModuleList([_Residual(width) for _ in range(n)])
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


@pytest.mark.parametrize("spec,layout", [("layers[1:4]", Layout(1, 1, 3, 1)), ("layers[:-1]", Layout(0, 1, 4, 1)),
                                         ("layers[1:]", Layout(1, 1, 4, 0)), ("layers[2:4]", Layout(2, 1, 2, 1))])
def test_a_stack_given_with_a_slice_keeps_the_children_after_it_fixed(spec, layout):
    """plan-slice-layout-drops-suffix: ``stack="layers[1:4]"`` makes the children after the slice fixed blocks; the
    model at one stage of all blocks is the original, and growing it works."""
    torch.manual_seed(0)
    model, x = _Uniform(), torch.randn(2, 4)
    with torch.no_grad():
        original = model(x)
    plan = growops.plan(model, stack=spec)
    assert plan.stacks[0].layout == layout
    units = layout.units
    a = growops.apollo(model, stages=(units,), stage_steps=(), stack=spec)
    a.eval()
    with torch.no_grad():
        torch.testing.assert_close(a(x), original, rtol=0, atol=0)
    b = growops.apollo(_Uniform(), stages=(1, units), stage_steps=(1,), stack=spec)
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), b.export()(x))


def test_a_block_replaced_after_wrapping_is_guarded_like_the_one_it_replaced():
    """stack-stale-unit-index-after-replace: a block put in place of another after wrapping (and adopted by a
    forward) is refused where the one it replaced would be: run outside the forward while its position runs another
    unit."""
    model = tiny_gpt(4)
    a = growops.apollo(model, stages=(1, 4), stage_steps=(5,), sampler="full")
    _loss(a)  # the runtime indexes its units
    x = torch.randn(2, 8, 16)
    with pytest.raises(GrowopsError, match="ran outside the model's forward"):
        model.blocks[2](x)
    model.blocks[2] = copy.deepcopy(model.blocks[2])
    _loss(a)  # adopts the new block
    assert a._runtimes[0].blocks[2] is model.blocks[2]
    with pytest.raises(GrowopsError, match="ran outside the model's forward"):
        model.blocks[2](x)


def test_calling_the_container_itself_runs_the_positions():
    """install-ancestors-miss-the-container: the container called on its own (an nn.Sequential's forward) runs the
    shared positions, as the model does, and its own state dict loads back."""
    torch.manual_seed(0)
    model = SequentialNet(4)
    a = growops.apollo(model, stages=(1, 4), stage_steps=(5,), sampler="full")
    assert a.mode == "container"
    a.eval()
    h = torch.randn(2, 8)
    exported = a.export()
    with torch.no_grad():
        torch.testing.assert_close(model.blocks(h), exported.blocks(h))
    state = model.blocks.state_dict()
    model.blocks.load_state_dict(state)
    with torch.no_grad():
        torch.testing.assert_close(model.blocks(h), exported.blocks(h))


@given(st.integers(1, 5), st.integers(1, 5), st.integers(0, 4), st.sampled_from(["interpolate", "stack"]))
def test_preserves_function_only_where_every_depth_composes(n_old, factor, extra, growth):
    """maps-preserves-function-ignores-growth: where preserves_function says growth keeps the function, the grown depth
    map composed with the growth sources is the old depth map at every depth (stacking 3 -> 6 does not: depth 10)."""
    n_new = n_old * factor + extra
    sources = growth_sources(n_old, n_new, growth)
    composes = all(tuple(sources[j] for j in depth_map(n_new, d, growth)) == depth_map(n_old, d, growth)
                   for d in range(n_new, 3 * n_new + 1))
    if preserves_function(n_old, n_new, growth):
        assert composes
    assert not preserves_function(3, 6, "stack") and preserves_function(3, 6, "interpolate")


class _NormBlock(nn.Module):
    def __init__(self, width: int, norm: type[nn.Module]):
        super().__init__()
        self.norm = norm(width)
        self.fc = nn.Linear(width, width)
        self.drop = nn.Dropout(0.1)

    def forward(self, x):
        return x + self.drop(self.fc(self.norm(x)))


class _NormNet(nn.Module):
    def __init__(self, n: int = 3, width: int = 8, norm: type[nn.Module] = nn.BatchNorm1d):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.layers = nn.ModuleList([_NormBlock(width, norm) for _ in range(n)])
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h)


def _frozen_norms(model: nn.Module) -> nn.Module:
    """`model` in training mode with its BatchNorms and dropouts frozen (eval mode), as a fine-tuning recipe leaves
    them."""
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm1d, nn.Dropout)):
            m.eval()
    return model


def _flags(model: nn.Module) -> dict[str, bool]:
    return {name: m.training for name, m in model.named_modules()}


@pytest.mark.parametrize("grow", ["plan", "deepen", "widen", "apollo"])
def test_planning_and_growing_keep_every_modules_training_flag(grow):
    """trace-restores-root-training-only: tracing runs the model in one mode and puts back every module's own
    training flag, so a frozen (eval-mode) BatchNorm or dropout inside a model in training mode stays frozen."""
    torch.manual_seed(0)
    # widen grows LayerNorms, not BatchNorms, in a model without a config: the widened one keeps a frozen dropout
    model = _frozen_norms(_NormNet(norm=nn.LayerNorm if grow == "widen" else nn.BatchNorm1d))
    flags = _flags(model)
    assert not all(flags.values()) and any(flags.values())
    x = torch.randn(4, 4)
    if grow == "plan":
        growops.plan(model)
    elif grow == "deepen":
        growops.deepen(model, layers=6, method="interpolate", example_inputs=x)
    elif grow == "widen":
        growops.widen(model, hidden=16, example_inputs=x)
    else:
        growops.apollo(model, stages=(1, 3), stage_steps=(1,))
    assert _flags(model) == flags


# ---------------------------------------------------------------- more patches the rest of the suite let through
class _Tail(nn.Module):
    """A block unlike the core's (an extra scale): a fixed block after the growable ones."""

    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, width))

    def forward(self, x):
        return x + self.fc(x) * self.scale


def test_deepen_keeps_a_fixed_block_after_the_core_in_place():
    """deepen-suffix-off-by-one: the fixed block after the growable ones is the grown model's last block."""
    torch.manual_seed(0)
    model, x = _Uniform(3), torch.randn(2, 4)
    model.layers.append(_Tail(8))
    deep = growops.deepen(model, layers=7, example_inputs=x)
    assert len(deep.layers) == 7 and type(deep.layers[-1]) is _Tail
    assert torch.equal(deep.layers[-1].scale, model.layers[-1].scale)
    with torch.no_grad():
        torch.testing.assert_close(deep(x), model(x))


class _SigmoidBranch(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.sigmoid(self.fc(x))  # zero weights leave 0.5, not 0


class _SigmoidNet(_Uniform):
    def __init__(self, n: int = 3, width: int = 8):
        super().__init__(n, width)
        self.layers = nn.ModuleList([_SigmoidBranch(width) for _ in range(n)])


def test_zero_insertion_refuses_a_branch_whose_last_op_moves_zero():
    """residual-sigmoid-keeps-zero: without a probe input nothing else would notice that zeroing the linear before
    a sigmoid leaves the branch at 0.5, so deepen must refuse the branch itself."""
    with pytest.raises(GrowopsError, match="does not end in a layer growops can zero"):
        growops.deepen(_SigmoidNet(), layers=6)


class _ShiftBlock(nn.Module):
    def __init__(self, width: int, index: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.register_buffer("shift", torch.full((width,), 0.1 * index))  # differs by layer: a per-layer buffer

    def forward(self, x):
        return x + torch.tanh(self.fc(x)) + self.shift


class _ShiftNet(_Uniform):
    def __init__(self, n: int = 4, width: int = 8):
        super().__init__(n, width)
        self.layers = nn.ModuleList([_ShiftBlock(width, i) for i in range(n)])


def test_a_state_with_per_layer_buffers_loads_while_blocks_are_shared():
    """saved-map-in-compares-per-layer-buffers: the positions that run one unit hold their own per-layer buffers in
    the saved state; loading it back compares only what they share."""
    torch.manual_seed(0)
    a = growops.apollo(_ShiftNet(), stages=(1, 4), stage_steps=(5,), sampler="full")
    assert "shift" in a.plan.stacks[0].per_layer_values
    b = growops.apollo(_ShiftNet(), stages=(1, 4), stage_steps=(5,), sampler="full")
    b.load_state_dict(a.state_dict())
    a.model.load_state_dict(a.model.state_dict())
    x = torch.randn(2, 4)
    a.eval()
    b.eval()
    with torch.no_grad():
        torch.testing.assert_close(b(x), a(x))
    assert [float(block.shift[0]) for block in b.model.layers] == pytest.approx([0.0, 0.1, 0.2, 0.3])


class _CountingBlock(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.register_buffer("calls", torch.zeros(()))

    def forward(self, x):
        self.calls.add_(1)  # state written in place, shared by every position that runs this block
        return x + torch.tanh(self.fc(x))


class _CountingNet(_Uniform):
    def __init__(self, n: int = 4, width: int = 8):
        super().__init__(n, width)
        self.layers = nn.ModuleList([_CountingBlock(width) for _ in range(n)])


def test_state_a_shared_unit_writes_in_place_is_refused():
    """stack-fingerprint-ignores-version: a buffer a shared unit updates in place (same tensor, same memory, a new
    version) is state the positions share, and is refused like a rebound one."""
    a = growops.apollo(_CountingNet(), stages=(1, 4), stage_steps=(5,)).eval()
    with pytest.raises(GrowopsError, match="the forward changed calls in layers's unit 0"):
        a(torch.randn(2, 4))


def test_a_value_declared_constant_is_shared_with_the_unit():
    """plan-declared-constant-stays-per-layer: declare(constant=[...]) of a value growops found per layer makes it
    part of the block: a shared position runs its unit's value, not its own."""
    torch.manual_seed(0)
    model, x = _GainNet((1.0, 2.0, 1.0)), torch.randn(2, 4)
    plan = growops.plan(model).declare(constant=["gain"])
    assert "gain" not in plan.stacks[0].per_layer_values and "gain" in plan.stacks[0].constant_values
    a = growops.apollo(model, stages=(1, 3), stage_steps=(5,), plan=plan)
    a.eval()
    with torch.no_grad():
        h = model.inp(x)
        for _ in range(3):
            h = model.layers[0](h)  # unit 0 at every position, with its own gain
        torch.testing.assert_close(a(x), model.out(h))


class _WidthReadingNet(_Uniform):
    """Its output depends a little on its width (a relative 1e-3 per unit): widening moves it by far less than
    1e-1 yet far more than round-off."""

    def __init__(self, scale: float = 1e-3):
        super().__init__(2, 8)
        self.scale = scale

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.out(h) * (1 + self.scale * h.shape[-1])


def test_widen_refuses_a_small_change_of_the_function():
    """widen-probe-tolerance-loosened: a widening by whole multiples that moves the output well above round-off is
    refused, however small the move."""
    torch.manual_seed(0)
    x = torch.randn(2, 4)
    wide = growops.widen(_WidthReadingNet(scale=0.0), hidden=16, example_inputs=x)  # no dependence: preserved
    assert wide.inp.out_features == 16
    with pytest.raises(GrowopsError, match="changed its output"):
        growops.widen(_WidthReadingNet(), hidden=16, example_inputs=x)


def test_a_block_put_in_an_offload_wrapper_after_wrapping_runs_as_itself():
    """checkpointing-only-checkpoint-wrappers: every activation wrapper of torch's (an OffloadWrapper too) is seen
    through to the block it holds, which keeps its unit."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import OffloadWrapper, offload_wrapper

    model = tiny_gpt(4)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(5,), sampler="full")
    expected = _loss(a).item()
    model.blocks[1] = offload_wrapper(model.blocks[1])
    loss = _loss(a)
    loss.backward()
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert type(model.blocks[1]) is OffloadWrapper
    assert a._runtimes[0].blocks[1] is model.blocks[1]._checkpoint_wrapped_module  # the block it holds


def test_the_cuda_kernel_serves_again_after_an_error_inside_disabled(monkeypatch):
    """extension-disabled-not-in-finally: an error inside ``extension.disabled()`` does not leave the kernel off."""
    from growops.ops import extension
    from growops.ops.shared_linear import _wgrad_reference

    class Built:  # a built, checked extension (none builds on this machine)
        @staticmethod
        def linear_wgrad(grad_out, x, with_bias):
            return (*_wgrad_reference(grad_out, x, with_bias), 0)

    monkeypatch.setattr(extension, "load", lambda verbose=False: Built)
    g, x = torch.randn(5, 3).bfloat16(), torch.randn(5, 2).bfloat16()
    calls = extension.kernel_calls()
    with pytest.raises(RuntimeError, match="inside"), extension.disabled():
        extension._linear_wgrad_cuda(g, x, True)
        raise RuntimeError("an error inside the block")
    assert extension.kernel_calls() == calls  # the reference served inside
    extension._linear_wgrad_cuda(g, x, True)
    assert extension.kernel_calls() == calls + 1


def test_python_dash_m_growops_exits_with_the_commands_status(tmp_path):
    """main-exit-status-lost: ``python -m growops`` exits with main()'s status, so a script sees a failed command."""
    proc = subprocess.run([sys.executable, "-m", "growops", "plan", str(tmp_path)], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 2 and "not a Hugging Face checkpoint directory" in proc.stderr


def test_importing_growops_registers_the_cuda_kernel_and_the_extension_module():
    """ops-init-drops-extension: ``import growops`` registers the CUDA kernel of growops::linear_wgrad (built only
    at its first CUDA call) and makes ``growops.ops.extension.status()`` reachable, in a fresh interpreter."""
    code = ("import torch, growops; "
            "assert torch._C._dispatch_has_kernel_for_dispatch_key('growops::linear_wgrad', 'CUDA'); "
            "print(growops.ops.extension.status())")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip() == "not tried yet", proc.stderr[-2000:]
