"""torch.nn.utils.prune on a model's blocks, before or after wrapping: ``weight_orig`` and the ``weight_mask`` buffer
belong to the unit like a weight (shared by the positions that run it, copied at growth, saved in the exported
layout); the ``weight`` that prune's pre-hook recomputes at every call is derived, never a per-layer value.

References without growops: the pruned model itself at stages=(L,), an untied pruned model of each sampled depth.
"""

import copy

import pytest
import torch
from torch import nn
from torch.nn.utils import prune

import growops
from growops.maps import depth_map
from growops.stack import deep_copy

WIDTH = 6


class Block(nn.Module):
    def __init__(self, i: int):
        super().__init__()
        self.lin = nn.Linear(WIDTH, WIDTH)
        self.gate = nn.Linear(WIDTH, WIDTH)
        self.layer_idx = i

    def forward(self, x):
        return x + torch.tanh(self.lin(x)) * torch.sigmoid(self.gate(x)) / (1 + self.layer_idx)


class Net(nn.Module):
    def __init__(self, n_layer: int = 4):
        super().__init__()
        self.inp = nn.Linear(4, WIDTH)
        self.layers = nn.ModuleList([Block(i) for i in range(n_layer)])
        self.head = nn.Linear(WIDTH, 3)

    def forward(self, x):
        h = self.inp(x)
        for layer in self.layers:
            h = layer(h)
        return self.head(h)


def _prune(model: Net) -> Net:
    for block in model.layers:
        prune.l1_unstructured(block.lin, "weight", amount=0.5)
        prune.random_unstructured(block.gate, "weight", amount=0.3)
        prune.l1_unstructured(block.gate, "weight", amount=0.2)  # pruned twice: a PruningContainer
    return model


def _pruned(seed: int = 0, n_layer: int = 4) -> Net:
    torch.manual_seed(seed)
    return _prune(Net(n_layer))


def _inputs(step: int) -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(100 + step))


def _apollo(after: bool = False, seed: int = 0, **kw):
    """The schedule of these tests over a model pruned before wrapping, or (`after`) by the same calls after."""
    torch.manual_seed(seed)
    model = Net() if after else _prune(Net())
    kw = {"stages": (1, 2, 4), "stage_steps": (3, 6), "sampler": "uniform", "seed": 5, **kw}
    a = growops.apollo(model, **kw)
    if after:
        torch.manual_seed(seed)
        Net()  # the same random draws as _prune(Net()) above
        _prune(model)
    return a


def _untied(a, depth: int) -> Net:
    """A plain pruned model of `depth` blocks whose block i is a copy of the unit position i runs."""
    plain = _pruned(seed=1, n_layer=depth)
    plain.inp.load_state_dict(a.model.inp.state_dict())
    plain.head.load_state_dict(a.model.head.state_dict())
    for i, u in enumerate(depth_map(a.unique_layers, depth)):
        plain.layers[i].load_state_dict(a.model.layers[u].state_dict())
    return plain


def _train(a, steps=8, untied=False):
    """SGD steps across both growths: each step's loss and gradients (checked against the untied pruned model of the
    step's depth with `untied`)."""
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    out, shared = [], 0
    for step in range(steps):
        x = _inputs(step)
        if untied:
            plain = _untied(a, a.depth)
            expected = plain(x).square().mean()
            expected.backward()
        loss = a(x).square().mean()
        loss.backward()
        grads = {n: p.grad.clone() for n, p in a.model.named_parameters() if p.grad is not None}
        if untied:
            torch.testing.assert_close(loss, expected, rtol=0, atol=1e-6)
            runs = depth_map(a.unique_layers, a.depth)
            for name, g in grads.items():
                if name.startswith("layers."):
                    _, u, rest = name.split(".", 2)
                    want = sum(dict(plain.layers[i].named_parameters())[rest].grad
                               for i, v in enumerate(runs) if v == int(u))
                else:
                    want = dict(plain.named_parameters())[name].grad
                torch.testing.assert_close(g, want, rtol=1e-5, atol=1e-6, msg=name)
        shared += a.depth > a.unique_layers
        out.append((loss.item(), grads))
        opt.step()
        opt.zero_grad()
        a.step(opt)
    assert shared >= 3 and a.unique_layers == 4
    return out


