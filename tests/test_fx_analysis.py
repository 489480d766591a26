import copy
import re

import pytest
import torch
from torch import nn

import growops
from growops.fx import find_block_stacks, trace_model
from growops.fx.analysis import analyse, call_sequence
from growops.structure import block_containers
from tests.models import EncoderDecoder, IndexLoopNet, NoStack, ParallelExperts, SequentialNet, tiny_gpt


def _leaves(model):
    return {model.get_submodule(b) for blocks, _ in block_containers(model).values() for b in blocks}


def _stacks(model, example_inputs=None):
    traced = trace_model(model, _leaves(model), example_inputs)
    return traced, find_block_stacks(traced.graph_module, model)


def test_symbolic_trace_finds_gpt_blocks():
    model = tiny_gpt(4)
    traced, stacks = _stacks(model)
    assert traced.kind == "symbolic"
    assert [s.path for s in stacks] == ["blocks"]
    assert stacks[0].blocks == tuple(f"blocks.{i}" for i in range(4))


def test_export_finds_the_same_stack_when_symbolic_trace_fails():
    model = tiny_gpt(4)
    ep = torch.export.export(model, (), model.dummy_inputs, strict=False).module()
    stacks = find_block_stacks(ep, model)
    assert [s.blocks for s in stacks] == [tuple(f"blocks.{i}" for i in range(4))]
    # every compute node of a block is tagged with its index
    tagged = {n.meta["growops_block"][1] for n in ep.graph.nodes if "growops_block" in n.meta}
    assert tagged == {0, 1, 2, 3}


def test_index_loop_shared_inputs_and_per_layer_constants():
    model = IndexLoopNet(5)
    _, stacks = _stacks(model)
    (stack,) = stacks
    assert stack.path == "layers" and stack.layers == 5
    assert len(stack.shared_inputs) == 1  # the sigmoid scale, read by every block


def test_sequential_stack():
    model = SequentialNet(3)
    _, stacks = _stacks(model)
    assert [s.path for s in stacks] == ["blocks"]


def test_two_stacks_are_both_reported():
    _, stacks = _stacks(EncoderDecoder())
    assert sorted(s.path for s in stacks) == ["decoder", "encoder"]


def test_parallel_identical_modules_are_not_a_stack():
    model = ParallelExperts()
    traced = trace_model(model, _leaves(model))
    stacks, notes = analyse(traced.graph_module, model)
    assert stacks == []
    assert "experts" in notes[0] and "not a chain" in notes[0]


def test_no_repeated_container():
    assert block_containers(NoStack()) == {}


def test_stacks_nested_in_blocks_are_ignored():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.sub = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

        def forward(self, x):
            for s in self.sub:
                x = s(x)
            return x

    class Outer(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([Inner() for _ in range(3)])

        def forward(self, x):
            for layer in self.layers:
                x = layer(x)
            return x

    model = Outer()
    ep = torch.export.export(model, (torch.randn(2, 4),), strict=False).module()
    assert [s.path for s in find_block_stacks(ep, model)] == ["layers"]


def test_call_sequence_ignores_weights_only_and_counts_repeats():
    class Reuse(nn.Module):
        def __init__(self):
            super().__init__()
            self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])

        def forward(self, x):
            x = self.layers[0](self.layers[0](x))
            return x + self.layers[2].weight.sum()  # reads block 2's weight, never calls it

    model = Reuse()
    names = ("layers.0", "layers.1", "layers.2")
    ep = torch.export.export(model, (torch.randn(2, 4),), strict=False).module()
    assert call_sequence(ep, names) == [0, 0]
    gm = trace_model(model, set(model.layers)).graph_module
    assert call_sequence(gm, names) == [0, 0]


class _ReadsABlockWeight(nn.Module):
    """Reads block k's weight after the loop: while blocks are shared, which block's weight would that be?"""

    def __init__(self, k=2):
        super().__init__()
        self.n, self.k = 4, k
        self.layers = nn.ModuleList([nn.Linear(4, 4) for _ in range(4)])

    def forward(self, x):
        for i in range(self.n):
            x = self.layers[i](x)
        return x * self.layers[self.k].weight.sum()


