"""Do ``grow_depth`` and ``grow_width`` keep their promises on Hugging Face architectures? One row per model.

    python benchmarks/grow_architectures.py                 # every model of benchmarks/architectures.py
    python benchmarks/grow_architectures.py gpt2 t5 jamba   # some of them

Each model is built from the tiny random config of ``benchmarks/architectures.py`` (nothing is downloaded) and
grown in its own process, the way a new user would (no example inputs given):
- deepen zero: ``grow_depth(model, blocks + 2, "zero")`` (must preserve the output or raise a GrowopsError);
- deepen stack: ``grow_depth(model, 2 * blocks, "stack")`` (growops' probe difference reported);
- widen x2: ``grow_width(model, hidden=2 * hidden size)`` (whole multiple: must preserve the output).
``blocks`` is the length of the stack growops plans (for a model with several stacks, the first one, passed as
``stack=``). Every step that returns is then checked independently of growops' own probe: the result has the
model's class and the asked depth / hidden size, the input model is untouched, for zero and widen the first float
output on a random input of our own (another batch size, length, seed and a padded attention mask) equals the
model's within 1e-4 (both in eval mode), and ``save_pretrained`` + ``from_pretrained`` reproduce the grown model's
outputs.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

from architectures import MODELS, _first_float  # noqa: E402

TOLERANCE = 1e-4  # |grown - original| / max(1, |original|) on our own input
RELOAD_TOLERANCE = 1e-6  # |reloaded - grown|
HIDDEN_FIELDS = ("hidden_size", "n_embd", "d_model", "dim", "embed_dim")


def _short(e: BaseException, n: int = 200) -> str:
    return f"{type(e).__name__}: {e}"[:n] if not _is_growops(e) else str(e)[:n]


def _is_growops(e: BaseException) -> bool:
    from growops.errors import GrowopsError

    return isinstance(e, GrowopsError)


def _bug(e: BaseException) -> dict:
    """A non-GrowopsError exception: type, message and the tail of its traceback."""
    tail = traceback.format_exception(type(e), e, e.__traceback__)
    text = "".join(tail).strip().splitlines()
    return {"status": "bug", "error": f"{type(e).__name__}: {str(e)[:500]}", "traceback": "\n".join(text[-12:])}


def _own_inputs(model, seed: int = 1234) -> dict:
    """A batch of our own (not growops' probe): 3 rows, other lengths, a right-padded attention mask."""
    import torch

    g = torch.Generator().manual_seed(seed)
    config = model.config
    text = getattr(config, "text_config", None)
    vision = getattr(config, "vision_config", None)
    params = inspect.signature(model.forward).parameters
    main = getattr(model, "main_input_name", "input_ids")
    batch = 3

    def ids(length: int):
        vocab = getattr(config, "vocab_size", None) or getattr(text, "vocab_size", None)
        return torch.randint(3, vocab, (batch, length), generator=g)

    inputs = {}
    wanted = [main] + (["pixel_values"] if vision is not None and "pixel_values" in params else []) + \
        (["input_ids"] if text is not None and "input_ids" in params else [])
    for name in dict.fromkeys(wanted):
        if name == "input_ids":
            inputs["input_ids"] = ids(10)
            if "attention_mask" in params:
                mask = torch.ones(batch, 10, dtype=torch.long)
                mask[1, -3:] = 0
                inputs["attention_mask"] = mask
        elif name == "pixel_values":
            cfg = vision or config
            size = cfg.image_size
            inputs["pixel_values"] = torch.randn(batch, getattr(cfg, "num_channels", 3), size, size, generator=g)
        elif name == "input_values":
            length = 20
            for k, s in reversed(list(zip(config.conv_kernel, config.conv_stride))):
                length = (length - 1) * s + k
            inputs["input_values"] = torch.randn(batch, length, generator=g)
        elif name == "input_features":
            inputs["input_features"] = torch.randn(batch, config.num_mel_bins, 2 * config.max_source_positions,
                                                   generator=g)
        else:
            raise ValueError(f"no own input for {name}")
    if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
        inputs["decoder_input_ids"] = ids(7)
    if "use_cache" in params:
        inputs["use_cache"] = False
    return inputs


def _out(model, inputs):
    import torch

    model.eval()
    with torch.no_grad():
        return _first_float(model(**inputs)).detach().double()


def _state(model) -> dict:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(a[k].shape == b[k].shape and torch.equal(a[k], b[k]) for k in a)


def _hidden(config) -> tuple[str, int] | None:
    for cfg in (config, getattr(config, "text_config", None)):
        for name in HIDDEN_FIELDS:
            value = getattr(cfg, name, None) if cfg is not None else None
            if isinstance(value, int) and not isinstance(value, bool):
                return name, value
    return None


def _verify(kind: str, model, grown, inputs, reference, original_state, path: str | None,
            expect) -> tuple[list[str], float | None]:
    """Independent checks of one grown model: (the failures, empty when all passed; |grown - original| on our
    input)."""
    fails = []
    if type(grown) is not type(model):
        fails.append(f"class {type(grown).__name__} != {type(model).__name__}")
    if not _same_state(original_state, _state(model)):
        fails.append("input model changed")
    if kind in ("zero", "stack") and path is not None:
        n = len(grown.get_submodule(path))
        if n != expect:
            fails.append(f"{path} holds {n} blocks, asked {expect}")
    before, after = (sum(p.numel() for p in m.parameters()) for m in (model, grown))
    if after <= before:
        fails.append(f"parameters did not grow ({before} -> {after})")
    if kind == "widen":
        field = _hidden(grown.config)
        if field is None or field[1] != expect:
            fails.append(f"config hidden size {field}, asked {expect}")
        emb = grown.get_input_embeddings() if hasattr(grown, "get_input_embeddings") else None
        weight = getattr(emb, "weight", None)
        if weight is not None and weight.dim() == 2 and weight.shape[1] != expect and \
                weight.shape[1] == _hidden(model.config)[1]:
            fails.append(f"input embedding width {weight.shape[1]}, asked {expect}")
    try:
        out = _out(grown, inputs)
    except Exception as e:  # noqa: BLE001
        return fails + [f"grown model fails on own input: {_short(e, 160)}"], None
    diff = float((out - reference).abs().max()) if out.shape == reference.shape else None
    scale = max(1.0, float(reference.abs().max()))
    if kind != "stack":
        if diff is None:
            fails.append(f"output shape {tuple(out.shape)} != {tuple(reference.shape)}")
        elif not diff <= TOLERANCE * scale:  # also catches NaN
            fails.append(f"own-input diff {diff:.2e}")
    if not bool(torch_isfinite(out)):
        fails.append("non-finite output")
    try:
        with tempfile.TemporaryDirectory(dir="/tmp") as d:
            grown.save_pretrained(d)
            reloaded, info = type(grown).from_pretrained(d, output_loading_info=True)
        bad = {k: v for k, v in info.items() if v and k in ("missing_keys", "unexpected_keys", "mismatched_keys")}
        if bad:
            fails.append(f"reload keys {str(bad)[:160]}")
        again = _out(reloaded, inputs)
        rdiff = float((again - out).abs().max()) if again.shape == out.shape else float("inf")
        if not rdiff <= RELOAD_TOLERANCE:
            fails.append(f"reload diff {rdiff:.2e}")
    except Exception as e:  # noqa: BLE001
        fails.append(f"round trip raised {_short(e, 160)}")
    return fails, diff


def torch_isfinite(t) -> bool:
    import torch

    return bool(torch.isfinite(t).all())


def _step(kind: str, call, model, inputs, reference, original_state, path, expect) -> dict:
    try:
        grown = call()
    except Exception as e:  # noqa: BLE001
        if _is_growops(e):
            return {"status": "refused", "error": str(e)[:200]}
        return _bug(e)
    r = {"status": "ok", "max_difference": grown.max_difference, "changes": grown.changes[:4]}
    try:
        fails, diff = _verify(kind, model, grown.model, inputs, reference, original_state, path, expect)
        r |= {"checks": fails, "own_diff": diff}
    except Exception as e:  # noqa: BLE001 - a failure of the checks themselves
        r |= {"checks": [f"check raised {_short(e, 200)}"], "check_traceback": _bug(e)["traceback"]}
    return r


def check(name: str) -> dict:
    """Build `name` and grow it three ways; a row of results."""
    import torch
    import transformers

    import growops
    from growops.deepening import grow_depth
    from growops.widening import grow_width

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(1)
    entry = MODELS[name]
    config_cls, model_cls, config = entry[:3]
    stack = entry[3] if len(entry) > 3 else None
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(getattr(transformers, config_cls)(**config)).eval()
    row = {"model": model_cls}
    path = stack
    if path is None:
        try:
            path = growops.plan(model).stacks[0].path
        except growops.GrowopsError as e:
            several = re.findall(r"'([\w.]+)' \(\d+ blocks\)", str(e))
            if several:
                path = stack = several[0]
                row["stack"] = f"{path} (first of {len(several)})"
            else:
                row["plan"] = str(e)[:200]
    if path is not None:
        blocks = len(model.get_submodule(path))
    else:  # no stack found: ask for a depth from the config anyway, to see what grow_depth says
        blocks = next((getattr(model.config, k) for k in ("num_hidden_layers", "n_layer", "num_layers", "n_layers")
                       if isinstance(getattr(model.config, k, None), int)), 4)
    row |= {"path": path, "blocks": blocks}

    try:
        inputs = _own_inputs(model)
        reference = _out(model, inputs)
    except Exception as e:  # noqa: BLE001 - our input does not fit: use growops' config inputs, and say so
        from growops.integrations.hf_inputs import config_inputs

        row["own_inputs"] = f"failed ({_short(e, 120)}); used config_inputs"
        inputs = config_inputs(model)
        reference = _out(model, inputs)
    original_state = _state(model)

    row["zero"] = _step("zero", lambda: grow_depth(model, blocks + 2, "zero", stack=stack), model, inputs,
                        reference, original_state, path, blocks + 2)
    row["stack_grow"] = _step("stack", lambda: grow_depth(model, 2 * blocks, "stack", stack=stack), model, inputs,
                              reference, original_state, path, 2 * blocks)
    hidden = _hidden(model.config)
    if hidden is None:
        row["widen"] = {"status": "skipped", "error": "no hidden size in the config"}
    else:
        row["hidden"] = hidden
        row["widen"] = _step("widen", lambda: grow_width(model, 2 * hidden[1]), model, inputs, reference,
                             original_state, None, 2 * hidden[1])
    return row


def _run_one(name: str, timeout: int) -> dict:
    start = time.time()
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    try:
        out = subprocess.run([sys.executable, __file__, "--one", name], capture_output=True, text=True, env=env,
                             timeout=timeout)
        lines = [line for line in out.stdout.splitlines() if line.startswith("{")]
        row = json.loads(lines[-1]) if lines else {"error": "\n".join(out.stderr.strip().splitlines()[-12:]) or "?"}
    except subprocess.TimeoutExpired:
        row = {"error": f"timed out after {timeout} s"}
    return {"name": name, "seconds": round(time.time() - start, 1)} | row


def _abbrev(text: str) -> str:
    """A GrowopsError in a few words."""
    patterns = [
        (r"is not a residual block", "not residual (post-norm)"),
        (r"does not end in a layer growops can zero", "branch does not vanish"),
        (r"changed its output by ([\d.e+-]+)", r"probe moved \1"),
        (r"cannot find the config field", "no depth config field"),
        (r"cannot trace", "cannot trace"),
        (r"no repeated block stack", "no block stack"),
        (r"has no hidden-size field", "no hidden field"),
        (r"is used both as an embedding", "tied weight, no norm to scale"),
        (r"does not know how to widen", "op not in width plan"),
        (r"other tensors than the model", "other tensors at new size"),
        (r"cannot build (\w+)", r"cannot build at new size"),
        (r"forward calls", "blocks not called in order"),
        (r"would shrink", "a tensor would shrink"),
        (r"not a multiple of", "head size mismatch"),
    ]
    for pattern, short in patterns:
        m = re.search(pattern, text)
        if m:
            return m.expand(short)
    return text[:60]


def _cell(r: dict | None, kind: str) -> str:
    if r is None:
        return "-"
    if r["status"] == "ok":
        d = r.get("max_difference")
        return f"ok, diff {d:.1e}" if d is not None else "ok, diff ?"
    if r["status"] == "refused":
        return f"refused: {_abbrev(r['error'])}"
    if r["status"] == "bug":
        return f"**BUG** {r['error'].split(':')[0]}"
    return r["status"]


def _checks_cell(row: dict) -> str:
    parts = []
    for key, label in (("zero", "zero"), ("stack_grow", "stack"), ("widen", "widen")):
        r = row.get(key)
        if r and r["status"] == "ok":
            parts.append(f"{label}: ok" if not r["checks"] else f"{label}: **{'; '.join(r['checks'])}**")
    return ", ".join(parts) or "-"


def table(rows: list[dict]) -> str:
    lines = ["| model | deepen zero | deepen stack | widen x2 | independent checks |",
             "| --- | --- | --- | --- | --- |"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['name']} | error: {r['error'].splitlines()[-1][:120]} | | | |")
            continue
        name = r["name"] + (f" ({r['stack']})" if "stack" in r else "")
        cells = [_cell(r.get("zero"), "zero"), _cell(r.get("stack_grow"), "stack"), _cell(r.get("widen"), "widen"),
                 _checks_cell(r)]
        lines.append(f"| {name} | " + " | ".join(c.replace("|", "/") for c in cells) + " |")
    return "\n".join(lines)


def details(rows: list[dict]) -> str:
    """The full text of every refusal, bug and failed check."""
    out = []
    for r in rows:
        if "error" in r:
            out.append(f"- {r['name']}: process error: {r['error']}")
            continue
        for key in ("zero", "stack_grow", "widen"):
            s = r.get(key) or {}
            if s.get("status") in ("refused", "bug", "skipped"):
                out.append(f"- {r['name']} / {key}: {s['status']}: {s['error']}")
                if s.get("traceback"):
                    out.append("  ```\n" + "\n".join("  " + line for line in s["traceback"].splitlines()) + "\n  ```")
            elif s.get("checks"):
                out.append(f"- {r['name']} / {key}: checks failed: {'; '.join(s['checks'])}")
                if s.get("check_traceback"):
                    out.append("  ```\n" + "\n".join("  " + line for line in s["check_traceback"].splitlines())
                               + "\n  ```")
        if "own_inputs" in r:
            out.append(f"- {r['name']}: own inputs {r['own_inputs']}")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help=f"models to grow (default: all {len(MODELS)})")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--timeout", type=int, default=300, help="seconds per model")
    parser.add_argument("--json", help="also write the rows to this file")
    args = parser.parse_args()
    if args.one:
        print(json.dumps(check(args.one)))
        return
    rows = []
    for name in args.names or MODELS:
        rows.append(_run_one(name, args.timeout))
        print(f"{name}: {rows[-1]['seconds']} s", file=sys.stderr, flush=True)
        if args.json:
            Path(args.json).write_text(json.dumps(rows, indent=1))
    print(table(rows))
    print(f"\n{sum(r['seconds'] for r in rows):.0f} s in all\n\nDetails:\n")
    print(details(rows))


if __name__ == "__main__":
    main()
