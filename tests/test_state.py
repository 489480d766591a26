"""Loading a schedule position is all or nothing: every field, tensor and key is checked before anything changes."""

import copy
import re
import warnings

import pytest
import torch

import growops
from growops import GrowopsError
from growops.state import decode_state
from tests.models import EncoderDecoder, gpt_batch, tiny_gpt, train_steps


def _make(**kwargs):
    return growops.apollo(tiny_gpt(4, seed=1), **({"stages": (1, 2, 4), "stage_steps": (3, 6), "seed": 5} | kwargs))


def _snapshot(a):
    return copy.deepcopy(a.state_dict())


def _unchanged(a, before) -> bool:
    after = a.state_dict()
    return torch.equal(before["_extra_state"], after["_extra_state"]) and all(
        torch.equal(before[k], after[k]) for k in before if k != "_extra_state")


@pytest.mark.parametrize("field, value, match", [
    ("step", -1, "step=-1; it must be a non-negative int"),
    ("step", 2.0, "step=2.0; it must be a non-negative int"),
    ("stage", 0, "at step 4 in stage 0, but step 4 belongs to stage 1"),
    ("unique", 1, "unique=1 in stage 1, which holds 2 unique blocks"),
    ("depth", 10, r"depth=10; it must lie in \[unique=2, L=4\]"),
    ("depth", 1, r"depth=1; it must lie in \[unique=2, L=4\]"),
])
def test_inconsistent_schedule_fields_are_refused_before_anything_changes(field, value, match):
    source = _make()
    for _ in range(4):
        source.step()
    state = source.state_dict()
    state["_extra_state"] = dict(decode_state(state["_extra_state"]), **{field: value})
    a = _make()
    before = _snapshot(a)
    with pytest.raises(GrowopsError, match=match):
        a.load_state_dict(state)
    assert _unchanged(a, before)


def test_non_tensor_values_are_refused_before_anything_changes():
    a = _make()
    state = _make().state_dict()
    state["model.blocks.3.ln_1.weight"] = [1.0] * 16
    before = _snapshot(a)
    with pytest.raises(GrowopsError, match="model.blocks.3.ln_1.weight is a list, not a tensor"):
        a.load_state_dict(state)
    assert _unchanged(a, before)


def test_strict_false_loads_what_matches():
    source = _make()
    opt = torch.optim.AdamW(source.parameters(), lr=1e-2)
    train_steps(source, opt, 4, lambda m, step: m(**gpt_batch()).loss)
    state = source.state_dict()
    del state["model.lm_head.weight"], state["model.wte.weight"]  # tied: both names of one tensor
    state["model.unknown"] = torch.zeros(1)
    a = _make()
    result = a.load_state_dict(state, strict=False)
    assert set(result.missing_keys) == {"model.lm_head.weight", "model.wte.weight"}
    assert result.unexpected_keys == ["model.unknown"]
    assert (a.step_count, a.unique_layers) == (4, 2)
    assert torch.equal(a.model.blocks[1].attn.c_attn.weight, source.model.blocks[1].attn.c_attn.weight)
    weights_only = {k: v for k, v in source.state_dict().items() if k != "_extra_state"}
    b = _make()
    before = copy.deepcopy(b.model.state_dict())
    # No schedule: the weights describe 2 unique blocks, which b (at 1) cannot run; refused, nothing written.
    with pytest.raises(GrowopsError, match="not a model the schedule can run: model.blocks.0.attn.c_attn.bias and "
                       "model.blocks.2.attn.c_attn.bias differ, but with 1 unique blocks of 4 they are positions of "
                       "blocks that run the same block"):
        b.load_state_dict(weights_only, strict=False)
    assert b.step_count == 0 and all(torch.equal(v, b.model.state_dict()[k]) for k, v in before.items())
    b.restore_step(4)  # at the weights' position they load, and the schedule stays
    b.load_state_dict(weights_only, strict=False)
    assert b.step_count == 4 and torch.equal(b.model.blocks[1].mlp.c_fc.weight, source.model.blocks[1].mlp.c_fc.weight)
    with pytest.raises(GrowopsError, match=re.escape(
            "no growops schedule (key '_extra_state'): load a plain model's weights with "
            "a.model.load_state_dict(...), or save with a.state_dict()")):
        _make().load_state_dict(weights_only)


def test_the_fingerprint_covers_the_optimizer_state_policy():
    state = _make(optimizer_state="copy").state_dict()
    with pytest.raises(GrowopsError, match="optimizer_state: saved 'copy', here 'reset'"):
        _make().load_state_dict(state)


def test_custom_samplers_are_told_apart_by_name_and_code():
    def deep(unique, layers, rng):
        return layers

    def shallow(unique, layers, rng):
        return unique

    state = _make(sampler=deep).state_dict()
    with pytest.raises(GrowopsError, match="sampler: saved '.*deep', here '.*shallow'"):
        _make(sampler=shallow).load_state_dict(state)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _make(sampler=deep).load_state_dict(state)  # the same function: no warning
    state = _make(sampler=lambda unique, layers, rng: layers).state_dict()
    with pytest.warns(UserWarning, match="has other code than the one this state was saved with"):
        _make(sampler=lambda unique, layers, rng: unique).load_state_dict(state)