@pytest.mark.parametrize("k", [1, 2, 3])
def test_a_tensor_of_a_block_but_the_first_read_outside_the_block_is_refused_by_name(k):
    with pytest.raises(growops.GrowopsError, match=rf"the forward reads layers.{k}.weight, a tensor of layers.{k}, "
                                                   r"outside the block \(`sum_1` \(at .*weight.sum\(\)\)\): while "
                                                   r"blocks are shared .*Use it inside the block \(outside it, only "
                                                   r"layers.0's, which position 0 runs at every depth\)"):
        growops.plan(_ReadsABlockWeight(k), example_inputs=(torch.randn(2, 4),))


class _AdaNorm(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.emb = nn.Linear(1, 2 * width)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)

    def forward(self, x, emb):
        scale, shift = emb.chunk(2, -1)
        return self.norm(x) * (1 + scale) + shift


class _DiTBlock(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.norm1 = _AdaNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x, emb):
        return x + torch.tanh(self.fc(self.norm1(x, emb)))


class _DiT(nn.Module):
    """Conditions every block on an embedding that block `reads`'s submodule computes before the loop, and scales its
    output by that block's weight after it, as diffusers' DiT reads ``transformer_blocks[0].norm1.emb``."""

    def __init__(self, n=4, reads=0):
        super().__init__()
        self.n, self.reads = n, reads
        self.inp = nn.Linear(4, 8)
        self.blocks = nn.ModuleList([_DiTBlock() for _ in range(n)])
        self.out = nn.Linear(8, 3)

    def forward(self, x, t):
        emb = nn.functional.silu(self.blocks[self.reads].norm1.emb(t))
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(h) * self.blocks[self.reads].fc.weight.mean()


class _DiTExported(_DiT):
    """Does not symbolically trace: growops reads it through torch.export."""

    def forward(self, x, t):
        if x.dim() != 2:
            raise ValueError("expected (batch, 4) inputs")
        return super().forward(x, t)


class _DiTIndexed(_DiT):
    """Reaches its blocks by index: graph mode."""

    def forward(self, x, t):
        emb = nn.functional.silu(self.blocks[self.reads].norm1.emb(t))
        h = self.inp(x)
        for i in range(self.n):
            h = self.blocks[i](h, emb)
        return self.out(h) * self.blocks[self.reads].fc.weight.mean()


def _dit_inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, 4, generator=g), torch.rand(6, 1, generator=g)


def _dit_untied(model, mapping):
    ref = type(model)(len(mapping))
    ref.inp.load_state_dict(model.inp.state_dict())
    ref.out.load_state_dict(model.out.state_dict())
    for i, unit in enumerate(mapping):
        ref.blocks[i].load_state_dict(model.blocks[unit].state_dict())
    return ref


@pytest.mark.parametrize("cls, mode", [(_DiT, "container"), (_DiTExported, "container"), (_DiTIndexed, "graph")])
def test_block_0s_submodule_and_weight_used_outside_the_loop_are_unit_0s_at_every_depth(cls, mode):
    """Position 0 runs unit 0 at every depth and under every growth map, so block 0's modules and tensors used
    outside the blocks are the same function at every depth: the model at one stage of every unit, and mid-schedule
    a plain model of the depth run whose block i copies unit floor(i*N/d), through a growth."""
    torch.manual_seed(0)
    model = cls()
    reference = copy.deepcopy(model)
    a = growops.apollo(model, stages=(4,), stage_steps=(), example_inputs=_dit_inputs())
    assert a.mode == mode
    for train in (True, False):
        a.train(train)
        reference.train(train)
        assert torch.equal(a(*_dit_inputs(1)), reference(*_dit_inputs(1)))
    torch.manual_seed(0)
    model = cls()
    a = growops.apollo(model, stages=(2, 4), stage_steps=(2,), sampler=lambda unique, layers, rng: max(unique, 3),
                       example_inputs=_dit_inputs())
    opt = torch.optim.SGD(a.parameters(), lr=0.2)
    for step in range(4):
        out = a(*_dit_inputs(step))
        torch.testing.assert_close(out, _dit_untied(model, a.mapping())(*_dit_inputs(step)), rtol=0, atol=1e-6)
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
    assert a.unique_layers == 4
    a.eval()
    assert torch.equal(a.export().eval()(*_dit_inputs(9)), a(*_dit_inputs(9)))


