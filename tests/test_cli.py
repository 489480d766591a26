"""``python -m growops grow``: a saved Hugging Face checkpoint in, a deeper one out, the same function with "zero"."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from growops.cli import load_checkpoint, main

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        vocab_size=64, bos_token_id=0, eos_token_id=0, pad_token_id=0))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(tmp_path / "in")
    (tmp_path / "in" / "tokenizer.json").write_text("{}")
    return model.eval(), tmp_path


def test_grow_writes_a_deeper_checkpoint_with_the_same_function(checkpoint, capsys):
    model, tmp = checkpoint
    assert main(["grow", str(tmp / "in"), str(tmp / "out"), "--layers", "4"]) == 0
    report = capsys.readouterr().out
    assert "model.layers: 2 -> 4 blocks" in report and "config.num_hidden_layers: 2 -> 4" in report
    assert "largest output difference on a probe input: 0" in report
    grown = transformers.LlamaForCausalLM.from_pretrained(tmp / "out").eval()
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(grown(ids).logits, model(ids).logits)
    assert grown.config.num_hidden_layers == 4 and (tmp / "out" / "tokenizer.json").read_text() == "{}"


def test_grow_stack_reports_the_difference(checkpoint, capsys):
    _, tmp = checkpoint
    assert main(["grow", str(tmp / "in"), str(tmp / "out"), "--layers", "4", "--method", "stack"]) == 0
    line = [x for x in capsys.readouterr().out.splitlines() if "largest output difference" in x][0]
    assert float(line.rsplit(" ", 1)[1]) > 0


@pytest.mark.parametrize("args, match", [
    (["--layers", "1"], "fewer than"),
    (["--layers", "4", "--stack", "model.nothing"], "nothing"),
])
def test_errors_write_nothing(checkpoint, capsys, args, match):
    _, tmp = checkpoint
    assert main(["grow", str(tmp / "in"), str(tmp / "out"), *args]) == 2
    assert match in capsys.readouterr().err and not (tmp / "out").exists()


def test_a_non_empty_output_or_a_missing_config_is_refused(checkpoint, capsys):
    _, tmp = checkpoint
    (tmp / "full").mkdir()
    (tmp / "full" / "x").write_text("")
    assert main(["grow", str(tmp / "in"), str(tmp / "full"), "--layers", "4"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert main(["grow", str(tmp), str(tmp / "out"), "--layers", "4"]) == 2
    assert "no config.json" in capsys.readouterr().err


def test_python_dash_m(checkpoint):
    _, tmp = checkpoint
    proc = subprocess.run([sys.executable, "-m", "growops", "grow", str(tmp / "in"), str(tmp / "out"), "--layers", "3"],
                          capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "2 -> 3 blocks" in proc.stdout


def test_grow_wider_and_deeper(checkpoint, capsys):
    model, tmp = checkpoint
    assert main(["grow", str(tmp / "in"), str(tmp / "out"), "--layers", "4", "--hidden", "32", "--ffn", "64"]) == 0
    report = capsys.readouterr().out
    assert "config.hidden_size: 16 -> 32" in report and "model.layers: 2 -> 4 blocks" in report
    grown = transformers.LlamaForCausalLM.from_pretrained(tmp / "out").eval()
    assert grown.config.hidden_size == 32 and grown.config.num_key_value_heads == 2
    ids = torch.randint(1, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.allclose(grown(ids).logits, model(ids).logits, atol=1e-5)


def test_grow_needs_a_size(checkpoint, capsys):
    _, tmp = checkpoint
    assert main(["grow", str(tmp / "in"), str(tmp / "out")]) == 2
    assert "say how to grow" in capsys.readouterr().err
    assert main(["grow", str(tmp / "in"), str(tmp / "out"), "--layers", "3", "--ffn", "64"]) == 2
    assert "give --hidden too" in capsys.readouterr().err


def test_help_explains_the_command_and_every_option(capsys, monkeypatch):
    """``--help`` and ``grow --help`` show the command and each option of grow with its explanation, word for word
    (argparse wraps lines: the words are compared, not the layout)."""
    monkeypatch.setenv("COLUMNS", "100")
    for argv in (["--help"], ["grow", "--help"]):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 0
    top, grow = (" ".join(text.split()) for text in capsys.readouterr().out.split("usage:")[1:])
    assert ("{grow,plan} grow widen and/or deepen a local Hugging Face checkpoint plan print what growops finds in "
            "a local Hugging Face checkpoint (reads only) options:") in top
    assert "--version show program's version number and exit" in top
    assert grow.endswith(
        "--layers LAYERS blocks in the grown stack "
        "--method {zero,interpolate,stack} how new blocks are made (default: zero) "
        "--stack STACK the block container's path, when the model holds several "
        "--hidden HIDDEN the new hidden size (widen first) "
        "--ffn FFN the new FFN size (default: what the config gives at the new hidden size) "
        "--heads HEADS the new head count (default: grown with the hidden size) "
        "--noise NOISE symmetry-breaking noise for widened weights")


def test_a_config_without_architectures_loads_with_automodel(tmp_path):
    """A checkpoint whose config.json names no architecture is built by AutoModel from its model type."""
    torch.manual_seed(0)
    model = transformers.LlamaModel(transformers.LlamaConfig(
        num_hidden_layers=1, hidden_size=16, num_attention_heads=2, num_key_value_heads=1, intermediate_size=32,
        vocab_size=64))
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["architectures"]  # save_pretrained writes the class name; some checkpoints lack it
    (tmp_path / "config.json").write_text(json.dumps(config))
    loaded = load_checkpoint(tmp_path)
    assert type(loaded) is transformers.LlamaModel
    want = model.state_dict()
    assert loaded.state_dict().keys() == want.keys()
    assert all(torch.equal(p, want[k]) for k, p in loaded.state_dict().items())


def test_plan_prints_what_growops_finds_and_reads_only(checkpoint, capsys):
    _, tmp_path = checkpoint
    before = {f.name: f.read_bytes() for f in (tmp_path / "in").iterdir()}
    assert main(["plan", str(tmp_path / "in")]) == 0
    out = capsys.readouterr().out
    assert "growops plan: container mode, L = 2" in out and "model.layers: 2 growable blocks" in out
    assert {f.name: f.read_bytes() for f in (tmp_path / "in").iterdir()} == before


def test_plan_shows_the_schedule_saved_beside_the_weights(checkpoint, capsys):
    import growops

    model, tmp_path = checkpoint
    a = growops.apollo(model, stages=(1, 2), stage_steps=(1,), seed=7)
    a.step()
    a.save_pretrained(tmp_path / "saved")
    assert main(["plan", str(tmp_path / "saved")]) == 0
    out = capsys.readouterr().out
    assert "saved at optimizer step 1 of: growops.apollo(model, stages=[1, 2], stage_steps=[1]" in out
    assert "seed=7" in out


def test_plan_of_a_folder_without_a_checkpoint_is_an_error(tmp_path, capsys):
    assert main(["plan", str(tmp_path)]) == 2
    assert "has no config.json" in capsys.readouterr().err


def test_version():
    import growops

    out = subprocess.run([sys.executable, "-m", "growops", "--version"], capture_output=True, text=True,
                         cwd=ROOT, timeout=120)
    assert out.stdout.strip() == f"growops {growops.__version__}"
