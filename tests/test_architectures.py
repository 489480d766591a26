""""Any nn.Module": the growth invariants on random small architectures (tests/archs.py), and the patterns that
growops grows or refuses with the real reason."""

import copy
import re

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import growops
from growops import GrowopsError
from growops.maps import depth_map
from growops.state import decode_state
from tests.archs import VALUES, Arch, Net, archs


def _per_layer(model: Net) -> list[dict]:
    out = []
    for block in model.layers._modules.values():
        out.append({name: getattr(block, f"v_{name}") for name in block.value_kinds})
    return out


def _same_values(a: list[dict], b: list[dict]) -> bool:
    return all(x.keys() == y.keys() and all(
        torch.equal(x[k], y[k]) if torch.is_tensor(x[k]) else x[k] == y[k] for k in x) for x, y in zip(a, b))


@pytest.mark.filterwarnings("ignore:growops. stages")
@given(archs(), st.data())
def test_invariants_on_random_architectures(arch, data):
    x = arch.inputs()
    # One stage of all units is the original model, in training and in evaluation.
    model = arch.build()
    reference = copy.deepcopy(model)
    a = growops.apollo(model, stages=(arch.units,), stage_steps=(), sampler="full")
    assert a.mode == arch.mode and a.layers == arch.units
    for train in (True, False):
        a.train(train)
        reference.train(train)
        assert torch.equal(a(x), reference(x))

    # Growth by a multiple keeps the function at every depth; export equals evaluation mid-schedule.
    units = arch.units
    unique = data.draw(st.sampled_from([u for u in (1, 2, 3) if units % u == 0 and u < units]))
    grown = data.draw(st.sampled_from([n for n in range(2 * unique, units + 1, unique) if units % n == 0]))
    stages = (unique, grown) if grown == units else (unique, grown, units)
    model = arch.build()
    original_values, keys = _per_layer(model), list(model.state_dict())
    a = growops.apollo(model, stages=stages, stage_steps=tuple(range(1, len(stages))), optimizer_state="keep")
    depths = data.draw(st.lists(st.integers(grown, units), min_size=1, max_size=2))
    with torch.no_grad():
        before = {}
        for d in depths:
            a._configure(unique, d)
            before[d] = a(x)
        a.eval()
        full = a(x)
        exported = a.export().eval()
        assert type(exported) is Net and list(exported.state_dict()) == keys
        assert _same_values(_per_layer(exported), original_values)
        torch.testing.assert_close(exported(x), full, rtol=0, atol=1e-6)
        a.train()
        a.step()  # unique -> grown: every new unit copies its source, per-layer values stay
        for d in depths:
            a._configure(grown, d)
            torch.testing.assert_close(a(x), before[d], rtol=0, atol=1e-5)
        assert _same_values(_per_layer(model), original_values)  # after forwards and growth, each block has its own


@pytest.mark.parametrize("values", [("buffer",), ("nonpersistent",), ("tuple", "enum", "tensor0d", "none_or_int")])
def test_per_layer_values_are_given_by_position_and_never_copied(values):
    """Position i runs with layer i's values at every depth; the grown model keeps every layer's own."""
    arch = Arch("modulelist", "iterate", "A", 4, "", "", values, False)
    model = arch.build()
    a = growops.apollo(model, stages=(1, 4), stage_steps=(1,), optimizer_state="keep")
    assert set(a.plan.stacks[0].per_layer_values) == {f"v_{v}" for v in values}
    seen = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda m, args: seen.append([getattr(m, f"v_{v}") for v in values]))
    a.eval()
    a(arch.inputs())
    expected = [[VALUES[v][0](i) for v in values] for i in range(4)]
    assert all(_same_values([dict(zip(values, s))], [dict(zip(values, e))]) for s, e in zip(seen, expected))
    a.step()
    exported = a.export()
    assert _same_values(_per_layer(exported), _per_layer(arch.build()))
    if "buffer" in values:
        state = a.state_dict()
        assert [state[f"model.layers.{i}.v_buffer"][0].item() for i in range(4)] == [1.0, 2.0, 3.0, 4.0]


