from collections import OrderedDict

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import growops
from growops import GrowopsError
from growops.maps import depth_map
from growops.stack import (
    SharedBlockList,
    SharedBlockSequential,
    StackRuntime,
    can_share,
    scope_forwards,
    share,
    unscope,
    unshare,
)
from growops.structure import Layout
from tests.models import BufferNet, SequentialNet


def _blocks(n=4):
    blocks = [nn.Linear(3, 3) for _ in range(n)]
    for i, b in enumerate(blocks):
        b.layer_idx = i
    return blocks


class Holder(nn.Module):
    """Iterates its container in forward and records what it saw."""

    def __init__(self, container):
        super().__init__()
        self.layers = container
        self.seen = []

    def forward(self, x):
        self.seen = []
        for block in self.layers:
            self.seen.append((block, block.layer_idx))
            x = block(x)
        return x


def _shared(blocks, layout=None, per_layer=("layer_idx",), growth="interpolate"):
    holder = Holder(nn.ModuleList(blocks))
    runtime = StackRuntime(holder.layers, layout, per_layer, growth, "layers")
    share(holder.layers, runtime)
    scope_forwards(runtime, [holder, holder.layers])
    return holder, runtime


@given(st.integers(1, 6), st.data(), st.booleans(), st.sampled_from(["interpolate", "stack"]))
def test_forward_runs_the_map_with_per_layer_values_and_restores_them(unique, data, training, growth):
    blocks = _blocks(6)
    holder, runtime = _shared(blocks, growth=growth)
    holder.train(training)
    runtime.unique, runtime.depth = unique, data.draw(st.integers(unique, 6))
    holder(torch.randn(2, 3))
    expected = depth_map(unique, runtime.depth if training else 6, growth)
    assert [blocks.index(b) for b, _ in holder.seen] == list(expected)
    assert [idx for _, idx in holder.seen] == list(range(len(expected)))  # position i ran with layer i's value
    assert [b.layer_idx for b in blocks] == list(range(6))  # each block has its own back


def test_outside_a_forward_the_container_is_physical():
    blocks = _blocks()
    holder, runtime = _shared(blocks)
    runtime.unique, runtime.depth = 1, 2
    assert list(holder.layers) == blocks  # optimizer groups built by iterating see every block
    assert len(holder.layers) == 4 and holder.layers[3] is blocks[3]
    assert list(holder.layers[1:3]) == blocks[1:3] and type(holder.layers[1:3]) is nn.ModuleList
    assert list(holder.state_dict()) == [f"layers.{i}.{k}" for i in range(4) for k in ("weight", "bias")]
    assert "unique=1, depth=2" in repr(holder.layers)


