"""What the wrapper costs: per-step wall-clock of a wrapped model at (unique, depth) against a plain model of `depth`
layers of its own, eager and compiled.

    python benchmarks/overhead.py                      # CPU, the main job's model (12 x 32), batch 16 x 64
    python benchmarks/overhead.py --width 128 --device cuda

For each (unique, depth) the Apollo schedule uses (every stage at its own depth and at full depth), the plain
model (GPT with `depth` blocks) and the wrapped 12-block model (put at that configuration with a fixed-depth
sampler and ``restore_step``) take training steps in turn (which goes first alternates), the same batch, the same
optimizer: the median over those pairs of wrapped / plain is the wrapper's cost (sharing weights adds no FLOPs).
Pairing makes the ratio robust to a machine whose load drifts; the absolute difference, best read at a tiny width
(``--width 8 --batch 1 --block 8``), is the wrapper's Python cost per step. Compiled: ``torch.compile`` of each.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch._dynamo

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import growops  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402

STAGES = (1, 3, 6, 12)


class FixedDepth:
    """A sampler that always answers `depth` (set before each configuration)."""

    depth = 12

    def __call__(self, unique: int, layers: int, rng) -> int:
        return max(unique, min(layers, self.depth))


def step(fn, opt, batch, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn(**batch).loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def measure(width: int, compiled: bool, steps: int, warmup: int, device: str, batch: int, block: int) -> list[tuple]:
    """(unique, depth, plain median s, wrapped median s, median of the paired ratios) per configuration."""
    cfg = dict(n_embd=width, n_head=max(1, width // 16), block_size=block)
    sampler = FixedDepth()
    torch.manual_seed(0)
    stage_steps = (10**6, 2 * 10**6, 3 * 10**6)
    a = growops.apollo(GPT(GPTConfig(n_layer=12, **cfg)).to(device), stages=STAGES, stage_steps=stage_steps,
                       sampler=sampler)
    wrapped = torch.compile(a) if compiled else a
    opt_a = torch.optim.AdamW(a.parameters(), lr=1e-4)
    ids = torch.randint(0, 256, (batch, block + 1), device=device, generator=torch.Generator(device).manual_seed(0))
    data = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    rows = []
    for stage, unique in enumerate(STAGES):
        for depth in sorted({unique, 12}):
            torch.manual_seed(0)
            plain = GPT(GPTConfig(n_layer=depth, **cfg)).to(device)
            plain_fn = torch.compile(plain) if compiled else plain
            opt_p = torch.optim.AdamW(plain.parameters(), lr=1e-4)
            sampler.depth = depth
            a.restore_step((0, *stage_steps)[stage])  # weights are not touched: timing only
            assert (a.unique_layers, a.depth) == (unique, depth)
            pairs = []  # (plain s, wrapped s) of steps taken back to back, the first of the two alternating
            for i in range(warmup + steps):
                order = ((plain_fn, opt_p), (wrapped, opt_a))[:: 1 if i % 2 == 0 else -1]
                times = {id(fn): step(fn, opt, data, device) for fn, opt in order}
                if i >= warmup:
                    pairs.append((times[id(plain_fn)], times[id(wrapped)]))
            plain_s = statistics.median(p for p, _ in pairs)
            wrapped_s = statistics.median(w for _, w in pairs)
            ratio = statistics.median(w / p for p, w in pairs)
            rows.append((unique, depth, plain_s, wrapped_s, ratio))
            print(f"| {'compiled' if compiled else 'eager'} | {unique} | {depth} | {plain_s * 1e3:.2f} | "
                  f"{wrapped_s * 1e3:.2f} | {(wrapped_s - plain_s) * 1e3:+.2f} | {ratio:.3f}x |", flush=True)
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--width", type=int, default=32)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=64)
    parser.add_argument("--modes", default="eager,compiled")
    args = parser.parse_args(argv)
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, model 12 x "
          f"{args.width}, batch {args.batch} x {args.block}, median of {args.steps} steps after {args.warmup}")
    print("| mode | unique | depth | plain ms/step | wrapped ms/step | difference ms | wrapped / plain (paired) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for mode in args.modes.split(","):
        torch._dynamo.reset()
        measure(args.width, mode == "compiled", args.steps, args.warmup, args.device, args.batch, args.block)


if __name__ == "__main__":
    main()
