"""Two CPU processes (gloo): DDP and FSDP2 train an apollo model across growths.

The test starts the two ranks itself, the way torchrun would (RANK, WORLD_SIZE, MASTER_ADDR/PORT), but pinned to
the loopback interface: gloo otherwise picks the interface the hostname resolves to, which on a sandboxed machine
may be unreachable and hang the rendezvous. Every rank runs in a session of its own and is killed on timeout, so a
hang fails the test instead of the whole suite.
"""

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch.distributed as dist

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 240

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs gloo")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


PREFLIGHT = """
import torch, torch.distributed as dist
dist.init_process_group("gloo")
t = torch.ones(1)
dist.all_reduce(t)
assert t.item() == 2
dist.destroy_process_group()
print("preflight ok")
"""


def _run_two_ranks(*args: str, timeout_s: float = TIMEOUT_S) -> tuple[bool, list[int | None], list[str]]:
    """Start ``python *args`` as ranks 0 and 1; return (timed_out, return codes, outputs)."""
    env_common = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "WORLD_SIZE": "2",
                  "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    logs, procs = [], []
    with tempfile.TemporaryDirectory() as tmp:
        for rank in range(2):
            log = open(Path(tmp) / f"rank{rank}.log", "w+")  # a file, not a pipe: nothing can block on it
            logs.append(log)
            env = {**env_common, "RANK": str(rank), "LOCAL_RANK": str(rank), "LOCAL_WORLD_SIZE": "2"}
            procs.append(subprocess.Popen([sys.executable, *args],
                                          stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                                          start_new_session=True))
        deadline = time.monotonic() + timeout_s
        timed_out = False
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for p in procs:
                if p.poll() is None:
                    os.killpg(p.pid, signal.SIGKILL)
                    p.wait()
        outputs = []
        for log in logs:
            log.seek(0)
            outputs.append(log.read())
            log.close()
    return timed_out, [p.returncode for p in procs], outputs


def _report(outputs: list[str]) -> str:
    return "\n".join(f"--- rank {r} ---\n{out[-3000:]}" for r, out in enumerate(outputs))


@pytest.fixture(scope="module")
def loopback_gloo() -> None:
    """Skip (saying why) where two plain-torch gloo processes cannot all-reduce over loopback at all: that is the
    machine, not growops. Anything that fails after this passes is ours."""
    timed_out, codes, outputs = _run_two_ranks("-c", PREFLIGHT, timeout_s=60)
    if timed_out or codes != [0, 0]:
        pytest.skip("two gloo processes cannot all-reduce over 127.0.0.1 on this machine:\n" + _report(outputs))


def _train(*args: str) -> str:
    timed_out, codes, outputs = _run_two_ranks(str(ROOT / "examples" / "ddp_train.py"), *args)
    if timed_out:
        pytest.fail(f"the two ranks did not finish within {TIMEOUT_S} s:\n{_report(outputs)}")
    assert codes == [0, 0], _report(outputs)
    return outputs[0]


def test_ddp_ranks_agree_and_stay_identical_across_growths(loopback_gloo):
    """Same depth on every rank without communication, averaged gradients, identical parameters (asserted in the
    script at every step)."""
    assert "ok: 2 ranks, 12 steps, 2 growths, ranks agreed at every step" in _train("--steps", "12", "--check")


def test_fsdp2_matches_an_unsharded_replica_across_growths(loopback_gloo):
    out = _train("--steps", "12", "--check", "--fsdp2")
    assert "ok: FSDP2 on 2 ranks, 12 steps, 2 growths, losses equal an unsharded replica's" in out
