"""Small random architectures for property tests: how a model holds its blocks, how its forward reaches them, what
per-layer values its blocks carry, and which blocks are fixed or periodic. Every variation here is one growops
supports; ``Arch.build()`` gives a fresh model and ``Arch.inputs()`` a batch."""

from __future__ import annotations

import enum
from dataclasses import dataclass

import torch
from hypothesis import strategies as st
from torch import nn

WIDTH = 6


class Kind(enum.Enum):
    LOCAL = 1
    GLOBAL = 2


# How a per-layer value of block i is stored, and how it scales the block's update (so a wrong value changes the
# output): every kind differs from layer to layer.
VALUES = {
    "int": (lambda i: i, lambda v: 1.0 / (1 + v)),
    "float": (lambda i: 0.5 + 0.25 * i, lambda v: v),
    "tuple": (lambda i: (i, 2 * i + 1), lambda v: 1.0 / (v[0] + v[1])),
    "none_or_int": (lambda i: None if i % 2 else i + 1, lambda v: 0.5 if v is None else 1.0 / v),
    "enum": (lambda i: Kind.LOCAL if i % 2 else Kind.GLOBAL, lambda v: 0.3 * v.value),
    "tensor0d": (lambda i: torch.tensor(1.0 + i), lambda v: 1.0 / v),
    "buffer": (lambda i: torch.full((WIDTH,), 1.0 + i), lambda v: 1.0 / v),
    "nonpersistent": (lambda i: torch.full((WIDTH,), 2.0 + i), lambda v: 1.0 / v),
}


class Block(nn.Module):
    """Kind "A" (a linear layer), "B" (a norm and a linear layer) or "C" (two linear layers); "P" adds an extra table
    (a fixed first block, say a relative-position bias owner); "S" has another width inside (a fixed last block)."""

    def __init__(self, kind: str, index: int, values: tuple[str, ...], tuple_out: bool):
        super().__init__()
        self.kind, self.tuple_out, self.value_kinds = kind, tuple_out, values
        hidden = 2 * WIDTH if kind == "S" else WIDTH
        self.inp = nn.Linear(WIDTH, hidden)
        self.norm = nn.LayerNorm(WIDTH) if kind == "B" else nn.Identity()
        if kind == "C":
            self.extra = nn.Linear(hidden, hidden)
        if kind == "P":
            self.table = nn.Parameter(torch.randn(WIDTH) * 0.1)
        self.out = nn.Linear(hidden, WIDTH)
        for name in values:
            make = VALUES[name][0]
            if name == "buffer":
                self.register_buffer("v_buffer", make(index))
            elif name == "nonpersistent":
                self.register_buffer("v_nonpersistent", make(index), persistent=False)
            else:
                setattr(self, f"v_{name}", make(index))

    def forward(self, x, layer_arg: int = 0):
        h = self.inp(self.norm(x))
        if self.kind == "C":
            h = torch.tanh(self.extra(h))
        update = torch.tanh(self.out(torch.tanh(h)))
        if self.kind == "P":
            update = update + self.table
        for name in self.value_kinds:
            update = update * VALUES[name][1](getattr(self, f"v_{name}"))
        x = x + update * (1.0 + 0.1 * layer_arg)
        return (x, layer_arg) if self.tuple_out else x


class OwnList(nn.Module):
    """A container class of its own that also keeps its blocks in a plain Python list."""

    def __init__(self, blocks):
        super().__init__()
        for i, block in enumerate(blocks):
            self.add_module(str(i), block)
        self.items = list(blocks)


class Net(nn.Module):
    def __init__(self, arch: Arch):
        super().__init__()
        self.arch = arch
        self.inp = nn.Linear(3, WIDTH)
        blocks = [Block(kind, i, arch.values if i in arch.core() else (), arch.tuple_out)
                  for i, kind in enumerate(arch.kinds())]
        if arch.container == "sequential":
            self.layers = nn.Sequential(*blocks)
        elif arch.container == "own":
            self.layers = OwnList(blocks)
        else:
            self.layers = nn.ModuleList(blocks)
        self.head = nn.Linear(WIDTH, 2)
        self.n = len(blocks)

    def forward(self, x):
        h = self.inp(x)
        loop = self.arch.loop
        if self.arch.container == "sequential":
            h = self.layers(h)
        elif self.arch.container == "own":
            for block in self.layers.items:
                h = self._call(block, h)
        elif loop == "iterate":
            for block in self.layers:
                h = self._call(block, h)
        elif loop == "enumerate":
            for _, block in enumerate(self.layers):
                h = self._call(block, h)
        elif loop == "slice":
            for block in self.layers[: self.n]:
                h = self._call(block, h)
        elif loop == "index_len":
            for i in range(len(self.layers)):
                h = self._call(self.layers[i], h)
        else:  # "index_const": graph mode, and each block gets its index as an argument
            for i in range(self.n):
                h = self._call(self.layers[i], h, i)
        return self.head(h)

    def _call(self, block, h, *args):
        out = block(h, *args)
        return out[0] if self.arch.tuple_out else out


@dataclass(frozen=True)
class Arch:
    container: str  # "modulelist" | "sequential" | "own"
    loop: str  # "iterate" | "enumerate" | "slice" | "index_len" | "index_const" (modulelist only)
    pattern: str  # the kinds of one growable unit, e.g. "A" or "AB"
    units: int
    prefix: str  # fixed blocks before, e.g. "P"
    suffix: str  # fixed blocks after, e.g. "S"
    values: tuple[str, ...]
    tuple_out: bool

    def kinds(self) -> str:
        return self.prefix + self.pattern * self.units + self.suffix

    def core(self) -> range:
        return range(len(self.prefix), len(self.prefix) + len(self.pattern) * self.units)

    @property
    def mode(self) -> str:
        return "graph" if self.container == "own" or self.loop == "index_const" else "container"

    def build(self, seed: int = 0) -> Net:
        torch.manual_seed(seed)
        return Net(self)

    def inputs(self, seed: int = 1) -> torch.Tensor:
        return torch.randn(4, 3, generator=torch.Generator().manual_seed(seed))


@st.composite
def archs(draw) -> Arch:
    container = draw(st.sampled_from(["modulelist", "modulelist", "sequential", "own"]))
    loop = draw(st.sampled_from(["iterate", "enumerate", "slice", "index_len", "index_const"])) \
        if container == "modulelist" else "iterate"
    pattern = draw(st.sampled_from(["A", "B", "C", "AB", "AC", "ABC"]))
    return Arch(container=container, loop=loop, pattern=pattern, units=draw(st.sampled_from([2, 4, 6])),
                prefix=draw(st.sampled_from(["", "", "P"])), suffix=draw(st.sampled_from(["", "", "S"])),
                values=tuple(draw(st.lists(st.sampled_from(sorted(VALUES)), max_size=3, unique=True))),
                tuple_out=draw(st.booleans()) and container != "sequential")
