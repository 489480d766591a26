import copy
import inspect
import re
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import growops
from growops import GrowopsError, GrowopsTypeError
from growops.maps import depth_map
from growops.state import decode_state
from tests.models import (
    BufferNet,
    EncoderDecoder,
    IndexLoopNet,
    NoStack,
    ParallelExperts,
    SequentialNet,
    UntraceableIndexNet,
    gpt_batch,
    tiny_gpt,
    train_steps,
)


def _gpt_loss(model, batch):
    return model(**batch).loss


def _loop_loss(model, x):
    return model(x).square().mean()


def _calls(a):
    """Record which block (by index) runs, in order."""
    seen = []
    for i, b in enumerate(a._runtimes[0].blocks):
        b.register_forward_hook(lambda m, args, out, i=i: seen.append(i))
    return seen


@pytest.mark.parametrize("make, inputs", [
    (lambda: tiny_gpt(4), lambda: gpt_batch()),
    (lambda: IndexLoopNet(4), lambda: (torch.randn(3, 4),)),
    (lambda: SequentialNet(4), lambda: (torch.randn(3, 4),)),
])
def test_one_stage_of_all_blocks_is_the_original_model(make, inputs):
    model, x = make(), inputs()
    x_args, x_kwargs = (x, {}) if isinstance(x, tuple) else ((), x)
    expected = model(*x_args, **x_kwargs)
    a = growops.apollo(model, stages=(4,), stage_steps=())
    got = a(*x_args, **x_kwargs)
    for train in (True, False):
        a.train(train)
        got = a(*x_args, **x_kwargs)
        expected_t = expected.logits if hasattr(expected, "logits") else expected
        got_t = got.logits if hasattr(got, "logits") else got
        assert torch.equal(got_t, expected_t)
    assert a.depth == a.unique_layers == a.layers == 4


def test_modes():
    assert growops.apollo(tiny_gpt(2), stages=(1, 2), stage_steps=(1,)).mode == "container"
    assert growops.apollo(SequentialNet(2), stages=(1, 2), stage_steps=(1,)).mode == "container"
    assert growops.apollo(IndexLoopNet(2), stages=(1, 2), stage_steps=(1,)).mode == "graph"


@pytest.mark.parametrize("make", [lambda: tiny_gpt(6), lambda: IndexLoopNet(6)])
def test_train_runs_sampled_depth_and_eval_runs_full_depth(make):
    a = growops.apollo(make(), stages=(2, 6), stage_steps=(100,), sampler="uniform", seed=3)
    x = gpt_batch() if isinstance(a.model, nn.Module) and hasattr(a.model, "wte") else torch.randn(2, 4)
    seen = _calls(a)
    run = (lambda: a(**x)) if isinstance(x, dict) else (lambda: a(x))
    for _ in range(5):
        seen.clear()
        run()
        assert seen == list(depth_map(2, a.depth))
        a.step()
    a.eval()
    seen.clear()
    run()
    assert seen == list(depth_map(2, 6))


@given(st.integers(1, 3), st.data())
def test_shared_gradient_is_the_sum_of_untied_copies(unique, data):
    """d loss / d w of a shared block = sum of the gradients its untied copies would get."""
    torch.manual_seed(0)
    depth = data.draw(st.integers(unique, 6))
    model = tiny_gpt(6)
    untied = copy.deepcopy(model)
    a = growops.apollo(model, stages=(unique, 6) if unique < 6 else (6,), stage_steps=(10,) if unique < 6 else ())
    a._configure(a.unique_layers, depth)
    batch = gpt_batch()
    _gpt_loss(a, batch).backward()
    mapping = depth_map(unique, depth)
    untied.blocks = nn.ModuleList([copy.deepcopy(model.blocks[m]) for m in mapping])
    for b in untied.blocks:
        b.zero_grad()
    _gpt_loss(untied, batch).backward()
    for j in range(unique):
        for (name, p) in model.blocks[j].named_parameters():
            copies = [dict(untied.blocks[i].named_parameters())[name] for i, m in enumerate(mapping) if m == j]
            expected = sum(c.grad for c in copies)
            torch.testing.assert_close(p.grad, expected, rtol=1e-5, atol=1e-6)
    for j in range(unique, 6):  # blocks not yet live get no gradient
        assert all(p.grad is None for p in model.blocks[j].parameters())


@pytest.mark.parametrize("growth", ["interpolate", "stack"])
def test_growth_by_a_multiple_keeps_the_function(growth):
    a = growops.apollo(tiny_gpt(12), stages=(2, 4, 12), stage_steps=(1, 2), growth=growth, sampler="full")
    batch = {"input_ids": gpt_batch()["input_ids"]}
    # interpolation keeps every depth; stacking keeps depths that are multiples of the new count
    depths = range(4, 13) if growth == "interpolate" else (4, 8, 12)
    with torch.no_grad():
        before = {}
        for d in depths:
            a._configure(a.unique_layers, d)
            before[d] = a(**batch).logits
        a.step()  # 2 -> 4 unique blocks
        for d in depths:
            a._configure(a.unique_layers, d)
            torch.testing.assert_close(a(**batch).logits, before[d], rtol=0, atol=1e-5)


