"""Where does growing pay? Run the main job's arms over a grid of regimes and compare FLOPs to scratch's loss.

    python benchmarks/regimes.py --grid quick          # a few minutes on 2 cores
    python benchmarks/regimes.py --grid full --workers 2

Each (regime, arm) trains in its own process with one thread (two at a time on 2 cores); histories are cached in
runs/regimes/<key>.json, so a grid can be extended without re-running what it already has. Losses and FLOPs do not
depend on the machine's load; wall-clock here does (arms share the CPU), so this script reports FLOPs only and the
main job (examples/train_shakespeare.py) measures wall-clock.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from examples import report  # noqa: E402
from examples.train_shakespeare import TrainConfig  # noqa: E402

CACHE = ROOT / "runs" / "regimes"
PLOTS = ROOT / "benchmarks" / "artifacts" / "regimes"
APOLLO_ONLY = ("stages", "stage_fractions", "optimizer_state")
# 1: CPU attention counted as 0 (no FlopCounterMode formula for the CPU flash kernel); 2: attention counted.
FLOP_COUNTING = 2  # fields that do not change the scratch arm

# The grid's own base (the first CPU preset), spelled out so that changing the preset keeps cached runs valid.
BASE = TrainConfig(n_layer=12, n_embd=64, n_head=4, block_size=64, batch_size=16, steps=1000, lr=2e-3, min_lr_ratio=0.1,
                   warmup=50, weight_decay=0.1, eval_every=50, eval_batches=8, stages=(1, 3, 6, 12),
                   stage_fractions=(0.05, 0.1, 0.25), optimizer_state="reset", bf16=False, seed=0,
                   fused_adamw=False)
W32 = dict(steps=3000, n_embd=32, n_head=2)
ALL = ("apollo", "apollo-keep", "apollo-copy", "stack", "interpolate", "apollo-uniform")
MAIN = ("apollo", "interpolate", "stack")

# regime name -> TrainConfig overrides; every regime runs scratch plus its "arms" (default: --arms).
GRIDS = {
    "quick": {
        "base-1000": dict(steps=1000),
    },
    "explore1": {
        "base-1000": dict(steps=1000),
        "late-1000": dict(steps=1000, stage_fractions=(0.1, 0.25, 0.5)),
        "w32-3000": dict(steps=3000, n_embd=32, n_head=2),
        "w32-3000-late": dict(steps=3000, n_embd=32, n_head=2, stage_fractions=(0.1, 0.3, 0.6)),
    },
    "explore2": {
        "w32-3000-lr1e-3": dict(steps=3000, n_embd=32, n_head=2, lr=1e-3, arms=()),
        "w32-3000-lr4e-3": dict(steps=3000, n_embd=32, n_head=2, lr=4e-3, arms=()),
        "w32-3000-later": dict(steps=3000, n_embd=32, n_head=2, stage_fractions=(0.2, 0.4, 0.7)),
        "w32-3000-late-3612": dict(steps=3000, n_embd=32, n_head=2, stages=(3, 6, 12), stage_fractions=(0.3, 0.6)),
        "w32-3000-late-uniform": dict(steps=3000, n_embd=32, n_head=2, stage_fractions=(0.1, 0.3, 0.6),
                                      arms=("apollo-uniform", "interpolate")),
    },
    # Peak lr 4e-3 (the best of 1e-3, 2e-3, 4e-3 for scratch at w32-3000); highest priority first.
    "explore3": {
        "lr4-late": dict(W32, lr=4e-3, stage_fractions=(0.1, 0.3, 0.6), arms=ALL),
        "lr4-early": dict(W32, lr=4e-3, stage_fractions=(0.05, 0.1, 0.25), arms=ALL),
        "lr6": dict(W32, lr=6e-3, arms=()),
        "lr8": dict(W32, lr=8e-3, arms=()),
        "lr4-later": dict(W32, lr=4e-3, stage_fractions=(0.2, 0.4, 0.7), arms=MAIN),
        "lr4-3612": dict(W32, lr=4e-3, stages=(3, 6, 12), stage_fractions=(0.3, 0.6), arms=MAIN),
        "lr4-late-6000": dict(W32, steps=6000, lr=4e-3, stage_fractions=(0.1, 0.3, 0.6), arms=MAIN),
        "lr4-late-w64-1500": dict(steps=1500, lr=4e-3, stage_fractions=(0.1, 0.3, 0.6), arms=MAIN),
        "lr4-2612": dict(W32, lr=4e-3, stages=(2, 6, 12), stage_fractions=(0.2, 0.5), arms=MAIN),
        "lr4-late-seed1": dict(W32, lr=4e-3, stage_fractions=(0.1, 0.3, 0.6), seed=1, arms=MAIN),
    },
    "lr-sweep": {f"lr{lr:g}": dict(W32, lr=lr, arms=()) for lr in (1.2e-2, 1.6e-2, 2.4e-2)},
    # The final CPU preset's length (1500 steps, fused AdamW): scratch's lr again.
    "lr-sweep-1500": {f"lr{lr:g}": dict(W32, steps=1500, fused_adamw=True, lr=lr, arms=())
                      for lr in (8e-3, 1.2e-2, 1.6e-2, 2.4e-2)},
    # At scratch's best peak lr (1.6e-2 of 1e-3 ... 2.4e-2).
    "lr16": {
        "lr16-late": dict(W32, lr=1.6e-2, stage_fractions=(0.1, 0.3, 0.6), arms=ALL),
        "lr16-later": dict(W32, lr=1.6e-2, stage_fractions=(0.2, 0.4, 0.7), arms=MAIN),
        "lr16-early": dict(W32, lr=1.6e-2, stage_fractions=(0.05, 0.1, 0.25), arms=MAIN),
    },
    # Four times longer (12000 steps, 12M tokens, 75 tokens per parameter): does the gap close with training length?
    "long": {
        "long-lr16": dict(W32, steps=12000, fused_adamw=True, lr=1.6e-2, arms=MAIN),
        "long-lr8": dict(W32, steps=12000, fused_adamw=True, lr=8e-3, arms=()),
    },
    # The long regime again with attention FLOPs counted on CPU (the cache key changed with the counting), plus
    # later growth for Apollo (more of the run shallow) and the copy policy.
    "long2": {
        "long2-lr16": dict(W32, steps=12000, fused_adamw=True, lr=1.6e-2, arms=MAIN),
        "long2-lr16-late": dict(W32, steps=12000, fused_adamw=True, lr=1.6e-2, stage_fractions=(0.1, 0.3, 0.6),
                                arms=("apollo",)),
    },
    # Each growing arm at its own peak lr (tuning the schedule is fair); scratch stays at its best, 1.6e-2.
    "arm-lr": {
        "lr8-early": dict(W32, lr=8e-3, stage_fractions=(0.05, 0.1, 0.25), arms=MAIN, scratch=dict(lr=1.6e-2)),
        "lr12-early": dict(W32, lr=1.2e-2, stage_fractions=(0.05, 0.1, 0.25), arms=("apollo",),
                           scratch=dict(lr=1.6e-2)),
        "lr4-early": dict(W32, lr=4e-3, stage_fractions=(0.05, 0.1, 0.25), arms=MAIN, scratch=dict(lr=1.6e-2)),
    },
}


# The study of issue 11: every recipe and growth-aware option at scratch's tuned lr, a 4x larger validation set
# (32 batches: the 8-batch set jitters by ~0.01), one seed to screen, then three seeds of scratch and the best arms.
STUDY = ("apollo", "apollo-sqrt", "apollo-linear", "apollo-rewarm", "gstack", "gstack-10", "gstack-50",
         "gstack-rewarm", "gstack-lvps", "stack")
S3000 = dict(W32, fused_adamw=True, lr=1.6e-2, eval_batches=32)
GRIDS["study-3000"] = {"s3000-seed0": dict(S3000, arms=STUDY)}
GRIDS["seeds-3000"] = {f"s3000-seed{s}": dict(S3000, seed=s) for s in (0, 1, 2)}
# Scratch decayed at the FLOPs the G_stack arms use (82% and 64% of 3000 steps): the compute-matched baseline.
GRIDS["matched-3000"] = {f"s3000-seed{s}-steps{n}": dict(S3000, steps=n, seed=s, arms=())
                          for s in (0, 1, 2) for n in (2460, 1920)}
# G_stack trained longer than scratch (25% more steps: 80% of scratch's FLOPs), against scratch's 3000 steps.
GRIDS["longer-3000"] = {"s3000-gstack50-3750": dict(S3000, steps=3750, arms=("gstack-50",),
                                                    scratch=dict(steps=3000, eval_every=75))}
GRIDS["seeds-12000"] = {f"s12000-seed{s}": dict(S3000, steps=12000, seed=s) for s in (0, 1, 2)}
# Width and depth grown once (issue 12) against the best depth-only recipe, three seeds.
GRIDS["wd-3000"] = {f"s3000-seed{s}": dict(S3000, seed=s, arms=("gstack", "grow-wd", "grow-wd-50", "grow-wd-0",
                                                                 "grow-wd-50-0")) for s in (0, 1, 2)}
# Scratch's loss as a function of its budget (its cosine decayed over 64%, 82% and 100% of 3000 steps) against the
# G_stack arms, per seed: how many FLOPs scratch needs for each arm's final loss (the budget table).
GRIDS["budget-3000"] = {**{f"s3000-seed{s}": dict(S3000, seed=s, arms=("gstack", "gstack-50")) for s in (0, 1, 2)},
                        **GRIDS["matched-3000"]}


def key(cfg: TrainConfig, arm: str) -> str:
    fields = asdict(cfg)
    if not fields["fused_adamw"]:
        del fields["fused_adamw"]  # runs from before the field existed used the for-loop AdamW: keep their keys
    if arm == "scratch":
        fields = {k: v for k, v in fields.items() if k not in APOLLO_ONLY}
    if FLOP_COUNTING != 1:
        fields["flop_counting"] = FLOP_COUNTING  # older runs keep their keys (and their counts)
    blob = json.dumps([arm, fields], sort_keys=True)
    return f"{arm}-{hashlib.sha1(blob.encode()).hexdigest()[:12]}"


def run_one(cfg: TrainConfig, arm: str) -> list:
    import torch

    torch.set_num_threads(1)
    from examples.data import encode, fixed_batches, load_text, split
    from examples.gpt import GPT, GPTConfig
    from examples.train_shakespeare import train_arm

    path = CACHE / f"{key(cfg, arm)}.json"
    if path.exists():
        return json.loads(path.read_text())["history"]
    torch.manual_seed(cfg.seed)
    train_ids, val_ids = split(encode(load_text()))
    val = fixed_batches(val_ids, cfg.eval_batches, cfg.batch_size, cfg.block_size, seed=cfg.seed + 1)
    init = GPT(GPTConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, block_size=cfg.block_size))
    history = train_arm(arm, cfg, init.state_dict(), train_ids, val, torch.device("cpu"), progress=False)
    CACHE.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"arm": arm, "config": asdict(cfg), "history": history}))
    return history


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--grid", default="quick", choices=sorted(GRIDS))
    parser.add_argument("--arms", default="apollo,apollo-keep,apollo-copy,stack,interpolate,apollo-uniform")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--only", help="run only the grid's regimes whose names match this regular expression")
    args = parser.parse_args(argv)
    arms = ["scratch"] + args.arms.split(",")
    grid = {k: v for k, v in GRIDS[args.grid].items() if args.only is None or re.search(args.only, k)}
    configs = {}  # (regime, arm) -> TrainConfig; "scratch" may differ (e.g. kept at its best lr)
    for name, o in grid.items():
        cfg = replace(BASE, eval_every=max(1, o.get("steps", BASE.steps) // 40),
                      **{k: v for k, v in o.items() if k not in ("arms", "scratch")})
        for arm in ["scratch", *o.get("arms", arms[1:])]:
            configs[(name, arm)] = replace(cfg, **o.get("scratch", {})) if arm == "scratch" else cfg
    with ProcessPoolExecutor(args.workers) as pool:
        by_key = {}  # regimes that share a scratch run submit it once
        for (_, arm), cfg in configs.items():
            if key(cfg, arm) not in by_key:
                by_key[key(cfg, arm)] = pool.submit(run_one, cfg, arm)
        histories = {job: by_key[key(cfg, job[1])].result() for job, cfg in configs.items()}
    print("| regime | arm | final val | FLOPs share | scratch at equal FLOPs | target (scratch final) | reached at "
          "step | FLOPs saving |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    summaries = {}
    for name in grid:
        target, rows = summaries[name] = report.summary({arm: h for (n, arm), h in histories.items() if n == name})
        for r in rows:
            hit = (f"{r['step']} | {r['flops_saving']:.1f}%" if r["reached"] else "not reached | -")
            print(f"| {name} | {r['arm']} | {r['final_val']:.4f} | {r['flops_share']:.0f}% | "
                  f"{r['scratch_at_equal_flops']:.4f} | {target:.4f} | {hit} |")
    PLOTS.mkdir(parents=True, exist_ok=True)
    for name in grid:
        report.plot({arm: h for (n, arm), h in histories.items() if n == name}, summaries[name][0],
                    PLOTS / f"{name}.png", f"{name}: val loss against FLOPs", wall_clock=False)
    print(f"\nplots: {PLOTS}/<regime>.png")
    if any(SEED.search(name) for name in grid):
        print()
        print(seed_table(summaries))
    if args.grid == "budget-3000":
        print()
        print(budget_table(histories))


SEED = re.compile(r"-seed\d+$")


def seed_table(summaries: dict[str, tuple[float, list[dict]]]) -> str:
    """Per regime (seeds pooled) and arm: final val loss mean and range over seeds, the mean gap to the same seed's
    scratch at the arm's own FLOPs, and the FLOPs saving where every seed reaches its scratch's final loss."""
    pooled: dict[tuple[str, str], list[dict]] = {}
    for name, (_, rows) in summaries.items():
        for r in rows:
            pooled.setdefault((SEED.sub("", name), r["arm"]), []).append(r)
    lines = ["| regime | arm | seeds | final val, mean (min-max) | FLOPs share | val minus scratch's at equal FLOPs, "
             "mean (min-max) | FLOPs saving to own scratch's final, per seed |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for (regime, arm), rows in pooled.items():
        finals = [r["final_val"] for r in rows]
        gaps = [r["final_val"] - r["scratch_at_equal_flops"] for r in rows]
        savings = ", ".join(f"{r['flops_saving']:.1f}%" if r["reached"] else "-" for r in rows)
        lines.append(f"| {regime} | {arm} | {len(rows)} | {sum(finals) / len(finals):.4f} ({min(finals):.4f}-"
                     f"{max(finals):.4f}) | {rows[0]['flops_share']:.0f}% | {sum(gaps) / len(gaps):+.4f} "
                     f"({min(gaps):+.4f}-{max(gaps):+.4f}) | {savings} |")
    return "\n".join(lines)


def budget_table(histories: dict[tuple[str, str], list]) -> str:
    """Per seed: scratch's final loss at each budget it was trained for, and for each growing arm the budget scratch
    needs for the arm's final loss (linear between budgets; ">100%" when no budget reaches it) and the FLOPs saving
    against that budget."""
    lines = ["| seed | scratch final at 64% / 82% / 100% of its FLOPs | arm | arm's final (FLOPs share) | scratch "
             "budget for that loss | FLOPs saving |", "| --- | --- | --- | --- | --- | --- |"]
    for name in sorted(n for n, arm in histories if SEED.search(n) and arm == "scratch"):
        full = histories[(name, "scratch")]
        curve = sorted((h[-1][1] / full[-1][1], h[-1][3]) for (n, arm), h in histories.items()
                       if arm == "scratch" and n.startswith(name))  # (budget share, final loss), smallest first
        for (n, arm), h in histories.items():
            if n != name or arm == "scratch":
                continue
            share, loss = h[-1][1] / full[-1][1], h[-1][3]
            need = next(((b0 + (b1 - b0) * (l0 - loss) / (l0 - l1))
                         for (b0, l0), (b1, l1) in zip(curve, curve[1:]) if l1 <= loss <= l0), None)
            if need is None and loss <= curve[-1][1]:
                need = float("inf")
            budget = ">100%" if need == float("inf") else "-" if need is None else f"{100 * need:.0f}%"
            saving = f">= {100 * (1 - share):.0f}%" if need == float("inf") else "-" if need is None else \
                f"{100 * (1 - share / need):.0f}%"
            finals = " / ".join(f"{v:.4f}" for _, v in curve)
            lines.append(f"| {SEED.search(name).group(0)[1:]} | {finals} | {arm} | {loss:.4f} ({100 * share:.0f}%) | "
                         f"{budget} | {saving} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
