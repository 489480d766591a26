"""Which modules can be a block stack, read from the module tree alone (no graph).

A *container* holds a model's blocks as its children. Its *layout* splits the children into fixed blocks and a
growable core::

    children:  [ prefix (fixed) | unit 0 | unit 1 | ... | unit L-1 | suffix (fixed) ]
    each unit: `period` consecutive blocks whose signatures repeat from unit to unit

- A uniform container (every child structurally identical) is all core, period 1: each block is a unit.
- A container indexed like a list (child names "0", "1", ...) may hold blocks that are not all alike. Its core is
  the longest run of two or more repetitions of one pattern of `period` signatures; ties go to the shorter period,
  then to the earlier start. The other children are fixed: they keep their positions and their own weights.
  E.g. T5's ``[A, B, B, B, B, B]`` (block 0 owns the relative-position table) is prefix 1, period 1, L = 5;
  alternating attention and MLP-only blocks ``[A, M, A, M]`` are period 2, L = 2.

Invariant: the core's units are interchangeable (same signature, unit for unit), so growth may copy any unit into
any other; fixed blocks are never copied.
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import dataclass

from torch import nn


def module_class(module: nn.Module) -> type:
    """The class a module was written as: ``torch.nn.utils.parametrize`` gives each parametrized module a class of
    its own (a subclass named ``Parametrized<Class>``), which says nothing about its structure."""
    cls = type(module)
    if cls.__name__.startswith("Parametrized") and hasattr(module, "parametrizations"):
        return cls.__bases__[0]
    return cls


def module_signature(module: nn.Module) -> tuple:
    """What makes two blocks interchangeable: module classes, parameter and buffer names, shapes, dtypes."""
    return (
        tuple((name, module_class(m)) for name, m in module.named_modules()),
        tuple((name, tuple(p.shape), p.dtype) for name, p in module.named_parameters()),
        tuple((name, tuple(b.shape), b.dtype) for name, b in module.named_buffers()),
    )


@dataclass(frozen=True)
class Layout:
    """How a container's children split: `prefix` fixed blocks, `units` growable units of `period` blocks each,
    then `suffix` fixed blocks."""

    prefix: int
    period: int
    units: int
    suffix: int

    @property
    def size(self) -> int:
        return self.prefix + self.period * self.units + self.suffix

    @property
    def uniform(self) -> bool:
        """Every child is its own growable unit: no fixed blocks, period 1."""
        return self.prefix == self.suffix == 0 and self.period == 1

    def core(self) -> range:
        """Child indices of the growable core, in order."""
        return range(self.prefix, self.prefix + self.period * self.units)

    def unit(self, u: int) -> range:
        """Child indices of unit `u`."""
        start = self.prefix + u * self.period
        return range(start, start + self.period)

    def fixed(self) -> list[int]:
        """Child indices of the fixed blocks."""
        core = self.core()
        return [i for i in range(self.size) if i not in core]

    def describe(self, names: Sequence[str]) -> str:
        """One line for errors and the plan, e.g. ``5 growable blocks (h.1..h.5); fixed: h.0``."""
        core = [names[i] for i in self.core()]
        what = "growable blocks" if self.period == 1 else f"growable units of {self.period} blocks"
        text = f"{self.units} {what} ({core[0]}..{core[-1]})"
        fixed = [names[i] for i in self.fixed()]
        return text + (f"; fixed: {', '.join(fixed)}" if fixed else "")


def find_layout(signatures: Sequence[Hashable], indexed: bool = True) -> Layout | None:
    """The layout of a container whose children have `signatures` (see the module docstring), or None when no
    pattern repeats. `indexed=False` (children with names, not list indices) accepts uniform containers only."""
    n = len(signatures)
    if n >= 2 and all(s == signatures[0] for s in signatures):
        return Layout(0, 1, n, 0)
    if not indexed:
        return None
    best, best_key = None, None
    for period in range(1, n // 2 + 1):
        for start in range(0, n - 2 * period + 1):
            pattern = list(signatures[start:start + period])
            units = 1
            while start + (units + 1) * period <= n and \
                    list(signatures[start + units * period:start + (units + 1) * period]) == pattern:
                units += 1
            key = (units * period, -period, -start)
            if units >= 2 and (best_key is None or key > best_key):
                best_key, best = key, Layout(start, period, units, n - start - units * period)
    return best


def block_containers(root: nn.Module) -> dict[str, tuple[tuple[str, ...], Layout]]:
    """Every module whose children can hold a block stack: ``{path: (child paths, layout)}``."""
    found = {}
    for path, module in root.named_modules():
        children = list(module._modules.items())  # not named_children(): a module held twice counts twice
        if len(children) < 2 or any(child is None for _, child in children):
            continue
        indexed = all(name.isdigit() for name, _ in children)
        layout = find_layout([module_signature(child) for _, child in children], indexed)
        unit = [children[i][1] for i in layout.unit(0)] if layout is not None else []
        if any(p is not None for block in unit for p in block.parameters()):  # nothing to grow without parameters
            found[path] = (tuple(join(path, name) for name, _ in children), layout)
    return found


def difference(a: nn.Module, b: nn.Module) -> str:
    """What makes `b` structurally different from `a`, in words naming the submodule or tensor."""
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    if module_class(a) is not module_class(b):
        return f"it is a {_names(b, a)}"
    for name in sorted(mods_a.keys() | mods_b.keys()):
        if name not in mods_b:
            return f"it lacks {name} (a {type(mods_a[name]).__name__})"
        if name not in mods_a:
            return f"it has an extra {name} (a {type(mods_b[name]).__name__})"
        if module_class(mods_a[name]) is not module_class(mods_b[name]):
            return f"its {name} is a {_names(mods_b[name], mods_a[name])}"
    for kind, ta, tb in (("parameter", dict(a.named_parameters()), dict(b.named_parameters())),
                         ("buffer", dict(a.named_buffers()), dict(b.named_buffers()))):
        for name in sorted(ta.keys() | tb.keys()):
            if name not in tb:
                return f"it lacks the {kind} {name}"
            if name not in ta:
                return f"it has an extra {kind} {name}"
            if (ta[name].shape, ta[name].dtype) != (tb[name].shape, tb[name].dtype):
                return (f"its {kind} {name} is {tuple(tb[name].shape)} {tb[name].dtype}, not "
                        f"{tuple(ta[name].shape)} {ta[name].dtype}")
    return "nothing structural"


def _names(got: nn.Module, expected: nn.Module) -> str:
    """``"B, not a A"``, with module paths when the two classes share a name."""
    a, b = module_class(got), module_class(expected)
    if a.__name__ == b.__name__:
        return f"{a.__module__}.{a.__qualname__}, not a {b.__module__}.{b.__qualname__} (another class of that name)"
    return f"{a.__name__}, not a {b.__name__}"


def explain_fixed(names: Sequence[str], modules: Sequence[nn.Module], layout: Layout) -> list[str]:
    """Why each fixed block is not part of the growable core, e.g. ``h.0: it has an extra attn.bias_table``."""
    reasons = []
    core = layout.core()
    for i in layout.fixed():
        ref = modules[layout.unit(0)[(i - layout.prefix) % layout.period]]
        why = difference(ref, modules[i])
        if why == "nothing structural":  # like the core's blocks, but cut off from them by a different block
            between = range(core.stop, i) if i >= core.stop else range(i + 1, core.start)
            cut = next((j for j in between if module_signature(modules[j]) != module_signature(ref)), None)
            why = f"it is like the growable blocks, but {names[cut]} separates it from them" if cut is not None \
                else "it is like the growable blocks but does not complete a unit"
        reasons.append(f"{names[i]}: {why}")
    return reasons


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


def inside(path: str, prefix: str) -> bool:
    """Whether module path `path` is `prefix` or lies under it."""
    return prefix == "" or path == prefix or path.startswith(prefix + ".")
