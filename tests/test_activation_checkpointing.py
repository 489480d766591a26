"""Activation checkpointing applied after growops wrapped the model: torch's FSDP recipe
(``apply_activation_checkpointing``: a ``CheckpointWrapper`` in place of each block), a checkpoint inside a block
around its ``forward`` (Hugging Face's way), and Hugging Face's ``gradient_checkpointing_enable()``.

Every block carries per-layer values (``layer_idx`` on the block, read before any submodule runs, and on a
submodule) that scale tensors the backward saves, so a recomputation that ran a position with another position's
values (or another block) would change the gradients; they are compared with the same wrapper without
checkpointing and with untied plain models.
"""

import copy
import functools

import pytest
import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    CheckpointWrapper,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.utils.checkpoint import checkpoint

import growops
from growops import GrowopsError
from growops.checkpointing import core
from growops.maps import depth_map

WIDTH = 6
REENTRANT = functools.partial(checkpoint_wrapper, checkpoint_impl=CheckpointImpl.REENTRANT)
WRAPPERS = {"non-reentrant": checkpoint_wrapper, "reentrant": REENTRANT}


class Mix(nn.Module):
    def __init__(self, i: int):
        super().__init__()
        self.fc = nn.Linear(WIDTH, WIDTH)
        self.layer_idx = i

    def forward(self, x):
        return torch.tanh(self.fc(x) / (1 + self.layer_idx))  # tanh saves its output, which the value scales


class Block(nn.Module):
    def __init__(self, i: int):
        super().__init__()
        self.norm = nn.LayerNorm(WIDTH)
        self.mix = Mix(i)
        self.out = nn.Linear(WIDTH, WIDTH)
        self.layer_idx = i
        self.inner_checkpoint = None  # None, or use_reentrant for a checkpoint of the body inside forward (HF's way)

    def body(self, x):
        scale = 1.0 + 0.5 * self.layer_idx  # read before any hook of the block or its submodules runs
        return x + self.out(torch.tanh(self.mix(self.norm(x)) * scale))

    def forward(self, x):
        if self.inner_checkpoint is None:
            return self.body(x)
        return checkpoint(self.body, x, use_reentrant=self.inner_checkpoint)


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


def _inputs(step: int) -> torch.Tensor:
    return torch.randn(5, 4, generator=torch.Generator().manual_seed(100 + step))


def _apollo(wrapper=None, inner=None, seed=0):
    torch.manual_seed(seed)
    model = Net()
    a = growops.apollo(model, stages=(1, 2, 4), stage_steps=(3, 6), sampler="uniform", seed=5)
    if wrapper is not None:
        apply_activation_checkpointing(model, checkpoint_wrapper_fn=wrapper, check_fn=lambda m: isinstance(m, Block))
    for block in model.modules():
        if isinstance(block, Block):
            block.inner_checkpoint = inner
    return a


def _untied(a, depth: int) -> Net:
    """A plain model of `depth` blocks whose block i is a copy of the unit position i runs, with layer i's values."""
    plain = Net(depth)
    plain.inp, plain.head = copy.deepcopy(a.model.inp), copy.deepcopy(a.model.head)
    blocks = [core(b) for b in a.model.layers]  # physical, outside a forward
    for i, u in enumerate(depth_map(a.unique_layers, depth)):
        plain.layers[i].load_state_dict(blocks[u].state_dict())
    return plain


def _grads(model) -> dict:
    return {n.replace("_checkpoint_wrapped_module.", ""): p.grad.clone() for n, p in model.named_parameters()
            if p.grad is not None}


def _train(a, steps=8, check_untied=False):
    """SGD steps across both growths; per step the loss and every gradient. With `check_untied`, each step's loss
    and gradients are also checked against the untied plain model of that step's depth."""
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    out, shared = [], 0
    for step in range(steps):
        x = _inputs(step)
        if check_untied:
            plain = _untied(a, a.depth)
            expected = plain(x).square().mean()
            expected.backward()
        loss = a(x).square().mean()
        loss.backward()
        grads = _grads(a.model)
        if check_untied:
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
        out.append((loss.detach(), grads))
        opt.step()
        opt.zero_grad()
        a.step(opt)
    assert shared >= 3 and a.unique_layers == 4  # units ran at several positions, in every stage but the last
    return out


