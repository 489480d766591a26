"""Benchmark scripts still run (at toy sizes on the CPU), so a GPU session does not spend its time on their bugs."""

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

    def diff(old, new):
        return f"--- growops/recipes.py\n+++ growops/recipes.py\n@@ -1,3 +1,3 @@\n-{old}\n+{new}\n"

    message = '        raise GrowopsError(f"gstack_growth_tokens needs parameters > 1 and flops > 10, got {flops}")'
    name = "growops.recipes.x_gstack_growth_tokens__mutmut_99"
    assert message_only(name, diff(message, message.replace("needs", "XXneeds")))  # f-string: only its text
    assert not message_only(name, diff(message, '        raise GrowopsError(None)'))
    condition = "    if parameters <= 1 or flops <= 10:"
    assert not message_only(name, diff(condition, condition.replace("<= 1", "< 1")))
    key = '    if options.get("plan") is None:'
    assert not message_only("growops.recipes.x__layers__mutmut_99", diff(key, key.replace('"plan"', '"XXplanXX"')))
