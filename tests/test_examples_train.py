"""The main job end to end at a toy length: every arm kind builds, trains, and gets a verdict in the headline form."""

import re

from examples import train_shakespeare


def test_main_job_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(train_shakespeare, "ROOT", tmp_path)
    result = train_shakespeare.main(["--steps", "24", "--arms", "scratch,apollo,gstack,apollo-linear,gstack-lvps",
                                     "--quiet", "--name", "smoke"])
    arms = [r["arm"] for r in result["rows"]]
    assert arms == ["scratch", "apollo", "gstack", "apollo-linear", "gstack-lvps"]
    growing = re.compile(r"^[\w-]+: (\d+\.\d% fewer FLOPs, -?\d+\.\d% less wall-clock than scratch to val loss "
                         r"\d\.\d{4}|val loss \d\.\d{4} at \d+% of scratch's FLOPs; scratch reaches that loss "
                         r"at \d+%)$")
    assert growing.match(result["headline"]), result["headline"]
    assert (tmp_path / "runs" / "smoke" / "results.md").exists()
    assert result["table"].count("\n- ") == 4  # a verdict per growing arm


def test_the_width_and_depth_arm_grows_once_and_keeps_its_moments():
    """grow-wd: 3 blocks of width 16 until its growth step, then the 12 x 32 model, Adam moments carried over."""
    import torch

    cfg = train_shakespeare.TrainConfig(steps=8, eval_every=4, eval_batches=1, batch_size=2, block_size=16)
    ids = torch.randint(0, 256, (4000,), generator=torch.Generator().manual_seed(0))
    init = train_shakespeare.GPT(train_shakespeare.GPTConfig(n_layer=12, n_embd=32, n_head=2, block_size=16))
    arm = train_shakespeare.Arm("grow-wd", cfg, init.state_dict(), ids, torch.device("cpu"))
    assert (len(arm.model.blocks), arm.model.config.n_embd, arm.model.config.n_head) == (3, 16, 1)
    for step in range(arm.grow_step):
        arm.train_step(step)
    small_block = arm.opt.state[arm.model.blocks[1].mlp.c_fc.weight]["exp_avg"].clone()
    arm.train_step(arm.grow_step)
    assert (len(arm.model.blocks), arm.model.config.n_embd, arm.model.config.n_head) == (12, 32, 2)
    assert arm.opt.state[arm.model.blocks[4].mlp.c_fc.weight]["step"] == arm.grow_step + 1  # block 4 copies block 1
    assert small_block.abs().sum() > 0
