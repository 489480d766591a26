"""Benchmark scripts still run (at toy sizes on the CPU), so a GPU session does not spend its time on their bugs."""

import fnmatch
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_shared_layer_benchmark_smoke_on_cpu(tmp_path):
    out = tmp_path / "rows.json"
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "shared_layer.py"), "--smoke-cpu", "--out",
                           str(out)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())
    assert [r["k"] for r in rows] == [1, 4, 12]
    for r in rows:
        # the fp32 ways agree with fp64; PyTorch's bf16 autocast sum does not (that is what the op fixes)
        assert r["growops_rel_err"] < 1e-6 and r["addmm_rel_err"] < 1e-6
        assert r["autograd_rel_err"] > 1e-4


def test_overhead_benchmark_smoke():
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py"), "--steps", "1", "--warmup", "0",
                           "--modes", "eager", "--width", "16", "--block", "8", "--batch", "2"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [line for line in proc.stdout.splitlines() if line.startswith("| eager")]
    assert len(rows) == 7  # (1, 1), (1, 12), (3, 3), (3, 12), (6, 6), (6, 12), (12, 12)


def test_mutation_report_tells_message_wording_from_code():
    """benchmarks/mutation.py: a survivor that only rewords an error is told apart from one that changes code."""
    from benchmarks.mutation import message_only

    source = (
        "def tokens(parameters, options):\n"
        "    if parameters <= 1:\n"
        "        raise GrowopsError(\"tokens needs parameters > 1; \"\n"
        "                           \"pass a larger model\")\n"
        "    if options.get(\"plan\") is None:\n"
        "        return 0\n")
    lines = source.splitlines()

    def verdict(line, new):
        diff = f"--- growops/x.py\n+++ growops/x.py\n@@ -1,3 +1,3 @@\n-{lines[line]}\n+{new}\n"
        return message_only("growops.x.x_tokens__mutmut_1", diff, source)

    assert verdict(3, '                           "XXpass a larger modelXX")')  # the wording of a message
    assert verdict(2, lines[2].replace("tokens needs", "TOKENS NEEDS"))
    assert not verdict(2, "        raise GrowopsError(None)")  # the message is gone
    assert not verdict(1, "    if parameters < 1:")  # code
    assert not verdict(4, lines[4].replace('"plan"', '"XXplanXX"'))  # a string that is not a message


def test_mutation_sample_is_uniform_reproducible_and_its_interval_covers(monkeypatch, tmp_path):
    """benchmarks/mutation.py --sample: the same seed draws the same mutants, each pattern's mutants as often as
    their share, and the Wilson interval holds the proportion (and stays inside [0, 1] at the ends)."""
    from benchmarks import mutation

    names = {f"growops.{m}.x_f__mutmut_{i}": None for m, count in (("a", 300), ("b", 100)) for i in range(count)}
    monkeypatch.setattr(mutation, "results", lambda patterns: {
        n: c for n, c in names.items() if any(fnmatch.fnmatch(n, p) for p in patterns)})
    first = mutation.sample(["growops.*"], 200, seed=3)
    assert first == mutation.sample(["growops.*"], 200, seed=3) != mutation.sample(["growops.*"], 200, seed=4)
    assert len(set(first)) == 200 and set(first) <= set(names)
    assert 30 <= sum(n.startswith("growops.b.") for n in first) <= 70  # a quarter of 200, give or take
    assert all(n.startswith("growops.b.") for n in mutation.sample(["growops.b.*"], 500, seed=0))
    assert len(mutation.sample(["growops.b.*"], 500, seed=0)) == 100
    low, high = mutation.wilson(540, 600)
    assert 0.87 < low < 0.9 < high < 0.93
    assert mutation.wilson(10, 10)[1] == 1.0 and 0.69 < mutation.wilson(10, 10)[0] < 0.73
    assert mutation.wilson(0, 10)[0] == 0.0
    monkeypatch.setattr(mutation, "SAMPLE", tmp_path / "sample.txt")
    assert mutation.main(["sample", "200", "--seed", "3"]) == 0
    listed = (tmp_path / "sample.txt").read_text().splitlines()
    assert listed[0].startswith("# 200 of 400 mutants") and listed[1:] == first


