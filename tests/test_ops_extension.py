"""The growops_cuda extension: import stays lean; where the kernel builds, it matches the reference.

GPU tests skip by whether the extension loaded (``growops.ops.extension.status()`` says why not), not by guessing
from the hardware.
"""

import subprocess
import sys

import pytest
import torch

from growops.ops import extension, shared_linear
from growops.ops.shared_linear import _wgrad_reference


def test_importing_growops_builds_nothing_and_does_not_initialise_cuda():
    code = ("import torch, growops, growops.ops.extension as e; "
            "assert not torch.cuda.is_initialized(); assert e.status() == 'not tried yet'; print('lean')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "lean" in out.stdout, out.stderr[-2000:]


def test_without_cuda_the_extension_says_why_and_the_reference_serves():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available: the GPU tests below apply")
    assert extension.load() is None
    assert extension.status() in ("no CUDA device", "disabled by GROWOPS_CUDA=0")


@pytest.fixture(scope="module")
def ext():
    module = extension.load()
    if module is None:
        pytest.skip(f"growops_cuda not loaded: {extension.status()}")
    return module


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(4096, 768, 3072), (1000, 3072, 768), (37, 24, 40), (1, 8, 8)])
@pytest.mark.parametrize("with_bias", [True, False])
def test_cuda_kernel_matches_the_reference(ext, dtype, shape, with_bias):
    tokens, n_in, n_out = shape
    gen = torch.Generator(device="cuda").manual_seed(0)
    g = torch.randn(tokens, n_out, device="cuda", generator=gen).to(dtype)
    x = torch.randn(tokens, n_in, device="cuda", generator=gen).to(dtype)
    dw, db, path = ext.linear_wgrad(g, x, with_bias)
    assert path >= 0, "cuBLASLt offered no algorithm"
    ref_dw, ref_db = _wgrad_reference(g, x, with_bias)
    exact = g.double().t() @ x.double()
    assert ((dw.double() - exact).norm() / exact.norm()).item() < 1e-5
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-3)
    if with_bias:
        torch.testing.assert_close(db, ref_db, rtol=1e-4, atol=1e-3)


def test_cuda_shared_linear_k_uses_match_fp64(ext):
    gen = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(256, 128, device="cuda", generator=gen, requires_grad=True)
    b = torch.zeros(256, device="cuda", requires_grad=True)
    xs = [torch.randn(512, 128, device="cuda", generator=gen) for _ in range(12)]
    gs = [torch.randn(512, 256, device="cuda", generator=gen) for _ in range(12)]
    calls = extension.kernel_calls()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = sum((shared_linear(x, w, b) * g.bfloat16()).float().sum() for x, g in zip(xs, gs))
    loss.backward()
    assert extension.kernel_calls() == calls + 12  # the kernel ran for every use, not the reference
    want = sum(g.bfloat16().double().t() @ x.bfloat16().double() for x, g in zip(xs, gs))
    assert ((w.grad.double() - want).norm() / want.norm()).item() < 1e-5


