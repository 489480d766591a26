"""The ``growops_cuda`` extension: built on first use, checked once, registered as the CUDA kernel of
``growops::linear_wgrad``.

Importing growops builds nothing and never initialises CUDA. The CUDA kernel registered at import only calls
``load()`` when a CUDA tensor first reaches the op; ``load()`` JIT-builds the sources in ``growops_cuda/`` (cached
by ``torch.utils.cpp_extension`` under ``TORCH_EXTENSIONS_DIR``), compares the kernel with the reference on a small
problem, and returns None, with one warning that says why, where any of that fails: the reference then serves.
``GROWOPS_CUDA=0`` skips the extension.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
from collections.abc import Iterator
from types import ModuleType

import torch
from torch import Tensor

from ..errors import warn
from .shared_linear import _wgrad_reference

__all__ = ["disabled", "kernel_calls", "load", "status"]

_state: dict = {"tried": False, "module": None, "why": "not tried yet", "enabled": True, "kernel_calls": 0,
                "warned_no_algorithm": False}


def kernel_calls() -> int:
    """How many times the CUDA kernel's result was used (tests check the kernel, not the fallback, ran)."""
    return _state["kernel_calls"]


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Within the block the CUDA kernel is not used and the reference serves (benchmarks compare the two)."""
    saved = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = saved


def status() -> str:
    """Why the extension is or is not in use (for messages, skips and benchmarks)."""
    return "loaded" if _state["module"] is not None else _state["why"]


def _cublaslt_flags() -> tuple[list[str], list[str]]:
    """Include and link flags for cuBLASLt: from the CUDA toolkit, or from the NVIDIA wheels a CUDA build of torch
    installs (``nvidia/cu13/{include,lib}`` for CUDA 13, ``nvidia/cublas/{include,lib}`` before)."""
    from torch.utils.cpp_extension import CUDA_HOME

    roots = [CUDA_HOME] if CUDA_HOME else []
    try:
        import nvidia

        roots += [d for base in nvidia.__path__ for d in sorted(glob.glob(os.path.join(base, "*")))]
    except ImportError:
        pass
    includes, links = [], []
    for root in roots:
        if not includes and os.path.exists(os.path.join(root, "include", "cublasLt.h")):
            includes = [os.path.join(root, "include")]
        libs = sorted(glob.glob(os.path.join(root, "lib*", "libcublasLt.so*")))
        if not links and libs:
            # Name the file itself: a wheel ships only libcublasLt.so.<major>, which plain -lcublasLt does not find.
            links = [f"-L{os.path.dirname(libs[0])}", f"-l:{os.path.basename(libs[0])}"]
    return includes, links or ["-lcublasLt"]


def _build_name() -> str:
    """The extension's name carries a hash of every source and header: torch's JIT cache hashes only the listed
    sources, so an edited header would otherwise load a stale build."""
    import growops_cuda

    digest = hashlib.sha1()
    for path in sorted(growops_cuda.SOURCE_DIR.glob("*.[ch]*")):
        digest.update(path.name.encode() + path.read_bytes())
    return f"growops_cuda_{digest.hexdigest()[:10]}"


def _self_check(module: ModuleType, device: str = "cuda") -> str | None:
    """None if the kernel matches the reference on a small bf16 problem, else what differed."""
    gen = torch.Generator(device=device).manual_seed(0)
    g = torch.randn(300, 48, device=device, generator=gen).bfloat16()
    x = torch.randn(300, 40, device=device, generator=gen).bfloat16()
    dw, db, path = module.linear_wgrad(g, x, True)
    if path < 0:
        return "cuBLASLt offered no algorithm for a bf16 GEMM with fp32 output"
    ref_dw, ref_db = _wgrad_reference(g, x, True)
    for name, got, ref in (("dW", dw, ref_dw), ("db", db, ref_db)):
        err = ((got - ref).norm() / ref.norm()).item()
        if not err < 1e-5:
            return f"{name} differs from the reference by {err:.2e} (relative)"
    return None


def load(verbose: bool = False) -> ModuleType | None:
    """The built and checked extension, or None (``status()`` says why). Builds at most once per process."""
    if _state["tried"]:
        return _state["module"]
    _state["tried"] = True
    if os.environ.get("GROWOPS_CUDA", "1") == "0":
        _state["why"] = "disabled by GROWOPS_CUDA=0"
        return None
    if not torch.cuda.is_available():
        _state["why"] = "no CUDA device"
        return None
    try:
        from torch.utils.cpp_extension import load as build

        import growops_cuda

        includes, links = _cublaslt_flags()
        module = build(_build_name(), [str(s) for s in growops_cuda.SOURCES], extra_include_paths=includes,
                       extra_cuda_cflags=["-O3"], extra_ldflags=links, verbose=verbose)
        problem = _self_check(module)
    except Exception as e:  # a missing compiler, headers or library: the reference still works
        _state["why"] = f"build failed: {type(e).__name__}: {e}"
        warn(f"growops: the growops_cuda extension is not used ({_state['why'][:500]}); "
             "the reference implementation serves. Set GROWOPS_CUDA=0 to skip the build.")
        return None
    if problem is not None:
        _state["why"] = f"self-check failed: {problem}"
        warn(f"growops: the growops_cuda extension is not used ({_state['why']})")
        return None
    _state["module"], _state["why"] = module, "loaded"
    return module


@torch.library.register_kernel("growops::linear_wgrad", "cuda")
def _linear_wgrad_cuda(grad_out: Tensor, x: Tensor, with_bias: bool) -> tuple[Tensor, Tensor]:
    usable = _state["enabled"] and grad_out.dtype in (torch.bfloat16, torch.float16) and grad_out.dtype == x.dtype
    module = load() if usable else None
    if module is not None:
        dw, db, path = module.linear_wgrad(grad_out, x, with_bias)
        if path >= 0:
            _state["kernel_calls"] += 1
            return dw, db
        if not _state["warned_no_algorithm"]:
            _state["warned_no_algorithm"] = True
            warn(f"growops: cuBLASLt offered no algorithm for linear_wgrad on {tuple(grad_out.shape)} x "
                 f"{tuple(x.shape)} {x.dtype}; the reference serves such calls")
    return _wgrad_reference(grad_out, x, with_bias)
