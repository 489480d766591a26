"""Training state you can trust: resume mid-schedule, safetensors, gradient accumulation, bad states."""

import copy
import io
import json

import numpy as np
import pytest
import torch

import growops
from growops import GrowopsError
from tests.models import IndexLoopNet, gpt_batch, tiny_gpt, train_steps

OPTIMIZERS = {
    "adamw": lambda ps: torch.optim.AdamW(ps, lr=1e-2),
    "adam": lambda ps: torch.optim.Adam(ps, lr=1e-2),
    "sgd": lambda ps: torch.optim.SGD(ps, lr=1e-1, momentum=0.9),
}


def _gpt():
    return growops.apollo(tiny_gpt(4, seed=1), stages=(1, 2, 4), stage_steps=(3, 6), seed=5)


def _loop():
    torch.manual_seed(2)
    return growops.apollo(IndexLoopNet(4), stages=(1, 2, 4), stage_steps=(3, 6), seed=5)


def _gpt_loss(a, step):
    return a(**gpt_batch(seed=step)).loss


def _loop_loss(a, step):
    return a(torch.randn(3, 4, generator=torch.Generator().manual_seed(step))).square().mean()


@pytest.mark.parametrize("make, loss_fn", [(_gpt, _gpt_loss), (_loop, _loop_loss)], ids=["container", "graph"])
@pytest.mark.parametrize("optimizer", sorted(OPTIMIZERS))
def test_resume_continues_identically_across_the_next_growth(make, loss_fn, optimizer):
    a = make()
    opt = OPTIMIZERS[optimizer](a.parameters())
    train_steps(a, opt, 4, loss_fn)  # past the first growth (step 3), before the second (step 6)
    buffer = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": opt.state_dict()}, buffer)
    expected = train_steps(a, opt, 5, loss_fn)  # crosses the growth at step 6

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    b = make()
    b.load_state_dict(saved["model"])
    assert (b.step_count, b.stage, b.unique_layers) == (4, 1, 2)
    opt_b = OPTIMIZERS[optimizer](b.parameters())
    opt_b.load_state_dict(saved["opt"])
    assert train_steps(b, opt_b, 5, loss_fn) == pytest.approx(expected, rel=0, abs=1e-6)
    assert b.unique_layers == 4


def test_safetensors_round_trip_with_tied_weights(tmp_path):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    config = transformers.GPT2Config(n_layer=4, n_embd=32, n_head=2, vocab_size=96, n_positions=32)
    make = lambda: growops.apollo(transformers.GPT2LMHeadModel(config), stages=(2, 4), stage_steps=(2,), seed=3)
    torch.manual_seed(0)
    a = make()
    a.step()
    a.step()
    path = tmp_path / "a.safetensors"
    growops.save_safetensors(a, path)
    torch.manual_seed(1)
    b = make()
    growops.load_safetensors(b, path)
    assert (b.step_count, b.stage, b.unique_layers, b.depth) == (a.step_count, a.stage, a.unique_layers, a.depth)
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert k == "_extra_state" or torch.equal(v, w), k
    assert b.model.lm_head.weight is b.model.transformer.wte.weight  # still tied


def test_safetensors_without_a_schedule_is_refused(tmp_path):
    from safetensors.torch import save_file

    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(GrowopsError, match="no growops schedule"):
        growops.load_safetensors(_gpt(), tmp_path / "plain.safetensors")


def test_gradient_accumulation_keeps_one_depth_per_step():
    a = growops.apollo(tiny_gpt(6), stages=(1, 6), stage_steps=(50,), sampler="uniform", seed=3)
    depths = []
    for _ in range(6):
        per_step = set()
        for micro in range(3):
            a(**gpt_batch(seed=micro))
            per_step.add(a.depth)
        depths.append(per_step)
        a.step()
    assert all(len(d) == 1 for d in depths)
    assert len(set().union(*depths)) > 1  # but it does change between steps


def test_micro_batch_resampling_is_deterministic():
    def run():
        a = growops.apollo(tiny_gpt(6), stages=(1, 6), stage_steps=(50,), sampler="uniform", seed=3,
                           resample="micro_batch")
        seen = []
        for _ in range(4):
            for micro in range(3):
                a(**gpt_batch(seed=micro))
                seen.append(a.depth)
            a.step()
        return seen

    first = run()
    assert first == run()
    assert len(set(first)) > 2
    with pytest.raises(GrowopsError, match="unknown resample 'batch'"):
        growops.apollo(tiny_gpt(2), stages=(1, 2), stage_steps=(1,), resample="batch")


def test_restore_step_matches_the_schedule():
    a, b = _gpt(), _gpt()
    for _ in range(7):
        a.step()
    b.restore_step(7)
    assert (b.step_count, b.stage, b.unique_layers, b.depth) == (a.step_count, a.stage, a.unique_layers, a.depth)
    with pytest.raises(GrowopsError, match="step must be an int >= 0, got -1"):
        b.restore_step(-1)
    b.restore_step(np.int64(7))  # NumPy ints are ints
    assert b.step_count == 7 and type(b.step_count) is int


