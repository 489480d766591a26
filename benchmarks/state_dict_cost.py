"""What a wrapped model's state dict costs: ``a.model.state_dict()`` writes each position as a copy of the unit it
runs (the exported layout), so while blocks are shared it clones the blocks not grown yet.

    python benchmarks/state_dict_cost.py                 # the example GPT, 12 x 256, on CPU
    python benchmarks/state_dict_cost.py --layers 24 --width 512

Each call kind is timed in a process of its own (a fresh allocator: a process that has cloned once reuses freed
memory, so its first save costs more than the next): a plain model's ``state_dict()``, the wrapper's model at 1
unique block and at L, and ``a.export().state_dict()``. Prints the first call and the median of the next
`--repeat`, each with its ratio to the plain model's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import growops  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402

KINDS = ("plain", "shared", "full", "export")


def measure(kind: str, layers: int, width: int, repeat: int) -> tuple[float, float]:
    """Seconds of the first ``state_dict()`` of `kind` in a fresh process, and the median of the next `repeat`."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=layers, n_embd=width, n_head=max(1, width // 64), block_size=64))
    if kind == "plain":
        call = model.state_dict
    else:
        a = growops.apollo(model, stages=(1, layers), stage_steps=(1,))
        if kind == "full":
            a.step()
        call = a.model.state_dict if kind != "export" else (lambda: a.export().state_dict())
    start = time.perf_counter()
    call()
    first = time.perf_counter() - start
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return first, statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--width", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--kind", choices=KINDS, help=argparse.SUPPRESS)  # one measurement, in a child process
    args = parser.parse_args()
    if args.kind:
        print(json.dumps(measure(args.kind, args.layers, args.width, args.repeat)))
        return
    seconds = {}
    for kind in KINDS:
        out = subprocess.run([sys.executable, __file__, "--kind", kind, "--layers", str(args.layers), "--width",
                              str(args.width), "--repeat", str(args.repeat)], check=True, capture_output=True,
                             text=True).stdout
        seconds[kind] = json.loads(out.strip().splitlines()[-1])
    print(f"{'':>7}  {'first call':>22}  {'median of the next':>24}")
    for kind in KINDS:
        (first, median), (first0, median0) = seconds[kind], seconds["plain"]
        print(f"{kind:>7}: {first * 1e3:9.2f} ms ({first / first0:7.1f}x)  "
              f"{median * 1e3:9.2f} ms ({median / median0:7.1f}x)")


if __name__ == "__main__":
    main()
