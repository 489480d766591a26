"""Hand-written bugs: apply each patch of ``benchmarks/bug_patches/`` to a copy of the repository, run the tests it
names, and report which bugs the tests catch.

    python -m benchmarks.bug_patches                         # every patch (make bug-patches)
    python -m benchmarks.bug_patches growops/stack.py        # the patches of the modules a change touched
    python -m benchmarks.bug_patches --changed               # ... of the modules changed since main (git diff)
    python -m benchmarks.bug_patches --list                  # the catalogue: pattern and module of each patch

mutmut's mutants are syntactic (an operator, a constant). These patches are the bugs a developer writes while
changing this code: a check moved after the change it guards, a ``finally`` turned into straight-line code, a cache
not invalidated, a tolerance loosened, a slice off by one, a flag restored on the wrong modules. Each patch is a
unified diff (``git apply`` format) with a header of ``# key: value`` lines before it:

    # pattern: check-after-change        (one of PATTERNS below)
    # module: growops/growth.py
    # tests: tests/test_apollo.py tests/test_optim_state.py
    # why: growth copies weights before the optimizer side is validated; an error leaves the model half-grown

A patch is *killed* when a named test fails, *survives* when they all pass (a bug the suite misses: add a test that
fails with it, or explain in ``# equivalent:`` why no user can observe it), and *stale* when it no longer applies
(the code moved on: rewrite it). A kill counts only if the failing test passes without the patch: a test that fails
on the unpatched copy (someone's change in progress) is deselected and the patch's tests run again, and the table
names it. A patch whose tests cannot run (a named file is gone, nothing is collected) is an *error*. The copy lives
in a temporary directory; the repository is never changed.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PATCHES = ROOT / "benchmarks" / "bug_patches"
COPIED = ("growops", "growops_cuda", "tests", "examples", "benchmarks", "pyproject.toml", "README.md", "docs",
          "mkdocs.yml", "Makefile", "constraints.txt", "LICENSE")
# The realistic bug patterns of this code base (docs/testing.md explains each).
PATTERNS = {
    "check-after-change": "a validation moved after the change it guards: an error leaves a half-done change",
    "no-finally": "cleanup in straight-line code instead of a finally: an exception leaves state behind",
    "stale-cache": "a cache or index not invalidated when what it describes changes",
    "loose-tolerance": "a tolerance or strictness relaxed: a check that no longer refuses what it must",
    "off-by-one": "an off-by-one in a slice, range or index",
    "dropped-statement": "one statement of a sequence dropped",
    "wrong-target": "the right operation applied to the wrong object (modules, units, keys, ancestors)",
    "last-only": "a loop that keeps only its last comparison or value",
    "ignored-argument": "an argument or option read but not used (growth method, dtype, strict)",
    "shared-state": "state shared between objects that must each own theirs (grown siblings, copies)",
    "wrong-dtype": "a cast missing or applied where autocast or the caller decides",
    "wrong-order": "two steps swapped (restore before apply, remap after copy)",
    "weak-key": "a fingerprint, cache key or identity that leaves out what tells two things apart (a version, dtype)",
    "inverted-condition": "a comparison, sign or tie-break turned the other way",
}


@dataclass
class BugPatch:
    path: Path
    pattern: str
    module: str
    tests: tuple[str, ...]
    why: str
    equivalent: str | None = None

    @property
    def name(self) -> str:
        return self.path.stem


def read_patch(path: Path) -> BugPatch:
    """The header of the patch at `path`; a ValueError naming the file when a key is missing or unknown."""
    header = {}
    for line in path.read_text().splitlines():
        if not line.startswith("# "):
            break
        key, _, value = line[2:].partition(":")
        header[key.strip()] = value.strip()
    missing = [k for k in ("pattern", "module", "tests", "why") if not header.get(k)]
    if missing:
        raise ValueError(f"{path.name}: header lacks {', '.join(missing)}")
    if header["pattern"] not in PATTERNS:
        raise ValueError(f"{path.name}: unknown pattern {header['pattern']!r}; use one of {', '.join(PATTERNS)}")
    touched = sorted(set(re.findall(r"^\+\+\+ b/(\S+)", path.read_text(), re.MULTILINE)))
    if touched != [header["module"]]:
        raise ValueError(f"{path.name}: the header names module {header['module']}, the diff changes "
                         f"{', '.join(touched) or 'nothing'} (one module per patch, paths as a/growops/x.py b/...)")
    return BugPatch(path, header["pattern"], header["module"], tuple(header["tests"].split()), header["why"],
                    header.get("equivalent"))


def catalogue(modules: list[str] | None = None) -> list[BugPatch]:
    """Every patch, or those of `modules` (paths such as ``growops/stack.py``)."""
    patches = [read_patch(p) for p in sorted(PATCHES.glob("*.patch"))]
    return [p for p in patches if not modules or p.module in modules]


def changed_modules() -> list[str]:
    """The growops modules changed against main (committed or not)."""
    out = subprocess.run(["git", "diff", "--name-only", "main", "--", "growops"], cwd=ROOT, text=True,
                         capture_output=True)
    return [line for line in out.stdout.splitlines() if line.endswith(".py")]


def _pytest(copy: Path, tests: Sequence[str], deselect: Sequence[str], timeout: int) -> tuple[int, list[str]]:
    """``(return code, failed node ids)`` of pytest on `tests` in the copy; the return code is None on a timeout."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}  # a stale .pyc of an equal-sized edit would hide the patch
    args = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests]
    args += [f"--deselect={node}" for node in deselect]
    try:
        proc = subprocess.run(args, cwd=copy, text=True, capture_output=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        return None, []
    failed = [line.split(" ", 1)[1].split(" - ")[0] for line in proc.stdout.splitlines()
              if line.startswith(("FAILED ", "ERROR "))]
    return proc.returncode, failed


class Baseline:
    """Which test nodes fail on the unpatched copy (asked only of tests that killed a patch; cached). ``check`` runs
    many nodes in one pytest process, so the verdicts cost one start-up, not one per patch."""

    def __init__(self, copy: Path, timeout: int):
        self.copy, self.timeout, self.known = copy, timeout, {}

    def check(self, nodes: Sequence[str]) -> None:
        todo = sorted({n for n in nodes if n not in self.known})
        if not todo:
            return
        env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
        try:
            proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *todo],
                                  cwd=self.copy, text=True, capture_output=True, timeout=self.timeout, env=env)
            failed = {line.split(" ", 1)[1].split(" - ")[0] for line in proc.stdout.splitlines()
                      if line.startswith(("FAILED ", "ERROR "))}
        except subprocess.TimeoutExpired:
            failed = set()  # cannot tell: every kill stands
        self.known.update({n: n in failed for n in todo})

    def fails(self, node: str) -> bool:
        self.check([node])
        return self.known[node]