@pytest.mark.parametrize("cls, why", [
    (_DiT, r"the forward calls blocks.2.norm1.emb, a module of blocks.2, outside the block \(`silu` \(at .*Use it "
           r"inside the block \(outside it, only blocks.0's"),
    (_DiTExported, r"the forward reads blocks.2.norm1.emb.weight, a tensor of blocks.2, outside the block \(`linear` "
                   r"\(at .*Use it inside the block"),
])
def test_another_blocks_submodule_used_outside_the_loop_is_refused_by_name(cls, why):
    with pytest.raises(growops.GrowopsError, match=why):
        growops.plan(cls(reads=2), example_inputs=_dit_inputs())


class _Residual(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 4)

    def forward(self, x):
        return x + self.fc(x)


class _SameBlockThrice(nn.Module):
    def __init__(self):
        super().__init__()
        block = _Residual()
        self.layers = nn.ModuleList([block, block, block])

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return x


class _Reversed(nn.Module):
    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([_Residual() for _ in range(3)])

    def forward(self, x):
        for layer in reversed(self.layers):
            x = layer(x)
        return x


@pytest.mark.parametrize("model, why", [
    (_SameBlockThrice, "layers.0 and layers.1 are the same module: its blocks already share their weights, and "
                       "growops grows stacks of distinct blocks"),
    (_Reversed, "not a chain: layers.0 reads layers.1's output, but the blocks must run in the container's order, "
                "layers.0 first (reversed or reordered iteration is not supported)"),
])
def test_containers_that_are_not_stacks_are_refused_saying_why(model, why):
    with pytest.raises(growops.GrowopsError, match=re.escape(f"(layers (3 x _Residual): {why})")):
        growops.plan(model())


class _Rope(nn.Module):
    """A rotary-like table kept in a buffer: torchtune builds one and hands the same object to every layer."""

    def __init__(self, width=8, length=16):
        super().__init__()
        angles = torch.arange(length)[:, None] * torch.linspace(0.1, 1.0, width)[None]
        self.register_buffer("cache", angles.cos(), persistent=False)

    def forward(self, x):
        return x * self.cache[: x.shape[1]]


class _RopeAttention(nn.Module):
    def __init__(self, pos_embeddings):
        super().__init__()
        self.q = nn.Linear(8, 8)
        self.pos_embeddings = pos_embeddings

    def forward(self, x):
        return self.pos_embeddings(self.q(x))


class _RopeBlock(nn.Module):
    def __init__(self, pos_embeddings):
        super().__init__()
        self.attn = _RopeAttention(pos_embeddings)
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        return x + torch.tanh(self.fc(self.attn(x)))


class _SharedRope(nn.Module):
    """Every layer's attention holds the same rotary module (`share="all"`), or only every other layer's does."""

    def __init__(self, n=4, share="all"):
        super().__init__()
        rope = _Rope()
        self.inp = nn.Linear(4, 8)
        self.layers = nn.ModuleList([_RopeBlock(rope if share == "all" or i % 2 == 0 else _Rope()) for i in range(n)])

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return h


class _SharedRopeExported(_SharedRope):
    def forward(self, x):
        if x.dim() != 3:  # control flow on a traced value: symbolic_trace fails, torch.export does not
            raise ValueError("expected (batch, length, 4) inputs")
        return super().forward(x)


def _rope_x(seed=0):
    return torch.randn(2, 5, 4, generator=torch.Generator().manual_seed(seed))


