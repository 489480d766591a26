"""Per-layer values collected over the layers (a load-balancing loss summed over every layer, a stack of every layer's
router logits): the loss over the positions a step runs equals the loss of a plain model of that depth whose layer i
is a copy of the unit position i runs. A tap on one layer, or layers weighted differently, stays refused."""

import copy

import pytest
import torch
from torch import nn

import growops
from growops import GrowopsError

EXPERTS = 3


def _balance(logits):
    """A Switch-style load-balancing loss of one layer's router logits."""
    probs = logits.softmax(-1)
    chosen = nn.functional.one_hot(probs.argmax(-1), EXPERTS).float()
    return EXPERTS * (chosen.mean(0) * probs.mean(0)).sum()


class _MoE(nn.Module):
    """A soft mixture of experts: returns (hidden state, router logits)."""

    def __init__(self, width=8):
        super().__init__()
        self.gate = nn.Linear(width, EXPERTS)
        self.experts = nn.Linear(width, width * EXPERTS)

    def forward(self, x):
        logits = self.gate(x)
        outs = torch.tanh(self.experts(x)).unflatten(-1, (EXPERTS, -1))
        return x + (logits.softmax(-1).unsqueeze(-1) * outs).sum(-2), logits


class _Dense(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class _AuxNet(nn.Module):
    """Its forward returns (output, auxiliary loss, every layer's router logits), the loss over the layers written one
    of several ways (`kind`); with `dense`, the blocks alternate a mixture and a dense block (units of two blocks), with
    `prefix` a dense block comes first (fixed), and only the mixtures count."""

    def __init__(self, n_layer=4, kind="accumulate", dense=False, prefix=False):
        super().__init__()
        self.kind, self.n_layer = kind, n_layer
        self.inp = nn.Linear(4, 8)
        kinds = [_MoE, _Dense] if dense else [_MoE]
        blocks = [kinds[i % len(kinds)]() for i in range(n_layer * len(kinds))]
        self.layers = nn.ModuleList([_Dense()] * prefix + blocks)
        self.out = nn.Linear(8, 3)

    def forward(self, x):
        h = self.inp(x)
        aux = h.new_zeros(()) if self.kind in ("accumulate", "weighted", "but_last") else 0.0
        aux = None if self.kind == "none" else aux
        collected, layers = [], len(self.layers)
        for i, layer in enumerate(self.layers):
            if isinstance(layer, _Dense):
                h = layer(h)
                continue
            h, logits = layer(h)
            if self.kind in ("accumulate", "zero"):
                aux = aux + _balance(logits)
            elif self.kind == "none":
                aux = _balance(logits) if aux is None else aux + _balance(logits)
            elif self.kind == "weighted":  # refused: each layer weighted by its own constant
                aux = aux + (i + 1) * _balance(logits)
            elif self.kind == "but_last":  # refused: every layer but the last
                if i < layers - 1:
                    aux = aux + _balance(logits)
            elif self.kind == "tap":  # refused: one layer's loss
                if i == 1:
                    aux = _balance(logits)
            else:
                collected.append(logits)
        if self.kind == "stack":
            aux = torch.stack([_balance(g) for g in collected]).mean()
        elif self.kind == "sum":
            aux = sum(_balance(g) for g in collected) / len(collected)
        elif self.kind == "cat":
            aux = _balance(torch.cat(collected))
        elif self.kind == "first_two":  # refused: two layers' losses, whatever the depth
            aux = torch.stack([_balance(g) for g in collected[:2]]).sum()
        return self.out(h), aux, tuple(collected)


class _AuxNetExported(_AuxNet):
    """Does not symbolically trace (control flow on a traced value): growops reads it through torch.export."""

    def forward(self, x):
        if x.dim() != 2:
            raise ValueError("expected (batch, 4) inputs")
        return super().forward(x)


class _AuxNetIndexed(_AuxNet):
    """Reaches its blocks by index: graph mode, whose graph holds L router outputs."""

    def forward(self, x):
        h, aux = self.inp(x), 0.0
        for i in range(self.n_layer):
            h, logits = self.layers[i](h)
            aux = aux + _balance(logits)
        return self.out(h), aux


def _x(seed=0):
    return torch.randn(16, 4, generator=torch.Generator().manual_seed(seed))


def _loss(out):
    return out[0].pow(2).mean() + 0.1 * out[1]


def _untied(model, mapping):
    """A plain model of depth len(mapping) whose position i holds a copy of `model`'s unit mapping[i]."""
    prefix = int(isinstance(model.layers[0], _Dense))
    period = 2 if isinstance(model.layers[prefix + 1], _Dense) else 1
    ref = type(model)(len(mapping), model.kind, dense=period == 2, prefix=bool(prefix))
    ref.inp.load_state_dict(model.inp.state_dict())
    ref.out.load_state_dict(model.out.state_dict())
    ref.layers[:prefix].load_state_dict(model.layers[:prefix].state_dict())
    for i, unit in enumerate(mapping):
        for r in range(period):
            ref.layers[prefix + i * period + r].load_state_dict(model.layers[prefix + unit * period + r].state_dict())
    return ref


COLLECTING = ["accumulate", "zero", "none", "stack", "sum", "cat"]


@pytest.mark.parametrize("cls", [_AuxNet, _AuxNetExported])
@pytest.mark.parametrize("kind", COLLECTING)
def test_one_stage_of_every_unit_is_the_model(cls, kind):
    torch.manual_seed(0)
    model = cls(4, kind)
    reference = copy.deepcopy(model)
    a = growops.apollo(model, stages=(4,), stage_steps=(), example_inputs=(_x(),))
    assert a.mode == "container"
    for train in (True, False):
        a.train(train)
        reference.train(train)
        got, expected = a(_x(1)), reference(_x(1))
        assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("cls, kind, dense, prefix", [(_AuxNet, k, False, False) for k in COLLECTING] +
                         [(_AuxNetExported, "accumulate", False, False), (_AuxNetExported, "stack", False, False),
                          (_AuxNet, "accumulate", True, False), (_AuxNetExported, "sum", True, False),
                          (_AuxNet, "stack", False, True), (_AuxNetExported, "stack", False, True)])
def test_mid_schedule_the_loss_is_that_of_a_plain_model_of_the_depth_run(cls, kind, dense, prefix):
    """At depth d with N unique units the loss, auxiliary loss included, is a plain depth-d model's whose layer i
    copies unit floor(i*N/d), and d router logits come back; through a growth too, and export equals evaluation."""
    torch.manual_seed(0)
    model = cls(4, kind, dense=dense, prefix=prefix)
    assert growops.plan(model, example_inputs=(_x(),)).stacks[0].layout.prefix == prefix
    a = growops.apollo(model, stages=(2, 4), stage_steps=(3,), sampler=lambda unique, layers, rng: max(unique, 3),
                       example_inputs=(_x(),))
    opt = torch.optim.SGD(a.parameters(), lr=0.2)
    worst = 0.0
    for step in range(5):
        x = _x(step)
        out = a(x)
        expected = _untied(model, a.mapping())(x)
        assert a.depth == 3 or a.unique_layers == 4
        assert len(out[2]) == len(expected[2]) == (a.depth if kind in ("stack", "sum", "cat") else 0)
        torch.testing.assert_close(out[1], expected[1], rtol=0, atol=1e-6)
        torch.testing.assert_close(_loss(out), _loss(expected), rtol=0, atol=1e-6)
        worst = max(worst, (_loss(out) - _loss(expected)).abs().item())
        _loss(out).backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
    assert a.unique_layers == 4 and worst < 1e-6
    a.eval()
    exported = a.export().eval()
    got, expected = a(_x(9)), exported(_x(9))
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])