def run_one(patch: BugPatch, copy: Path, timeout: int, baseline: Baseline | None = None,
            broken: Sequence[str] = ()) -> tuple[str, float, str]:
    """``(outcome, seconds, detail)`` for one patch applied to the repository copy at `copy` (reverted after).
    `broken`: tests known to fail without the patch, deselected; with `baseline`, a test that kills the patch is
    checked on the unpatched copy at once (for a single patch; ``run`` checks them all together after)."""
    check = subprocess.run(["git", "apply", "--check", str(patch.path)], cwd=copy, text=True, capture_output=True)
    if check.returncode != 0:
        return "stale", 0.0, check.stderr.strip().splitlines()[0] if check.stderr.strip() else "does not apply"
    absent = [t for t in patch.tests if not (copy / t.split("::")[0]).exists()]
    if absent:
        return "error", 0.0, f"no such test file: {', '.join(absent)}"
    subprocess.run(["git", "apply", str(patch.path)], cwd=copy, check=True)
    start, broken = time.time(), list(broken)
    try:
        while True:
            code, failed = _pytest(copy, patch.tests, broken, timeout)
            if code is None:
                outcome, detail = "killed", f"timeout after {timeout} s"
            elif code == 0:
                outcome, detail = "survived", ""
            elif code in (1, 2):  # tests failed, or collection failed (the patched package does not import)
                outcome, detail = "killed", failed[0] if failed else f"pytest exit {code}"
                # A collection error (no "::") is the patched package failing to import: a kill as it stands.
                if baseline is not None and failed and "::" in failed[0] and failed[0] not in broken:
                    subprocess.run(["git", "apply", "-R", str(patch.path)], cwd=copy, check=True)
                    try:
                        fails_unpatched = baseline.fails(failed[0])
                    finally:
                        subprocess.run(["git", "apply", str(patch.path)], cwd=copy, check=True)
                    if fails_unpatched:
                        broken.append(failed[0])
                        continue
            else:  # usage error, nothing collected: the catalogue's fault, not a verdict on the patch
                outcome, detail = "error", f"pytest exit {code}: the named tests did not run"
            break
    finally:
        subprocess.run(["git", "apply", "-R", str(patch.path)], cwd=copy, check=True)
    if broken:
        detail += f" (deselected, failing without the patch too: {', '.join(broken)})"
    return outcome, time.time() - start, detail


