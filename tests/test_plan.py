"""growops.plan: what growops will do, readable and correctable before anything changes."""

import copy
import warnings

import pytest
import torch
from torch import nn

import growops
from growops import GrowopsError, GrowopsTypeError
from tests.archs import Arch
from tests.models import IndexLoopNet, ParallelExperts, tiny_gpt


class _Opaque:
    __slots__ = ()


def _with_opaque_values():
    model = tiny_gpt(4)
    for block in model.blocks:
        block.attn.helper = _Opaque()  # one per block, incomparable
    return model


def test_plan_prints_what_grows_and_changes_nothing():
    model = Arch("modulelist", "iterate", "A", 3, "P", "", ("int", "buffer"), False).build()
    before = copy.deepcopy(model.state_dict())
    plan = growops.plan(model)
    assert str(plan).splitlines() == [
        "growops plan: container mode, L = 3",
        "  layers: 3 growable blocks (layers.1..layers.3); fixed: layers.0",
        "    fixed layers.0: it has an extra parameter table",
        "    per layer: v_buffer = (tensor(6,), tensor(6,), tensor(6,))",
        "    per layer: v_int = (1, 2, 3)",
    ]
    assert type(model.layers) is nn.ModuleList and not model.layers._forward_pre_hooks
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    assert growops.plan(IndexLoopNet(3)).mode == "graph"


def test_undecided_values_are_refused_until_declared():
    model = _with_opaque_values()
    with pytest.raises(GrowopsError, match=r"blocks: the blocks hold different values at attn.helper \(_Opaque "
                                           r"objects.*p.declare\(per_layer=\['attn.helper'\]\)"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,))
    assert type(model.blocks) is nn.ModuleList
    plan = growops.plan(model)
    assert "undecided: attn.helper" in str(plan)
    a = growops.apollo(model, stages=(2, 4), stage_steps=(1,), plan=plan.declare(per_layer=["attn.helper"]))
    assert "attn.helper" in a.plan.stacks[0].per_layer_values
    helpers = [b.attn.helper for b in model.blocks]
    a.step()
    assert [b.attn.helper for b in model.blocks] == helpers  # per-layer: never copied
    constant = growops.plan(_with_opaque_values()).declare(constant=["attn.helper"])
    assert "attn.helper" not in constant.stacks[0].per_layer_values and not constant.stacks[0].undecided_values
    with pytest.raises(GrowopsError, match="the plan's value 'attn.nothing' is not in blocks's blocks"):
        growops.apollo(_with_opaque_values(), stages=(2, 4), stage_steps=(1,), plan=plan.declare(
            per_layer=["attn.helper", "attn.nothing"]))


def test_a_plan_for_another_model_is_refused():
    plan = growops.plan(tiny_gpt(4))
    with pytest.raises(GrowopsError, match="lists 4 blocks, the model holds 6"):
        growops.apollo(tiny_gpt(6), stages=(2, 6), stage_steps=(1,), plan=plan)
    with pytest.raises(GrowopsTypeError, match="plan= takes a growops.plan"):
        growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(1,), plan="blocks")
    with pytest.raises(GrowopsError, match="pass stack= to growops.plan"):
        growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(1,), plan=plan, stack="blocks")
    a = growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(1,), plan=plan)
    assert a.plan is plan


def test_declare_takes_lists_of_paths_for_each_argument():
    plan = growops.plan(_with_opaque_values())
    for kwargs in (dict(per_layer="attn.helper"), dict(constant="attn.helper"),
                   dict(per_layer=["attn.helper"], constant="attn.helper")):
        with pytest.raises(GrowopsTypeError, match=r"declare takes lists of paths"):
            plan.declare(**kwargs)


