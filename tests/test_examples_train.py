"""The main job end to end at a toy length: every arm kind builds, trains, and gets a verdict in the headline form."""

import re

from examples import train_shakespeare


def test_main_job_smoke(tmp_path, monkeypatch):
    monkeypatch.setattr(train_shakespeare, "ROOT", tmp_path)
    result = train_shakespeare.main(["--steps", "24", "--arms", "scratch,apollo,gstack,apollo-linear,gstack-lvps",
                                     "--no-results", "--quiet", "--name", "smoke"])
    arms = [r["arm"] for r in result["rows"]]
    assert arms == ["scratch", "apollo", "gstack", "apollo-linear", "gstack-lvps"]
    growing = re.compile(r"^[\w-]+: (\d+\.\d% fewer FLOPs, -?\d+\.\d% less wall-clock than scratch to val loss "
                         r"\d\.\d{4}|val loss \d\.\d{4} at \d+% of scratch's FLOPs; scratch reaches that loss "
                         r"at \d+%)$")
    assert growing.match(result["headline"]), result["headline"]
    assert (tmp_path / "runs" / "smoke" / "results.md").exists()
    assert result["table"].count("\n- ") == 4  # a verdict per growing arm