def run(patches: list[BugPatch], timeout: int = 600, verify: bool = True) -> list[dict]:
    """Apply and test every patch in turn on one copy of the repository; one row per patch. With `verify`, the
    tests that killed patches are then run together on the unpatched copy, and the patches they killed are run
    again without those that fail there too."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="growops-bugs-") as tmp:
        copy = Path(tmp) / "repo"
        copy.mkdir()
        for name in COPIED:
            src = ROOT / name
            if src.is_dir():
                shutil.copytree(src, copy / name, ignore=shutil.ignore_patterns("__pycache__", "artifacts"))
            elif src.exists():
                shutil.copy2(src, copy / name)
        subprocess.run(["git", "init", "-q"], cwd=copy, check=True)  # git apply needs a directory to work in
        results = {}
        for patch in patches:
            results[patch.name] = run_one(patch, copy, timeout)
            outcome, seconds, detail = results[patch.name]
            print(f"{outcome:10s} {patch.name} ({seconds:.0f} s) {detail}", flush=True)
        if verify:
            baseline = Baseline(copy, timeout)
            killers = {p.name: results[p.name][2] for p in patches if results[p.name][0] == "killed"}
            baseline.check([node for node in killers.values() if "::" in node])
            broken = [node for node, fails in baseline.known.items() if fails]
            for patch in patches:
                if killers.get(patch.name) in broken:
                    files = {t.split("::")[0] for t in patch.tests}
                    mine = [node for node in broken if node.split("::")[0] in files]
                    results[patch.name] = run_one(patch, copy, timeout, baseline, mine)
                    outcome, seconds, detail = results[patch.name]
                    print(f"{outcome:10s} {patch.name} ({seconds:.0f} s, again) {detail}", flush=True)
        for patch in patches:
            outcome, seconds, detail = results[patch.name]
            if outcome == "survived" and patch.equivalent:
                outcome = "equivalent"
            rows.append({"patch": patch.name, "module": patch.module, "pattern": patch.pattern, "outcome": outcome,
                         "seconds": round(seconds, 1), "detail": detail or (patch.equivalent or "")})
    return rows


def table(rows: list[dict]) -> str:
    count = {o: sum(r["outcome"] == o for r in rows) for o in ("killed", "survived", "equivalent", "stale", "error")}
    lines = [f"{count['killed']} of {len(rows)} killed; survived: {count['survived']}, equivalent (explained): "
             f"{count['equivalent']}, stale: {count['stale']}, error: {count['error']}; "
             f"{sum(r['seconds'] for r in rows) / 60:.1f} min of tests", "",
             "| patch | module | pattern | outcome | seconds | failing test or reason |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['patch']} | {r['module']} | {r['pattern']} | {r['outcome']} | {r['seconds']} | {r['detail']} |"
              for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("modules", nargs="*", help="only the patches of these modules (growops/x.py)")
    parser.add_argument("--changed", action="store_true", help="only the modules changed since main")
    parser.add_argument("--list", action="store_true", help="print the catalogue and stop")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per patch's tests")
    parser.add_argument("--append", action="store_true", help="append the table to benchmarks/RESULTS.md")
    parser.add_argument("--no-verify", action="store_true",
                        help="count every failure as a kill (skip checking the failing test without the patch)")
    args = parser.parse_args(argv)
    modules = args.modules + (changed_modules() if args.changed else [])
    patches = catalogue(modules or None)
    unknown = [m for m in modules if not (ROOT / m).is_file()]
    if unknown:
        parser.error(f"no such module: {', '.join(unknown)} (give paths such as growops/stack.py)")
    if args.list:
        for p in patches:
            print(f"{p.name}: {p.pattern} in {p.module}: {p.why}")
        return 0
    began = time.time()
    rows = run(patches, args.timeout, verify=not args.no_verify)
    text = f"{table(rows)}\n\n{(time.time() - began) / 60:.1f} min in all (copy, patches, checks without them)"
    print(text)
    if args.append:
        words = " ".join(["python -m benchmarks.bug_patches", *(argv if argv is not None else sys.argv[1:])])
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n### bug patches: {datetime.date.today()}, {platform.machine()}, `{words}`\n\n{text}\n")
    return 1 if any(r["outcome"] in ("survived", "stale", "error") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