class _NotContainers(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
        self.wrap = nn.Sequential(nn.Linear(4, 4))  # one child
        self.mixed = nn.ModuleList([nn.Linear(4, 4), nn.LayerNorm(4), nn.ReLU()])  # no pattern repeats

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        for m in self.mixed:
            x = m(x)
        return self.wrap(x)


@pytest.mark.parametrize("stack, why", [
    ("wrap", r"\(it has 1 child module\)"),
    ("blocks.0", r"\(it has 0 child modules\)"),
    ("mixed", r"\(no pattern of its children repeats; mixed.1 differs from mixed.0: "),
])
def test_a_stack_that_is_not_a_container_of_blocks_is_refused_with_why(stack, why):
    with pytest.raises(GrowopsError, match=rf"stack='{stack}' is not a container of repeated blocks in "
                                           rf"_NotContainers {why}"):
        growops.plan(_NotContainers(), stack=stack)


def test_per_layer_values_print_short():
    """How ``print(plan)`` shows a value: small tensors in full, others by shape, long reprs cut."""
    from growops.plan import _short_value

    assert _short_value(torch.arange(4)) == "[0, 1, 2, 3]"
    assert _short_value(torch.arange(5)) == "tensor(5,)"
    assert _short_value("x" * 24) == repr("x" * 24)[:21] + "..." and _short_value("x" * 22) == repr("x" * 22)


def test_a_plan_whose_blocks_no_longer_match_is_refused_naming_them():
    model = tiny_gpt(4)
    plan = growops.plan(model)
    model.blocks[2].mlp.c_fc = nn.Linear(16, 32)  # block 2 changed after planning
    with pytest.raises(GrowopsError, match=r"^the plan grows blocks.2 from blocks.0, but its parameter "
                                           r"mlp.c_fc.bias is \(32,\) torch.float32, not \(64,\) torch.float32$"):
        growops.apollo(model, stages=(2, 4), stage_steps=(1,), plan=plan)


def test_hooks_of_yours_on_a_block_are_warned_about_once_at_your_call():
    """A user's hook on a growable block's submodule fires wherever the block runs while shared: apollo says so once
    (naming the first hooked module), and the warning points at the line that called growops.apollo."""
    model = tiny_gpt(4)
    for block in model.blocks[1:]:
        block.attn.register_forward_hook(lambda *args: None)
    with pytest.warns(UserWarning) as record:
        growops.apollo(model, stages=(2, 4), stage_steps=(1,))
    mine = [w for w in record if "hooks of yours" in str(w.message)]
    assert len(mine) == 1 and mine[0].filename == __file__
    assert str(mine[0].message).startswith("growops: blocks.1.attn has hooks of yours: they fire wherever its block "
                                           "runs while blocks are shared")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        growops.apollo(tiny_gpt(4), stages=(2, 4), stage_steps=(1,))  # no hooks: no warning


class _ExpertsBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(4, 4) for _ in range(2)])

    def forward(self, x):
        return x + sum(expert(x) for expert in self.experts)


class _WithExperts(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([_ExpertsBlock() for _ in range(3)])

    def forward(self, x):
        for block in self.blocks:
            x = block(x)
        return x


def test_a_chosen_container_that_is_not_a_chain_is_refused_by_name():
    """Parallel experts inside each block are a container of repeated modules, not a stack of blocks."""
    with pytest.raises(GrowopsError, match=r"^stack='blocks.0.experts' is not called as a chain of blocks in the "
                                           r"traced forward$"):
        growops.plan(_WithExperts(), stack="blocks.0.experts")
    with pytest.raises(GrowopsError, match=r"^stack='experts' is not a chain of blocks in the traced forward: experts "
                                           r"\(4 x Linear\): not a chain: experts.1 does not read experts.0's output"):
        growops.plan(ParallelExperts(), stack="experts")  # a container of its own: why it is not a stack


class _SetsStateInForward(torch.nn.Module):
    """A forward that changes its model, as RWKV (a 'rescaled' flag) and BigBird (a replaced submodule) do."""

    def __init__(self):
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(4))
        self.norm = torch.nn.LayerNorm(4)
        self.rescaled = False

    def forward(self, x):
        if not self.rescaled:
            self.rescaled = True
        self.seen = x.shape  # an attribute the forward adds
        self.norm = torch.nn.LayerNorm(4)  # a submodule it replaces
        for block in self.layers:
            x = x + block(x)
        return self.norm(x)


def _full_state(model: torch.nn.Module) -> dict:
    return {(path, name): value for path, m in model.named_modules() for name, value in vars(m).items()
            if not name.endswith("hooks") and name not in ("_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                                                            "_forward_pre_hooks_with_kwargs")} | {
        ("tables", path, kind): tuple((k, id(v)) for k, v in getattr(m, kind).items())
        for path, m in model.named_modules() for kind in ("_parameters", "_buffers", "_modules")}


@pytest.mark.parametrize("build, inputs", [(_SetsStateInForward, torch.randn(2, 4)), (lambda: tiny_gpt(4), None)],
                         ids=["sets-state", "gpt"])
def test_planning_leaves_the_model_as_it_was(build, inputs):
    model = build()
    before = _full_state(model)
    growops.plan(model, example_inputs=inputs)
    after = _full_state(model)
    assert after.keys() == before.keys()
    assert all(after[k] is before[k] or after[k] == before[k] for k in before)