class _Weighted(nn.Module):
    """Keeps every layer's output for a learned weighted sum: at a sampled depth that sum would silently shrink."""

    def __init__(self, n=4):
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(n)])
        self.mix = nn.Parameter(torch.ones(n))

    def forward(self, x):
        outs = []
        for layer in self.layers:
            x = torch.tanh(layer(x))
            outs.append(x)
        return sum(self.mix[i] * o for i, o in enumerate(outs))


class _Tap(_Weighted):
    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = torch.tanh(layer(x))
            if i == 1:
                tap = x
        return x + tap


class _Collect(_Weighted):
    """Returns every layer's output as it is (output_hidden_states): supported."""

    def forward(self, x):
        hidden = [x]
        for layer in self.layers:
            x = torch.tanh(layer(x))
            hidden.append(x)
        return x, tuple(hidden)


class _Residual(_Weighted):
    """A residual written in the loop: glue between the blocks, not a use outside the chain."""

    def forward(self, x):
        for layer in self.layers:
            x = x + torch.tanh(layer(x))
        return x


@pytest.mark.parametrize("cls, line", [(_Weighted, "sum(self.mix[i] * o for i, o in"), (_Tap, "return x + tap")])
def test_block_outputs_used_outside_the_chain_are_refused(cls, line):
    model = cls()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(GrowopsError, match=f"layers.[0-2]'s output is used outside the chain of blocks.*"
                                           f"{re.escape(line)}"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,))
    assert type(model.layers) is nn.ModuleList and not model.layers._forward_pre_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_collected_hidden_states_and_loop_residuals_work():
    x = torch.randn(2, 4)
    a = growops.apollo(_Collect(), stages=(2, 4), stage_steps=(5,), sampler="unique")
    out, hidden = a(x)
    assert len(hidden) == 1 + a.depth == 3
    a.eval()
    assert len(a(x)[1]) == 5  # evaluation runs all L
    r = growops.apollo(_Residual(), stages=(2, 4), stage_steps=(5,), sampler="unique")
    assert r.mode == "container" and r(x).shape == (2, 4)


def _t5_like():
    return Arch("modulelist", "iterate", "A", 4, "P", "", ("int",), True)


def test_fixed_first_block_keeps_its_position_and_weights():
    arch = _t5_like()
    model = arch.build()
    table = model.layers[0].table.detach().clone()
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), sampler="unique", optimizer_state="keep")
    (stack,) = a.plan.stacks
    assert stack.layout.prefix == 1 and a.layers == 4
    assert stack.fixed_reasons == ("layers.0: it has an extra parameter table",)
    seen = []
    for i, block in enumerate(model.layers):
        block.register_forward_pre_hook(lambda m, args, i=i: seen.append(i))
    a(arch.inputs())
    assert seen == [0, 1, 2]  # the fixed block, then 2 positions of the 2 live units
    a.step()
    assert torch.equal(model.layers[0].table, table)
    with pytest.raises(GrowopsError, match=r"last stage must hold all L=4.*4 growable blocks \(layers.1..layers.4\); "
                                           "fixed: layers.0"):
        growops.apollo(arch.build(), stages=(1, 5), stage_steps=(1,))


def test_first_dense_then_mixture_and_alternating_kinds():
    dense_then_moe = Arch("modulelist", "slice", "C", 4, "AA", "", (), False)
    a = growops.apollo(dense_then_moe.build(), stages=(2, 4), stage_steps=(1,))
    assert a.plan.stacks[0].layout.prefix == 2 and a.layers == 4
    alternating = Arch("modulelist", "iterate", "AB", 3, "", "", ("int",), False)
    a = growops.apollo(alternating.build(), stages=(1, 3), stage_steps=(1,), sampler="full")
    assert (a.plan.stacks[0].layout.period, a.layers) == (2, 3)
    assert "2 growable units of 2 blocks" not in str(a.plan) and "3 growable units of 2 blocks" in str(a.plan)


def test_unsupported_stacks_name_the_real_reason():
    class TwoKinds(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4, bias=False), nn.Linear(4, 4), nn.Identity()])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    with pytest.raises(GrowopsError, match=r"no repeated block stack in TwoKinds.*\(layers.1 differs from layers.0: it "
                                           r"lacks the parameter bias\)"):
        growops.apollo(TwoKinds(), stages=(1, 2), stage_steps=(1,))

    class Named(nn.Module):
        def __init__(self):
            super().__init__()
            self.stack = nn.ModuleDict({"a": nn.Linear(4, 4), "b": nn.Linear(4, 4, bias=False)})

        def forward(self, x):
            return self.stack["b"](self.stack["a"](x))

    with pytest.raises(GrowopsError, match=r"'stack' is not a container of repeated blocks in Named \(its children "
                                           r"differ: stack.b: it lacks the parameter bias\)"):
        growops.apollo(Named(), stages=(1, 2), stage_steps=(1,), stack="stack")


