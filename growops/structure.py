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


def module_signature(module: nn.Module) -> tuple:
    """What makes two blocks interchangeable: module classes, parameter and buffer names, shapes, dtypes."""
    return (
        tuple((name, type(m)) for name, m in module.named_modules()),
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
        children = list(module.named_children())
        if len(children) < 2:
            continue
        indexed = all(name.isdigit() for name, _ in children)
        layout = find_layout([module_signature(child) for _, child in children], indexed)
        if layout is not None:
            found[path] = (tuple(join(path, name) for name, _ in children), layout)
    return found


def difference(a: nn.Module, b: nn.Module) -> str:
    """What makes `b` structurally different from `a`, in words naming the submodule or tensor."""
    mods_a, mods_b = dict(a.named_modules()), dict(b.named_modules())
    if type(a) is not type(b):
        return f"it is a {type(b).__name__}, not a {type(a).__name__}"
    for name in mods_a.keys() | mods_b.keys():
        if name not in mods_b:
            return f"it lacks {name} (a {type(mods_a[name]).__name__})"
        if name not in mods_a:
            return f"it has an extra {name} (a {type(mods_b[name]).__name__})"
        if type(mods_a[name]) is not type(mods_b[name]):
            return f"its {name} is a {type(mods_b[name]).__name__}, not a {type(mods_a[name]).__name__}"
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


def explain_fixed(names: Sequence[str], modules: Sequence[nn.Module], layout: Layout) -> list[str]:
    """Why each fixed block is not part of the growable core, e.g. ``h.0: it has an extra attn.bias_table``."""
    reasons = []
    for i in layout.fixed():
        ref = modules[layout.unit(0)[(i - layout.prefix) % layout.period]]
        reasons.append(f"{names[i]}: {difference(ref, modules[i])}")
    return reasons


def join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def inside(path: str, prefix: str) -> bool:
    """Whether module path `path` is `prefix` or lies under it."""
    return prefix == "" or path == prefix or path.startswith(prefix + ".")
