"""Steps per second of the example GPT under torch.compile(a) against eager, at full depth and over an LVPS schedule.

    python benchmarks/compile.py                       # CPU, the main job's CPU model (12 x 32) and 12 x 64
    python benchmarks/compile.py --device cuda --bf16  # GPU

Both arms run the same schedule (same seed, so the same depth at every step) on the same batch, in lockstep. The
compiled arm's first steps include compilation; steps/s is measured after `--warmup` steps. Graphs are dynamo's
unique_graphs.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch._dynamo
from torch._dynamo.utils import counters

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import growops  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402


def make(width: int, heads: int, schedule: str, total: int, device: str, block: int) -> growops.Apollo:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=12, n_embd=width, n_head=heads, block_size=block)).to(device)
    if schedule == "full":
        return growops.apollo(model, stages=(12,), stage_steps=())
    # LVPS through every stage, growth at a quarter, half and three quarters of the run
    return growops.apollo(model, stages=(1, 3, 6, 12), stage_steps=tuple(total * k // 4 for k in (1, 2, 3)), seed=3)


def run(width: int, heads: int, schedule: str, steps: int, warmup: int, device: str, bf16: bool, batch: int,
        block: int) -> tuple[dict, dict]:
    """Eager and compiled copies trained in lockstep (a step of each in turn), so a machine whose speed drifts
    during the run slows both alike. Returns (eager, compiled) figures."""
    torch._dynamo.reset()
    counters.clear()
    total = steps + warmup
    models = [make(width, heads, schedule, total, device, block) for _ in range(2)]
    fns = [models[0], torch.compile(models[1])]
    opts = [torch.optim.AdamW(a.parameters(), lr=1e-3) for a in models]
    ids = torch.randint(0, 256, (batch, block + 1), device=device, generator=torch.Generator(device).manual_seed(0))
    x = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    times, configs = ([], []), set()
    for _ in range(total):
        configs.add((models[0].unique_layers, models[0].depth))
        for a, fn, opt, t in zip(models, fns, opts, times):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
                loss = fn(**x).loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            a.step(opt)
            if device == "cuda":
                torch.cuda.synchronize()
            t.append(time.perf_counter() - start)
    out = []
    for t in times:
        steady = t[warmup:]
        out.append({"steps_per_s": len(steady) / sum(steady), "warmup_s": sum(t[:warmup]), "configs": len(configs)})
    out[1]["graphs"] = counters["stats"].get("unique_graphs", 0)
    return out[0], out[1]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--widths", default="32,64")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--block", type=int, default=64)
    args = parser.parse_args(argv)
    torch._dynamo.config.fail_on_recompile_limit_hit = True
    print(f"torch {torch.__version__}, device {args.device}, {torch.get_num_threads()} threads, "
          f"batch {args.batch} x {args.block}, {args.steps} timed steps after {args.warmup}")
    print("| model | schedule | configs | eager steps/s | compiled steps/s | speedup | compiled warmup s | graphs |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for width in map(int, args.widths.split(",")):
        heads = max(1, width // 16)
        for schedule in ("full", "lvps"):
            common = dict(width=width, heads=heads, schedule=schedule, steps=args.steps, warmup=args.warmup,
                          device=args.device, bf16=args.bf16, batch=args.batch, block=args.block)
            eager, comp = run(**common)
            print(f"| 12 x {width} | {schedule} | {eager['configs']} | {eager['steps_per_s']:.1f} | "
                  f"{comp['steps_per_s']:.1f} | {comp['steps_per_s'] / eager['steps_per_s']:.2f}x | "
                  f"{comp['warmup_s']:.1f} | {comp['graphs']} |", flush=True)


if __name__ == "__main__":
    main()
