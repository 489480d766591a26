"""The ``growops`` command (also ``python -m growops``)::

    growops grow IN_DIR OUT_DIR [--layers 24] [--method zero|interpolate|stack] [--hidden 1024] [--ffn 4096]
                 [--heads 16] [--noise 0] [--stack PATH]
    growops plan MODEL_DIR [--stack PATH]
    growops --version

``grow`` reads a local Hugging Face checkpoint directory (config + safetensors; nothing is downloaded), widens the model
with ``growops.widen`` (when --hidden is given) and then deepens it with ``growops.deepen`` (when --layers is given),
and writes the grown checkpoint with ``save_pretrained`` (other files, such as the tokenizer's, are copied), printing
what changed and the largest output difference on a probe input. OUT_DIR must not hold a checkpoint already; on any
error nothing is written.

``plan`` prints what ``growops.apollo`` would find in a checkpoint (stacks, fixed blocks, per-layer values, mode) and,
for a folder ``a.save_pretrained`` or the Trainer's ``ApolloCallback`` wrote, the schedule saved with it. It reads
only.
"""

from __future__ import annotations

import argparse
import shutil
import sys
from pathlib import Path

from .deepening import METHODS, grow_depth
from .errors import GrowopsError
from .widening import grow_width

_WEIGHTS = (".safetensors", ".bin", ".pt", ".pth", ".safetensors.index.json", ".bin.index.json")


def load_checkpoint(directory: Path):
    """The model saved in `directory` (``save_pretrained``'s layout), built from its config's architecture."""
    try:
        import transformers
    except ImportError:
        raise GrowopsError("growing a checkpoint needs transformers: pip install 'growops[hf]'") from None
    if not (directory / "config.json").is_file():
        raise GrowopsError(f"{directory} is not a Hugging Face checkpoint directory: it has no config.json")
    config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    names = getattr(config, "architectures", None) or []
    cls = getattr(transformers, names[0], None) if names else transformers.AutoModel
    if cls is None:
        raise GrowopsError(f"{directory}/config.json names architecture {names[0]!r}, which this transformers "
                           f"({transformers.__version__}) does not have")
    return cls.from_pretrained(directory, local_files_only=True)


def grow(in_dir: str, out_dir: str, layers: int | None = None, method: str = "zero", stack: str | None = None,
         hidden: int | None = None, ffn: int | None = None, heads: int | None = None, noise: float = 0.0) -> list[str]:
    """Grow the checkpoint in `in_dir` into `out_dir` (wider, then deeper); the report lines (also printed by
    ``main``)."""
    source, target = Path(in_dir), Path(out_dir)
    if layers is None and hidden is None:
        raise GrowopsError("say how to grow: --layers N (deeper), --hidden H (wider), or both")
    if hidden is None and (ffn is not None or heads is not None or noise):
        raise GrowopsError("--ffn, --heads and --noise widen the model: give --hidden too")
    if target.exists() and any(target.iterdir()):
        raise GrowopsError(f"{target} is not empty: growops writes a grown checkpoint into a new or empty directory")
    model = load_checkpoint(source)
    changes, differences, grown = [], [], model
    if hidden is not None:
        wide = grow_width(grown, hidden, ffn, heads, noise=noise)
        grown, changes, differences = wide.model, changes + wide.changes, differences + [wide.max_difference]
    if layers is not None:
        deep = grow_depth(grown, layers, method, stack)
        grown, changes, differences = deep.model, changes + deep.changes, differences + [deep.max_difference]
    known = [d for d in differences if d is not None]
    total = None if len(known) < len(differences) else max(known)
    target.mkdir(parents=True, exist_ok=True)
    grown.save_pretrained(target)
    for f in source.iterdir():  # tokenizer, generation config, README: what the grown model still goes with
        if f.is_file() and not (target / f.name).exists() and not f.name.endswith(_WEIGHTS):
            shutil.copy2(f, target / f.name)
    diff = "no probe input" if total is None else f"{total:.3g}"
    if noise:
        diff += " (before noise)"
    return [f"grew {type(model).__name__} from {source} into {target}", *(f"  {c}" for c in changes),
            f"  largest output difference on a probe input: {diff}"]


def describe(model_dir: str, stack: str | None = None) -> list[str]:
    """What ``growops plan MODEL_DIR`` prints: the plan of the checkpoint's model and, if saved beside it, the
    schedule (arguments and step)."""
    from .config import CONFIG_NAME, load_config
    from .plan import make_plan

    folder = Path(model_dir)
    lines = str(make_plan(load_checkpoint(folder), stack)).splitlines()
    if (folder / CONFIG_NAME).is_file():
        config, step, _ = load_config(folder)
        options = ", ".join(f"{k}={v!r}" for k, v in config.to_dict().items() if v is not None)
        lines += [f"saved at optimizer step {step} of: growops.apollo(model, {options})"]
    return lines


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(prog="growops", description="grow Transformer checkpoints; inspect plans")
    parser.add_argument("--version", action="version", version=f"growops {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    g = commands.add_parser("grow", help="widen and/or deepen a local Hugging Face checkpoint")
    g.add_argument("in_dir")
    g.add_argument("out_dir")
    g.add_argument("--layers", type=int, help="blocks in the grown stack")
    g.add_argument("--method", default="zero", choices=METHODS, help="how new blocks are made (default: zero)")
    g.add_argument("--stack", help="the block container's path, when the model holds several")
    g.add_argument("--hidden", type=int, help="the new hidden size (widen first)")
    g.add_argument("--ffn", type=int, help="the new FFN size (default: what the config gives at the new hidden size)")
    g.add_argument("--heads", type=int, help="the new head count (default: grown with the hidden size)")
    g.add_argument("--noise", type=float, default=0.0, help="symmetry-breaking noise for widened weights")
    p = commands.add_parser("plan", help="print what growops finds in a local Hugging Face checkpoint (reads only)")
    p.add_argument("model_dir")
    p.add_argument("--stack", help="the block container's path, when the model holds several")
    args = parser.parse_args(argv)
    try:
        if args.command == "plan":
            lines = describe(args.model_dir, args.stack)
        else:
            lines = grow(args.in_dir, args.out_dir, args.layers, args.method, args.stack, args.hidden, args.ffn,
                         args.heads, args.noise)
    except GrowopsError as e:
        print(f"growops: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines))
    return 0
