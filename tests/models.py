"""Small models for the tests: each exercises one way a model can hold and call its blocks."""

from __future__ import annotations

import torch
from torch import nn

from examples.gpt import GPT, GPTConfig


def tiny_gpt(n_layer: int = 6, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    return GPT(GPTConfig(n_layer=n_layer, n_embd=16, n_head=2, block_size=16, vocab_size=64))


def gpt_batch(batch: int = 2, length: int = 8, seed: int = 1) -> dict:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (batch, length + 1), generator=g)
    return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}


class TupleBlock(nn.Module):
    """Returns (hidden, aux) and takes a shared scale and a per-layer constant, as HF blocks do."""

    def __init__(self, width: int):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc = nn.Linear(width, width)

    def forward(self, x, scale, layer_id: int = 0):
        return x + torch.tanh(self.fc(self.norm(x))) * scale, layer_id


class IndexLoopNet(nn.Module):
    """Reaches its blocks by index in a loop: only a graph rewrite can change its depth."""

    def __init__(self, n_layer: int = 6, width: int = 8):
        super().__init__()
        self.n_layer = n_layer
        self.inp = nn.Linear(4, width)
        self.layers = nn.ModuleList([TupleBlock(width) for _ in range(n_layer)])
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        scale = torch.sigmoid(x.mean())  # a shared side input, computed once
        h = self.inp(x)
        for i in range(self.n_layer):
            h = self.layers[i](h, scale, i)[0]
        return self.out(h)


class SequentialNet(nn.Module):
    """Calls its blocks through nn.Sequential."""

    def __init__(self, n_layer: int = 4, width: int = 8):
        super().__init__()
        self.inp = nn.Linear(4, width)
        self.blocks = nn.Sequential(*[nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.Tanh())
                                      for _ in range(n_layer)])
        self.out = nn.Linear(width, 3)

    def forward(self, x):
        return self.out(self.blocks(self.inp(x)))


class EncoderDecoder(nn.Module):
    """Two block stacks: growops must be told which one."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.encoder = nn.ModuleList([nn.Linear(width, width) for _ in range(4)])
        self.decoder = nn.ModuleList([nn.Linear(width, width) for _ in range(2)])

    def forward(self, x):
        for layer in self.encoder:
            x = torch.relu(layer(x))
        for layer in self.decoder:
            x = torch.relu(layer(x))
        return x


class ParallelExperts(nn.Module):
    """Identical modules that are not a chain (each reads the input): no block stack."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.experts = nn.ModuleList([nn.Linear(width, width) for _ in range(4)])

    def forward(self, x):
        return sum(e(x) for e in self.experts)


class NoStack(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 8)
        self.b = nn.Linear(8, 2)

    def forward(self, x):
        return self.b(self.a(x))


class UntraceableIndexNet(IndexLoopNet):
    """Indexes its blocks and has data-dependent control flow: neither path can change its depth."""

    dummy_inputs = None

    def forward(self, x):
        if x.dim() != 2:  # control flow on a traced value: symbolic_trace fails here, torch.export does not
            raise ValueError("expected (batch, 4) inputs")
        return super().forward(x)


def train_steps(a, opt, n: int, loss_fn) -> list[float]:
    """n optimizer steps of apollo model `a`; loss_fn(a, step) gives each step's loss. Returns the losses."""
    out = []
    for _ in range(n):
        loss = loss_fn(a, a.step_count)
        loss.backward()
        opt.step()
        opt.zero_grad()
        a.step(opt)
        out.append(loss.item())
    return out


class BufferBlock(nn.Module):
    def __init__(self, width=8):
        super().__init__()
        self.fc = nn.Linear(width, width)
        self.norm = nn.BatchNorm1d(width)
        self.register_buffer("shift", torch.zeros(width))

    def forward(self, x):
        return x + torch.tanh(self.norm(self.fc(x))) + self.shift


class BufferNet(nn.Module):
    """Blocks with a BatchNorm (running statistics) and a buffer of their own."""

    def __init__(self, n_layer=4):
        super().__init__()
        self.inp = nn.Linear(4, 8)
        self.layers = nn.ModuleList([BufferBlock() for _ in range(n_layer)])

    def forward(self, x):
        h = self.inp(x)
        for block in self.layers:
            h = block(h)
        return h