@pytest.mark.parametrize("make, x", [(lambda: tiny_gpt(6), None), (lambda: IndexLoopNet(6), "tensor")])
def test_export_equals_full_depth_with_original_class_and_keys(make, x):
    model = make()
    keys = list(model.state_dict())
    cls = type(model)
    a = growops.apollo(model, stages=(1, 3, 6), stage_steps=(1, 3))
    inputs = {"input_ids": gpt_batch()["input_ids"]} if x is None else {"x": torch.randn(2, 4)}
    for _ in range(2):  # in stage 1: 3 unique blocks
        a.step()
    a.eval()
    exported = a.export()
    exported.eval()
    assert type(exported) is cls
    assert list(exported.state_dict()) == keys
    out_a, out_e = a(**inputs), exported(**inputs)
    torch.testing.assert_close(getattr(out_e, "logits", out_e), getattr(out_a, "logits", out_a))
    # untied: six distinct block objects, parameters not shared with the wrapped model
    blocks = exported.blocks if x is None else exported.layers
    assert len({id(b) for b in blocks}) == 6 and type(blocks) is nn.ModuleList
    ours = {p.data_ptr() for p in a.parameters()}
    assert not ours & {p.data_ptr() for p in exported.parameters()}


def test_export_renumbers_per_layer_values():
    model = tiny_gpt(4)
    for i, b in enumerate(model.blocks):
        b.attn.layer_idx = i
    a = growops.apollo(model, stages=(1, 4), stage_steps=(5,))
    assert a.plan.stacks[0].per_layer_values == {"attn.layer_idx": (0, 1, 2, 3)}
    exported = a.export()
    assert [b.attn.layer_idx for b in exported.blocks] == [0, 1, 2, 3]


def test_export_of_a_model_that_cannot_be_deep_copied_says_what_to_do():
    class Handle:
        def __deepcopy__(self, memo):
            raise RuntimeError("no copy")

    model = tiny_gpt(4)
    model.handle = Handle()
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,))
    with pytest.raises(GrowopsError, match=re.escape(
            "export() deep-copies the model, which failed (RuntimeError: no copy); a sharded model (FSDP2) must be "
            "gathered first: load its full state dict into an unsharded apollo of the same schedule and export that")):
        a.export()


def test_step_grows_and_samples_deterministically():
    a = growops.apollo(tiny_gpt(12), stages=(1, 3, 6, 12), stage_steps=(3, 6, 9), seed=7)
    b = growops.apollo(tiny_gpt(12), stages=(1, 3, 6, 12), stage_steps=(3, 6, 9), seed=7)
    history = []
    for _ in range(10):
        assert a.depth == b.depth
        history.append((a.step_count, a.stage, a.unique_layers, a.depth))
        assert a.unique_layers <= a.depth <= 12
        a.step()
        b.step()
    assert [h[1] for h in history] == [0, 0, 0, 1, 1, 1, 2, 2, 2, 3]
    assert [h[2] for h in history] == [1, 1, 1, 3, 3, 3, 6, 6, 6, 12]


@pytest.mark.parametrize("sampler, expected", [("unique", lambda n: n), ("full", lambda n: 6)])
def test_fixed_samplers(sampler, expected):
    a = growops.apollo(tiny_gpt(6), stages=(2, 6), stage_steps=(2,), sampler=sampler)
    for _ in range(4):
        assert a.depth == expected(a.unique_layers)
        a.step()


def test_callable_sampler_and_its_checks():
    calls = []

    def sampler(unique, layers, rng):
        calls.append((unique, layers))
        return layers - 1

    a = growops.apollo(tiny_gpt(6), stages=(2, 6), stage_steps=(5,), sampler=sampler)
    assert a.depth == 5 and calls == [(2, 6)]
    assert growops.apollo(tiny_gpt(6), stages=(2, 6), stage_steps=(5,), sampler=lambda u, n, rng: 4.0).depth == 4
    for bad, error, match in [(7, GrowopsError, r"returned depth 7 at step 0; it must lie in \[unique=2, L=6\]"),
                              ("deep", GrowopsTypeError, "must return an int"),
                              (3.9, GrowopsTypeError, "must return an int")]:
        model = tiny_gpt(6)
        with pytest.raises(error, match=match):
            growops.apollo(model, stages=(2, 6), stage_steps=(5,), sampler=lambda u, n, rng, bad=bad: bad)
        assert type(model.blocks) is nn.ModuleList  # rejected before the model was touched


OPTIMIZERS = {"adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-3), "adam": lambda ps: torch.optim.Adam(ps, lr=1e-3),
              "sgd-momentum": lambda ps: torch.optim.SGD(ps, lr=1e-2, momentum=0.9)}