def test_torch_transformer_encoder():
    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            layer = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
            self.enc = nn.TransformerEncoder(layer, num_layers=4, enable_nested_tensor=False)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            return self.head(self.enc(x))

    x = torch.randn(2, 5, 8)
    deferred = growops.apollo(Net(), stages=(2, 4), stage_steps=(1,))  # no inputs: planned at the first forward
    assert not deferred.planned
    deferred(x)
    assert deferred.planned and deferred.plan.stacks[0].path == "enc.layers"
    model = Net().eval()
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), example_inputs=(x,), optimizer_state="keep").eval()
    assert a.plan.stacks[0].path == "enc.layers" and a.mode == "container"
    before = a(x)
    a.step()
    torch.testing.assert_close(a(x), before, rtol=0, atol=1e-6)
    torch.testing.assert_close(a.export()(x), a(x), rtol=0, atol=1e-6)


class _EncDec(nn.Module):
    def __init__(self):
        super().__init__()
        self.encoder = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])
        self.decoder = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])
        self.short = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        for layer in self.encoder:
            x = torch.tanh(layer(x))
        memory = x
        for layer in self.decoder:
            x = torch.tanh(layer(x)) + memory
        for layer in self.short:
            x = layer(x)
        return x


def test_several_stacks_grow_together_and_export_together():
    model = _EncDec()
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), stack=("encoder", "decoder"), sampler="unique",
                       optimizer_state="keep")
    assert a.plan.paths == ("encoder", "decoder")
    seen = []
    for name in ("encoder", "decoder"):
        for i, layer in enumerate(getattr(model, name)):
            layer.register_forward_pre_hook(lambda m, args, k=(name, i): seen.append(k))
    x = torch.randn(2, 4)
    a(x)
    assert seen == [("encoder", 0), ("encoder", 1), ("decoder", 0), ("decoder", 1)]
    a.eval()
    full = a(x)
    exported = a.export()
    torch.testing.assert_close(exported(x), full)
    for name in ("encoder", "decoder"):
        stack = getattr(exported, name)
        for j, s in enumerate(depth_map(2, 4)):
            assert torch.equal(stack[j].weight, getattr(model, name)[s].weight)
    with pytest.raises(GrowopsError, match="same number of growable blocks.*encoder \\(4\\), short \\(2\\)"):
        growops.apollo(_EncDec(), stages=(2, 4), stage_steps=(1,), stack=("encoder", "short"))


def test_choosing_the_growable_core_with_a_slice():
    arch = Arch("modulelist", "iterate", "A", 2, "", "", (), False)  # [A, A] then two C blocks: a tie
    model = Net(arch)
    model.layers.extend([type(model.layers[0])("C", 2, (), False), type(model.layers[0])("C", 3, (), False)])
    model.n = 4
    assert growops.plan(model).stacks[0].layout.core() == range(0, 2)  # a tie goes to the earlier run
    plan = growops.plan(model, stack="layers[2:]")
    assert plan.stacks[0].layout.core() == range(2, 4) and "fixed: layers.0, layers.1" in str(plan)
    with pytest.raises(GrowopsError, match=r"stack='layers\[1:3\]': children 1..2 hold no repeating blocks"):
        growops.plan(model, stack="layers[1:3]")
    a = growops.apollo(model, stages=(1, 2), stage_steps=(1,), stack="layers[2:]")
    assert decode_state(a.state_dict()["_extra_state"])["stack"] == ["layers[2:4]"]


# ---------------------------------------------------------------- found by trying models as a user would
class _Lin(nn.Module):
    def __init__(self, i: int = 0):
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.scale = 1.0 / (i + 1)

    def forward(self, x):
        return x + torch.tanh(self.fc(x) * self.scale)