def test_loading_another_model_raises_and_changes_nothing():
    a = _gpt()
    before = copy.deepcopy(a.state_dict())
    wider = growops.apollo(tiny_gpt(4, seed=1), stages=(1, 2, 4), stage_steps=(3, 6), seed=5)
    state = wider.state_dict()
    state["model.wte.weight"] = torch.zeros(64, 8)  # another width
    with pytest.raises(GrowopsError, match="model.wte.weight has shape \\(64, 8\\)"):
        a.load_state_dict(state)
    state = wider.state_dict()
    state["model.extra.weight"] = torch.zeros(1)
    with pytest.raises(GrowopsError, match="unexpected \\['model.extra.weight'\\]"):
        a.load_state_dict(state)
    after = a.state_dict()
    assert torch.equal(before["_extra_state"], after["_extra_state"])
    assert all(torch.equal(before[k], after[k]) for k in before if k != "_extra_state")


def test_a_wrapper_loading_a_bad_state_raises_before_anything_under_apollo_changes():
    """DDP, torch.compile and user wrappers load through torch's recursion, not a.load_state_dict."""

    class Wrapper(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    a = _gpt()
    opt = torch.optim.AdamW(a.parameters(), lr=1e-2)
    train_steps(a, opt, 4, lambda m, step: m(**gpt_batch()).loss)  # past a growth
    wrapped = Wrapper(a)
    before = copy.deepcopy(a.state_dict())
    state = Wrapper(_gpt()).state_dict()  # a fresh schedule: the right keys and shapes
    state["inner.model.wte.weight"] = torch.zeros(64, 8)
    with pytest.raises(GrowopsError, match="inner.model.wte.weight has shape"):
        wrapped.load_state_dict(state)
    after = a.state_dict()
    assert torch.equal(before["_extra_state"], after["_extra_state"])
    assert all(torch.equal(before[k], after[k]) for k in before if k != "_extra_state")
    wrapped.load_state_dict(Wrapper(_gpt()).state_dict())  # a good state loads through the wrapper
    assert (a.step_count, a.stage) == (0, 0)


def test_safetensors_helpers_refuse_the_wrong_object_and_damaged_files(tmp_path):
    a = _gpt()
    with pytest.raises(growops.GrowopsTypeError, match="takes the growops.apollo wrapper `a`, got a GPT"):
        growops.save_safetensors(a.model, tmp_path / "x.safetensors")
    path = tmp_path / "a.safetensors"
    growops.save_safetensors(a, path)
    with pytest.raises(growops.GrowopsTypeError, match="load_safetensors takes the growops.apollo wrapper"):
        growops.load_safetensors(a.model, path)
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    b = _gpt()
    before = copy.deepcopy(b.state_dict())
    with pytest.raises(GrowopsError, match="cannot read .*damaged.safetensors as a safetensors file"):
        growops.load_safetensors(b, damaged)
    assert all(torch.equal(before[k], b.state_dict()[k]) for k in before if k != "_extra_state")


class _Views(IndexLoopNet):
    """Buffers and a parameter that are views of one storage. Only `low_again` is the same view as `low` (an alias);
    `high` and `bias2` start at other offsets, and at `low`'s offset `low_t` has other strides and `low_empty` another
    shape. With `overlapping`, also views that overlap `low` only in part: `low_half` (another shape) and `low_bits`
    (another dtype)."""

    def __init__(self, overlapping=False):
        super().__init__(4)
        base = torch.randn(4, 4, 4)
        self.register_buffer("low", base[0])
        self.register_buffer("high", base[1])
        self.register_buffer("low_again", base[0])
        self.register_buffer("low_t", base[0].t())
        self.register_buffer("low_empty", base[0, :0])
        self.bias2 = torch.nn.Parameter(base[2])
        if overlapping:
            self.register_buffer("low_half", base[0, :2])
            self.register_buffer("low_bits", base[0].view(torch.int32))

    def forward(self, x):
        return super().forward(x) + (self.low + self.high + self.bias2).sum() * 1e-3


def _round_trip_views(tmp_path, overlapping=False):
    """Save an apollo of _Views, load it into another one; every tensor must come back. Returns the file's aliases."""
    from safetensors import safe_open

    torch.manual_seed(0)
    a = growops.apollo(_Views(overlapping), stages=(2, 4), stage_steps=(2,), seed=3)
    a.step()
    path = tmp_path / "views.safetensors"
    growops.save_safetensors(a, path)
    torch.manual_seed(1)
    b = growops.apollo(_Views(overlapping), stages=(2, 4), stage_steps=(2,), seed=3)
    growops.load_safetensors(b, path)
    want, got = a.state_dict(), b.state_dict()
    assert list(got) == list(want) and b.step_count == 1
    for k in want:
        assert k == "_extra_state" or torch.equal(got[k], want[k]), k
    with safe_open(str(path), framework="pt") as f:
        return json.loads(f.metadata()["aliases"])


def test_safetensors_aliases_only_identical_views_of_a_storage(tmp_path):
    """Views of one storage at other offsets, or with other strides or shape, are other tensors: each is saved, and
    only the identical view is stored once, as an alias. Every tensor round-trips."""
    assert _round_trip_views(tmp_path) == {"model.low_again": "model.low"}


def test_safetensors_saves_views_that_overlap_in_part(tmp_path):
    """A slice or a dtype view of another tensor is not an alias, and safetensors refuses overlapping tensors:
    they are saved as copies and come back equal."""
    assert _round_trip_views(tmp_path, overlapping=True) == {"model.low_again": "model.low"}


def test_safetensors_helpers_refuse_a_bad_path_naming_the_function_and_the_fix(tmp_path):
    a = _gpt()
    with pytest.raises(growops.GrowopsTypeError, match="save_safetensors takes a file path, got int"):
        growops.save_safetensors(a, 3)
    with pytest.raises(growops.GrowopsTypeError, match="load_safetensors takes a file path, got NoneType"):
        growops.load_safetensors(a, None)
    with pytest.raises(GrowopsError, match="save_safetensors: .* is a directory; give the path of a .safetensors file"):
        growops.save_safetensors(a, tmp_path)
    with pytest.raises(GrowopsError, match="load_safetensors: .* is a directory; give the path of a .safetensors file"):
        growops.load_safetensors(a, tmp_path)
    with pytest.raises(GrowopsError, match="save_safetensors: the folder of .*missing.* does not exist; create it"):
        growops.save_safetensors(a, tmp_path / "missing" / "a.safetensors")
    assert list(tmp_path.iterdir()) == []


def _rewrite_metadata(path, edit):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata()
    save_file(load_file(str(path)), str(path), metadata=edit(metadata))


def test_safetensors_file_without_aliases_metadata_still_loads(tmp_path):
    """Files written before tied weights were stored as aliases have no "aliases" key: they load as before."""
    a = _loop()
    a.step()
    with torch.no_grad():
        a.model.inp.weight.add_(1.0)
    path = tmp_path / "old.safetensors"
    growops.save_safetensors(a, path)
    _rewrite_metadata(path, lambda m: {"growops": m["growops"]})
    b = _loop()
    growops.load_safetensors(b, path)
    assert b.step_count == 1
    assert all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items() if k != "_extra_state")