def test_cuda_kernel_handles_inputs_at_odd_offsets(ext):
    """Contiguous views that start mid-allocation: cuBLASLt is told their real alignment."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    buf_g = torch.randn(37 * 24 + 3, device="cuda", generator=gen).bfloat16()
    buf_x = torch.randn(37 * 40 + 5, device="cuda", generator=gen).bfloat16()
    g, x = buf_g[3:].view(37, 24), buf_x[5:].view(37, 40)
    dw, db, path = ext.linear_wgrad(g, x, True)
    ref_dw, ref_db = _wgrad_reference(g, x, True)
    torch.testing.assert_close(dw, ref_dw, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(db, ref_db, rtol=1e-4, atol=1e-3)


@pytest.fixture
def fresh_state(monkeypatch):
    """extension._state as before any load(); restored after the test."""
    for key, value in (("tried", False), ("module", None), ("why", "not tried yet")):
        monkeypatch.setitem(extension._state, key, value)


def test_growops_cuda_0_disables_the_extension_and_status_names_the_variable(fresh_state, monkeypatch):
    """GROWOPS_CUDA=0 skips the extension, and the reason given names the variable exactly as it is set."""
    monkeypatch.setenv("GROWOPS_CUDA", "0")
    assert extension.load() is None
    assert extension.status() == "disabled by GROWOPS_CUDA=0"


def test_load_tries_once_per_process(fresh_state, monkeypatch):
    """The outcome of the first load() is kept: a second call neither checks nor builds again."""
    checks = []
    monkeypatch.delenv("GROWOPS_CUDA", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: checks.append(1) or False)
    assert extension.load() is None and extension.load() is None
    assert len(checks) == 1 and extension.status() == "no CUDA device"


def test_the_build_name_follows_every_source_and_header(monkeypatch, tmp_path):
    """torch's JIT cache hashes only the listed sources: the name carries a hash of every .cu/.h file, so an edited
    header gives a new build, while other files (Python, caches) do not."""
    import shutil

    import growops_cuda

    for path in growops_cuda.SOURCE_DIR.glob("*.[ch]*"):
        shutil.copy(path, tmp_path / path.name)
    monkeypatch.setattr(growops_cuda, "SOURCE_DIR", tmp_path)
    name = extension._build_name()
    assert name.startswith("growops_cuda_") and len(name) == len("growops_cuda_") + 10
    (tmp_path / "notes.py").write_text("x = 1\n")
    assert extension._build_name() == name
    header = tmp_path / "wgrad_lt.h"
    header.write_text(header.read_text() + "\n// edited\n")
    edited = extension._build_name()
    assert edited != name
    (tmp_path / "extra.cuh").write_text("// new\n")
    assert extension._build_name() not in (name, edited)


def _cuda_root(root, lib_dir: str, lib: str):
    (root / "include").mkdir(parents=True)
    (root / "include" / "cublasLt.h").write_text("")
    (root / lib_dir).mkdir()
    (root / lib_dir / lib).write_text("")
    return root


def test_cublaslt_flags_name_the_toolkit_or_the_wheels_library_file(monkeypatch, tmp_path):
    """The toolkit first, then NVIDIA's wheels (which ship only libcublasLt.so.<major>: linked by file name);
    plain -lcublasLt where neither has it."""
    import sys
    import types

    from torch.utils import cpp_extension

    wheel = types.ModuleType("nvidia")
    wheel.__path__ = [str(tmp_path / "site" / "nvidia")]
    monkeypatch.setitem(sys.modules, "nvidia", wheel)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    assert extension._cublaslt_flags() == ([], ["-lcublasLt"])
    cu13 = _cuda_root(tmp_path / "site" / "nvidia" / "cu13", "lib", "libcublasLt.so.13")
    assert extension._cublaslt_flags() == ([str(cu13 / "include")], [f"-L{cu13 / 'lib'}", "-l:libcublasLt.so.13"])
    toolkit = _cuda_root(tmp_path / "cuda", "lib64", "libcublasLt.so")
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(toolkit))
    assert extension._cublaslt_flags() == ([str(toolkit / "include")], [f"-L{toolkit / 'lib64'}", "-l:libcublasLt.so"])


def test_a_failed_build_or_self_check_leaves_the_reference_serving_and_says_why(fresh_state, monkeypatch):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("nvcc not found")

    monkeypatch.delenv("GROWOPS_CUDA", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    with pytest.warns(UserWarning, match=r"not used \(build failed: RuntimeError: nvcc not found\); the reference "
                                         r"implementation serves. Set GROWOPS_CUDA=0"):
        assert extension.load() is None
    assert extension.status() == "build failed: RuntimeError: nvcc not found"

    built = object()
    monkeypatch.setitem(extension._state, "tried", False)
    monkeypatch.setattr(cpp_extension, "load", lambda name, sources, **kwargs: built)
    monkeypatch.setattr(extension, "_self_check", lambda module: "dW differs from the reference by 1.00e-02")
    with pytest.warns(UserWarning, match=r"not used \(self-check failed: dW differs from the reference by 1.00e-02\)"):
        assert extension.load() is None
    assert extension.status().startswith("self-check failed") and extension._state["module"] is None

    calls = []
    monkeypatch.setitem(extension._state, "tried", False)
    monkeypatch.setattr(cpp_extension, "load", lambda *args, **kwargs: calls.append((args, kwargs)) or built)
    monkeypatch.setattr(extension, "_self_check", lambda module: None if module is built else "another module")
    assert extension.load() is built and extension.status() == "loaded"
    import growops_cuda

    (args, kwargs), = calls
    includes, links = extension._cublaslt_flags()
    assert args == (extension._build_name(), [str(s) for s in growops_cuda.SOURCES])
    assert kwargs == {"extra_include_paths": includes, "extra_cuda_cflags": ["-O3"], "extra_ldflags": links,
                      "verbose": False}


class _Kernel:
    """A stand-in for the built module: the reference's answer, scaled, or no algorithm (path -1)."""

    def __init__(self, db_scale=1.0, dw_scale=1.0, path=0):
        self.db_scale, self.dw_scale, self.path = db_scale, dw_scale, path

    def linear_wgrad(self, g, x, with_bias):
        dw, db = _wgrad_reference(g, x, with_bias)
        return dw * self.dw_scale, db * self.db_scale, self.path


def test_the_self_check_compares_both_gradients_with_the_reference():
    """Run on CPU with stand-in kernels: a right one passes, a wrong dW or db is named with its error, and a kernel
    without an algorithm is reported as such."""
    assert extension._self_check(_Kernel(), device="cpu") is None
    assert extension._self_check(_Kernel(dw_scale=1.01), device="cpu") == \
        "dW differs from the reference by 1.00e-02 (relative)"
    assert extension._self_check(_Kernel(db_scale=0.5), device="cpu") == \
        "db differs from the reference by 5.00e-01 (relative)"
    assert extension._self_check(_Kernel(dw_scale=1 + 2e-5), device="cpu").startswith("dW differs")
    assert extension._self_check(_Kernel(path=-1), device="cpu") == \
        "cuBLASLt offered no algorithm for a bf16 GEMM with fp32 output"
