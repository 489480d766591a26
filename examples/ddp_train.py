"""Apollo under DistributedDataParallel: every rank draws the same depth without communicating.

    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --steps 40
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --steps 10 --check           # the DDP test
    torchrun --standalone --nproc_per_node 2 examples/ddp_train.py --steps 10 --check --fsdp2   # the FSDP2 test

Each rank reads its own batches; DDP averages the gradients. Blocks that are not live yet get no gradient, so DDP
runs with find_unused_parameters=True, which lets the set of parameters that receive gradients change at every
growth without re-wrapping the model (shared blocks are fine: autograd sums a parameter's uses before DDP's hook).
Growth copies weights in place on every rank alike, so parameters stay identical.
With --check, every step asserts that all ranks ran the same (unique, depth), hold identical parameters, and saw
identical (averaged) gradients.

If the ranks hang at start-up on a single machine, gloo picked an unreachable interface for the hostname: set
GLOO_SOCKET_IFNAME=lo (the test suite pins 127.0.0.1 and lo, and starts the two ranks without torchrun).

--fsdp2 shards each block and the root with FSDP2 (``fully_shard``, gloo on CPU here) instead. A shared block is
all-gathered at each of its uses; growth copies shards in place (blocks of one shape are sharded alike); the
optimizer-state policy acts on the sharded state. With --check an unsharded replica trains beside it on the global
batch (all ranks' batches): every step, each parameter's full gradient must equal the replica's and the ranks' mean
loss the replica's loss.
"""

from __future__ import annotations

import argparse
import os
import sys
import threading
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import growops  # noqa: E402
from examples.data import Batches, encode, load_text  # noqa: E402
from examples.gpt import GPT, GPTConfig  # noqa: E402


def _all_equal(value: torch.Tensor) -> bool:
    gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value)
    return all(torch.equal(g, gathered[0]) for g in gathered)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--fsdp2", action="store_true", help="shard blocks with FSDP2 instead of DDP")
    args = parser.parse_args(argv)
    if args.fsdp2:
        return main_fsdp2(args)
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    steps = args.steps
    a = _apollo(steps)  # same initial weights everywhere (DDP would broadcast rank 0's anyway)
    ddp = DistributedDataParallel(a, find_unused_parameters=True)
    opt = torch.optim.AdamW(ddp.parameters(), lr=3e-3)
    batches = Batches(encode(load_text())[: 200_000], batch_size=4, block_size=32, seed=rank)  # own data per rank
    for step in range(steps):
        config = (a.unique_layers, a.depth)
        loss = ddp(**batches.next()).loss
        loss.backward()
        if args.check:
            live = a.model.blocks[0].mlp.c_fc.weight.grad
            assert _all_equal(torch.tensor(config)), f"step {step}: ranks ran different (unique, depth)"
            assert _all_equal(live.sum().reshape(1)), f"step {step}: gradients were not averaged"
        opt.step()
        opt.zero_grad(set_to_none=True)
        a.step(opt)
        if args.check:
            checksum = torch.stack([p.detach().double().sum() for p in a.parameters()])
            assert _all_equal(checksum), f"step {step}: parameters differ across ranks"
        if rank == 0 and (step % 10 == 0 or step == steps - 1):
            print(f"step {step:3d} loss {loss.item():.4f} stage {a.stage} unique {config[0]} depth {config[1]}")
    if rank == 0:
        print(f"ok: {dist.get_world_size()} ranks, {steps} steps, {a.stage} growths, ranks agreed at every step")
    _teardown()


def _gather(value: torch.Tensor) -> list[torch.Tensor]:
    gathered = [torch.empty_like(value) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, value)
    return gathered


def _check_fsdp2_gradients(sharded: growops.Apollo, replica: growops.Apollo, step: int) -> None:
    """Each sharded parameter's full gradient equals the replica's (which saw the global batch); a parameter no
    position ran has none on either side."""
    for (name, p), q in zip(sharded.named_parameters(), replica.parameters()):
        if p.grad is None or q.grad is None:
            assert p.grad is None and q.grad is None, f"step {step}: {name} has a gradient on one side only"
            continue
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        assert torch.allclose(grad, q.grad, rtol=1e-4, atol=1e-6), f"step {step}: {name} gradient differs"


def _apollo(steps: int) -> growops.Apollo:
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=4, n_embd=32, n_head=2, block_size=32))
    return growops.apollo(model, stages=(1, 2, 4), stage_steps=(steps // 3, 2 * steps // 3), sampler="uniform",
                          seed=7)


def main_fsdp2(args) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    a = _apollo(args.steps)
    replica = _apollo(args.steps) if args.check else None  # unsharded, same weights and schedule
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    for block in a.model.blocks.runtime.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(a, mesh=mesh)
    opts = [torch.optim.AdamW(m.parameters(), lr=3e-3) for m in (a, replica) if m is not None]
    # Every rank reads its own batches. With --check the replica trains on all ranks' batches at once, so its
    # gradient is what FSDP2's reduce-scatter must produce: the average of the ranks' gradients.
    batches = Batches(encode(load_text())[: 200_000], batch_size=4, block_size=32, seed=rank)
    for step in range(args.steps):
        batch = batches.next()
        loss = a(**batch).loss
        loss.backward()
        losses = [loss.item()]
        if replica is not None:
            global_batch = {k: torch.cat(_gather(v)) for k, v in batch.items()}
            loss = replica(**global_batch).loss
            loss.backward()
            losses.append(loss.item())
            _check_fsdp2_gradients(a, replica, step)
        for model, opt in zip((a, replica), opts):
            opt.step()
            opt.zero_grad(set_to_none=True)
            model.step(opt)
        if args.check:
            mean = torch.tensor([losses[0]])
            dist.all_reduce(mean)
            mean = mean.item() / dist.get_world_size()
            assert abs(mean - losses[1]) <= 1e-5 * abs(losses[1]), f"step {step}: sharded {mean}, replica {losses[1]}"
            assert _all_equal(torch.tensor([a.unique_layers, a.depth])), f"step {step}: ranks disagree"
        if rank == 0 and (step % 10 == 0 or step == args.steps - 1):
            print(f"step {step:3d} loss {losses[0]:.4f} stage {a.stage} unique {a.unique_layers} depth {a.depth}")
    if rank == 0:
        print(f"ok: FSDP2 on {dist.get_world_size()} ranks, {args.steps} steps, {a.stage} growths"
              + (", losses equal an unsharded replica's (and gradients, on the global batch)" if args.check else ""))
    _teardown()


def _teardown(timeout_s: float = 30.0) -> None:
    """Barrier, then destroy the process group; if gloo's teardown does not return (it can hang in
    destroy_process_group after the other rank has left), say so and exit: the work is done and checked."""
    dist.barrier()  # let every rank finish its collectives before the group goes away
    done = threading.Thread(target=dist.destroy_process_group, daemon=True)
    done.start()
    done.join(timeout_s)
    if done.is_alive():
        print(f"warning: destroy_process_group did not return within {timeout_s:.0f} s; exiting", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
