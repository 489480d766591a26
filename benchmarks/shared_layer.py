"""A linear layer used k times per step (a shared block at k positions): time and gradient error, GPU.

    python benchmarks/shared_layer.py                    # all GPT-2-small projections, k in 1 4 12, T in 4096 16384
    python benchmarks/shared_layer.py --quick            # one layer, one T: a smoke run
    python benchmarks/shared_layer.py --smoke-cpu        # the logic on CPU at toy sizes (tests run this)
    python benchmarks/shared_layer.py --smoke-cpu --layers mlp.c_fc --tokens 512   # CPU gradient errors, real width

Per (layer, T tokens per use, k uses), in bf16 with fp32 master weights and biases, four ways to get the weight
and bias gradients of the k uses (every way also computes the input gradients):
  autograd   PyTorch's default under autocast: the weight is cast once, the k weight gradients are summed in bf16
  addmm      per-use torch.addmm(out_dtype=float32) into one fp32 buffer, bias gradients summed in fp32 (by hand)
  growops    growops.ops.shared_linear through autograd, with the growops_cuda kernel (cuBLASLt, BGRADB epilogue)
  growops-ref  the same op with the extension disabled (torch.mm(out_dtype=float32) and a separate bias sum)
Reported: median backward and forward+backward time (CUDA events), the speed-ups of growops over autograd and addmm,
and each way's relative error of the summed weight gradient against fp64.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from growops.ops import extension, shared_linear  # noqa: E402
from growops.ops.shared_linear import compute_weight  # noqa: E402

# GPT-2 small (d = 768): (in, out) of each projection in a block.
LAYERS = {"attn.c_attn": (768, 2304), "attn.c_proj": (768, 768), "mlp.c_fc": (768, 3072), "mlp.c_proj": (3072, 768)}


DEVICE = "cuda"


def _time_once(fn) -> float:
    """Milliseconds of one fn() call: CUDA events on the GPU, a wall clock on the CPU (smoke runs only)."""
    if DEVICE != "cuda":
        start = time.perf_counter()
        fn()
        return (time.perf_counter() - start) * 1e3
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _median_ms(make_run, reps: int) -> float:
    """Median of reps timed calls (after two warm-ups); make_run() prepares untimed work and returns the call."""
    return statistics.median([_time_once(make_run()) for _ in range(reps + 2)][2:])


def _sync() -> None:
    if DEVICE == "cuda":
        torch.cuda.synchronize()


_OUT_ALIAS_OK = [True]  # whether addmm(out_dtype=..., out=main) accumulates in place here


def _accumulate_fp32(main: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """main + a @ b in fp32 from bf16 a, b with one addmm(out_dtype=float32): in place where torch allows it,
    else into a new tensor (never an extra copy, which would handicap this baseline)."""
    if DEVICE != "cuda":
        return main.add_(a.float() @ b.float())
    if _OUT_ALIAS_OK[0]:
        try:
            return torch.addmm(main, a, b, out_dtype=torch.float32, out=main)
        except (RuntimeError, TypeError):
            _OUT_ALIAS_OK[0] = False
    return torch.addmm(main, a, b, out_dtype=torch.float32)


class Problem:
    def __init__(self, n_in: int, n_out: int, tokens: int, k: int, seed: int = 0):
        gen = torch.Generator(device=DEVICE).manual_seed(seed)
        self.w = torch.randn(n_out, n_in, device=DEVICE, generator=gen).mul_(n_in**-0.5).requires_grad_()
        self.b = torch.zeros(n_out, device=DEVICE, requires_grad=True)
        self.xs = [torch.randn(tokens, n_in, device=DEVICE, generator=gen).bfloat16().requires_grad_()
                   for _ in range(k)]
        self.gys = [torch.randn(tokens, n_out, device=DEVICE, generator=gen).bfloat16() for _ in range(k)]

    def clear(self) -> None:
        for t in (self.w, self.b, *self.xs):
            t.grad = None

    def exact_wgrad(self) -> torch.Tensor:
        return sum(g.double().t() @ x.detach().double() for x, g in zip(self.xs, self.gys))


def _autograd_forward(p: Problem, linear):
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        if linear is shared_linear:  # as routed layers do: the weight is cast once per forward, like autocast's
            lp = compute_weight(p.w, torch.bfloat16)
            return [shared_linear(x, p.w, p.b, weight_lp=lp) for x in p.xs]
        return [linear(x, p.w, p.b) for x in p.xs]


def _manual_forward(p: Problem):
    w_lp, b_lp = p.w.detach().bfloat16(), p.b.detach().bfloat16()
    return w_lp, [F.linear(x.detach(), w_lp, b_lp) for x in p.xs]


def _manual_backward(p: Problem, w_lp: torch.Tensor) -> None:
    main_w = torch.zeros_like(p.w)
    main_b = torch.zeros_like(p.b)
    for x, gy in zip(reversed(p.xs), reversed(p.gys)):  # autograd's order: the last use first
        x.grad = gy @ w_lp
        main_w = _accumulate_fp32(main_w, gy.t(), x.detach())
        main_b += gy.sum(0, dtype=torch.float32)
    p.w.grad, p.b.grad = main_w, main_b


def measure(name: str, n_in: int, n_out: int, tokens: int, k: int, reps: int) -> dict:
    p = Problem(n_in, n_out, tokens, k)
    exact = p.exact_wgrad()
    row = {"layer": name, "in": n_in, "out": n_out, "T": tokens, "k": k}

    def autograd_way(linear):
        def fwd_bwd():
            p.clear()
            torch.autograd.backward(_autograd_forward(p, linear), p.gys)

        def bwd_only():
            p.clear()
            ys = _autograd_forward(p, linear)
            _sync()
            return lambda: torch.autograd.backward(ys, p.gys)

        return fwd_bwd, bwd_only

    def addmm_way():
        def fwd_bwd():
            p.clear()
            w_lp, _ = _manual_forward(p)
            _manual_backward(p, w_lp)

        def bwd_only():
            p.clear()
            w_lp, _ = _manual_forward(p)
            _sync()
            return lambda: _manual_backward(p, w_lp)

        return fwd_bwd, bwd_only

    ways = {"autograd": autograd_way(F.linear), "addmm": addmm_way(), "growops": autograd_way(shared_linear),
            "growops-ref": autograd_way(shared_linear)}
    for way, (fwd_bwd, bwd_only) in ways.items():
        with extension.disabled() if way == "growops-ref" else contextlib.nullcontext():
            row[f"{way}_fwd_bwd_ms"] = _median_ms(lambda fwd_bwd=fwd_bwd: fwd_bwd, reps)
            row[f"{way}_bwd_ms"] = _median_ms(bwd_only, reps)
            fwd_bwd()
            row[f"{way}_rel_err"] = ((p.w.grad.double() - exact).norm() / exact.norm()).item()
    row["addmm_in_place"] = _OUT_ALIAS_OK[0]
    for base in ("autograd", "addmm"):
        row[f"speedup_bwd_vs_{base}"] = row[f"{base}_bwd_ms"] / row["growops_bwd_ms"]
        row[f"speedup_fwd_bwd_vs_{base}"] = row[f"{base}_fwd_bwd_ms"] / row["growops_fwd_bwd_ms"]
    if DEVICE == "cuda":
        torch.cuda.empty_cache()
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--reps", type=int, default=10)
    parser.add_argument("--out", type=Path, default=None, help="write the rows as JSON here")
    parser.add_argument("--smoke-cpu", action="store_true", help="toy sizes on the CPU: checks the script, not speed")
    parser.add_argument("--layers", default=None, help="comma-separated subset of " + ", ".join(LAYERS))
    parser.add_argument("--tokens", default=None, help="comma-separated tokens per use, e.g. 4096,16384")
    args = parser.parse_args(argv)
    global DEVICE
    DEVICE = "cpu" if args.smoke_cpu else "cuda"
    if DEVICE == "cuda" and not torch.cuda.is_available():
        raise SystemExit("benchmarks/shared_layer.py needs a CUDA device (or --smoke-cpu)")
    module = extension.load(verbose=False) if DEVICE == "cuda" else None
    card = torch.cuda.get_device_name() if DEVICE == "cuda" else "CPU smoke run"
    print(f"# {card}, torch {torch.__version__}, growops_cuda: {extension.status()}")
    if module is not None:  # which cuBLASLt path the kernel takes at GPT-2 sizes (0: fused bias epilogue)
        g = torch.randn(4096, 3072, device="cuda").bfloat16()
        x = torch.randn(4096, 768, device="cuda").bfloat16()
        print(f"# kernel path at (T 4096, in 768, out 3072) with bias: {module.linear_wgrad(g, x, True)[2]}")
    layers = {"mlp.c_fc": LAYERS["mlp.c_fc"]} if args.quick else LAYERS
    token_counts = (4096,) if args.quick else (4096, 16384)
    if args.smoke_cpu:
        layers, token_counts, args.reps = {"toy": (32, 48)}, (64,), 1
    if args.layers:
        layers = {name: LAYERS[name] for name in args.layers.split(",")}
    if args.tokens:
        token_counts = tuple(int(t) for t in args.tokens.split(","))
    rows = []
    header = ("| layer | T | k | bwd ms autograd / addmm / growops / ref | x vs autograd | x vs addmm | "
              "fwd+bwd x vs autograd / addmm | rel err autograd / addmm / growops |")
    print(header)
    print("|" + " --- |" * 8)
    for name, (n_in, n_out) in layers.items():
        for tokens in token_counts:
            for k in (1, 4, 12):
                r = measure(name, n_in, n_out, tokens, k, args.reps)
                rows.append(r)
                print(f"| {name} | {tokens} | {k} | {r['autograd_bwd_ms']:.3f} / {r['addmm_bwd_ms']:.3f} / "
                      f"{r['growops_bwd_ms']:.3f} / {r['growops-ref_bwd_ms']:.3f} | "
                      f"{r['speedup_bwd_vs_autograd']:.2f} | {r['speedup_bwd_vs_addmm']:.2f} | "
                      f"{r['speedup_fwd_bwd_vs_autograd']:.2f} / {r['speedup_fwd_bwd_vs_addmm']:.2f} | "
                      f"{r['autograd_rel_err']:.1e} / {r['addmm_rel_err']:.1e} / {r['growops_rel_err']:.1e} |",
                      flush=True)
    print(f"# addmm baseline accumulated {'in place' if _OUT_ALIAS_OK[0] else 'into new tensors'}; growops_cuda "
          f"kernel calls: {extension.kernel_calls()}")
    if args.out:
        args.out.write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
