"""Mutation testing of growops/ with mutmut: run it, and score what it found.

    python -m benchmarks.mutation run [PATTERN ...]    # mutmut run, then report (default: every mutant of growops/)
    python -m benchmarks.mutation report [PATTERN ...] # the score of the mutants checked so far
    python -m benchmarks.mutation sample 600           # draw 600 mutants at random into mutation_sample.txt
    python -m benchmarks.mutation run --sample         # check them; the report estimates the score of all

mutmut (configured in pyproject.toml, ``[tool.mutmut]``) copies growops/ and the tests to ``mutants/``, rewrites
every function into variants that each change one thing (an operator, a constant, an argument, a string), and runs
the tests that cover the function against each variant. A mutant is *killed* when a test fails (or times out), and
*survives* when every test passes. A pattern such as ``growops.maps.*`` or ``growops.fx.gate.*`` selects the mutants
of one module and checks them again; without a pattern, results cached in ``mutants/`` stand and only mutants of
changed functions (or never checked) run.

The score is killed / checked. Every survivor must either be killed by a new test or be listed, with the reason it
cannot change what a user sees (an equivalent mutant), in ``benchmarks/mutation_survivors.txt`` (one line each:
``mutant-name  reason``). The report names every survivor that is not listed.

Checking all ~9000 mutants takes 5-15 hours on 2 cores. ``sample N`` draws N mutants uniformly (``--seed``) and
lists them in ``benchmarks/mutation_sample.txt``; ``run --sample`` checks those, and the report gives their score
with a 95% (Wilson) interval: an unbiased estimate of the score of every mutant, at the cost of the interval's
width. ``run --survivors`` checks the survivors again, after tests were added.
"""

from __future__ import annotations

import argparse
import ast
import fnmatch
import json
import math
import os
import random
import re
import subprocess
import sys
from collections import Counter, defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MUTANTS = ROOT / "mutants"
EXPLAINED = ROOT / "benchmarks" / "mutation_survivors.txt"
SAMPLE = ROOT / "benchmarks" / "mutation_sample.txt"
KILLED = {1, 3, 36, -24, 24, 152, 255, -11, -9, 37}  # a failing test, a timeout, a crash (mutmut's exit codes)
SURVIVED = {0}
NO_TESTS = {5, 33}