def test_a_module_shared_by_every_block_belongs_to_each_call_in_an_export_graph():
    """torch.export names the shared table after one of its holders (layers.3): its reads belong to no block, and the
    nodes of each call of the shared module to the block that calls it."""
    model = _SharedRope()
    ep = torch.export.export(model, (_rope_x(),), strict=False).module()
    (stack,) = find_block_stacks(ep, model)
    assert stack.path == "layers" and stack.layers == 4
    tables = [n for n in ep.graph.nodes if n.op == "get_attr" and n.target.endswith("pos_embeddings.cache") and n.users]
    assert len(tables) == 1 and "growops_block" not in tables[0].meta
    assert [u.meta["growops_block"] for u in tables[0].users] == [("layers", k) for k in range(4)]


@pytest.mark.parametrize("cls", [_SharedRope, _SharedRopeExported])
def test_a_module_shared_by_every_block_grows_like_any_other(cls):
    torch.manual_seed(0)
    model = cls()
    reference = copy.deepcopy(model)
    a = growops.apollo(model, stages=(4,), stage_steps=(), example_inputs=(_rope_x(),))
    assert a.mode == "container"
    assert torch.equal(a(_rope_x(1)), reference(_rope_x(1)))
    torch.manual_seed(0)
    model = cls()
    a = growops.apollo(model, stages=(2, 4), stage_steps=(2,), sampler=lambda unique, layers, rng: max(unique, 3),
                       example_inputs=(_rope_x(),))
    opt = torch.optim.SGD(a.parameters(), lr=0.2)
    for step in range(4):
        out = a(_rope_x(step))
        untied = cls(len(a.mapping()))
        untied.inp.load_state_dict(model.inp.state_dict())
        for i, unit in enumerate(a.mapping()):
            untied.layers[i].load_state_dict(model.layers[unit].state_dict())
        torch.testing.assert_close(out, untied(_rope_x(step)), rtol=0, atol=1e-6)
        out.pow(2).mean().backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
    a.eval()
    assert torch.equal(a.export().eval()(_rope_x(9)), a(_rope_x(9)))


@pytest.mark.parametrize("cls", [_SharedRope, _SharedRopeExported])
def test_a_module_shared_by_some_blocks_is_still_refused_as_a_tie(cls):
    with pytest.raises(growops.GrowopsError, match=r"layers.0.attn.pos_embeddings.cache and layers.2.attn."
                                                   r"pos_embeddings.cache are one tensor, tied across blocks"):
        growops.apollo(cls(share="some"), stages=(2, 4), stage_steps=(1,), example_inputs=(_rope_x(),))


transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _zamba(units):
    config = transformers.ZambaConfig(num_hidden_layers=2 * units, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=100, mamba_d_state=4,
                                      n_mamba_heads=2, max_position_embeddings=64,
                                      layers_block_type=["linear_attention", "hybrid"] * units)
    return transformers.ZambaForCausalLM(config)


def _ids():
    return torch.randint(0, 100, (2, 10), generator=torch.Generator().manual_seed(1))


def test_zambas_attention_block_shared_by_every_hybrid_layer():
    """Zamba ties one attention block into every hybrid layer: units of (mamba, hybrid) grow, the tie stays."""
    torch.manual_seed(0)
    model = _zamba(3)
    reference = copy.deepcopy(model)
    a = growops.apollo(model, stages=(1, 3), stage_steps=(1,), sampler=lambda unique, layers, rng: 2 if unique == 1
                       else 3)
    assert a.mode == "container" and a.plan.stacks[0].layout.period == 2 and a.layers == 3
    out = a(input_ids=_ids(), labels=_ids())
    untied = _zamba(2)
    untied.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")},
                           strict=False)
    for i in range(4):  # both positions run unit 0
        untied.model.layers[i].load_state_dict(model.model.layers[i % 2].state_dict())
    torch.testing.assert_close(out.loss, untied(input_ids=_ids(), labels=_ids()).loss, rtol=0, atol=1e-6)
    a.step()
    a.eval()
    reference.load_state_dict(a.export().state_dict())
    assert torch.equal(a(input_ids=_ids()).logits, reference.eval()(input_ids=_ids()).logits)


