"""The main job: how much compute does growing save against training from scratch, on real text?

    python -m examples.train_shakespeare                      # CPU preset, the demo arms (make demo)
    python -m examples.train_shakespeare --preset gpu         # GPT-2-small shape, bf16, one H100
    python -m examples.train_shakespeare --text my.txt --arms scratch,apollo --steps 600

Every arm starts from the same initial weights, sees the same batches in the same order, and uses the same
optimizer and one global learning-rate schedule (linear warmup, then cosine), as in the paper. Validation loss
is measured at full depth every `eval_every` steps on fixed batches. FLOPs are counted with FlopCounterMode per
(unique blocks, depth) configuration; wall-clock is the training time of each arm in this run (evaluation
excluded). Results go to runs/<name>/ (table, plots, histories); --append-results also appends the headline to
benchmarks/RESULTS.md (a tracked file: only when asked).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from datetime import date
from pathlib import Path

import torch
from tqdm import tqdm

import growops
from examples import report
from examples.data import Batches, encode, fixed_batches, load_text, split
from examples.flops import StepFlops
from examples.gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class TrainConfig:
    """The CPU preset: 12 x 32 blocks, 1500 steps of 16 x 64 bytes (1.5M tokens), the four demo arms within 10 minutes.

    lr 1.6e-2 is scratch's best at this size (of 8e-3 ... 2.4e-2 at 1500 steps and 1e-3 ... 2.4e-2 at 3000 steps,
    benchmarks/RESULTS.md); a smaller peak flatters the growing arms, which tolerate a too-low learning rate better.
    """

    n_layer: int = 12
    n_embd: int = 32
    n_head: int = 2
    block_size: int = 64
    batch_size: int = 16
    steps: int = 1500
    lr: float = 1.6e-2
    min_lr_ratio: float = 0.1  # the cosine ends at this share of the peak
    warmup: int = 50
    weight_decay: float = 0.1
    eval_every: int = 50
    eval_batches: int = 8  # fixed validation batches, the same for every arm
    stages: tuple[int, ...] = (1, 3, 6, 12)
    stage_fractions: tuple[float, ...] = (0.05, 0.1, 0.25)  # where each later stage begins, as a share of steps
    optimizer_state: str = "reset"  # the policy of the "apollo" arm
    bf16: bool = False  # autocast to bfloat16 (GPU preset)
    fused_adamw: bool = True  # the fused AdamW kernel: about 20% faster per step on the CPU preset
    seed: int = 0

    def stage_steps(self, fractions: tuple[float, ...] | None = None) -> tuple[int, ...]:
        fractions = self.stage_fractions if fractions is None else fractions
        return tuple(max(i + 1, round(f * self.steps)) for i, f in enumerate(fractions))


PRESETS = {
    "cpu": TrainConfig(),
    # GPT-2-small shape (12 x 768): all seven arms took 251 s on an H100 (about 30 steps/s at full depth: the step
    # is launch-bound at this batch), inside the 8-minute budget. lr 6e-4 is GPT-2's, not tuned here.
    "gpu": TrainConfig(n_embd=768, n_head=12, block_size=256, batch_size=32, steps=1200, lr=6e-4, warmup=100,
                       eval_every=60, eval_batches=16, stage_fractions=(0.1, 0.3, 0.6), bf16=True),
}

# Arms: None is training from scratch; otherwise the arguments of growops.apollo (stages and stage_fractions default
# to the config's), or of another recipe named by "recipe" with its growth step given as a share of the run.
ARMS: dict[str, dict | None] = {
    "scratch": None,
    "apollo": dict(sampler="lvps", growth="interpolate"),
    "gstack": dict(recipe="gstack", factor=4, grow_at=0.25),  # G_stack: 3 blocks, stacked 4x at a quarter
    "stack": dict(sampler="unique", growth="stack"),  # StackBERT-style progressive stacking
    "interpolate": dict(sampler="unique", growth="interpolate"),  # progressive interpolation, no sampling
    "apollo-uniform": dict(sampler="uniform", growth="interpolate"),
    "apollo-copy": dict(sampler="lvps", growth="interpolate", optimizer_state="copy"),
    "apollo-reset": dict(sampler="lvps", growth="interpolate", optimizer_state="reset"),
    "apollo-keep": dict(sampler="lvps", growth="interpolate", optimizer_state="keep"),
    # The study's options (benchmarks/regimes.py --grid study-3000): growth-aware learning rates, growth timing.
    "apollo-sqrt": dict(sampler="lvps", growth="interpolate", lr_scale="sqrt"),
    "apollo-linear": dict(sampler="lvps", growth="interpolate", lr_scale="linear"),
    "apollo-rewarm": dict(sampler="lvps", growth="interpolate", rewarmup=50),
    "gstack-10": dict(recipe="gstack", factor=4, grow_at=0.10),
    "gstack-50": dict(recipe="gstack", factor=4, grow_at=0.50),
    "gstack-rewarm": dict(recipe="gstack", factor=4, grow_at=0.25, rewarmup=50),
    "gstack-lvps": dict(stages=(3, 12), stage_fractions=(0.25,), sampler="lvps", growth="stack"),  # LVPS, then stack
    # Width and depth (growops.widen, then growops.deepen by stacking), once: a model of a quarter of the blocks at
    # half the width (heads of the same size) until grow_at, then the full model; Adam moments carried over. Widening
    # duplicates units, which train identically unless noise breaks their symmetry (-0: none, the width is wasted).
    "grow-wd": dict(recipe="grow", depth=0.25, width=0.5, grow_at=0.25, noise=1e-2),
    "grow-wd-50": dict(recipe="grow", depth=0.25, width=0.5, grow_at=0.50, noise=1e-2),
    "grow-wd-0": dict(recipe="grow", depth=0.25, width=0.5, grow_at=0.25, noise=0.0),
    "grow-wd-50-0": dict(recipe="grow", depth=0.25, width=0.5, grow_at=0.50, noise=0.0),
}


# The noise band, from the study (benchmarks/RESULTS.md, "Recipes and growth-aware learning rates"): one run per arm
# here, so the demo states it rather than running seeds of scratch.
NOISE = ("Noise (3 seeds at 3000 steps, benchmarks/RESULTS.md): scratch's final val loss varies by 0.05 between "
         "seeds, and an arm's difference to its own seed's scratch by about 0.03; smaller gaps are not findings.")

# What `make demo` runs: scratch and the recipes, G_stack (the study's best) growing at a quarter and at half of the
# run. Seven arms (with stack, interpolate, apollo-linear) took 12 min on 2 cores, over the 10 the demo may take.
DEMO_ARMS = ("scratch", "apollo", "gstack", "gstack-50")


def lr_at(step: int, cfg: TrainConfig) -> float:
    """Linear warmup, then one cosine from the peak to ``min_lr_ratio`` of it over the whole run."""
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _autocast(cfg: TrainConfig, device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=cfg.bf16)


@torch.no_grad()
def evaluate(model: torch.nn.Module, batches: list[dict], cfg: TrainConfig, device: torch.device) -> float:
    """Mean validation loss at full depth (an Apollo model in eval mode runs all L positions)."""
    was_training = model.training
    model.eval()
    with _autocast(cfg, device):
        loss = sum(model(**b).loss.float().item() for b in batches) / len(batches)
    model.train(was_training)
    return loss


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def build(arm: str, cfg: TrainConfig, init_state: dict, device: torch.device) -> torch.nn.Module:
    model = GPT(GPTConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, block_size=cfg.block_size))
    model.load_state_dict(init_state)
    model.to(device)
    if ARMS[arm] is None:
        return model
    kwargs = {"optimizer_state": cfg.optimizer_state, "seed": cfg.seed, **ARMS[arm]}
    if kwargs.get("recipe") == "grow":
        torch.manual_seed(cfg.seed)  # the small model has shapes of its own: its own initialisation
        small = GPTConfig(n_layer=round(cfg.n_layer * kwargs["depth"]), n_embd=round(cfg.n_embd * kwargs["width"]),
                          n_head=max(1, round(cfg.n_head * kwargs["width"])), block_size=cfg.block_size)
        return GPT(small).to(device)
    if kwargs.pop("recipe", None) == "gstack":
        return growops.gstack(model, grow_step=max(1, round(kwargs.pop("grow_at") * cfg.steps)), **kwargs)
    stages = kwargs.pop("stages", cfg.stages)
    stage_steps = cfg.stage_steps(kwargs.pop("stage_fractions", None))
    return growops.apollo(model, stages=stages, stage_steps=stage_steps, **kwargs)


def param_groups(model: torch.nn.Module, arm: str):
    """The optimizer's parameters: per-unit groups where the arm's learning rates are growth-aware (one group
    otherwise: the fused AdamW runs one kernel per group, and the wall-clock comparison should not pay for that)."""
    options = ARMS[arm] or {}
    if options.get("lr_scale", "none") != "none" or options.get("rewarmup", 0):
        return model.param_groups()
    return model.parameters()


class Arm:
    """One arm's training state: its model (plain or wrapped), optimizer, batch stream and history."""

    def __init__(self, name: str, cfg: TrainConfig, init_state: dict, train_ids: torch.Tensor, device: torch.device):
        self.name, self.cfg, self.device = name, cfg, device
        self.model = build(name, cfg, init_state, device)
        self.apollo = self.model if isinstance(self.model, growops.Apollo) else None
        self.opt = torch.optim.AdamW(param_groups(self.model, name), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                     betas=(0.9, 0.95), fused=cfg.fused_adamw or None)
        self.batches = Batches(train_ids, cfg.batch_size, cfg.block_size, seed=cfg.seed)
        sample = Batches(train_ids, cfg.batch_size, cfg.block_size, seed=-1).next()
        self.step_flops = StepFlops(self.model, {k: v.to(device) for k, v in sample.items()},
                                    torch.bfloat16 if cfg.bf16 else None)
        self.history: list[report.Row] = []
        self.flops = self.seconds = 0.0
        options = ARMS[name] or {}
        self.grow_step = round(options["grow_at"] * cfg.steps) if options.get("recipe") == "grow" else None
        self.sample = {k: v.to(device) for k, v in sample.items()}

    def grow(self) -> None:
        """The "grow" recipe's one growth: widen to the full width, deepen to the full depth by stacking (the
        function is preserved by the widening, not by the stacking), and carry the Adam moments over (widened like
        the weights; a stacked copy takes its source block's)."""
        cfg, small = self.cfg, self.model
        wide = growops.widen(small, hidden=cfg.n_embd, noise=ARMS[self.name]["noise"], seed=cfg.seed)
        deep = growops.deepen(wide, layers=cfg.n_layer, method="stack")
        new_opt = lambda m: torch.optim.AdamW(m.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay,  # noqa: E731
                                              betas=(0.9, 0.95), fused=cfg.fused_adamw or None)
        wide_opt, deep_opt = new_opt(wide), new_opt(deep)
        growops.widen_optimizer_state(self.opt, small, wide, wide_opt)
        sources = growops.growth_sources(len(wide.blocks), len(deep.blocks), "stack")
        held = dict(wide.named_parameters())
        for name, p in deep.named_parameters():
            parts = name.split(".")
            if parts[0] == "blocks":
                parts[1] = str(sources[int(parts[1])])
            state = wide_opt.state.get(held[".".join(parts)])
            if state:
                deep_opt.state[p] = {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in state.items()}
        self.model, self.opt = deep, deep_opt
        self.step_flops = StepFlops(deep, self.sample, torch.bfloat16 if cfg.bf16 else None)

    def evaluate(self, step: int, val: list[dict]) -> None:
        self.history.append((step, self.flops, self.seconds, evaluate(self.model, val, self.cfg, self.device)))

    def train_step(self, step: int) -> None:
        """One optimizer step; only the step itself is timed (not data loading, FLOP counting or evaluation)."""
        cfg, apollo = self.cfg, self.apollo
        if step == self.grow_step:
            start = time.perf_counter()
            self.grow()
            self.seconds += time.perf_counter() - start
        depth = len(self.model.blocks) if apollo is None else None
        key = (apollo.unique_layers, apollo.depth) if apollo else (depth, depth)
        self.flops += self.step_flops(*key)
        batch = {k: v.to(self.device, non_blocking=True) for k, v in self.batches.next().items()}
        self.model.train()
        _sync(self.device)
        start = time.perf_counter()
        for group in self.opt.param_groups:
            group["lr"] = lr_at(step, cfg)
        with _autocast(cfg, self.device):
            loss = self.model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if apollo is not None:
            apollo.step(self.opt)
        _sync(self.device)
        self.seconds += time.perf_counter() - start


