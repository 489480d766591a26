"""A minimal decoder-only GPT (nanoGPT-style), byte-level by default.

Invariant used by growops: `GPT.forward` runs the blocks by *iterating* `self.blocks`, never by indexing it or by
`len(self.blocks)`, so swapping the container for one that yields a different sequence of blocks changes the depth
of the network without touching this file.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class GPTConfig:
    vocab_size: int = 256  # byte-level tokens: every UTF-8 byte is a token, no tokenizer to ship
    block_size: int = 128  # maximum context length = rows of the position embedding
    n_layer: int = 12
    n_head: int = 4
    n_embd: int = 64  # must be divisible by n_head
    dropout: float = 0.0
    bias: bool = True  # bias in Linear and LayerNorm layers


@dataclass
class GPTOutput:
    logits: torch.Tensor  # (B, T, vocab_size)
    loss: torch.Tensor | None = None  # scalar mean cross-entropy; None when no labels were given


# fx.symbolic_trace handles dataclass outputs by itself; torch.export needs the type registered as a pytree node.
torch.export.register_dataclass(GPTOutput)


class CausalSelfAttention(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        assert config.n_embd % config.n_head == 0, "n_embd must be divisible by n_head"
        self.n_head = config.n_head
        self.head_dim = config.n_embd // config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = config.dropout
        self.resid_dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).split(self.c_proj.in_features, dim=-1)  # 3 x (B, T, C)
        # unflatten/flatten instead of view(B, T, ...) so no sizes are unpacked: keeps the module easy to trace
        q = q.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hs)
        k = k.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hs)
        v = v.unflatten(-1, (self.n_head, self.head_dim)).transpose(1, 2)  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        y = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True)  # (B, nh, T, hs)
        y = y.transpose(1, 2).flatten(2)  # (B, T, C)
        return self.resid_dropout(self.c_proj(y))  # (B, T, C)


class MLP(nn.Module):
    def __init__(self, config: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.gelu = nn.GELU()
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
        self.dropout = nn.Dropout(config.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))  # (B, T, C)


class Block(nn.Module):
    """Pre-LayerNorm transformer block: (B, T, C) -> (B, T, C), nothing else in or out."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln_1(x))  # (B, T, C)
        x = x + self.mlp(self.ln_2(x))  # (B, T, C)
        return x


class GPT(nn.Module):
    """Token + position embeddings, a stack of Blocks, final LayerNorm, and an lm_head tied to the token embedding."""

    def __init__(self, config: GPTConfig):
        super().__init__()
        self.config = config
        self.wte = nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = nn.Embedding(config.block_size, config.n_embd)
        self.drop = nn.Dropout(config.dropout)
        self.blocks = nn.ModuleList([Block(config) for _ in range(config.n_layer)])
        self.ln_f = nn.LayerNorm(config.n_embd, bias=config.bias)
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # weight tying: one (vocab_size, C) matrix embeds and un-embeds

        self.apply(self._init_weights)
        # Residual projections write into the residual stream once per attn/MLP, 2 * n_layer times in all;
        # shrinking their init keeps the stream's variance roughly independent of depth (GPT-2 paper).
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None) -> GPTOutput:
        """input_ids: (B, T) with T <= block_size. labels: (B, T), already shifted (labels[:, t] is the target of
        position t); -100 marks positions that do not count in the loss."""
        pos = torch.arange(input_ids.size(1), device=input_ids.device)  # (T,)
        x = self.drop(self.wte(input_ids) + self.wpe(pos))  # (B, T, C)
        for block in self.blocks:  # iterate, never index: the container decides which blocks run and in what order
            x = block(x)  # (B, T, C)
        logits = self.lm_head(self.ln_f(x))  # (B, T, vocab_size)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)
        return GPTOutput(logits=logits, loss=loss)

    @property
    def dummy_inputs(self) -> dict[str, torch.Tensor]:
        """A small valid batch on the model's device, for tracers that need example inputs."""
        device = self.wte.weight.device
        input_ids = torch.arange(16, device=device).view(2, 8) % self.config.vocab_size  # (2, 8)
        return {"input_ids": input_ids}

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count, tied weights counted once; non_embedding=True leaves out the position embedding
        (the token embedding is kept because it is also the lm_head)."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding:
            n -= self.wpe.weight.numel()
        return n