@pytest.mark.parametrize("aliases", ["not json", '{"x": "no.such.tensor"}', "[1]"])
def test_safetensors_damaged_metadata_is_refused_with_the_reason(tmp_path, aliases):
    path = tmp_path / "a.safetensors"
    growops.save_safetensors(_gpt(), path)
    _rewrite_metadata(path, lambda m: {**m, "aliases": aliases})
    with pytest.raises(GrowopsError, match="a.safetensors has damaged growops metadata .*not written by this version "
                                           "of growops.save_safetensors"):
        growops.load_safetensors(_gpt(), path)


class _TwoViews(IndexLoopNet):
    """Exactly two buffers over one storage, both contiguous and overlapping (not the same view)."""

    def __init__(self):
        super().__init__(4)
        base = torch.randn(4, 4)
        self.register_buffer("whole", base)
        self.register_buffer("top", base[:2])


def test_safetensors_copies_exactly_two_overlapping_views(tmp_path):
    torch.manual_seed(0)
    a = growops.apollo(_TwoViews(), stages=(2, 4), stage_steps=(2,), seed=3)
    path = tmp_path / "two.safetensors"
    growops.save_safetensors(a, path)
    b = growops.apollo(_TwoViews(), stages=(2, 4), stage_steps=(2,), seed=3)
    growops.load_safetensors(b, path)
    assert torch.equal(b.model.whole, a.model.whole) and torch.equal(b.model.top, a.model.top)


def test_safetensors_does_not_copy_tensors_that_share_no_memory(tmp_path, monkeypatch):
    """Only tensors sharing a storage are copied before writing: the rest are written from the model's own memory
    (a copy of every weight would double the memory a save needs)."""
    import safetensors.torch

    written, save_file = {}, safetensors.torch.save_file

    def recording_save_file(tensors, *args, **kwargs):
        written.update(tensors)
        save_file(tensors, *args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", recording_save_file)
    torch.manual_seed(0)
    a = growops.apollo(_TwoViews(), stages=(2, 4), stage_steps=(2,), seed=3)
    growops.save_safetensors(a, tmp_path / "a.safetensors")
    own = a.model.inp.weight
    assert written["model.inp.weight"].data_ptr() == own.data_ptr()
    assert written["model.whole"].data_ptr() != a.model.whole.data_ptr()
