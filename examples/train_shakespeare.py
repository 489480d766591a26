"""Train the example GPT on Shakespeare from scratch and with Apollo, and compare validation losses.

    python -m examples.train_shakespeare                       # the CPU default (make demo)
    python -m examples.train_shakespeare --steps 600 --text my_corpus.txt

Both arms start from the same initial weights, see the same batches in the same order, and use the same
optimizer and learning-rate schedule (warmup, then one cosine over the whole run, as in the paper).
"""

from __future__ import annotations

import argparse
import copy
import math
import time
from dataclasses import dataclass

import torch

import growops
from examples.data import Batches, encode, fixed_batches, load_text, split
from examples.gpt import GPT, GPTConfig


@dataclass
class TrainConfig:
    steps: int = 300
    batch_size: int = 16
    block_size: int = 64
    lr: float = 2e-3
    warmup: int = 30  # steps of linear warmup before the cosine
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_batches: int = 8  # fixed validation batches, the same for every arm
    stages: tuple[int, ...] = (1, 3, 6, 12)
    stage_fractions: tuple[float, ...] = (0.05, 0.1, 0.25)  # where each later stage begins, as a share of steps
    seed: int = 0


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then one cosine to 10% of the peak over the whole run."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict]) -> float:
    """Mean validation loss at full depth (an Apollo model in eval mode runs all L positions)."""
    was_training = model.training
    model.eval()
    loss = sum(model(**b).loss.item() for b in batches) / len(batches)
    model.train(was_training)
    return loss


def train(model: torch.nn.Module, cfg: TrainConfig, train_ids: torch.Tensor, val: list[dict], log=print) -> list:
    """Train `model` (a plain GPT or an Apollo wrapper); returns [(step, seconds, val loss)] every eval_every."""
    apollo = model if isinstance(model, growops.Apollo) else None
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(0.9, 0.95))
    batches = Batches(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed)
    history, seconds = [], 0.0
    model.train()
    for step in range(cfg.steps + 1):
        if step % cfg.eval_every == 0 or step == cfg.steps:
            history.append((step, seconds, evaluate(model, val)))
            log(f"  step {step:5d}  val {history[-1][2]:.4f}  {seconds:6.1f}s"
                + (f"  unique {apollo.unique_layers:2d} depth {apollo.depth:2d}" if apollo else ""))
        if step == cfg.steps:
            break
        start = time.perf_counter()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        model(**batches.next()).loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if apollo is not None:
            apollo.step(opt)
        seconds += time.perf_counter() - start
    return history


def stage_steps(cfg: TrainConfig) -> tuple[int, ...]:
    return tuple(max(i + 1, round(f * cfg.steps)) for i, f in enumerate(cfg.stage_fractions))


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=TrainConfig.steps)
    parser.add_argument("--text", default=None, help="a UTF-8 text file to train on (default: Shakespeare's plays)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    cfg = TrainConfig(steps=args.steps, seed=args.seed, eval_every=max(1, args.steps // 6))
    torch.manual_seed(cfg.seed)
    train_ids, val_ids = split(encode(load_text(args.text)))
    val = fixed_batches(val_ids, cfg.eval_batches, cfg.batch_size, cfg.block_size, seed=cfg.seed + 1)
    init = GPT(GPTConfig(n_layer=cfg.stages[-1], block_size=cfg.block_size))
    print(f"data: {len(train_ids):,} train / {len(val_ids):,} val bytes; model: {init.num_params():,} parameters")

    results = {}
    print("scratch")
    results["scratch"] = train(copy.deepcopy(init), cfg, train_ids, val)
    print(f"apollo  stages {cfg.stages} at steps {stage_steps(cfg)}")
    a = growops.apollo(copy.deepcopy(init), stages=cfg.stages, stage_steps=stage_steps(cfg), seed=cfg.seed)
    results["apollo"] = train(a, cfg, train_ids, val)
    for name, history in results.items():
        print(f"{name:8s} final val loss {history[-1][2]:.4f} in {history[-1][1]:.1f}s of training")
    return results


if __name__ == "__main__":
    main()