@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
@pytest.mark.parametrize("policy", ["copy", "reset", "keep"])
def test_optimizer_state_policy_end_to_end(policy, optimizer):
    """At growth 2 -> 4 (sources 0, 0, 1, 1): copy gives each block its source's state (moments, momentum, step);
    reset leaves each changed block without state; keep moves nothing."""
    a = growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(2,), optimizer_state=policy, sampler="full")
    opt = OPTIMIZERS[optimizer](a.parameters())
    batch = gpt_batch()
    blocks = list(a._runtimes[0].blocks)
    for _ in range(2):
        _gpt_loss(a, batch).backward()
        opt.step()
        opt.zero_grad()
        if a.step_count == 1:
            snapshot = {p: {k: v.clone() for k, v in opt.state[p].items()} for p in a.parameters() if p in opt.state}
        a.step(opt)
    assert a.unique_layers == 4
    for j, s in enumerate((0, 0, 1, 1)):
        for p, src in zip(blocks[j].parameters(), blocks[s].parameters()):
            state = opt.state.get(p, {})
            expected = {"copy": snapshot.get(src, {}), "keep": snapshot.get(p, {}),
                        "reset": {} if j != s else snapshot.get(p, {})}[policy]
            assert state.keys() == expected.keys(), (j, policy)
            assert all(torch.equal(state[k], expected[k]) for k in state)


def test_growth_without_optimizer_warns_once():
    a = growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(1, 2))
    with pytest.warns(UserWarning, match="without an optimizer"):
        a.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.step()


def test_non_multiple_interpolation_warns():
    with pytest.warns(UserWarning, match=r"non-multiple \(2 -> 3\)"):
        growops.apollo(tiny_gpt(6), stages=(2, 3, 6), stage_steps=(1, 2))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        growops.apollo(tiny_gpt(6), stages=(2, 3, 6), stage_steps=(1, 2), growth="stack")


def test_forward_signature_is_the_models():
    model = tiny_gpt(2)
    a = growops.apollo(model, stages=(1, 2), stage_steps=(1,))
    assert inspect.signature(a.forward) == inspect.signature(model.forward)
    assert type(a.model) is type(model)


def test_state_dict_round_trip_and_resume():
    torch.manual_seed(0)
    make = lambda: growops.apollo(tiny_gpt(4, seed=1), stages=(1, 2, 4), stage_steps=(2, 4), seed=5)
    a = make()
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    batch = gpt_batch()

    def train(model, optimizer, n):
        return train_steps(model, optimizer, n, lambda m, step: _gpt_loss(m, batch))

    train(a, opt, 3)
    saved = copy.deepcopy({"model": a.state_dict(), "opt": opt.state_dict()})
    expected = train(a, opt, 3)
    b = make()
    b.load_state_dict(saved["model"])
    depth = decode_state(saved["model"]["_extra_state"])["depth"]
    assert (b.step_count, b.stage, b.unique_layers, b.depth) == (3, 1, 2, depth)
    opt_b = torch.optim.AdamW(b.parameters(), lr=1e-2)
    opt_b.load_state_dict(saved["opt"])
    assert train(b, opt_b, 3) == pytest.approx(expected, abs=1e-6)


def test_loading_another_schedule_raises_and_changes_nothing():
    a = growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(2, 4))
    other = growops.apollo(tiny_gpt(4, seed=3), stages=(2, 4), stage_steps=(2,))
    other.step()
    before = copy.deepcopy(a.state_dict())
    with pytest.raises(GrowopsError, match="another schedule.*stages: saved \\[2, 4\\], here \\[1, 2, 4\\]"):
        a.load_state_dict(other.state_dict())
    after = a.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if torch.is_tensor(before[k]))
    assert torch.equal(before["_extra_state"], after["_extra_state"])
    with pytest.raises(GrowopsError, match="no growops schedule"):
        a.load_state_dict(a.model.state_dict())


# ---------------------------------------------------------------- bad input
@pytest.mark.parametrize("kwargs, error, match", [
    (dict(stages=(1, 3, 5)), GrowopsError, "last stage must hold all L=6"),
    (dict(stages=(3, 1, 6), stage_steps=(1, 2)), GrowopsError, "strictly increase"),
    (dict(stages=(1, 6), stage_steps=(1, 2)), GrowopsError, "one step per stage"),
    (dict(stages=(1, 3, 6), stage_steps=(4, 2)), GrowopsError, "stage_steps must strictly increase"),
    (dict(sampler="lvsp"), GrowopsError, "unknown sampler"),
    (dict(growth="grow"), GrowopsError, "unknown growth"),
    (dict(optimizer_state="zero"), GrowopsError, "unknown optimizer_state"),
    (dict(seed=-1), GrowopsError, "seed must be an int >= 0, got -1"),
    (dict(seed=1.5), GrowopsTypeError, "seed must be an int >= 0, got 1.5 \\(float\\)"),
    (dict(growth=None), GrowopsTypeError, "growth must be one of .interpolate., .stack., got a NoneType"),
    (dict(stack="head"), GrowopsError, "stack='head' is not a module of GPT; candidates: \\['blocks'\\]"),
    (dict(stack="ln_f"), GrowopsError, "'ln_f' is not a container of repeated blocks in GPT \\(it has 0 child"),
])
def test_bad_arguments_raise_and_leave_the_model_untouched(kwargs, error, match):
    model = tiny_gpt(6)
    before = copy.deepcopy(model.state_dict())
    args = dict(stages=(1, 3, 6), stage_steps=(1, 2)) | kwargs
    with pytest.raises(error, match=match):
        growops.apollo(model, **args)
    assert type(model.blocks) is nn.ModuleList
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_not_a_module():
    with pytest.raises(GrowopsTypeError, match="wraps an nn.Module"):
        growops.apollo("gpt2", stages=(1,), stage_steps=())


