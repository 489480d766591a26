"""The package surface: a small public API, one error family, and a lean import."""

import subprocess
import sys

import growops


def test_public_api():
    assert set(growops.__all__) == {
        "Apollo", "ApolloConfig", "AveragedExport", "BlockStack", "GrowopsError", "GrowopsTypeError", "Plan", "apollo",
        "deepen", "depth_map", "expand_blocks", "find_block_stacks", "from_pretrained", "growth_sources", "gstack",
        "gstack_growth_tokens", "insert_depth_gate",
        "load_safetensors", "lvps_depth", "plan", "remap_optimizer_state", "save_safetensors", "stackbert",
        "tie_blocks", "trace_model", "widen", "widen_optimizer_state"}
    assert {"branch_zeros", "width_plan", "width_groups"} <= set(growops.fx.__all__)
    assert all(hasattr(growops, name) for name in growops.__all__)


def test_errors_are_value_errors():
    assert issubclass(growops.GrowopsError, ValueError)
    assert issubclass(growops.GrowopsTypeError, TypeError)
    assert issubclass(growops.GrowopsTypeError, growops.GrowopsError)


def test_import_is_lean():
    """Importing growops neither imports transformers nor initialises CUDA."""
    code = ("import sys, torch, growops; "
            "assert 'transformers' not in sys.modules; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ok", out.stderr


def test_version_and_typing_marker():
    from importlib.metadata import version
    from pathlib import Path

    assert growops.__version__ == version("growops")
    assert (Path(growops.__file__).parent / "py.typed").is_file()


def test_the_sdist_carries_what_the_tests_need(tmp_path):
    """The tests import examples/ and benchmarks/: an sdist without them cannot be tested."""
    import tarfile
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    code = f"from setuptools import build_meta; print(build_meta.build_sdist({str(tmp_path)!r}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    with tarfile.open(tmp_path / out.stdout.strip().splitlines()[-1]) as sdist:
        names = {n.split("/", 1)[1] for n in sdist.getnames() if "/" in n}
    assert {"LICENSE", "Makefile", "constraints.txt", "growops/py.typed", "tests/conftest.py",
            "examples/gpt.py", "benchmarks/architectures.py"} <= names
    assert not any(n.startswith("benchmarks/artifacts/") for n in names)