def train_arms(names: list[str], cfg: TrainConfig, init_state: dict, train_ids: torch.Tensor, val: list[dict],
               device: torch.device, progress: bool = True) -> dict[str, list[report.Row]]:
    """Train every arm in lockstep (step t of each arm, then step t + 1 of each): a shared, noisy machine that
    speeds up or slows down during the run then affects every arm's wall-clock alike.
    Returns each arm's history of (step, FLOPs so far, seconds so far, val loss)."""
    arms = [Arm(name, cfg, init_state, train_ids, device) for name in names]
    bar = tqdm(range(cfg.steps + 1), desc=f"{len(arms)} arms", disable=not progress, ncols=110, mininterval=1)
    for step in bar:
        if step % cfg.eval_every == 0 or step == cfg.steps:
            for arm in arms:
                arm.evaluate(step, val)
            bar.set_postfix_str(" ".join(f"{a.name}={a.history[-1][3]:.3f}" for a in arms[:4]))
        if step < cfg.steps:
            for arm in arms:
                arm.train_step(step)
    return {arm.name: arm.history for arm in arms}


def train_arm(arm: str, cfg: TrainConfig, init_state: dict, train_ids: torch.Tensor, val: list[dict],
              device: torch.device, progress: bool = True) -> list[report.Row]:
    """Train one arm alone (see train_arms)."""
    return train_arms([arm], cfg, init_state, train_ids, val, device, progress)[arm]