def test_already_wrapped():
    a = growops.apollo(tiny_gpt(2), stages=(1, 2), stage_steps=(1,))
    with pytest.raises(GrowopsError, match="already wrapped"):
        growops.apollo(a, stages=(1, 2), stage_steps=(1,))


def test_no_stack_errors_say_what_was_searched():
    with pytest.raises(GrowopsError, match="no repeated block stack in NoStack: searched every module"):
        growops.apollo(NoStack(), stages=(1,), stage_steps=())
    with pytest.raises(GrowopsError, match="none is called as a chain.*experts.*not a chain"):
        growops.apollo(ParallelExperts(), stages=(1, 4), stage_steps=(1,))


def test_several_stacks_need_a_choice():
    with pytest.raises(GrowopsError, match=re.escape(
            "EncoderDecoder holds several block stacks: 'encoder' (4 blocks), 'decoder' (2 blocks); choose one with "
            "stack='...' (stacks grown together need the same number of blocks)")):
        growops.apollo(EncoderDecoder(), stages=(1, 4), stage_steps=(1,))
    balanced = EncoderDecoder()
    balanced.decoder = nn.ModuleList([nn.Linear(8, 8) for _ in range(4)])
    with pytest.raises(GrowopsError, match=re.escape(
            "choose one with stack='...', or grow them together with stack=('encoder', 'decoder')")):
        growops.apollo(balanced, stages=(1, 4), stage_steps=(1,))
    model = EncoderDecoder()
    decoder = copy.deepcopy(model.decoder.state_dict())
    encoder = [copy.deepcopy(layer.state_dict()) for layer in model.encoder]
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), stack="encoder", optimizer_state="keep")
    assert a.plan.stacks[0].path == "encoder" and type(model.decoder) is nn.ModuleList
    a.step()  # 2 -> 4 by interpolation: sources (0, 0, 1, 1)
    for layer, source in zip(model.encoder, (0, 0, 1, 1)):
        assert all(torch.equal(v, encoder[source][k]) for k, v in layer.state_dict().items())
    assert all(torch.equal(v, decoder[k]) for k, v in model.decoder.state_dict().items())


def test_untraceable_index_model_explains_the_fix():
    model = UntraceableIndexNet(4)
    deferred = growops.apollo(model, stages=(2, 4), stage_steps=(1,))  # no inputs: planned at the first forward
    with pytest.raises(GrowopsError, match="does not iterate layers.*Iterate the container"):
        deferred(torch.randn(2, 4))
    assert not deferred.planned
    model = UntraceableIndexNet(4)
    with pytest.raises(GrowopsError, match="does not iterate layers.*Iterate the container"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,), example_inputs=(torch.randn(2, 4),))
    assert type(model.layers) is nn.ModuleList


def test_model_that_is_its_own_container():
    blocks = nn.Sequential(*[nn.Linear(4, 4) for _ in range(3)])
    with pytest.raises(GrowopsError, match="itself the block container: wrap it"):
        growops.apollo(blocks, stages=(1, 3), stage_steps=(1,))
    assert type(blocks) is nn.Sequential


class _DropoutLoop(IndexLoopNet):
    """Index-loop model whose forward reads self.training outside the blocks."""

    def forward(self, x):
        scale = torch.sigmoid(x.mean())
        h = torch.nn.functional.dropout(self.inp(x), 0.5, self.training)
        for i in range(self.n_layer):
            h = self.layers[i](h, scale, i)[0]
        return self.out(h)


def test_graph_mode_follows_the_training_flag():
    model = _DropoutLoop(3)
    reference = copy.deepcopy(model)
    a = growops.apollo(model, stages=(3,), stage_steps=())
    assert a.mode == "graph"
    x = torch.randn(4, 4)
    for train in (True, False):
        a.train(train)
        reference.train(train)
        torch.manual_seed(0)
        got = a(x)
        torch.manual_seed(0)
        assert torch.equal(got, reference(x)), train
    a.train()
    assert not torch.equal(a(x), a(x))  # dropout is live in training


def test_graph_mode_sees_moved_and_replaced_tensors():
    class WithBuffer(IndexLoopNet):
        def __init__(self):
            super().__init__(3)
            self.register_buffer("shift", torch.zeros(8))

        def forward(self, x):
            scale = torch.sigmoid(x.mean())
            h = self.inp(x) + self.shift
            for i in range(self.n_layer):
                h = self.layers[i](h, scale, i)[0]
            return self.out(h)

    model = WithBuffer()
    a = growops.apollo(model, stages=(3,), stage_steps=())
    assert a.mode == "graph"
    a.model.double()
    x = torch.randn(2, 4, dtype=torch.float64)
    assert a(x).dtype == torch.float64
    model.shift = torch.ones(8, dtype=torch.float64)  # a new tensor object
    assert torch.equal(a(x), model(x))