def _zamba2(types):
    config = transformers.Zamba2Config(num_hidden_layers=len(types), hidden_size=32, num_attention_heads=2,
                                       intermediate_size=64, vocab_size=100, mamba_d_state=8, n_mamba_heads=2,
                                       chunk_size=8, max_position_embeddings=64, layers_block_type=types,
                                       num_mem_blocks=1, adapter_rank=4)
    return transformers.Zamba2ForCausalLM(config)


def test_zamba2_hybrid_layers_in_the_growable_core_are_refused_for_their_adapters():
    """Zamba2's shared block holds one adapter per hybrid layer and picks it by the loop index the forward passes:
    at another depth a position would pick by its own index."""
    with pytest.raises(growops.GrowopsError, match=r"model.layers.2 and model.layers.5 read different tensors of a "
                                                   r"module that every unit holds alike: model.layers.2 reads its "
                                                   r"shared_transformer.feed_forward.gate_up_proj_adapter_list.0.0"
                                                   r".weight, model.layers.5 does not"):
        growops.plan(_zamba2(["mamba", "mamba", "hybrid"] * 2))


def test_zamba2_with_its_hybrid_layer_fixed_before_the_core():
    torch.manual_seed(0)
    model = _zamba2(["hybrid", "mamba", "mamba", "mamba", "mamba"])
    reference = copy.deepcopy(model)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), sampler="full")
    assert a.plan.stacks[0].layout.prefix == 1 and a.layers == 4
    mapping = a.mapping()
    out = a(input_ids=_ids(), labels=_ids())
    for i, unit in enumerate(mapping):
        reference.model.layers[1 + i].load_state_dict(model.model.layers[1 + unit].state_dict())
    assert mapping == (0, 0, 1, 1)
    torch.testing.assert_close(out.loss, reference(input_ids=_ids(), labels=_ids()).loss, rtol=0, atol=1e-6)


def test_zamba2_with_a_hybrid_layer_fixed_after_the_core_is_refused_for_the_real_reason():
    """Its fixed hybrid layer looks the loop index up in a table built for L layers (Zamba2MLP.layer_dic): at another
    depth it gets its position, a KeyError."""
    with pytest.raises(growops.GrowopsError, match=r"with fewer positions in model.layers its forward fails "
                                                   r"\(.*KeyError.*looks the loop index up in a table"):
        growops.plan(_zamba2(["mamba", "mamba", "mamba", "hybrid"]))


class _CastsFirst(nn.Module):
    """Starts with x.float(), which hands a float32 input back as it is (torchtune's RMSNorm does)."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, x):
        x = x.float()
        return x + torch.tanh(self.fc(x))


class _SavesBefore(nn.Module):
    """Saves the hidden state before the layers in `taps` (torchtune's output_hidden_states); exported, not traced."""

    def __init__(self, taps):
        super().__init__()
        self.layers = nn.ModuleList(_CastsFirst() for _ in range(4))
        self.taps = taps
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        if x.shape[0] > 100:  # symbolic tracing fails here: torch.export makes the graph
            raise ValueError("batch too large")
        hidden = []
        for i, layer in enumerate(self.layers):
            if i in self.taps:
                hidden.append(x)
            x = layer(x)
        return [*hidden, self.head(x)]


def test_a_value_a_block_hands_back_unchanged_is_not_that_blocks_output():
    """torch.export records a tensor that x.float() returns as it is under the block's node: the hidden state saved
    before layer 3 is layer 2's output (a tap: refused, naming layer 2), the one saved before layer 0 is the input
    (the same at every depth: accepted)."""
    x = torch.randn(2, 8)
    with pytest.raises(growops.GrowopsError, match=r"layers.2.s output is returned"):
        growops.plan(_SavesBefore([3]), example_inputs=(x,))
    torch.manual_seed(0)
    model = _SavesBefore([0])
    reference = copy.deepcopy(model)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(5,), example_inputs=(x,), sampler="full")
    out = a(x)
    untied = copy.deepcopy(reference)
    for i, unit in enumerate(a.mapping()):
        untied.layers[i].load_state_dict(reference.layers[unit].state_dict())
    for got, expected in zip(out, untied(x), strict=True):
        torch.testing.assert_close(got, expected, rtol=0, atol=0)