class _Stack(nn.Module):
    def __init__(self, n=4, block=_Lin):
        super().__init__()
        self.layers = nn.ModuleList([block(i) for i in range(n)])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


def test_blocks_looked_up_by_name_run_in_graph_mode():
    class ByName(_Stack):
        def forward(self, x):
            for i in range(len(self.layers)):
                x = getattr(self.layers, str(i))(x)
            return x

    model = ByName()
    a = growops.apollo(model, stages=(1, 4), stage_steps=(1,), optimizer_state="keep").eval()
    assert a.mode == "graph"
    x = torch.randn(2, 4)
    before = a(x)
    torch.testing.assert_close(a.export().eval()(x), before)
    a.step()
    torch.testing.assert_close(a(x), before)  # 1 -> 4 by a multiple


def test_tensors_tied_across_blocks_are_refused_and_ties_in_every_block_work():
    model = _Stack()
    model.layers[2].fc = model.layers[1].fc
    with pytest.raises(GrowopsError, match="layers.1.fc.weight and layers.2.fc.weight are one tensor"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,))
    model = _Stack()
    model.head = nn.Linear(4, 4)
    model.head.weight = model.layers[3].fc.weight
    with pytest.raises(GrowopsError, match="layers.3.fc.weight and head.weight are one tensor"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,))
    assert type(model.layers) is nn.ModuleList
    model = _Stack()
    shared = nn.Linear(4, 4)
    for layer in model.layers:
        layer.extra = shared  # tied alike in every block: growth copies it onto itself
    growops.apollo(model, stages=(2, 4), stage_steps=(1,))


class _CachedBlock(_Lin):
    """Keeps a key cache in a buffer, as Meta's reference LLaMA does."""

    def __init__(self, i: int = 0):
        super().__init__(i)
        self.register_buffer("cache", torch.zeros(2, 8, 4), persistent=False)

    def forward(self, x, start: int = 0):
        self.cache[:, start:start + x.shape[1]] = self.fc(x).detach()
        return x + torch.tanh(self.cache[:, :start + x.shape[1]].mean(1, keepdim=True) * self.scale)


class _Cached(_Stack):
    def __init__(self):
        super().__init__(block=_CachedBlock)

    def forward(self, x, start: int = 0):
        for layer in self.layers:
            x = layer(x, start)
        return x


def test_state_written_into_a_shared_block_is_refused_until_declared():
    x = torch.randn(2, 3, 4)
    a = growops.apollo(_Cached(), stages=(1, 4), stage_steps=(5,), example_inputs=(x,)).eval()
    with pytest.raises(GrowopsError, match="the forward changed cache in layers's unit 0 while that unit ran at "
                                           "several positions.*declare\\(per_layer=\\['cache'\\]\\)"):
        a(x)
    model = _Cached()
    plan = growops.plan(model, example_inputs=(x,)).declare(per_layer=["cache"])
    a = growops.apollo(model, stages=(1, 4), stage_steps=(5,), plan=plan).eval()
    exported = a.export().eval()
    for start in (0, 3):  # prefill, then decode: every position keeps its own cache
        step = x[:, :3] if start == 0 else x[:, :1]
        torch.testing.assert_close(a(step, start), exported(step, start))


def _shared_grads(model_cls, checkpointed: bool, reentrant: bool = False, stages=(1, 4)) -> dict:
    torch.manual_seed(0)
    model = model_cls()
    model.checkpointed, model.reentrant = checkpointed, reentrant
    a = growops.apollo(model, stages=stages, stage_steps=(5,)[:len(stages) - 1], sampler="full")
    a(torch.ones(2, 4, requires_grad=True)).square().sum().backward()  # reentrant checkpoints need an input grad
    return {n: p.grad for n, p in model.named_parameters() if p.grad is not None}


class _CheckpointedLoop(_Stack):
    """nanoGPT's activation checkpointing: each block checkpointed from the parent's loop."""

    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        for layer in self.layers:
            x = checkpoint(layer, x, use_reentrant=self.reentrant) if self.checkpointed else layer(x)
        return x