def _same_training(got, expected):
    for (loss, grads), (loss_e, grads_e) in zip(got, expected):
        assert loss.item() == loss_e.item()
        assert grads.keys() == grads_e.keys()
        for name in grads:
            assert torch.equal(grads[name], grads_e[name]), name


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_checkpoint_wrappers_applied_after_wrapping_train_exactly_as_without(wrapper):
    """apply_activation_checkpointing on a.model: the same losses and gradients, bit for bit, at every sampled depth
    and across both growths (the grown units are checkpointed too), and the untied plain model's."""
    plain = _train(_apollo())
    a = _apollo(WRAPPERS[wrapper])
    assert all(type(b) is CheckpointWrapper for b in a.model.layers)
    _same_training(_train(a, check_untied=True), plain)
    assert all(type(b) is CheckpointWrapper for b in a.model.layers)


@pytest.mark.parametrize("reentrant", [False, True])
def test_a_recomputation_of_a_forward_gets_its_positions_values_before_any_hook_runs(reentrant):
    """Hugging Face checkpoints a block's forward inside its call, so the block's hooks do not run again in the
    recomputation, which reads layer_idx before any submodule's hook: the backward gives the unit its position's
    values as it reaches the block's output."""
    _same_training(_train(_apollo(inner=reentrant)), _train(_apollo()))