def test_inside_a_forward_len_index_and_slices_see_positions():
    """Each block holds a layer_idx unlike its index, and positions 1.. run a block holding another unit's value: what
    len, indexing (negative too) and slices (and their items) give is the position's block with the position's value."""
    blocks = _blocks()
    own = [7, 5, 9, 3]  # unit u's per-layer value; position i must see own[i]
    for b, v in zip(blocks, own):
        b.layer_idx = v

    class IndexByLen(Holder):
        def forward(self, x):
            layers = self.layers
            self.seen = [(layers[i], layers[i].layer_idx) for i in range(len(layers))]
            self.last = (layers[-1], layers[-1].layer_idx)
            tail = layers[1:]
            self.sliced = [(b, b.layer_idx) for b in tail]
            self.tail_items = [(tail[0], tail[0].layer_idx), (tail[-1], tail[-1].layer_idx), len(tail)]
            self.tail_slice = [(b, b.layer_idx) for b in tail[1:]]
            return x

    holder = IndexByLen(nn.ModuleList(blocks))
    runtime = StackRuntime(holder.layers, per_layer=("layer_idx",))
    share(holder.layers, runtime)
    scope_forwards(runtime, [holder])
    for unique, depth in [(2, 4), (1, 3), (3, 4)]:
        runtime.unique, runtime.depth = unique, depth
        holder(torch.randn(1, 3))
        runs = [i * unique // depth for i in range(depth)]
        expected = [(blocks[u], own[i]) for i, u in enumerate(runs)]
        assert holder.seen == expected and holder.last == expected[-1]
        assert holder.sliced == expected[1:]
        assert holder.tail_items == [expected[1], expected[-1], depth - 1]
        # a slice of a slice is a list, built at once: a block it holds twice has the later value, so blocks only
        assert [b for b, _ in holder.tail_slice] == [b for b, _ in expected[2:]]
        assert [b.layer_idx for b in blocks] == own


def test_an_error_in_the_forward_still_restores_per_layer_values():
    blocks = _blocks()

    class Failing(Holder):
        def forward(self, x):
            for block in self.layers:
                if block.layer_idx == 2:
                    raise RuntimeError("boom")
            return x

    holder = Failing(nn.ModuleList(blocks))
    runtime = StackRuntime(holder.layers, per_layer=("layer_idx",))
    share(holder.layers, runtime)
    scope_forwards(runtime, [holder])
    runtime.unique, runtime.depth = 1, 4
    with pytest.raises(RuntimeError, match="boom"):
        holder(torch.randn(1, 3))
    assert [b.layer_idx for b in blocks] == [0, 1, 2, 3] and runtime.active == 0


def test_sequential_keeps_its_object_names_and_hooks():
    blocks = _blocks(3)
    container = nn.Sequential(OrderedDict((f"b{i}", b) for i, b in enumerate(blocks)))
    calls = []
    container.register_forward_hook(lambda *args: calls.append(1))
    keys = list(container.state_dict())
    runtime = StackRuntime(container)
    share(container, runtime)
    scope_forwards(runtime, [container])
    assert isinstance(container, SharedBlockSequential) and list(container.state_dict()) == keys
    x = torch.randn(2, 3)
    runtime.unique = runtime.depth = 1
    assert torch.equal(container(x), blocks[0](x)) and calls == [1]
    unshare(container)
    unscope(container)
    assert type(container) is nn.Sequential and torch.equal(container(x), blocks[2](blocks[1](blocks[0](x))))


def test_only_plain_module_lists_and_sequentials_are_shared():
    class MyList(nn.ModuleList):
        pass

    assert not can_share(MyList(_blocks())) and can_share(nn.ModuleList()) and can_share(nn.Sequential())
    holder, _ = _shared(_blocks())
    assert isinstance(holder.layers, SharedBlockList)


def test_layout_follows_the_container_not_one_block():
    blocks = _blocks(4)
    holder, runtime = _shared(blocks)
    runtime.unique, runtime.depth = 2, 2
    holder.train()
    blocks[0].eval()  # a single block's flag does not switch the stack to the evaluation layout
    assert runtime.mapping() == (0, 1)
    holder.eval()
    assert runtime.mapping() == (0, 0, 1, 1)


def test_fixed_blocks_and_periodic_units():
    blocks = _blocks(7)  # prefix 1 | units of 2 blocks x 2 ... | suffix 2
    holder, runtime = _shared(blocks, Layout(1, 2, 2, 2), per_layer=("0.layer_idx", "1.layer_idx"))
    runtime.unique, runtime.depth = 1, 2
    holder.train()
    holder(torch.randn(1, 3))
    assert [blocks.index(b) for b, _ in holder.seen] == [0, 1, 2, 1, 2, 5, 6]
    # position 1's blocks ran with unit 1's values (blocks 3 and 4), the fixed blocks with their own
    assert [i for _, i in holder.seen] == [0, 1, 2, 3, 4, 5, 6]
    assert [b.layer_idx for b in blocks] == list(range(7))


def test_replaced_block_is_used_or_rejected():
    blocks = _blocks(4)
    holder, runtime = _shared(blocks)
    runtime.unique, runtime.depth = 4, 4
    new = nn.Linear(3, 3)
    new.layer_idx = 2
    holder.layers[2] = new
    holder(torch.randn(1, 3))
    assert holder.seen[2][0] is new and runtime.blocks[2] is new

    holder.layers[1] = nn.Sequential(nn.Linear(3, 3))  # another structure: refused, nothing adopted
    with pytest.raises(GrowopsError, match=r"layers.1 was replaced after growops.apollo wrapped.*a Sequential"):
        holder(torch.randn(1, 3))
    assert runtime.blocks[1] is blocks[1]
    del holder.layers[3]
    with pytest.raises(GrowopsError, match="layers changed after growops.apollo wrapped the model"):
        runtime.sync()


class _Remembers(nn.Module):
    """Keeps the last input it saw in an attribute that starts as None."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.last = None

    def forward(self, x):
        self.last = x
        return x + self.fc(x)


class _RemembersNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Remembers() for _ in range(4)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


@pytest.mark.parametrize("inference", [False, True])
def test_state_a_shared_unit_sets_is_refused_also_under_inference_mode(inference):
    """An attribute set by the forward of a unit that runs at several positions is refused, whether the value is
    an ordinary tensor or an inference tensor (which has no version counter to tell by)."""
    a = growops.apollo(_RemembersNet(), stages=(1, 4), stage_steps=(5,)).eval()
    with torch.inference_mode(inference), pytest.raises(GrowopsError, match="the forward changed last in layers's "
                                                                             "unit 0"):
        a(torch.randn(2, 4))


def test_running_statistics_of_a_nested_norm_may_change_in_a_shared_unit():
    """BatchNorm's running statistics are trained state like weights, also in a submodule of the block
    (``norm.running_mean``): a shared unit updating them at each position is not refused."""
    a = growops.apollo(BufferNet(4), stages=(1, 4), stage_steps=(5,), sampler="full").train()  # unit 0 at 4 positions
    before = a.model.layers[0].norm.running_mean.clone()
    a(torch.randn(6, 4))
    assert not torch.equal(a.model.layers[0].norm.running_mean, before)


def test_a_copy_made_during_a_forward_is_not_inside_one():
    """Forward state is not copied: a wrapper deep-copied from inside a forward (a hook taking a snapshot) starts
    idle, so its blocks called directly are refused as usual."""
    import copy

    a = growops.apollo(_RemembersNet(), stages=(1, 4), stage_steps=(5,), plan=growops.plan(_RemembersNet())
                       .declare(per_layer=["last"])).eval()
    copies = []
    a.model.layers[0].register_forward_hook(lambda module, args, out: copies.append(copy.deepcopy(a)) if not copies
                                            else None)
    a(torch.randn(2, 4))
    snapshot = copies[0]
    assert all(r.active == 0 for r in snapshot._runtimes)
    with pytest.raises(GrowopsError, match="layers.3"):
        snapshot.model.layers[3](torch.randn(2, 4))


class _AlsoByList(_RemembersNet):
    """Iterates its container, then (once `refine` is set, after wrapping) runs the last block again through a list
    it keeps: a path the trace did not take."""

    def __init__(self):
        super().__init__()
        self.extra, self.refine = [self.layers[3]], False

    def forward(self, x):
        x = super().forward(x)
        return self.extra[0](x) if self.refine else x


def test_a_block_reached_around_the_container_inside_the_forward_is_refused():
    a = growops.apollo(_AlsoByList(), stages=(1, 4), stage_steps=(5,), plan=growops.plan(_AlsoByList())
                       .declare(per_layer=["last"])).eval()
    a.model.refine = True
    with pytest.raises(GrowopsError, match=r"layers.3 ran inside the model's forward, but layers did not hand it "
                                           r"out for a position: .*Reach the blocks only by iterating or indexing "
                                           r"layers"):
        a(torch.randn(2, 4))


def test_a_block_failing_while_positions_are_used_directly_still_restores_per_layer_values():
    """Outside a forward each block handed out by positions() is a session of its own, ended by the block's call even
    when the call raises: the unit gets its own per-layer values back."""
    blocks = _blocks()
    holder, runtime = _shared(blocks)
    runtime.guard_blocks()
    runtime.unique, runtime.depth = 1, 4
    for i, block in enumerate(runtime.positions()):
        if i == 2:
            with pytest.raises(RuntimeError):
                block(torch.randn(1, 5))  # the wrong width
            break
        block(torch.randn(1, 3))
    assert [b.layer_idx for b in blocks] == [0, 1, 2, 3] and runtime._own is None


@pytest.mark.parametrize("per_layer", [(), ("layer_idx",)])
def test_guard_blocks_hooks_each_module_once_however_often_it_is_called(per_layer):
    blocks = [nn.Sequential(nn.Linear(3, 3)) for _ in range(4)]
    for i, b in enumerate(blocks):
        b.layer_idx = i
    holder, runtime = _shared(blocks, per_layer=per_layer)

    def hooks():
        return [(len(m._forward_pre_hooks), len(m._forward_hooks)) for b in blocks for m in b.modules()]

    runtime.guard_blocks()
    once = hooks()
    assert once == [(1, 1), (1 if per_layer else 0, 0)] * 4
    runtime.guard_blocks()
    assert hooks() == once


def test_a_recomputation_that_reaches_a_block_not_live_yet_is_refused():
    """A backward that reruns a physical block the forward never handed out (a hand-written recomputation) would
    compute with weights the stage does not train: refused, naming the block."""
    blocks = _blocks()
    holder, runtime = _shared(blocks)
    runtime.guard_blocks()
    runtime.unique, runtime.depth = 1, 4

    class Recompute(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, grad):
            blocks[3](grad)
            return grad

    x = torch.randn(1, 3, requires_grad=True)
    with pytest.raises(GrowopsError, match=r"^layers.3 runs in the backward, but it is not live yet: a recomputation "
                                           r"\(activation checkpointing\) reached the physical blocks$"):
        Recompute.apply(x).sum().backward()


def test_torch_func_grad_through_shared_blocks_is_the_untied_models_summed_over_positions():
    from torch.func import functional_call, grad

    from tests.archs import Arch

    arch = Arch(container="modulelist", loop="iterate", pattern="A", units=4, prefix="", suffix="", values=("int",),
                tuple_out=False)  # per-layer values: block outputs are marked with their positions
    a = growops.apollo(arch.build(), stages=(1, 4), stage_steps=(5,), sampler="full")
    x = arch.inputs()
    grads = grad(lambda p: functional_call(a, p, (x,)).pow(2).sum())(dict(a.named_parameters()))
    plain = a.export()  # untied: every position a copy of unit 0
    plain(x).pow(2).sum().backward()
    for name, _ in plain.layers[0].named_parameters():
        expected = sum(dict(block.named_parameters())[name].grad for block in plain.layers)
        torch.testing.assert_close(grads[f"model.layers.0.{name}"], expected)


@pytest.mark.parametrize("resample", ["step", "micro_batch"])  # micro_batch: the wrapper's own entry points first
def test_compiling_the_whole_wrapper_as_one_graph_says_what_to_do_instead(resample):
    """growops' runtime is opaque to torch.compile on purpose (regional compilation); fullgraph=True meets it at the
    first hook, and dynamo's error then carries growops' advice rather than only its own hint to remove the
    torch.compiler.disable call. Every such entry point of the runtime carries it."""
    import re

    import torch._dynamo

    from growops.eager import COMPILE_ADVICE
    from growops.stack import _Guard

    a = growops.apollo(SequentialNet(4), stages=(2, 4), stage_steps=(1,), resample=resample)
    disabled = {name: f for cls in (StackRuntime, _Guard) for name, f in vars(cls).items()
                if getattr(f, "_torchdynamo_disable", False)}
    assert disabled.keys() == {"_selected", "_block_at", "core_entries", "begin", "end", "enter", "exit", "_block"}
    assert all(f._torchdynamo_disable_msg == COMPILE_ADVICE for f in disabled.values())
    torch._dynamo.reset()
    try:
        with pytest.raises(torch._dynamo.exc.Unsupported, match=re.escape(f"(reason: {COMPILE_ADVICE})")):
            torch.compile(a, fullgraph=True, backend="eager")(torch.randn(3, 4))
        compiled = torch.compile(a.eval(), backend="eager")  # as advised: without fullgraph
        torch.testing.assert_close(compiled(torch.ones(3, 4)), a(torch.ones(3, 4)))
    finally:
        torch._dynamo.reset()


def test_a_block_put_in_two_slots_is_refused():
    blocks = _blocks(4)
    holder, runtime = _shared(blocks)
    holder.layers[3] = blocks[1]
    with pytest.raises(GrowopsError, match=r"^layers.3 was replaced after growops.apollo wrapped the model by "
                                           r"layers.1's block itself"):
        holder(torch.randn(1, 3))
    assert runtime.blocks == blocks and runtime.children == blocks


class _Appending(nn.Module):
    """Keeps a cache it rebinds (not writes in place) at every call."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.cache = None

    def forward(self, x):
        k = self.fc(x).detach()
        self.cache = k if self.cache is None else torch.cat([self.cache, k], 1)
        return x + torch.tanh(self.cache.mean(1, keepdim=True))


class _AppendingNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList(_Appending() for _ in range(4))

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_a_per_layer_value_the_forward_rebinds_is_kept_by_its_position():
    """A declared per-layer cache the block replaces by a new object each call (torch.cat, not an in-place write):
    each position keeps what its call made, as the untied model's layers do, call after call."""
    torch.manual_seed(0)
    model = _AppendingNet()
    plan = growops.plan(model).declare(per_layer=["cache"])
    a = growops.apollo(model, stages=(1, 4), stage_steps=(5,), plan=plan).eval()
    untied = a.export().eval()
    x = torch.randn(2, 3, 4)
    for step in (x, x[:, :1], x[:, :2]):
        torch.testing.assert_close(a(step), untied(step), rtol=0, atol=0)
    assert [tuple(layer.cache.shape) for layer in model.layers] == [(2, 6, 4)] * 4
