"""Two CPU processes under torchrun (gloo): DDP and FSDP2 train an apollo model across growths."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _torchrun(*args: str) -> str:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "examples" / "ddp_train.py"), *args]
    # A session of its own, so a hang is killed with every worker rather than leaving them behind.
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT,
                            start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        pytest.fail(f"torchrun timed out:\n{stdout[-2000:]}\n{stderr[-4000:]}")
    assert proc.returncode == 0, stdout[-2000:] + stderr[-4000:]
    return stdout


def test_ddp_ranks_agree_and_stay_identical_across_growths():
    """Same depth on every rank without communication, averaged gradients, identical parameters (asserted in the
    script at every step)."""
    assert "ok: 2 ranks, 12 steps, 2 growths, ranks agreed at every step" in _torchrun("--steps", "12", "--check")


def test_fsdp2_matches_an_unsharded_replica_across_growths():
    out = _torchrun("--steps", "12", "--check", "--fsdp2")
    assert "ok: FSDP2 on 2 ranks, 12 steps, 2 growths, losses equal an unsharded replica's" in out