@pytest.mark.parametrize("make", [lambda: tiny_gpt(4), lambda: IndexLoopNet(4)])
def test_save_and_load_the_whole_wrapper(make, tmp_path):
    a = growops.apollo(make(), stages=(2, 4), stage_steps=(2,), optimizer_state="keep")
    a.step()
    a.eval()
    x = {"input_ids": gpt_batch()["input_ids"]} if a.mode == "container" else {"x": torch.randn(2, 4)}
    torch.save(a, tmp_path / "a.pt")
    b = torch.load(tmp_path / "a.pt", weights_only=False)
    out_a, out_b = a(**x), b(**x)
    assert torch.equal(getattr(out_a, "logits", out_a), getattr(out_b, "logits", out_b))
    b.step()
    assert b.unique_layers == 4 and a.unique_layers == 2  # the copy has its own schedule


def test_export_after_stack_growth_in_graph_mode_equals_full_depth_with_original_class_and_keys():
    """Graph mode, growth="stack": position i of the export copies unit i % unique (not i * unique // L)."""
    torch.manual_seed(0)
    model = IndexLoopNet(4)
    keys = list(model.state_dict())
    a = growops.apollo(model, stages=(2, 4), stage_steps=(3,), growth="stack", sampler="full")
    assert a.mode == "graph"
    opt = torch.optim.SGD(a.parameters(), lr=0.5)
    x = torch.randn(3, 4)
    for steps, unique in [(2, 2), (3, 4)]:  # before the growth (maps 0, 1, 0, 1), then one step after it
        train_steps(a, opt, steps, lambda m, step: _loop_loss(m, torch.randn(3, 4)))
        assert a.unique_layers == unique
        a.eval()
        exported = a.export().eval()
        assert type(exported) is IndexLoopNet and list(exported.state_dict()) == keys
        torch.testing.assert_close(exported(x), a(x), rtol=0, atol=1e-6)
        a.train()


@pytest.mark.parametrize("growth, sources", [("interpolate", (0, 0, 1, 1)), ("stack", (0, 1, 0, 1))])
def test_growth_copies_buffers_and_running_statistics_from_the_source(growth, sources):
    """Buffers equal at wrapping (so not per-layer values) but changed since are copied with the weights."""
    model = BufferNet(4)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), growth=growth, optimizer_state="keep")
    assert not a.plan.stacks[0].per_layer_values
    with torch.no_grad():
        for j, block in enumerate(model.layers):
            block.shift.fill_(j + 1)
            block.norm.running_mean.fill_(10 * (j + 1))
            block.norm.running_var.fill_(j + 2)
            block.norm.num_batches_tracked.fill_(100 + j)
    before = [{k: v.clone() for k, v in b.state_dict().items()} for b in model.layers]
    a.step()
    assert a.unique_layers == 4
    for j, s in enumerate(sources):
        got = model.layers[j].state_dict()
        assert all(torch.equal(got[k], before[s][k]) for k in before[s]), (j, s)