def test_a_pruned_model_at_its_full_depth_trains_as_itself():
    reference = _pruned()
    a = growops.apollo(_pruned(), stages=(4,), stage_steps=())
    assert a.plan.stacks[0].per_layer_values.keys() == {"layer_idx"}  # the derived weight is not a per-layer value
    opts = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (reference, a)]
    for step in range(3):
        x = _inputs(step)
        losses = []
        for model, opt in zip((reference, a), opts):
            loss = model(x).square().mean()
            loss.backward()
            losses.append(loss.item())
            opt.step()
            opt.zero_grad()
        a.step(opts[1])
        assert losses[0] == losses[1]
    x = _inputs(9)
    assert torch.equal(a.eval()(x), reference.eval()(x))


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_pruned_blocks_train_as_the_untied_pruned_model_at_every_depth(after):
    """Masks and weight_orig are shared by the positions that run a unit and copied at growth; pruning after
    wrapping trains exactly as pruning before."""
    a = _apollo(after)
    steps = _train(a, untied=True)
    if after:
        before = _train(_apollo(False))
        assert [loss for loss, _ in steps] == [loss for loss, _ in before]
        for (_, grads), (_, grads_b) in zip(steps, before):
            assert all(torch.equal(grads[n], grads_b[n]) for n in grads_b) and grads.keys() == grads_b.keys()


@pytest.mark.parametrize("growth", ["interpolate", "stack"])
@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_growth_by_a_multiple_keeps_the_pruned_function(growth, after):
    a = _apollo(after, growth=growth, stages=(1, 2, 4), stage_steps=(1, 2)).eval()
    x = _inputs(0)
    for _ in range(2):
        before = a(x)
        masks = [b.lin.weight_mask.clone() for b in a.model.layers]
        a.step()
        sources = depth_map(a.unique_layers // 2, a.unique_layers, growth)
        for j, s in enumerate(sources):  # each new unit took its source's mask; its derived weight follows at once
            block = a.model.layers[j]
            assert torch.equal(block.lin.weight_mask, masks[s])
            assert torch.equal(block.lin.weight, block.lin.weight_orig * block.lin.weight_mask)
        torch.testing.assert_close(a(x), before, rtol=0, atol=0)


@pytest.mark.parametrize("after", [False, True], ids=["before", "after"])
def test_export_is_the_pruned_model_and_the_state_round_trips(after):
    a = _apollo(after)
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for step in range(4):  # mid-schedule: 2 unique units of 4, after a forward (prune's weight is then not a leaf)
        a(_inputs(step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
    a(_inputs(5))
    assert (a.unique_layers, a.layers) == (2, 4)
    x = _inputs(9)
    expected = a.eval()(x)
    keys = list(_pruned().state_dict())
    assert list(a.model.state_dict()) == keys

    exported = a.export().eval()
    assert list(exported.state_dict()) == keys
    torch.testing.assert_close(exported(x), expected, rtol=0, atol=0)
    assert [b.layer_idx for b in exported.layers] == [0, 1, 2, 3]
    assert prune.is_pruned(exported)
    for block in exported.layers:
        prune.remove(block.lin, "weight")
        prune.remove(block.gate, "weight")
    assert not prune.is_pruned(exported)
    torch.testing.assert_close(exported(x), expected, rtol=0, atol=0)
    assert prune.is_pruned(a.model)  # the model under training keeps its pruning

    b = _apollo(after, seed=1)
    b.load_state_dict(a.state_dict())
    assert (b.step_count, b.unique_layers) == (a.step_count, a.unique_layers)
    torch.testing.assert_close(b.eval()(x), expected, rtol=0, atol=0)
    plain = _pruned(seed=2).eval()
    plain.load_state_dict(a.model.state_dict())  # a checkpoint of the schedule is a plain pruned model
    torch.testing.assert_close(plain(x), expected, rtol=0, atol=0)


def test_deep_copy_of_a_pruned_model_after_a_forward_changes_nothing():
    model = _pruned()
    model(_inputs(0)).sum().backward()
    weight = model.layers[0].lin.weight
    assert not weight.is_leaf
    with pytest.raises(RuntimeError, match="graph leaves"):
        copy.deepcopy(model)
    copied = deep_copy(model)
    assert model.layers[0].lin.weight is weight  # the original keeps its own tensors
    assert torch.equal(copied(_inputs(1)), model(_inputs(1)))
    assert copied.layers[0].lin.weight_orig is not model.layers[0].lin.weight_orig