def test_the_checkpointed_model_exports_saves_and_loads_with_the_plain_keys():
    a = _apollo(checkpoint_wrapper)
    keys = list(Net().state_dict())
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for step in range(4):  # mid-schedule: 2 unique units of 4
        a(_inputs(step)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
    assert (a.unique_layers, a.layers) == (2, 4)
    x = _inputs(99)
    expected = a.eval()(x)
    assert list(a.model.state_dict()) == keys  # the wrapper's prefix stripped, as torch's hooks do

    exported = a.export()
    assert all(type(b) is CheckpointWrapper for b in exported.layers)  # the model as the user made it
    torch.testing.assert_close(exported.eval()(x), expected, rtol=0, atol=0)
    assert list(exported.state_dict()) == keys
    bare = Net().eval()
    bare.load_state_dict(exported.state_dict())  # strict: a plain model without checkpointing takes it
    torch.testing.assert_close(bare(x), expected, rtol=0, atol=0)
    assert [b.layer_idx for b in exported.layers] == [0, 1, 2, 3]

    b = _apollo(checkpoint_wrapper, seed=1)
    b.load_state_dict(a.state_dict())
    assert (b.step_count, b.unique_layers) == (a.step_count, a.unique_layers)
    torch.testing.assert_close(b.eval()(x), expected, rtol=0, atol=0)
    c = _apollo(seed=2)  # the same schedule without checkpointing
    c.load_state_dict(a.state_dict())
    torch.testing.assert_close(c.eval()(x), expected, rtol=0, atol=0)


def test_a_checkpointed_submodule_keeps_its_per_layer_value():
    """A wrapper put around a submodule that holds a per-layer value (Mix.layer_idx): positions still give it to the
    module the wrapper runs, which reads it."""
    a = _apollo()
    apply_activation_checkpointing(a.model, check_fn=lambda m: isinstance(m, Mix))
    assert type(a.model.layers[0].mix) is CheckpointWrapper
    _same_training(_train(a), _train(_apollo()))


def test_a_wrapper_of_another_block_is_refused_before_anything_changes():
    a = _apollo()
    a.model.layers[2] = checkpoint_wrapper(nn.Sequential(nn.Linear(WIDTH, WIDTH)))
    with pytest.raises(GrowopsError, match=r"^layers.2 was replaced after growops.apollo wrapped the model, by a "
                                           r"CheckpointWrapper whose structure differs from the block it replaced "
                                           r"\(it is a Sequential, not a Block\).*activation checkpointing wrappers, "
                                           r"which hold the block they replace, are fine"):
        a(_inputs(0))
    with pytest.raises(GrowopsError, match="layers.2 was replaced"):
        a.step()
    assert a.step_count == 0 and type(a._runtimes[0].blocks[2]) is Block
    a.model.layers[2] = checkpoint_wrapper(copy.deepcopy(a._runtimes[0].blocks[2]))  # a copy of the block: used
    a(_inputs(0))
    assert a._runtimes[0].blocks[2] is a.model.layers[2]._checkpoint_wrapped_module


@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
@pytest.mark.parametrize("how", ["hf", "hf-reentrant", "fsdp-recipe-layers", "fsdp-recipe-model"])
def test_hugging_face_llama_checkpointed_after_wrapping(how):
    """gradient_checkpointing_enable() (the layer checkpoints its forward, inside its hooks), or torch's recipe on
    the decoder layers or on the LlamaModel above the container: the gradients of the model without it."""
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaModel

    config = transformers.LlamaConfig(num_hidden_layers=4, hidden_size=32, num_attention_heads=2,
                                      num_key_value_heads=2, intermediate_size=64, vocab_size=96, bos_token_id=0,
                                      eos_token_id=0, pad_token_id=0)
    ids = torch.randint(1, 96, (2, 10), generator=torch.Generator().manual_seed(0))
    grads = []
    for enable in (False, True):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        a = growops.apollo(model, stages=(1, 2, 4), stage_steps=(5, 9), sampler="full").train()
        if enable and how.startswith("hf"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": how == "hf-reentrant"})
            assert all(layer.gradient_checkpointing for layer in model.model.layers)
        elif enable:
            kind = LlamaDecoderLayer if how == "fsdp-recipe-layers" else LlamaModel
            apply_activation_checkpointing(model, check_fn=lambda m, kind=kind: isinstance(m, kind))
        a(input_ids=ids, labels=ids, use_cache=False).loss.backward()
        grads.append(_grads(model))
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 4
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=1e-5, atol=1e-7, msg=name)
    assert type(a.export().model.layers) is nn.ModuleList


def test_a_wrapper_around_the_container_is_refused():
    """Wrapping the container (not its blocks): the model would call a module growops does not run."""
    a = _apollo()
    apply_activation_checkpointing(a.model, check_fn=lambda m: isinstance(m, nn.ModuleList))
    with pytest.raises(GrowopsError, match=r"^layers was replaced after growops.apollo wrapped the model, by a "
                                           r"CheckpointWrapper: .*Wrap the blocks, not their container"):
        a(_inputs(0))
    with pytest.raises(GrowopsError, match="Wrap the blocks, not their container"):
        a.step()
    assert a.step_count == 0


@pytest.mark.parametrize("wrapper", sorted(WRAPPERS))
def test_recomputations_after_the_depth_moved_on_run_their_own_positions(wrapper):
    """resample="micro_batch": two forwards at different depths, one backward through both; each recomputation runs
    the block and the values of the forward it belongs to, not those of the depth drawn last."""
    grads = []
    for checkpointed in (False, True):
        torch.manual_seed(0)
        model = Net()
        a = growops.apollo(model, stages=(2, 4), stage_steps=(9,), sampler="uniform", seed=1,
                           resample="micro_batch")
        if checkpointed:
            apply_activation_checkpointing(model, checkpoint_wrapper_fn=WRAPPERS[wrapper],
                                           check_fn=lambda m: isinstance(m, Block))
        depths, losses = [], []
        for k in range(3):
            losses.append(a(_inputs(k)).square().mean())
            depths.append(a.depth)
        sum(losses).backward()
        assert len(set(depths)) > 1
        grads.append(_grads(model))
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[1][name], grads[0][name]), name
