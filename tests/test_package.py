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