def test_mutation_report_finds_a_method_by_its_class():
    """A method's mutant (``xǁClassǁname``, shown dedented by mutmut) is judged in that class's method, not in
    another class's method of the same name."""
    from benchmarks.mutation import message_only

    source = ("class A:\n"
              "    def load(self):\n"
              "        return \"plan\"\n"
              "\n"
              "\n"
              "class B:\n"
              "    def load(self):\n"
              "        raise GrowopsError(\"plan\")\n")
    diff = "--- growops/x.py\n+++ growops/x.py\n@@ -1,2 +1,2 @@\n-    raise GrowopsError(\"plan\")\n" \
           "+    raise GrowopsError(\"XXplanXX\")\n"
    assert message_only("growops.x.xǁBǁload__mutmut_1", diff, source)
    diff = "--- growops/x.py\n+++ growops/x.py\n@@ -1,2 +1,2 @@\n-    return \"plan\"\n+    return \"XXplanXX\"\n"
    assert not message_only("growops.x.xǁAǁload__mutmut_1", diff, source)


def test_state_dict_cost_benchmark_smoke():
    from benchmarks.state_dict_cost import KINDS, measure

    for kind in KINDS:
        first, median = measure(kind, layers=2, width=16, repeat=1)
        assert first > 0 and median > 0


# Modules without a hand-written bug patch, and why (docs/testing.md, "Realistic bug patterns").
UNPATCHED = {
    "growops/integrations/__init__.py": "a docstring, no code",
}


def test_bug_patch_catalogue_parses_and_covers_every_module():
    """benchmarks/bug_patches: every header names a known pattern, the module its diff changes and test files that
    exist; every module of growops/ has a patch or a reason it has none."""
    from benchmarks.bug_patches import PATTERNS, catalogue, main

    patches = catalogue()
    assert len(patches) >= 40 and len({p.name for p in patches}) == len(patches)
    for p in patches:
        assert p.pattern in PATTERNS and (ROOT / p.module).is_file() and p.why, p.name
        assert p.tests and all((ROOT / t.split("::")[0]).is_file() for t in p.tests), p.name
    modules = {path.relative_to(ROOT).as_posix() for path in (ROOT / "growops").rglob("*.py")}
    assert modules - {p.module for p in patches} == set(UNPATCHED), "give each new module a patch"
    assert main(["--list", "growops/maps.py"]) == 0


def test_bug_patch_runner_tells_killed_survived_and_stale(tmp_path):
    """One real patch is killed, a harmless edit survives, a patch whose context is gone is stale; the repository is
    left as it was."""
    import difflib

    from benchmarks.bug_patches import PATCHES, read_patch, run, table

    maps = (ROOT / "growops" / "maps.py").read_text()

    def patch(name: str, before: str, after: str) -> Path:
        header = "# pattern: off-by-one\n# module: growops/maps.py\n# tests: tests/test_maps.py::test_doctests\n" \
                 "# why: runner smoke test\n"
        diff = difflib.unified_diff(before.splitlines(keepends=True), after.splitlines(keepends=True),
                                    "a/growops/maps.py", "b/growops/maps.py")
        (tmp_path / f"{name}.patch").write_text(header + "".join(diff))
        return tmp_path / f"{name}.patch"

    line = next(x for x in maps.splitlines() if x.startswith("Growth = "))
    harmless = patch("harmless", maps, maps.replace(line, f"{line}  # the growth rules", 1))
    gone = patch("gone", maps.replace(line, f"{line}  # a line that is not there", 1), maps)
    patches = [read_patch(PATCHES / "maps-stack-partial-cycle-from-the-bottom.patch"), read_patch(harmless),
               read_patch(gone)]
    rows = run(patches, timeout=300)
    assert [r["outcome"] for r in rows] == ["killed", "survived", "stale"]
    assert rows[0]["detail"].startswith("tests/test_maps.py::")
    assert table(rows).startswith("1 of 3 killed; survived: 1, equivalent (explained): 0, stale: 1")
    assert (ROOT / "growops" / "maps.py").read_text() == maps
