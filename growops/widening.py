"""Widen a model once: a copy of the same class with a larger hidden size (and FFN size, head count).

A model with a config is rebuilt from it at the new sizes (a Hugging Face config, or a dataclass config the model is
built from, as in nanoGPT: ``type(model)(config)``), so the new model is exactly what its own code builds at that
width (``save_pretrained``/``from_pretrained`` round-trip). A model without one grows its hidden width only: the
dimensions tied to its blocks' outputs (``growops.fx.width.width_groups``) grow in a deep copy whose torch.nn layers
are resized. Either way every tensor is then filled from the old one by the width plan (``growops.fx.width``): units
duplicated by tiling, contracted inputs split, a norm scaled where a tied weight is contracted. The head size is kept:
the head count grows with the hidden size (or as given).

Invariant, checked on a probe input on every call: with ``noise=0`` and every width grown by a whole multiple, the
widened model's outputs equal the model's (to fp32 round-off), or ``widen`` raises a GrowopsError and returns
nothing. For other sizes every new unit is still a copy and contracted weights are split, so paths through linear
layers and elementwise activations are preserved, but normalisation statistics over a widened dimension change and
the output moves (the probe difference is reported by ``grow_width``). ``noise > 0`` then adds Gaussian noise of
``noise`` times each widened tensor's standard deviation, so duplicated units train apart.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from typing import Any

import torch
from torch import fx, nn

from .deepening import Grown, _match_tensors, _probe_difference, match_training
from .errors import GrowopsError, GrowopsTypeError, check_int
from .fx.analysis import block_regions
from .fx.residual import _hidden_output
from .fx.trace import _candidate_inputs, example_inputs_for, first_line, trace_model
from .fx.width import ParamWidth, _named_tensors, _shape, dim_growths, group_growths, width_groups, width_plan
from .integrations.hf_inputs import is_hf_model
from .plan import find_stacks, refuse_wrapped
from .stack import deep_copy

PLAN_ATTR = "_growops_width_plan"
OPTIMIZER_POLICIES = ("split", "reset")
# Config fields, by what they size, in the order they are looked for.
FIELDS = {
    "hidden": ("hidden_size", "n_embd", "d_model", "dim", "embed_dim", "n_embed", "width"),
    "ffn": ("intermediate_size", "n_inner", "ffn_dim", "d_ff", "mlp_dim", "ffn_hidden_size"),
    "heads": ("num_attention_heads", "n_head", "num_heads", "n_heads"),
    "kv_heads": ("num_key_value_heads", "n_kv_heads", "num_kv_heads"),
}


def widen(model: nn.Module, hidden: int, ffn: int | None = None, heads: int | None = None,
          example_inputs: Any = None, noise: float = 0.0, seed: int = 0) -> nn.Module:
    """A copy of `model` (same class) with hidden size `hidden`, FFN size `ffn` (None: what the model's config gives
    at the new hidden size, e.g. unchanged ``intermediate_size`` or GPT-2's 4 x hidden) and `heads` attention heads
    (None: grown with the hidden size, keeping the head size); `model` is left untouched.

        wide = growops.widen(model, hidden=1024)              # 512 -> 1024: the same function, twice the width
        wide = growops.widen(model, hidden=1024, noise=1e-3)  # duplicated units break symmetry

    example_inputs: one batch for tracing and the probe check (default: ``dummy_inputs`` or, for a Hugging Face model,
    inputs built from its config). noise, seed: symmetry-breaking noise (module docstring) and its generator's seed.
    """
    return grow_width(model, hidden, ffn, heads, example_inputs, noise, seed).model


def grow_width(model: nn.Module, hidden: int, ffn: int | None = None, heads: int | None = None,
               example_inputs: Any = None, noise: float = 0.0, seed: int = 0) -> Grown:
    """``widen`` with a report: the model, what changed, the probe difference (before noise)."""
    if not isinstance(model, nn.Module):
        raise GrowopsTypeError(f"widen takes an nn.Module, got {type(model).__name__}")
    refuse_wrapped(model, "widen")
    hidden = check_int("hidden", hidden, 1)
    ffn = None if ffn is None else check_int("ffn", ffn, 1)
    heads = None if heads is None else check_int("heads", heads, 1)
    if isinstance(noise, bool) or not isinstance(noise, (int, float)) or not math.isfinite(noise) or noise < 0:
        raise GrowopsError(f"noise must be a finite number >= 0, got {noise!r}")
    seed = check_int("seed", seed)

    config = getattr(model, "config", None)
    if is_hf_model(model) or (dataclasses.is_dataclass(config) and not isinstance(config, type)):
        new, plan, changes = _widen_by_config(model, hidden, ffn, heads, example_inputs)
    else:
        new, plan, changes = _widen_by_graph(model, hidden, ffn, heads, example_inputs)
    match_training(new, model)
    multiples = all(g.whole_multiple for entry in plan.values() for g in entry.grows.values())
    difference = _probe_difference(model, new, example_inputs)
    if difference is None:
        raise GrowopsError(f"widen checks the widened {type(model).__name__} on a probe input and found none it runs "
                           "on: pass one batch as example_inputs=")
    if multiples and difference[0] > 1e-4 * max(1.0, difference[1]):
        raise GrowopsError(
            f"widening {type(model).__name__} by whole multiples changed its output by {difference[0]:.3g} on "
            f"{difference[2]}: the model mixes widened units in a way the width plan does not follow (a fused "
            "projection whose pieces are not multiples of the hidden size, a reshape that interleaves heads, a value "
            "computed from the width). Widen it by hand, or report the model to growops")
    if noise:
        _add_noise(new, plan, noise, seed)
    new.__dict__[PLAN_ATTR] = plan  # for widen_optimizer_state; not a module, parameter or buffer
    grown_dims = sorted({f"{g.old} -> {g.new}" for e in plan.values() for g in e.grows.values()})
    changes.append(f"widened dimensions: {', '.join(grown_dims)}" + ("" if multiples else
                                                                     " (not all whole multiples)"))
    return Grown(new, changes, difference[0])


def _widen_by_config(model: nn.Module, hidden: int, ffn: int | None, heads: int | None,
                     example_inputs: Any) -> tuple[nn.Module, dict[str, ParamWidth], list[str]]:
    """The model's class built from its config at the new sizes, every tensor filled by the width plan."""
    config, changes, old_hidden = _widened_config(model, hidden, ffn, heads)
    try:
        new = type(model)(config)
    except Exception as e:  # noqa: BLE001 - a config the class cannot build at these sizes: say so
        raise GrowopsError(f"cannot build {type(model).__name__} at the new sizes ({'; '.join(changes)}): "
                           f"{first_line(e)}") from None
    old_tensors, new_tensors = _named_tensors(model), _named_tensors(new)
    if set(old_tensors) != set(new_tensors):
        extra = sorted(set(old_tensors) ^ set(new_tensors))[:4]
        raise GrowopsError(f"{type(model).__name__} built at the new sizes has other tensors than the model "
                           f"({extra}): widen fills the same tensors at larger sizes")
    growths = dim_growths({k: tuple(v.shape) for k, v in old_tensors.items()},
                          {k: tuple(v.shape) for k, v in new_tensors.items()}, (old_hidden, hidden))
    if hidden != old_hidden and not any(growths.values()):
        raise GrowopsError(f"{type(model).__name__} built with {'; '.join(changes)} has the same tensors as before: "
                           "its width is set by another field of its config than the ones growops changed")
    traced = trace_model(model, set(), example_inputs)
    plan = width_plan(traced.graph_module, model, growths)
    by_name = {n: entry for entry in plan.values() for n in entry.names}
    _match_tensors(model, new)
    persistent = set(new.state_dict())
    with torch.no_grad():
        new.load_state_dict({k: _filled(by_name[k], old_tensors[k]) for k in persistent})
        for name, buffer in new.named_buffers(remove_duplicate=False):
            if name not in persistent and by_name[name].grows:
                buffer.copy_(_filled(by_name[name], old_tensors[name]))
    return new, plan, changes


# Size attributes of torch.nn layers, set from their weight's new shape when the graph path widens them.
_SIZE_ATTRS = {nn.Linear: {"in_features": (0, 1), "out_features": (0, 0)},
               nn.Embedding: {"embedding_dim": (0, 1)},
               nn.LayerNorm: {"normalized_shape": None}, nn.RMSNorm: {"normalized_shape": None}}


def _widen_by_graph(model: nn.Module, hidden: int, ffn: int | None, heads: int | None,
                    example_inputs: Any) -> tuple[nn.Module, dict[str, ParamWidth], list[str]]:
    """For a model without a config: the dimensions tied to its blocks' hidden output (``growops.fx.width_groups``)
    grow to `hidden` in a deep copy, whose layers get the new tensors and sizes; FFN and head widths stay."""
    name = type(model).__name__
    if ffn is not None or heads is not None:
        raise GrowopsError(f"{name} has no config growops can read, so widen grows its hidden width only (the width "
                           "of its blocks' outputs and everything tied to it); leave ffn and heads None")
    stack = find_stacks(model, None, example_inputs)[0]
    traced = trace_model(model, set(), example_inputs)
    gm = traced.graph_module
    if traced.kind == "symbolic":
        _shapes_from_run(gm, model, example_inputs)
    regions = block_regions(gm.graph, stack.blocks)
    core = list(stack.layout.core())
    first = stack.blocks[core[0]]
    # The stack's hidden width: the last dimension of every core block's output, and of the first one's input (in a
    # stack without residual connections nothing else ties a block's input to its output).
    outputs = [_hidden_output(gm.graph, {n for n, k in regions.items() if k == i}, stack.blocks[i]) for i in core]
    shapes = [_shape(o) for o in outputs]
    shape = shapes[0]
    if None in shapes or len(set(shapes)) > 1:  # a width is read from tensors of one known shape
        seen = ", ".join([f"{stack.blocks[i]}: {s}" for i, s in zip(core[:4], shapes)] + ["..."] * (len(core) > 4))
        raise GrowopsError(f"cannot read one hidden width from the blocks' outputs ({seen}): widen grows stacks "
                           "whose blocks keep the shape of what they pass on; widen this model by hand")
    region = {n for n, k in regions.items() if k == core[0]}
    inputs = {i for n in region for i in n.all_input_nodes if i not in region and _shape(i) == shape}
    old_hidden = shape[-1]
    if hidden < old_hidden:
        raise GrowopsError(f"widen grows: hidden={hidden} is smaller than {name}'s hidden width {old_hidden}")
    groups = width_groups(gm, model)
    anchor = (outputs[0], len(shape) - 1)
    for node in outputs[1:] + (list(inputs) if len(inputs) == 1 else []):
        groups.union((node, len(shape) - 1), anchor)
    tensors = _named_tensors(model)
    growths = group_growths(groups, tensors, anchor, hidden)
    plan = width_plan(gm, model, growths)
    new = deep_copy(model)
    made: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for entry in plan.values():
            if not entry.grows:
                continue
            old = tensors[entry.names[0]]
            value = _filled(entry, old)
            for path in entry.names:
                owner_path, _, attr = path.rpartition(".")
                owner = new.get_submodule(owner_path)
                if id(old) not in made:
                    made[id(old)] = nn.Parameter(value, old.requires_grad) if attr in owner._parameters else value
                if attr in owner._parameters:
                    owner._parameters[attr] = made[id(old)]
                else:
                    owner._buffers[attr] = made[id(old)]
                _resize(owner)
    return new, plan, [f"{name}: hidden width {old_hidden} -> {hidden} (the dimensions tied to "
                       f"{first}'s output, found in the graph)"]


def _resize(module: nn.Module) -> None:
    """Set a torch.nn layer's size attributes from its weight's shape."""
    weight = module._parameters.get("weight")
    for cls, attrs in _SIZE_ATTRS.items():
        if type(module) is cls and weight is not None:
            for attr, where in attrs.items():
                setattr(module, attr, tuple(weight.shape) if where is None else weight.shape[where[1]])


def _shapes_from_run(gm: fx.GraphModule, model: nn.Module, example_inputs: Any) -> None:
    """Record every node's output as ``node.meta["val"]`` by running `gm` on the first probe input (eval mode)."""
    failures = []
    for what, inputs in _candidate_inputs(model, example_inputs):
        args, kwargs = example_inputs_for(model, inputs)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        values = []
        for i, node in enumerate(placeholders):
            if i < len(args):
                values.append(args[i])
            elif node.target in kwargs:
                values.append(kwargs[node.target])
            else:
                values.append(node.args[0] if node.args else None)
        modes = [(m, m.training) for m in model.modules()]
        try:
            model.eval()
            with torch.no_grad():
                _Recorder(gm).run(*values)
            return
        except Exception as e:  # noqa: BLE001 - the next probe
            failures.append(f"on {what}: {first_line(e)}")
            continue
        finally:
            for m, mode in modes:
                m.training = mode
    # The graph is symbolic: arguments not given take their defaults, so the branch traced is the defaults' one.
    tried = f"; its symbolically traced forward failed {'; '.join(failures)}" if failures else ""
    raise GrowopsError(f"widen needs an input {type(model).__name__} runs on, to read its widths{tried}: pass one "
                       "batch it runs on as example_inputs=, with every argument the traced forward reads (the "
                       "trace follows the branch of the arguments' defaults)")


class _Recorder(fx.Interpreter):
    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if isinstance(result, torch.Tensor):
            n.meta["val"] = result
        return result


def _filled(entry: ParamWidth, old: torch.Tensor) -> torch.Tensor:
    return entry.fill(old.detach()) if entry.grows else old.detach()


def _add_noise(model: nn.Module, plan: dict[str, ParamWidth], noise: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, entry in plan.items():
            t = model.get_parameter(name) if _is_param(model, name) else None
            if t is None or not entry.grows or not t.is_floating_point() or t.numel() < 2:
                continue
            std = float(t.float().std())
            t.add_((torch.randn(t.shape, generator=g) * noise * (std or 1.0)).to(t.dtype))


def _is_param(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
        return True
    except AttributeError:
        return False


def _field(config: Any, kind: str) -> str | None:
    for name in FIELDS[kind]:
        if hasattr(config, name):
            return name
    return None


def _widened_config(model: nn.Module, hidden: int, ffn: int | None, heads: int | None) -> tuple[Any, list[str], int]:
    """(the model's config at the new sizes, the fields changed, the old hidden size); GrowopsErrors for sizes the
    model cannot take while keeping its head size."""
    config = getattr(model, "config", None)
    if config is None or not (is_hf_model(model) or dataclasses.is_dataclass(config)):
        raise GrowopsError(f"widen rebuilds {type(model).__name__} from its config at the new sizes, and it has none "
                           "(growops knows Hugging Face configs and a dataclass in model.config that "
                           "type(model)(config) builds from, as nanoGPT's GPTConfig)")
    name = type(model).__name__
    h_field = _field(config, "hidden")
    if h_field is None:
        raise GrowopsError(f"{name}'s config has no hidden-size field (looked for {', '.join(FIELDS['hidden'])})")
    h = getattr(config, h_field)
    if hidden < h:
        raise GrowopsError(f"widen grows: hidden={hidden} is smaller than {name}'s {h_field}={h}")
    fields = {h_field: hidden}
    f_field = _field(config, "ffn")
    if ffn is not None:
        if f_field is None:
            raise GrowopsError(f"{name} derives its FFN size from its hidden size (no {' / '.join(FIELDS['ffn'])} in "
                               "its config): leave ffn=None")
        old_ffn = getattr(config, f_field)
        if old_ffn is not None and ffn < old_ffn:
            raise GrowopsError(f"widen grows: ffn={ffn} is smaller than {name}'s {f_field}={old_ffn}")
        fields[f_field] = ffn
    n_field = _field(config, "heads")
    if n_field is not None and getattr(config, n_field) is None:
        n_field = None  # a head-count field left unset: the model has no heads to keep
    if n_field is not None:
        n_heads = getattr(config, n_field)
        if not isinstance(n_heads, int) or isinstance(n_heads, bool):
            raise GrowopsError(f"{name}'s config.{n_field} is {n_heads!r}, not one head count (per-stage counts, as in "
                               "Swin): widen grows models with one head count")
        head_dim = getattr(config, "head_dim", None) or h // n_heads
        explicit = getattr(config, "head_dim", None) is not None
        if not explicit and hidden % head_dim:
            raise GrowopsError(f"hidden={hidden} is not a multiple of {name}'s head size {head_dim}: growops keeps the "
                               "head size (attention stays the same)")
        if heads is None:
            if (hidden * n_heads) % h:
                raise GrowopsError(f"hidden={hidden} does not hold a whole number of {name}'s heads grown with it "
                                   f"({n_field}={n_heads} at {h_field}={h}); pass heads=")
            heads = hidden * n_heads // h
        if not explicit and heads * head_dim != hidden:
            raise GrowopsError(f"heads={heads} at hidden={hidden} would change the head size from {head_dim} to "
                               f"{hidden / heads:g}: growops keeps the head size (attention stays the same); use "
                               f"heads={hidden // head_dim}")
        if heads < n_heads:
            raise GrowopsError(f"widen grows: heads={heads} is fewer than {name}'s {n_field}={n_heads}")
        fields[n_field] = heads
        kv_field = _field(config, "kv_heads")
        kv = getattr(config, kv_field, None) if kv_field else None
        if kv is not None and kv != n_heads:
            if (kv * heads) % n_heads:
                raise GrowopsError(f"{heads} heads do not keep {name}'s ratio of {n_heads} query heads to {kv} "
                                   "key/value heads; pass heads= a multiple of that ratio")
            fields[kv_field] = kv * heads // n_heads
        elif kv is not None:
            fields[kv_field] = heads
    elif heads is not None:
        raise GrowopsError(f"heads= was given but {name}'s config has no head count "
                           f"({' / '.join(FIELDS['heads'])})")
    changes = [f"config.{k}: {getattr(config, k)} -> {v}" for k, v in fields.items() if getattr(config, k) != v]
    if dataclasses.is_dataclass(config) and not is_hf_model(model):
        return dataclasses.replace(config, **fields), changes, h
    config = copy.deepcopy(config)
    for k, v in fields.items():
        setattr(config, k, v)
    return config, changes, h


def widen_optimizer_state(optimizer: torch.optim.Optimizer, model: nn.Module, wide: nn.Module,
                          wide_optimizer: torch.optim.Optimizer, policy: str = "split") -> None:
    """Carry `optimizer`'s state (for `model`) over to `wide_optimizer` (built over ``wide = growops.widen(model,
    ...)``), parameter by parameter name.

    ``"split"``: each state tensor shaped like its parameter (Adam's ``exp_avg``, SGD's momentum) is widened like
    the parameter (copied, split where the weight is split); ``exp_avg_sq`` is divided by the squared counts, so
    each unit's ``exp_avg / sqrt(exp_avg_sq)`` is its old unit's; step counts and other values are copied.
    ``"reset"``: widened parameters start with no state, the others keep theirs. `wide_optimizer`'s hyperparameters
    are left as built; its state for `wide`'s parameters is replaced. Everything is checked before anything changes.
    """
    from .errors import check_choice

    policy = check_choice("policy", policy, OPTIMIZER_POLICIES)
    plan = wide.__dict__.get(PLAN_ATTR)
    if plan is None:
        raise GrowopsError("widen_optimizer_state needs the model growops.widen returned (it carries the width plan)")
    by_name = {n: entry for entry in plan.values() for n in entry.names}
    old = dict(model.named_parameters())
    new = dict(wide.named_parameters())
    held = {id(p) for g in wide_optimizer.param_groups for p in g["params"]}
    stranger = [n for n, p in new.items() if id(p) in held and n not in old]
    if set(new) != set(old) or stranger:
        raise GrowopsError("widen_optimizer_state maps parameters by name: `model` and `wide` must be the model and "
                           "its widen(...) result")
    if not held or not held <= {id(p) for p in new.values()}:
        raise GrowopsError("wide_optimizer must be built over the widened model's parameters")
    states = {}
    for name, p in new.items():
        state = optimizer.state.get(old[name])
        if id(p) not in held or not state:
            continue
        entry = by_name[name]
        if policy == "reset" and entry.grows:
            continue
        states[p] = {k: _state_value(k, v, old[name], entry) for k, v in state.items()}
    for p in new.values():
        wide_optimizer.state.pop(p, None)
    for p, state in states.items():
        wide_optimizer.state[p] = state


def _state_value(key: str, value: Any, param: torch.Tensor, entry: ParamWidth) -> Any:
    if isinstance(value, torch.Tensor) and value.shape == param.shape and value.dim() > 0:
        return entry.fill(value.detach(), power=2 if key.endswith("_sq") else 1) if entry.grows else value.clone()
    return value.clone() if isinstance(value, torch.Tensor) else copy.deepcopy(value)