def test_loads_that_torch_would_half_apply_are_refused_first():
    source = _make()
    for _ in range(4):
        source.step()
    a = _make()
    before = _snapshot(a)
    for bad in (torch.empty(64, 16, device="meta"), source.state_dict()["model.lm_head.weight"].to_sparse()):
        state = {**source.state_dict(), "model.lm_head.weight": bad}
        with pytest.raises(GrowopsError, match="model.lm_head.weight is a .* tensor, which holds no values"):
            a.load_state_dict(state)
        assert _unchanged(a, before)
    with pytest.raises(GrowopsError, match=re.escape(
            "assign=True) would replace the model's parameters, which the optimizer and tied weights hold: load "
            "without assign=True (assign=True is for a model built on the meta device)")):
        a.load_state_dict(source.state_dict(), assign=True)
    assert _unchanged(a, before)


def test_quantized_and_plain_tensors_do_not_load_into_each_other():
    model = tiny_gpt(4, seed=1)
    model.register_buffer("codes", torch.quantize_per_tensor(torch.ones(3), 0.1, 0, torch.quint8))
    a = growops.apollo(model, stages=(1, 2, 4), stage_steps=(3, 6), seed=5)
    state = a.state_dict()
    before = _snapshot(a)
    quantized = torch.quantize_per_tensor(state["model.lm_head.weight"], 0.1, 0, torch.qint8)
    with pytest.raises(GrowopsError, match=re.escape(
            "state_dict entry model.lm_head.weight is a quantized plain tensor, this model's is a plain tensor: load a "
            "state saved from a model quantized the same way")):
        a.load_state_dict({**state, "model.lm_head.weight": quantized})
    with pytest.raises(GrowopsError, match=re.escape(
            "state_dict entry model.codes is a plain tensor, this model's is a quantized plain tensor: load a state "
            "saved from a model quantized the same way")):
        a.load_state_dict({**state, "model.codes": torch.ones(3)})

    class Tagged(torch.Tensor):
        pass

    with pytest.raises(GrowopsError, match=re.escape(
            "state_dict entry model.lm_head.weight is a Tagged, this model's is a plain tensor: a sharded (DTensor) "
            "state loads into the sharded model, a full one into an unsharded model")):
        a.load_state_dict({**state, "model.lm_head.weight": state["model.lm_head.weight"].as_subclass(Tagged)})
    assert _unchanged(a, before)


