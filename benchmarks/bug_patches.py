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
(the code moved on: rewrite it). The copy lives in a temporary directory; the repository is never changed.
"""

from __future__ import annotations

import argparse
import datetime
import platform
import shutil
import subprocess
import sys
import tempfile
import time
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


def run_one(patch: BugPatch, copy: Path, timeout: int) -> tuple[str, float, str]:
    """``(outcome, seconds, detail)`` for one patch applied to the repository copy at `copy` (reverted after)."""
    check = subprocess.run(["git", "apply", "--check", str(patch.path)], cwd=copy, text=True, capture_output=True)
    if check.returncode != 0:
        return "stale", 0.0, check.stderr.strip().splitlines()[0] if check.stderr.strip() else "does not apply"
    subprocess.run(["git", "apply", str(patch.path)], cwd=copy, check=True)
    start = time.time()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *patch.tests],
                              cwd=copy, text=True, capture_output=True, timeout=timeout)
        outcome = "survived" if proc.returncode == 0 else "killed"
        failed = [line for line in proc.stdout.splitlines() if line.startswith("FAILED")]
        detail = failed[0][7:].split(" - ")[0] if failed else ""
    except subprocess.TimeoutExpired:
        outcome, detail = "killed", f"timeout after {timeout} s"
    finally:
        subprocess.run(["git", "apply", "-R", str(patch.path)], cwd=copy, check=True)
    return outcome, time.time() - start, detail


def run(patches: list[BugPatch], timeout: int = 600) -> list[dict]:
    """Apply and test every patch in turn on one copy of the repository; one row per patch."""
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
        for patch in patches:
            outcome, seconds, detail = run_one(patch, copy, timeout)
            if outcome == "survived" and patch.equivalent:
                outcome = "equivalent"
            rows.append({"patch": patch.name, "module": patch.module, "pattern": patch.pattern, "outcome": outcome,
                         "seconds": round(seconds, 1), "detail": detail or (patch.equivalent or "")})
            print(f"{outcome:10s} {patch.name} ({seconds:.0f} s) {detail}", flush=True)
    return rows


def table(rows: list[dict]) -> str:
    killed = sum(r["outcome"] == "killed" for r in rows)
    lines = [f"{killed} of {len(rows)} killed; survived: {sum(r['outcome'] == 'survived' for r in rows)}, "
             f"equivalent (explained): {sum(r['outcome'] == 'equivalent' for r in rows)}, "
             f"stale: {sum(r['outcome'] == 'stale' for r in rows)}", "",
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
    args = parser.parse_args(argv)
    modules = args.modules + (changed_modules() if args.changed else [])
    patches = catalogue(modules or None)
    if args.list:
        for p in patches:
            print(f"{p.name}: {p.pattern} in {p.module}: {p.why}")
        return 0
    rows = run(patches, args.timeout)
    text = table(rows)
    print(text)
    if args.append:
        words = " ".join(["python -m benchmarks.bug_patches", *(argv if argv is not None else sys.argv[1:])])
        with open(ROOT / "benchmarks" / "RESULTS.md", "a") as f:
            f.write(f"\n### bug patches: {datetime.date.today()}, {platform.machine()}, `{words}`\n\n{text}\n")
    return 1 if any(r["outcome"] in ("survived", "stale") for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
