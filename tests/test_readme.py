"""The README's usage block runs as written."""

import re
from pathlib import Path


def test_readme_usage_runs():
    text = Path(__file__).resolve().parents[1].joinpath("README.md").read_text()
    block = re.search(r"<!-- usage:.*?-->\s*```python\n(.*?)```", text, re.S).group(1)
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    a, final = scope["a"], scope["final"]
    assert a.step_count == 120 and a.unique_layers == 12
    assert type(final) is type(scope["model"])
    assert list(final.state_dict()) == list(a.model.state_dict())