def run(cfg: TrainConfig, arms: list[str], text: str | None, name: str, out: Path, device: torch.device,
        progress: bool = True) -> dict:
    torch.manual_seed(cfg.seed)
    train_ids, val_ids = split(encode(load_text(text)))
    val = [{k: v.to(device) for k, v in b.items()}
           for b in fixed_batches(val_ids, cfg.eval_batches, cfg.batch_size, cfg.block_size, seed=cfg.seed + 1)]
    init = GPT(GPTConfig(n_layer=cfg.n_layer, n_embd=cfg.n_embd, n_head=cfg.n_head, block_size=cfg.block_size))
    init_state = copy.deepcopy(init.state_dict())
    print(f"data: {len(train_ids):,} train / {len(val_ids):,} val bytes; model: {cfg.n_layer} x {cfg.n_embd}, "
          f"{init.num_params():,} parameters; {cfg.steps} steps of {cfg.batch_size} x {cfg.block_size} tokens; "
          f"stages {cfg.stages} from steps {cfg.stage_steps()}; device {describe(device)}")
    histories = train_arms(arms, cfg, init_state, train_ids, val, device, progress)
    target, rows = report.summary(histories)
    line = report.headline(target, rows)
    table = report.markdown_table(target, rows) + "\n\n" + "\n".join(
        f"- {report.verdict(target, r)}" for r in rows if r["arm"] != "scratch") + "\n\n" + NOISE
    out.mkdir(parents=True, exist_ok=True)
    (out / "histories.json").write_text(json.dumps({"config": asdict(cfg), "device": describe(device),
                                                    "histories": histories}, indent=1))
    (out / "results.md").write_text(f"# {name}\n\n{line}\n\n{table}\n\nConfig: `{asdict(cfg)}`\n")
    report.plot(histories, target, out / "val_loss.png", f"{name}: {cfg.n_layer} x {cfg.n_embd} on {describe(device)}")
    print(table)
    return {"headline": line, "table": table, "target": target, "rows": rows, "histories": histories}