@pytest.mark.filterwarnings("ignore:growops. stages")
@settings(max_examples=12)  # each example trains: keep the test to a few seconds
@given(st.integers(2, 6), st.integers(0, 4), st.sampled_from(["interpolate", "stack"]))
def test_export_equals_full_depth_property(layers, steps, growth):
    """Blocks differ (each starts with its own weights, and training after a growth separates a copy from its
    source), so the export equals the wrapper only if every position copies the unit it runs."""
    stages = tuple(sorted({2, (layers + 2) // 2, layers}))
    torch.manual_seed(layers)
    a = growops.apollo(IndexLoopNet(layers), stages=stages, stage_steps=(2, 4)[:len(stages) - 1], growth=growth,
                       optimizer_state="keep", sampler="full")
    opt = torch.optim.SGD(a.parameters(), lr=0.5)
    train_steps(a, opt, steps, lambda m, step: _loop_loss(m, torch.randn(3, 4)))
    a.eval()
    exported = a.export().eval()
    x = torch.randn(3, 4)
    assert type(exported) is IndexLoopNet
    torch.testing.assert_close(exported(x), a(x))


@given(st.integers(2, 6), st.integers(0, 2**16))
def test_one_stage_equals_the_original_property(layers, seed):
    torch.manual_seed(seed)
    model = IndexLoopNet(layers)
    x = torch.randn(2, 4)
    expected = model(x)
    a = growops.apollo(model, stages=(layers,), stage_steps=())
    assert torch.equal(a(x), expected)


@pytest.mark.filterwarnings("ignore:growops. stages")
@given(st.integers(1, 4), st.data())
def test_shared_gradient_in_graph_mode(unique, data):
    depth = data.draw(st.integers(unique, 4))
    model = IndexLoopNet(4)
    untied = copy.deepcopy(model)
    a = growops.apollo(model, stages=(unique, 4) if unique < 4 else (4,), stage_steps=(9,) if unique < 4 else ())
    a._configure(a.unique_layers, depth)
    x = torch.randn(3, 4)
    a(x).square().mean().backward()
    mapping = depth_map(unique, depth)
    untied.layers = nn.ModuleList([copy.deepcopy(model.layers[m]) for m in mapping])
    untied.n_layer = depth
    for b in untied.layers:
        b.zero_grad()
    untied(x).square().mean().backward()
    for j in range(unique):
        for name, p in model.layers[j].named_parameters():
            copies = [dict(untied.layers[i].named_parameters())[name] for i, m in enumerate(mapping) if m == j]
            torch.testing.assert_close(p.grad, sum(c.grad for c in copies), rtol=1e-5, atol=1e-6)


# ---------------------------------------------------------------- the container outside the forward, misuse
def test_optimizer_groups_built_by_iterating_the_container_train_every_block():
    """Layer-wise lr decay iterates the container: it sees all L blocks, so grown blocks are trained too."""
    model = tiny_gpt(4)
    a = growops.apollo(model, stages=(1, 4), stage_steps=(2,), sampler="full")
    groups = [{"params": list(block.parameters()), "lr": 1e-2 * 0.9 ** i} for i, block in enumerate(model.blocks)]
    assert len(groups) == 4 and len(list(model.blocks)) == len(model.blocks) == 4
    rest = [p for n, p in model.named_parameters() if not n.startswith("blocks.")]
    opt = torch.optim.AdamW(groups + [{"params": rest}], lr=1e-2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the optimizer holds every grown block: no warning
        train_steps(a, opt, 2, lambda m, step: _gpt_loss(m, gpt_batch()))
    before = [b.attn.c_attn.weight.detach().clone() for b in model.blocks]
    train_steps(a, opt, 1, lambda m, step: _gpt_loss(m, gpt_batch()))
    assert all(not torch.equal(b.attn.c_attn.weight, w) for b, w in zip(model.blocks, before))


def test_an_optimizer_without_the_grown_blocks_warns_once_and_names_them():
    model = tiny_gpt(4)
    a = growops.apollo(model, stages=(1, 2, 4), stage_steps=(1, 2))
    opt = torch.optim.AdamW(list(model.blocks[0].parameters()) + list(model.wte.parameters()), lr=1e-3)
    more = len(list(model.blocks[1].parameters())) - 5  # five named, the rest counted
    opt.step()
    with pytest.warns(UserWarning, match=rf"optimizer does not hold blocks.1.ln_1.weight, .* and {more} more: these "
                                         r"blocks are live now but will never train"):
        a.step(opt)
    opt.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.step(opt)
    with pytest.warns(UserWarning, match="without AdamW.step\\(\\) since the previous a.step\\(\\)"):
        a.step(opt)  # once per micro-batch, say


def test_several_optimizers_and_wrapped_ones_get_the_policy():
    """Muon + AdamW side by side: a.step(opt1, opt2) applies the policy to both; ZeroRedundancyOptimizer-like
    wrappers are unwrapped to the optimizer that holds the moments."""
    model = tiny_gpt(4)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), optimizer_state="reset", sampler="full")
    matrices = [p for p in model.parameters() if p.dim() == 2]
    others = [p for p in model.parameters() if p.dim() != 2]
    opt1, opt2 = torch.optim.SGD(matrices, lr=1e-2, momentum=0.9), torch.optim.AdamW(others, lr=1e-2)

    class Wrapped:  # holds its moments on .optim, as torch's ZeroRedundancyOptimizer does
        def __init__(self, inner):
            self.optim, self.param_groups, self.state = inner, inner.param_groups, {}

    _gpt_loss(a, gpt_batch()).backward()
    opt1.step()
    opt2.step()
    grown = list(model.blocks[1].parameters())  # live in stage 0, overwritten by block 0 at the growth
    assert all(p in opt1.state or p in opt2.state for p in grown)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # both optimizers together hold every block: no warning
        a.step(opt1, Wrapped(opt2))
    assert not any(p in opt1.state or p in opt2.state for p in grown)  # reset in both


def test_one_block_in_eval_mode_does_not_switch_the_stack_to_full_depth():
    model = tiny_gpt(6)
    a = growops.apollo(model, stages=(2, 6), stage_steps=(9,), sampler="unique")
    seen = _calls(a)
    model.blocks[0].eval()
    a(**gpt_batch())
    assert seen == [0, 1]
    a.eval()
    seen.clear()
    a(**gpt_batch())
    assert seen == list(depth_map(2, 6))


def test_hooks_on_the_container_keep_firing_and_references_stay_valid():
    model = SequentialNet(4)
    container = model.blocks
    calls = []
    container.register_forward_hook(lambda *args: calls.append(1))
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,))
    assert model.blocks is container
    calls.clear()  # tracing the forward ran it too
    a(torch.randn(2, 4))
    assert calls == [1]
    assert type(a.export().blocks) is nn.Sequential


def test_a_block_replaced_after_wrapping_is_used_or_refused():
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing

    model = tiny_gpt(4)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), sampler="full")
    replacement = copy.deepcopy(model.blocks[1])
    model.blocks[1] = replacement  # structurally the same: used
    seen = []
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: seen.append(i))
    a(**gpt_batch())
    assert seen == [0, 0, 1, 1] and a._runtimes[0].blocks[1] is replacement
    model.blocks[2] = nn.Sequential(nn.Linear(16, 16))  # another structure: refused, nothing adopted
    with pytest.raises(GrowopsError, match=r"blocks.2 was replaced after growops.apollo wrapped the model, by a "
                                           r"Sequential whose structure differs"):
        a(**gpt_batch())
    with pytest.raises(GrowopsError, match="was replaced after growops.apollo wrapped"):
        a.step()
    assert a.step_count == 0
    model.blocks[2] = a._runtimes[0].blocks[2]
    apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == "Block")  # each holds its block
    a(**gpt_batch())
    assert [type(b).__name__ for b in model.blocks] == ["CheckpointWrapper"] * 4


