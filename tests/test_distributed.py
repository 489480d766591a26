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
STALL_S = 120  # no CPU used and no output by either rank for this long: a hang
CAP_S = 1500  # a run slower than this fails even while it makes progress

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


def _cpu_seconds(pid: int) -> float | None:
    """CPU time a process has used so far (Linux /proc), None where it cannot be read."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _run_two_ranks(*args: str, stall_s: float = STALL_S, cap_s: float = CAP_S) -> tuple[bool, list[int | None],
                                                                                         list[str]]:
    """Start ``python *args`` as ranks 0 and 1; return (timed_out, return codes, outputs). They time out when for
    `stall_s` neither rank has written output, exited or used CPU at a working rate (a hang: a deadlocked rendezvous
    or teardown only polls), or after `cap_s` in all; a loaded machine that only makes them slow does not fail them."""
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
        start = last_progress = time.monotonic()
        cpu_then, sizes_then, alive_then = 0.0, (), 2
        timed_out = False
        while any(p.poll() is None for p in procs):
            time.sleep(0.5)
            now = time.monotonic()
            live = [p for p in procs if p.poll() is None]
            cpu = sum(c for c in (_cpu_seconds(p.pid) for p in live) if c is not None)
            sizes = tuple(os.path.getsize(log.name) for log in logs)
            # Progress: new output, a rank exiting, or CPU used at a working rate (a rank stuck in gloo's teardown
            # polls its sockets at well under 10% of a core; a slow rank on a loaded machine uses more).
            if sizes != sizes_then or len(live) != alive_then or cpu - cpu_then >= 0.1 * (now - last_progress) + 0.5:
                cpu_then, sizes_then, alive_then, last_progress = cpu, sizes, len(live), now
            if now - last_progress > stall_s or now - start > cap_s:
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
    timed_out, codes, outputs = _run_two_ranks("-c", PREFLIGHT, stall_s=60, cap_s=600)
    if timed_out or codes != [0, 0]:
        pytest.skip("two gloo processes cannot all-reduce over 127.0.0.1 on this machine:\n" + _report(outputs))


def _train(*args: str) -> str:
    timed_out, codes, outputs = _run_two_ranks(str(ROOT / "examples" / "ddp_train.py"), *args)
    if timed_out:
        pytest.fail(f"the two ranks stalled (no CPU used and no output for {STALL_S} s) or ran past {CAP_S} s:\n"
                    f"{_report(outputs)}")
    assert codes == [0, 0], _report(outputs)
    return outputs[0]


def test_ddp_ranks_agree_and_stay_identical_across_growths(loopback_gloo):
    """Same depth on every rank without communication, averaged gradients, identical parameters (asserted in the
    script at every step)."""
    assert "ok: 2 ranks, 12 steps, 2 growths, ranks agreed at every step" in _train("--steps", "12", "--check")


def test_fsdp2_matches_an_unsharded_replica_across_growths(loopback_gloo):
    out = _train("--steps", "12", "--check", "--fsdp2")
    assert "ok: FSDP2 on 2 ranks, 12 steps, 2 growths, losses equal an unsharded replica's" in out


def test_a_hang_is_told_from_a_slow_run():
    """The runner fails ranks that stop making progress (no CPU, no output), not ranks that are merely slow."""
    hang = "import time; print('start', flush=True); time.sleep(60)"
    started = time.monotonic()
    timed_out, _, outputs = _run_two_ranks("-c", hang, stall_s=3, cap_s=50)
    assert timed_out and time.monotonic() - started < 30 and "start" in outputs[0]
    busy = "import time\nend = time.monotonic() + 6\nwhile time.monotonic() < end: pass\nprint('done')"
    timed_out, codes, outputs = _run_two_ranks("-c", busy, stall_s=3, cap_s=50)
    assert not timed_out and codes == [0, 0] and "done" in outputs[1]