def describe(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads, {platform.machine()})"


def append_results(name: str, command: str, device: torch.device, result: dict, cfg: TrainConfig) -> None:
    path = ROOT / "benchmarks" / "RESULTS.md"
    entry = (f"\n### {name}: {date.today().isoformat()}, {describe(device)}\n\n`{command}`\n\n"
             f"**{result['headline']}**\n\n{result['table']}\n\nConfig: `{asdict(cfg)}`\n")
    with path.open("a") as f:
        f.write(entry)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    parser.add_argument("--arms", default=",".join(DEMO_ARMS),
                        help=f"comma-separated arms (scratch is always run first) of: {', '.join(ARMS)}")
    parser.add_argument("--steps", type=int, help="optimizer steps per arm (default: the preset's)")
    parser.add_argument("--text", help="a UTF-8 text file to train on (default: Shakespeare's plays)")
    parser.add_argument("--name", help="run name: results go to runs/<name>/ (default: the preset)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a TrainConfig field, e.g. --set lr=1e-3 --set stage_fractions=0.1,0.2,0.4")
    parser.add_argument("--append-results", action="store_true", help="append the headline to benchmarks/RESULTS.md")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    args = parser.parse_args(argv)
    cfg = PRESETS[args.preset]
    if args.steps:
        cfg = replace(cfg, steps=args.steps, eval_every=max(1, args.steps // 20))
    cfg = replace(cfg, **dict(_override(cfg, item) for item in args.set))
    arms = ["scratch"] + [a for a in args.arms.split(",") if a and a != "scratch"]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        parser.error(f"unknown arms {unknown}; choose from {list(ARMS)}")
    # "apollo" is the default policy's arm; running apollo-<default> as well would repeat it.
    arms = [a for a in arms if a != f"apollo-{cfg.optimizer_state}" or "apollo" not in arms]
    device = torch.device("cuda" if torch.cuda.is_available() and args.preset == "gpu" else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    name = args.name or args.preset
    result = run(cfg, arms, args.text, name, ROOT / "runs" / name, device, progress=not args.quiet)
    print(result["headline"])
    if args.append_results:
        words = sys.argv[1:] if argv is None else argv
        append_results(name, " ".join(["python -m examples.train_shakespeare", *words]), device, result, cfg)
    return result


def _override(cfg: TrainConfig, item: str) -> tuple[str, object]:
    field, _, value = item.partition("=")
    current = getattr(cfg, field)
    if isinstance(current, tuple):
        kind = type(current[0]) if current else float
        return field, tuple(kind(v) for v in value.split(","))
    if isinstance(current, bool):
        return field, value.lower() in ("1", "true", "yes")
    return field, type(current)(value)


if __name__ == "__main__":
    main()