def test_step_checks_everything_before_changing_anything():
    model = tiny_gpt(4)
    fail = {"once": True}

    def sampler(unique, layers, rng):
        if unique == 4 and fail["once"]:  # fails in the new stage, on the first try only
            fail["once"] = False
            return 0
        return unique

    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), sampler=sampler)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    _gpt_loss(a, gpt_batch()).backward()
    opt.step()
    scheduler = torch.optim.lr_scheduler.StepLR(opt, 1)
    weights = copy.deepcopy(model.state_dict())
    moments = copy.deepcopy(opt.state_dict())
    with pytest.raises(GrowopsTypeError, match="takes the optimizers .* got a StepLR \\(an LR scheduler: pass its "
                                               "\\.optimizer\\)"):
        a.step(scheduler)
    with pytest.raises(GrowopsError, match="returned depth 0 at step 1"):
        a.step(opt)
    assert (a.step_count, a.stage, a.unique_layers, a.depth) == (0, 0, 2, 2)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in weights.items())
    assert str(opt.state_dict()) == str(moments)
    a.step(opt)  # the retry works
    assert (a.step_count, a.unique_layers, a.depth) == (1, 4, 4)
    with pytest.raises(GrowopsTypeError, match="restore_step's step must be an int >= 0, got True"):
        a.restore_step(True)
    assert a.step_count == 1


@pytest.mark.parametrize("make", [lambda: tiny_gpt(4), lambda: IndexLoopNet(4)], ids=["container", "graph"])
def test_wrapping_a_wrapped_model_again_is_refused(make):
    model = make()
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,))
    with pytest.raises(GrowopsError, match="already managed by a growops.apollo wrapper: .*wrap a.export\\(\\)"):
        growops.apollo(a.model, stages=(2, 4), stage_steps=(1,))
    assert type(growops.apollo(a.export(), stages=(2, 4), stage_steps=(1,))) is growops.Apollo


def test_export_of_a_container_that_keeps_its_own_list_equals_evaluation():
    from tests.archs import Arch

    arch = Arch("own", "iterate", "A", 4, "", "", ("int",), False)
    model = arch.build()
    a = growops.apollo(model, stages=(2, 4), stage_steps=(5,), optimizer_state="keep")
    assert a.mode == "graph"
    opt = torch.optim.AdamW(a.parameters(), lr=1e-1)
    train_steps(a, opt, 2, lambda m, step: m(arch.inputs()).square().mean())
    a.eval()
    exported = a.export().eval()
    assert exported.layers.items[3] is exported.layers._modules["3"]
    torch.testing.assert_close(exported(arch.inputs()), a(arch.inputs()), rtol=0, atol=1e-6)


def test_misuse_found_by_trying_the_api():
    model = tiny_gpt(4)
    with pytest.raises(GrowopsError, match="stack= names blocks twice"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,), stack=("blocks", "blocks[1:]"))
    assert type(model.blocks) is nn.ModuleList and not model.blocks.__dict__.get("_growops_stack")
    with pytest.raises(GrowopsTypeError, match="stack= takes a container's module path"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,), stack=3)
    with pytest.raises(GrowopsError, match=r"sampler .* failed on \(unique=2, L=4, rng\) at step 0: ZeroDivisionError"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,), sampler=lambda u, n, rng: 1 // 0)

    plan = growops.plan(model)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), plan=plan)
    with pytest.raises(GrowopsError, match="already managed by a growops.apollo wrapper"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,), plan=plan)  # plan= checks it too
    other = torch.optim.AdamW(tiny_gpt(4).parameters())
    with pytest.raises(GrowopsError, match="hold none of blocks's parameters"):
        a.step(other)
    assert a.step_count == 0 and a.unique_layers == 2

    class Iterating(IndexLoopNet):
        def forward(self, x):
            scale = torch.sigmoid(x.mean())
            h = self.inp(x)
            for i, layer in enumerate(self.layers):
                h = layer(h, scale, i)[0]
            return self.out(h)

    iterating_plan = growops.plan(Iterating(4))
    assert iterating_plan.mode == "container"
    with pytest.raises(GrowopsError, match="runs layers in container mode, but this model's forward does not reach"):
        growops.apollo(IndexLoopNet(4), stages=(2, 4), stage_steps=(1,), plan=iterating_plan)


def test_a_copy_of_the_wrapped_model_is_refused_and_a_copy_of_the_wrapper_works():
    a = growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(1,))
    teacher = copy.deepcopy(a.model)
    with pytest.raises(GrowopsError, match="wrapper of this model is gone.*copy a.export\\(\\)"):
        teacher(**gpt_batch())
    b = copy.deepcopy(a)
    b.step()
    assert b.unique_layers == 4 and a.unique_layers == 2 and torch.isfinite(b(**gpt_batch()).loss)