def _mutmut(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mutmut", *args], cwd=ROOT, text=True, capture_output=True)


def results(patterns: list[str]) -> dict[str, int | None]:
    """mutant name -> mutmut's exit code for it (None: not checked yet), for the mutants matching `patterns`."""
    out = {}
    for meta in sorted(MUTANTS.glob("growops/**/*.py.meta")):
        for name, code in json.loads(meta.read_text())["exit_code_by_key"].items():
            if any(fnmatch.fnmatch(name, p) for p in patterns):
                out[name] = code
    return out


def sample(patterns: list[str], n: int, seed: int) -> list[str]:
    """`n` mutant names drawn uniformly without replacement from those matching `patterns` (the same for the same
    arguments and the same mutants/)."""
    names = sorted(results(patterns))
    return sorted(random.Random(seed).sample(names, min(n, len(names))))


def wilson(good: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion `good`/`n` (sensible also near 0 and 1)."""
    if n == 0:
        return 0.0, 1.0
    p = good / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    return max(0.0, centre - half), min(1.0, centre + half)


def explained() -> dict[str, str]:
    """The listed survivors: mutant name -> why it cannot change what a user sees."""
    if not EXPLAINED.exists():
        return {}
    lines = [line.split(None, 1) for line in EXPLAINED.read_text().splitlines()]
    return {parts[0]: parts[1].strip() for parts in lines if parts and not parts[0].startswith("#") and len(parts) == 2}


def module_of(name: str) -> str:
    """``growops.maps`` for ``growops.maps.x_growth_sources__mutmut_3`` (a method: ``growops.apollo.xǁApolloǁ...``)."""
    return name.rsplit(".", 1)[0]


def report(patterns: list[str], only: list[str] | None = None) -> int:
    """Print the score per module and the survivors nobody explained; returns how many those are.

    ``score``: killed (or listed as equivalent) / checked. ``code score`` leaves out the survivors that change only
    the wording of an error or warning (``message_only``), which the tests pin by key words, not letter by letter.
    `only` (a sample's names) restricts the report to those mutants and adds the estimate for all of them."""
    codes, reasons = results(patterns), explained()
    if only is not None:
        gone = [name for name in only if name not in codes]  # a function changed since the draw: fewer mutants
        codes = {name: codes[name] for name in only if name in codes}
        if gone:
            print(f"{len(gone)} sampled mutants no longer exist (their function changed)")
    diffs = {name: _mutmut("show", name).stdout for name, code in codes.items() if code in SURVIVED}
    kinds = {name: "message" if message_only(name, diff) else "code" for name, diff in diffs.items()}
    per_module: dict[str, Counter] = defaultdict(Counter)
    unexplained = []
    for name, code in codes.items():
        kind = ("not checked" if code is None else "killed" if code in KILLED else "no tests" if code in NO_TESTS
                else "explained" if name in reasons else kinds.get(name, f"other ({code})"))
        per_module[module_of(name)][kind] += 1
        if kind == "code":
            unexplained.append(name)
    total = Counter()
    print(f"{'module':24} {'mutants':>7} {'killed':>6} {'explained':>9} {'message':>7} {'survived':>8} "
          f"{'no tests':>8} {'unchecked':>9} {'score':>6} {'code score':>10}")
    for module in sorted(per_module):
        total.update(per_module[module])
        if per_module[module]["not checked"] < per_module[module].total():
            _row(module, per_module[module])
    _row("all", total)
    if only is not None and total["not checked"]:
        print(f"{total['not checked']} of the {total.total()} sampled mutants are not checked yet: no estimate (mutmut "
              "checks the mutants of lightly tested functions first, so the checked ones are not a uniform subset)")
    elif only is not None:
        checked = total.total() - total["not checked"]
        for label, good, n in (("score", total["killed"] + total["explained"], checked),
                               ("code score", total["killed"] + total["explained"], checked - total["message"])):
            low, high = wilson(good, n)
            print(f"estimated {label} of all {len(results(patterns))} mutants (sample of {checked} checked): "
                  f"{good / n:.1%}, 95% interval {low:.1%} - {high:.1%}")
    if unexplained:
        print(f"\n{len(unexplained)} survivors not in {EXPLAINED.name} (kill them with a test, or explain them):")
        for name in sorted(unexplained):
            body = [line for line in diffs[name].splitlines() if line[:1] in "+-" and line[:3] not in ("+++", "---")]
            print(f"  {name}: {' | '.join(body)[:200]}")
    return len(unexplained)


_STRING = re.compile(r"""[rRbBfFuU]{0,2}("([^"\\]|\\.)*"|'([^'\\]|\\.)*')""")


def message_only(name: str, diff: str, source: str | None = None) -> bool:
    """True if mutant `name` (`diff`: what ``mutmut show`` prints) changes only string literals, all inside a
    ``raise`` statement or a call of ``...warn``, ``...Error`` or ``...Warning`` of the original `source` (default:
    the module's file)."""
    removed = [line[1:] for line in diff.splitlines() if line[:1] == "-" and not line.startswith("---")]
    added = [line[1:] for line in diff.splitlines() if line[:1] == "+" and not line.startswith("+++")]
    if not removed or [_STRING.sub('""', t) for t in removed] != [_STRING.sub('""', t) for t in added]:
        return False
    module, mangled = name.rsplit(".", 1)
    *owner, function = mangled.split("__mutmut_")[0].removeprefix("x_").split("ǁ")  # a method: xǁClassǁname
    source = source if source is not None else (ROOT / (module.replace(".", "/") + ".py")).read_text()
    lines = source.splitlines()
    scope = ast.parse(source)
    if owner:
        scope = next((n for n in ast.walk(scope) if isinstance(n, ast.ClassDef) and n.name == owner[-1]), scope)
    for node in ast.walk(scope):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == function:
            spans = [(n.lineno, n.end_lineno) for n in ast.walk(node) if isinstance(n, ast.Raise) or (
                isinstance(n, ast.Call) and ast.unparse(n.func).endswith(("warn", "Error", "Warning")))]
            # mutmut shows a method as a module-level function: compare lines without their indentation
            at = [i + 1 for i in range(node.lineno - 1, node.end_lineno) if lines[i].strip() in
                  {line.strip() for line in removed}]
            if len(at) >= len(removed) and all(any(a <= i <= b for a, b in spans) for i in at):
                return True
    return False


def _row(module: str, c: Counter) -> None:
    checked = c.total() - c["not checked"]
    good = c["killed"] + c["explained"]
    score = good / checked if checked else float("nan")
    code = good / (checked - c["message"]) if checked > c["message"] else float("nan")
    print(f"{module:24} {c.total():7} {c['killed']:6} {c['explained']:9} {c['message']:7} {c['code']:8} "
          f"{c['no tests']:8} {c['not checked']:9} {score:6.1%} {code:10.1%}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("run", "report", "sample"))
    parser.add_argument("patterns", nargs="*", help="mutants to (re)check, e.g. 'growops.maps.*' (default: every "
                        "mutant, reusing the results cached in mutants/); for `sample`, how many to draw")
    parser.add_argument("--max-children", type=int, default=os.cpu_count() or 1, help="mutants checked at once")
    parser.add_argument("--sample", action="store_true", help=f"only the mutants listed in {SAMPLE.name}; the report "
                        "adds the estimated score of all mutants")
    parser.add_argument("--survivors", action="store_true", help="run: check the survivors again too (after adding "
                        "tests)")
    parser.add_argument("--seed", type=int, default=0, help="sample: which random sample")
    args = parser.parse_args(argv)
    if args.command == "sample":
        names = sample(["growops.*"], int(args.patterns[0]), args.seed)
        SAMPLE.write_text(f"# {len(names)} of {len(results(['growops.*']))} mutants of growops/ drawn uniformly "
                          f"(seed {args.seed}): python -m benchmarks.mutation sample {len(names)} --seed {args.seed}\n"
                          + "".join(f"{n}\n" for n in names))
        return 0
    patterns = args.patterns or ["growops.*"]
    chosen = [n for n in SAMPLE.read_text().splitlines() if n and not n.startswith("#")] if args.sample else None
    if args.command == "run":
        # One thread per test process: mutmut forks each mutant's tests from a process that already ran torch, and
        # a forked child that starts an OpenMP pool its parent started waits forever.
        env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        codes = results(patterns)
        todo = [n for n in (codes if chosen is None else chosen) if n in codes and (
            codes[n] is None or (args.survivors and codes[n] in SURVIVED))]
        if todo or (chosen is None and not args.survivors):
            subprocess.run([sys.executable, "-m", "mutmut", "run", "--max-children", str(args.max_children),
                            *(todo if chosen is not None or args.survivors else args.patterns)],
                           cwd=ROOT, env=env, check=False)
    return 1 if report(patterns, chosen) else 0


if __name__ == "__main__":
    sys.exit(main())