def test_whole_blocks_recomputed_get_their_positions_values_back():
    """A shared block recomputed in the backward runs with the per-layer values of the position it ran at (its
    output told the backward), so checkpointing changes no gradient."""
    plain, checkpointed = _shared_grads(_CheckpointedLoop, False), _shared_grads(_CheckpointedLoop, True)
    assert plain.keys() == checkpointed.keys() == {"layers.0.fc.weight", "layers.0.fc.bias"}
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])
    with pytest.raises(GrowopsError, match="cannot tell which position it ran at.*per-layer values \\(scale\\)"):
        _shared_grads(_CheckpointedLoop, True, reentrant=True)  # a reentrant checkpoint hides the block's output
    # Every block its own (the last stage): a reentrant recomputation runs each block with its own values, rightly.
    plain = _shared_grads(_CheckpointedLoop, False, stages=(4,))
    checkpointed = _shared_grads(_CheckpointedLoop, True, reentrant=True, stages=(4,))
    assert plain.keys() == checkpointed.keys() and len(plain) == 8
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])


class _CheckpointedInside(_Stack):
    """Checkpointing inside each block, around its computation."""

    def __init__(self):
        super().__init__(block=_InsideBlock)

    def forward(self, x):
        for layer in self.layers:
            layer.checkpointed = self.checkpointed
            x = layer(x)
        return x


class _InsideBlock(_Lin):
    def forward(self, x):
        from torch.utils.checkpoint import checkpoint

        return checkpoint(super().forward, x, use_reentrant=False) if self.checkpointed else super().forward(x)


def test_part_of_a_block_recomputed_gets_its_positions_values_back():
    plain, checkpointed = _shared_grads(_CheckpointedInside, False), _shared_grads(_CheckpointedInside, True)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name])


def test_a_method_iterating_the_container_is_refused_while_blocks_are_stale():
    class WithEncode(_Stack):
        def encode(self, x):  # not the forward: the container is physical here
            for layer in self.layers:
                x = layer(x)
            return x

    model = WithEncode()
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), sampler="full")
    with pytest.raises(GrowopsError, match="layers.1 ran outside the model's forward, where position 1 runs unit 0"):
        model.encode(torch.randn(2, 4))
    a.step()  # every block live: the physical blocks are the model
    torch.testing.assert_close(model.encode(torch.ones(2, 4)), a(torch.ones(2, 4)))
    model = WithEncode()
    for layer in model.layers:
        layer.scale = 1.0  # no per-layer values: only the blocks themselves are guarded
    growops.apollo(model, stages=(2, 4), stage_steps=(1,), sampler="full")
    with pytest.raises(GrowopsError, match="layers.1 ran outside the model's forward, where position 1 runs unit 0"):
        model.encode(torch.randn(2, 4))


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated")
def test_more_block_kinds():
    from torch.nn.utils import parametrizations

    model = _Stack()
    for layer in model.layers:  # each parametrized module gets a class of its own: still one stack
        parametrizations.weight_norm(layer.fc)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), optimizer_state="keep").eval()
    x = torch.randn(2, 4)
    before = a(x)
    a.step()
    torch.testing.assert_close(a(x), before)

    model = _Stack()
    model.acts = nn.ModuleList([nn.GELU() for _ in range(4)])  # nothing to grow: not a candidate stack
    assert growops.plan(model).paths == ("layers",)

    model = _Stack()
    model.layers = nn.ModuleList([torch.jit.script(_Lin(i)) for i in range(4)])
    with pytest.raises(GrowopsError, match="layers.0 is a TorchScript module"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,))


def test_stacks_run_twice_and_stacks_of_stacks_run_in_container_mode():
    class Siamese(_Stack):
        def forward(self, x):
            return super().forward(x) - super().forward(x.flip(0))

    a = growops.apollo(Siamese(), stages=(2, 4), stage_steps=(1,), sampler="unique")
    assert a.mode == "container"
    x = torch.randn(2, 4)
    untied = Siamese()
    untied.layers = nn.ModuleList([copy.deepcopy(a.model.layers[0]), copy.deepcopy(a.model.layers[1])])
    torch.testing.assert_close(a(x), untied(x))

    class Stages(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.ModuleList([_Lin(), _Lin()]) for _ in range(4)])

        def forward(self, x):
            for stage in self.layers:
                for block in stage:
                    x = block(x)
            return x

    a = growops.apollo(Stages(), stages=(2, 4), stage_steps=(1,))
    assert a.mode == "container" and a.plan.paths == ("layers",)
