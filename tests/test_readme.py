"""The README is a front door: short, and its quickstart runs as written."""

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quickstart_runs(tmp_path, monkeypatch):
    pytest.importorskip("transformers")
    block = re.search(r"<!-- quickstart:.*?-->\s*```python\n(.*?)```", README.read_text(), re.S).group(1)
    monkeypatch.chdir(tmp_path)  # it saves a checkpoint in the working directory
    scope = {}
    exec(compile(block, "README.md", "exec"), scope)
    a, model = scope["a"], scope["model"]
    assert a.step_count == 60 and a.unique_layers == 6
    assert type(model) is type(a.model) and len(model.transformer.h) == 6
    assert list(model.state_dict()) == list(a.model.state_dict())
    assert scope["loss"].item() < 4.0  # it learned something: ln(256) = 5.5 at the start
    assert (tmp_path / "grown-gpt2" / "config.json").is_file()


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 150


def test_readme_links_point_at_files():
    links = re.findall(r"\]\(((?!https?://)[^)#]+)\)", README.read_text())
    assert links and all((README.parent / link).exists() for link in links), \
        [link for link in links if not (README.parent / link).exists()]