def test_micro_batch_resampling_needs_the_wrapper():
    a = growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(9,), resample="micro_batch")
    a(**gpt_batch())
    with pytest.raises(GrowopsError, match="resample='micro_batch' draws each training forward's depth in a"):
        a.model(**gpt_batch())
    a.eval()
    a.model(**gpt_batch())  # evaluation draws nothing


@pytest.mark.parametrize("skipped", [1, 3])
def test_an_optimizer_step_a_grad_scaler_skips_warns_at_the_first_step_as_at_later_ones(skipped):
    """A GradScaler that finds an inf gradient skips opt.step(); a.step(opt) still counts the step (the schedule
    counts a.step() calls, as the Trainer's global_step does) and warns once, the first step included."""
    a = growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(2, 4), seed=0)
    opt = torch.optim.AdamW(a.parameters(), lr=1e-3)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    for step in range(1, 6):
        scaler.scale(_gpt_loss(a, gpt_batch())).backward()
        if step == skipped:
            next(p for p in a.parameters() if p.grad is not None).grad[0].fill_(float("inf"))  # an fp16 overflow
        scale = scaler.get_scale()
        before = [p.detach().clone() for p in a.parameters()]
        scaler.step(opt)
        scaler.update()
        opt.zero_grad()
        moved = any(not torch.equal(p, q) for p, q in zip(a.parameters(), before))
        assert moved == (step != skipped) and (scaler.get_scale() < scale) == (step == skipped)
        if step == skipped:
            with pytest.warns(UserWarning, match=r"a.step\(optimizer\) was called without AdamW.step\(\) since the "
                                                 r"previous a.step\(\) \(or, at the first call, since the model was "
                                                 r"wrapped\).*as torch.amp.GradScaler does when fp16 gradients "
                                                 r"overflow.*The schedule counts a.step\(\) calls"):
                a.step(opt)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")
                a.step(opt)
        assert a.step_count == step  # the skipped step counts
    assert (a.stage, a.unique_layers) == (2, 4)


def test_the_step_rate_warning_is_given_once_and_only_for_torch_optimizers():
    model = tiny_gpt(4)
    early = torch.optim.SGD(model.parameters(), lr=1e-2)
    early.step()  # before the model was wrapped: not a step since
    a = growops.apollo(model, stages=(2, 4), stage_steps=(3,))
    with pytest.warns(UserWarning, match=r"without SGD.step\(\) since the previous a.step\(\) \(or, at the first call"):
        a.step(early)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a.step(early)  # given once
    assert a.step_count == 2

    b = growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(3,))
    opt = torch.optim.SGD(b.parameters(), lr=1e-2)  # built after the wrapper

    class NotTorch:  # an optimizer-like object without torch's step hooks: not checked
        def __init__(self):
            self.param_groups, self.state = [{"params": list(b.parameters())}], {}

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        b.step(opt, NotTorch())
        b.step(NotTorch())
    assert b.step_count == 2

    c = growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(1,))
    opt = torch.optim.SGD(c.parameters(), lr=1e-2)
    opt.step()
    with pytest.raises(GrowopsError, match="hold none of"):
        c.step(torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=1e-2))  # refused: counts nothing
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        c.step(opt)  # the optimizer stepped since the last step taken
    assert c.step_count == 1


def test_growth_is_logged_at_info_and_the_schedule_at_debug(caplog):
    import logging

    a = growops.apollo(tiny_gpt(4), stages=(1, 2, 4), stage_steps=(2, 3), growth="stack", optimizer_state="copy",
                       sampler="unique")
    opt = torch.optim.AdamW(a.parameters(), lr=1e-3)
    with caplog.at_level(logging.INFO, logger="growops"):
        train_steps(a, opt, 3, lambda m, step: _gpt_loss(m, gpt_batch()))
    assert [(r.name, r.levelname, r.getMessage()) for r in caplog.records] == [
        ("growops.apollo", "INFO", "step 2: grew from 1 to 2 unique units (stage 1, growth='stack', "
                                   "optimizer_state=copy), stack blocks"),
        ("growops.apollo", "INFO", "step 3: grew from 2 to 4 unique units (stage 2, growth='stack', "
                                   "optimizer_state=copy), stack blocks")]
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="growops"), pytest.warns(UserWarning, match="without AdamW.step"):
        a.step(opt)  # a step without the optimizer's is warned about, and logged like any other
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("DEBUG", "step 4: stage 2, 4 unique units, next depth 4")]
    assert logging.getLogger("growops").handlers and all(
        isinstance(h, logging.NullHandler) for h in logging.getLogger("growops").handlers)


def test_torch_export_of_the_wrapper_says_to_export_the_plain_model():
    a = growops.apollo(tiny_gpt(4), stages=(1, 4), stage_steps=(2,))
    with pytest.raises(GrowopsError, match=r"torch.export.export\(a, ...\) would capture one step of it. Export "
                                           r"the plain model a.eval\(\) computes: "
                                           r"torch.export.export\(a.export\(\), args\)"):
        torch.export.export(a, (), gpt_batch(), strict=False)
    assert not hasattr(a.forward, "__code__")
    program = torch.export.export(a.export().eval(), (), gpt_batch(), strict=False)
    a.eval()
    assert torch.equal(program.module()(**gpt_batch()).logits, a(**gpt_batch()).logits)