def test_strict_false_through_a_wrapper_is_honoured():
    class Holder(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    source = _make()
    for _ in range(4):
        source.step()
    state = {f"inner.{k}": v for k, v in source.state_dict().items() if k != "model.ln_f.weight"}
    a = _make()
    result = Holder(a).load_state_dict(state, strict=False)
    assert result.missing_keys == ["inner.model.ln_f.weight"] and a.step_count == 4
    with pytest.raises(GrowopsError, match="missing \\['inner.model.ln_f.weight'\\]"):
        Holder(_make()).load_state_dict(state)


def test_partials_and_bound_methods_are_told_apart():
    import functools

    from growops.schedule import full_depth, unique_depth

    class Capped:
        def __init__(self, cap):
            self.cap = cap

        def draw(self, unique, layers, rng):
            return max(unique, min(self.cap, layers))

    state = _make(sampler=functools.partial(full_depth)).state_dict()
    with pytest.raises(GrowopsError, match="sampler: saved 'growops.schedule:full_depth'"):
        _make(sampler=functools.partial(unique_depth)).load_state_dict(state)
    state = _make(sampler=Capped(4).draw).state_dict()
    with pytest.warns(UserWarning, match="has other code"):
        _make(sampler=Capped(1).draw).load_state_dict(state)


def test_the_same_sampler_imported_another_way_resumes_with_a_warning():
    state = _make(sampler=_deep_sampler).state_dict()
    state["_extra_state"] = decode_state(state["_extra_state"])
    module, qualname = state["_extra_state"]["sampler"].split(":")
    state["_extra_state"]["sampler"] = f"__main__:{qualname}"  # saved from a script, resumed from a module
    with pytest.warns(UserWarning, match="the same name from another module"):
        _make(sampler=_deep_sampler).load_state_dict(state)


def _deep_sampler(unique, layers, rng):
    return layers


def test_a_model_built_on_the_meta_device_loads_with_assign():
    source = _make()
    for _ in range(4):
        source.step()
    with torch.device("meta"):
        a = _make()
    with pytest.raises(GrowopsError, match="on the meta device, where loading copies nothing"):
        a.load_state_dict(source.state_dict())
    a.load_state_dict(source.state_dict(), assign=True)
    assert a.step_count == 4 and not a.model.blocks[0].attn.c_attn.weight.is_meta


def test_a_shallow_copy_of_the_wrapper_does_not_take_its_stack():
    import gc

    a = _make()
    shallow = copy.copy(a)
    del shallow
    gc.collect()
    a(**gpt_batch())


FINGERPRINTED = [  # (field, saved with, loaded into, what the refusal says)
    ("stages", {"stages": (1, 3, 4), "growth": "stack"}, {"growth": "stack"}, "saved [1, 3, 4], here [1, 2, 4]"),
    ("stage_steps", {"stage_steps": (3, 7)}, {}, "saved [3, 7], here [3, 6]"),
    ("growth", {"growth": "stack"}, {}, "saved 'stack', here 'interpolate'"),
    ("sampler", {"sampler": "uniform"}, {}, "saved 'uniform', here 'lvps'"),
    ("seed", {"seed": 0}, {"seed": 1}, "saved 0, here 1"),
    ("resample", {"resample": "micro_batch"}, {}, "saved 'micro_batch', here 'step'"),
    ("optimizer_state", {"optimizer_state": "keep"}, {}, "saved 'keep', here 'reset'"),
    ("lr_scale", {"lr_scale": "linear"}, {}, "saved 'linear', here 'none'"),
    ("rewarmup", {"rewarmup": 2}, {}, "saved 2, here 0"),
]


@pytest.mark.parametrize("field, saved, here, detail", FINGERPRINTED, ids=[c[0] for c in FINGERPRINTED])
def test_the_fingerprint_covers_each_argument_that_changes_training(field, saved, here, detail):
    source = _make(**saved)
    source.step()
    state = source.state_dict()
    a = _make(**here)
    before = _snapshot(a)
    with pytest.raises(GrowopsError, match=re.escape(f"({field}: {detail})")):  # that field alone differs
        a.load_state_dict(state)
    assert _unchanged(a, before)
    same = _make(**saved)
    same.load_state_dict(state)  # changing nothing else loads
    assert same.step_count == 1


def test_the_fingerprint_covers_the_stack():
    make = lambda stack: growops.apollo(EncoderDecoder(), stages=(1, 2), stage_steps=(3,), stack=stack)  # noqa: E731
    state = make("decoder").state_dict()  # L = 2 either way, the same keys
    with pytest.raises(GrowopsError, match=re.escape("(stack: saved ['decoder'], here ['encoder[2:4]'])")):
        make("encoder[2:]").load_state_dict(state)
    make("decoder").load_state_dict(state)


def test_the_fingerprint_covers_the_depth_l():
    state = _make().state_dict()
    # L follows from the last stage: only a hand-edited state can differ in it
    state["_extra_state"] = dict(decode_state(state["_extra_state"]), layers=5)
    with pytest.raises(GrowopsError, match=re.escape("(layers: saved 5, here 4)")):
        _make().load_state_dict(state)


def test_samplers_that_differ_only_in_a_constant_or_a_name_are_told_apart():
    """The code digest covers a function's constants and the names it reads, not only its bytecode (which
    refers to both by index)."""
    pairs = ((lambda unique, layers, rng: layers - 0, lambda unique, layers, rng: layers - 1),
             (lambda unique, layers, rng: max(unique, layers), lambda unique, layers, rng: min(unique, layers)))
    for saved, here in pairs:
        assert saved.__code__.co_code == here.__code__.co_code  # what only constants and names tell apart
        state = _make(sampler=saved).state_dict()
        with pytest.warns(UserWarning, match="has other code than the one this state was saved with"):
            _make(sampler=here).load_state_dict(state)


class _CallableSampler:
    """A sampler object (a class with __call__) that keeps a bound method of itself: its fingerprint recurses
    through itself, so it must stop at a fixed depth."""

    def __init__(self, offset):
        self.offset = offset
        self.draw = self.__call__

    def __call__(self, unique, layers, rng):
        return max(unique, layers - self.offset)


def test_callable_objects_and_self_referencing_samplers_have_a_fingerprint():
    state = _make(sampler=_CallableSampler(0)).state_dict()
    _make(sampler=_CallableSampler(0)).load_state_dict(state)  # the same: loads
    state = _make(sampler=_CallableSampler(0).draw).state_dict()  # a bound method whose object holds itself
    _make(sampler=_CallableSampler(0).draw).load_state_dict(state)
    with pytest.warns(UserWarning, match="has other code"):
        _make(sampler=_CallableSampler(1).draw).load_state_dict(state)


def test_a_state_from_another_schedule_lists_every_difference():
    state = _make(seed=5, rewarmup=0).state_dict()
    with pytest.raises(GrowopsError, match=r"another schedule or model \(seed: saved 5, here 6; rewarmup: saved 0, "
                                           r"here 3\)"):
        _make(seed=6, rewarmup=3).load_state_dict(state)