@pytest.mark.parametrize("cls", [_AuxNet, _AuxNetExported])
@pytest.mark.parametrize("kind, why", [
    ("weighted", r"layers.0's output is used outside the chain of blocks by `\w+` \(at .*line \d+, in forward: aux = "
                 r"aux \+ \(i \+ 1\) \* _balance\(logits\)\)"),
    ("tap", r"layers.1's output is returned \(`\w+` \(at .*_balance.*\) without the like value of every other "
            r"layer"),
    ("first_two", r"layers.0's output is used outside the chain of blocks by `\w+` \(at .*aux = torch.stack\(\[_balance"
                  r"\(g\) for g in collected\[:2\]\]\).sum\(\)\)"),
    ("but_last", r"layers.2's output is returned \(`\w+` \(at .*aux = aux \+ _balance\(logits\)\)\) without the "
                 r"like value of every other layer"),
])
def test_a_loss_that_does_not_treat_every_layer_alike_is_refused_naming_the_node(cls, kind, why):
    with pytest.raises(GrowopsError, match=why):
        growops.plan(cls(4, kind), example_inputs=(_x(),))


def test_graph_mode_refuses_collected_outputs_saying_why():
    """Graph mode replaces the chain of block calls by one gate, so the L router outputs its graph holds cannot
    follow the depth: refused, naming the block and pointing to a forward that iterates the container."""
    with pytest.raises(GrowopsError, match=r"layers: the forward reaches its blocks other than by iterating it.*"
                                           r"layers.0's output is also used outside the chain of blocks \(by `\w+`\): "
                                           r"a value collected over the layers.*iterates the container"):
        growops.apollo(_AuxNetIndexed(4), stages=(2, 4), stage_steps=(1,))


transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()


def _mixtral(layers):
    config = transformers.MixtralConfig(num_hidden_layers=layers, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, num_key_value_heads=1, num_local_experts=4,
                                        num_experts_per_tok=2, vocab_size=100, max_position_embeddings=64,
                                        output_router_logits=True, router_aux_loss_coef=0.01)
    return transformers.MixtralForCausalLM(config)


def _mixtral_untied(model, mapping):
    ref = _mixtral(len(mapping))
    ref.load_state_dict({k: v for k, v in model.state_dict().items() if not k.startswith("model.layers.")},
                        strict=False)
    for i, unit in enumerate(mapping):
        ref.model.layers[i].load_state_dict(model.model.layers[unit].state_dict())
    return ref


def _ids(seed=0):
    return torch.randint(0, 100, (2, 12), generator=torch.Generator().manual_seed(seed))


def test_mixtral_router_loss_at_one_stage_mid_schedule_and_through_growth():
    torch.manual_seed(0)
    model = _mixtral(4)
    reference = copy.deepcopy(model)
    a = growops.apollo(model, stages=(4,), stage_steps=())
    for train in (True, False):
        a.train(train)
        reference.train(train)
        got, expected = a(input_ids=_ids(), labels=_ids()), reference(input_ids=_ids(), labels=_ids())
        assert expected.aux_loss > 0
        torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-6)

    torch.manual_seed(0)
    model = _mixtral(4)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(2,), sampler=lambda unique, layers, rng: max(unique, 3))
    opt = torch.optim.SGD(a.parameters(), lr=0.1)
    for step in range(4):
        out = a(input_ids=_ids(step), labels=_ids(step))
        expected = _mixtral_untied(model, a.mapping()).train()(input_ids=_ids(step), labels=_ids(step))
        assert a.mapping() == ((0, 0, 1) if step < 2 else (0, 1, 2, 3))
        torch.testing.assert_close(out.aux_loss, expected.aux_loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(out.loss, expected.loss, rtol=0, atol=1e-6)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
    a.eval()
    exported = a.export().eval()
    got, expected = a(input_ids=_ids(), labels=_ids()), exported(input_ids=_ids(), labels=_ids())
    assert torch.equal(got.loss, expected.loss) and torch.equal(got.logits, expected.logits)


def test_olmoe_router_loss_at_one_stage():
    config = transformers.OlmoeConfig(num_hidden_layers=4, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                                      num_key_value_heads=1, num_experts=4, num_experts_per_tok=2, vocab_size=100,
                                      max_position_embeddings=64, output_router_logits=True)
    torch.manual_seed(0)
    model = transformers.OlmoeForCausalLM(config)
    reference = copy.deepcopy(model)
    a = growops.apollo(model, stages=(4,), stage_steps=())
    for train in (True, False):
        a.train(train)
        reference.train(train)
        got, expected = a(input_ids=_ids(), labels=_ids()), reference(input_ids=_ids(), labels=_ids())
        torch.testing.assert_close(got.aux_loss, expected.aux_loss, rtol=0, atol=1e-6)
        torch.testing.assert_close(got.loss, expected.loss, rtol=0, atol=1e-6)


def test_planning_leaves_a_hugging_face_model_collecting_each_output_once():
    model = _mixtral(4)
    growops.plan(model)
    out = model(input_ids=_ids(), output_hidden_states=True)
    assert len(out.router_logits) == 4 and len(out.hidden_states) == 5
