"""The documentation site runs as written: every Python example in docs/, the CLI lines, and the strict build.

Each page is one test: its ```python blocks run in order in one namespace, like a notebook, in an empty working
directory. A block right after ``<!-- skip: reason -->`` is not run; the reason must say that it needs a GPU, several
processes or the network. A block that imports an optional package which is not installed skips the rest of its page.
"""

from __future__ import annotations

import ast
import importlib.util
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
PAGES = sorted(DOCS.rglob("*.md")) if DOCS.is_dir() else []
# Packages the docs may use that growops does not depend on (its extras: hf, demo, docs, test; and Lightning).
OPTIONAL = {"transformers", "accelerate", "safetensors", "peft", "pytorch_lightning", "lightning", "matplotlib"}
SKIP_REASONS = ("GPU", "processes", "network")
FENCE = re.compile(r"^```(\w*)[^\n]*\n(.*?)^```\s*$", re.M | re.S)
SKIP = re.compile(r"<!--\s*skip:\s*(.*?)\s*-->\s*$")

pytestmark = pytest.mark.skipif(not PAGES, reason="no docs/ here (an sdist carries no documentation)")


def blocks(page: Path) -> list[tuple[str, str, int, str | None]]:
    """``(language, code, line, skip reason)`` of every fenced block of `page`, in order."""
    text = page.read_text()
    out = []
    for m in FENCE.finditer(text):
        before = text[: m.start()].rstrip("\n").rsplit("\n", 1)[-1]
        skip = SKIP.search(before)
        out.append((m.group(1), m.group(2), text.count("\n", 0, m.start()) + 2, skip.group(1) if skip else None))
    return out


def _missing_optional(code: str) -> str | None:
    """The first optional package `code` imports that is not installed."""
    for node in ast.walk(ast.parse(code)):
        names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
            [node.module] if isinstance(node, ast.ImportFrom) and node.module and not node.level else []
        for name in names:
            top = name.split(".")[0]
            if top in OPTIONAL and importlib.util.find_spec(top) is None:
                return top
    return None


def _name(page: Path) -> str:
    return page.relative_to(DOCS).as_posix()


PYTHON_PAGES = [p for p in PAGES if any(lang == "python" for lang, *_ in blocks(p))]


@pytest.mark.parametrize("page", PYTHON_PAGES, ids=_name)
def test_page_examples_run(page, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # pages write checkpoints into the working directory
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    # The examples' models are tiny: one thread is faster, and far faster on a machine whose cores are busy.
    torch.set_num_threads(1)
    scope = {"__name__": f"docs_{_name(page).replace('/', '_').replace('-', '_')[:-3]}"}
    try:
        for lang, code, line, skip in blocks(page):
            if lang != "python" or skip is not None:
                continue
            missing = _missing_optional(code)
            if missing is not None:
                pytest.skip(f"{_name(page)}:{line} needs {missing}, which is not installed")
            # Line numbers in tracebacks are the page's own.
            exec(compile("\n" * (line - 1) + code, str(page), "exec"), scope)
    finally:
        torch._dynamo.reset()  # a page that compiles leaves no graphs behind for the next
        torch.set_num_threads(threads)


def test_skipped_blocks_say_why():
    """Only blocks that need a GPU, several processes or the network may be left out, and they say which."""
    for page in PAGES:
        for _, _, line, skip in blocks(page):
            if skip is not None:
                assert any(word in skip for word in SKIP_REASONS), f"{_name(page)}:{line}: skip reason {skip!r}"


def _cli_lines() -> list[tuple[str, list[str]]]:
    """``(where, argv)`` of every ``growops ...`` command in the shell blocks (``python -m growops`` too)."""
    out = []
    for page in PAGES:
        for lang, code, line, _ in blocks(page):
            if lang not in ("bash", "sh", "shell", "console"):
                continue
            for k, text in enumerate(code.splitlines()):
                words = shlex.split(text.split(" #", 1)[0].removeprefix("$ "))
                if words[:3] == ["python", "-m", "growops"]:
                    words = words[2:]
                if words[:1] == ["growops"]:
                    out.append((f"{_name(page)}:{line + k}", words[1:]))
    return out


def test_cli_commands_in_the_docs_parse(monkeypatch, capsys):
    import growops.cli

    lines = _cli_lines()
    assert len(lines) >= 3, "the docs show the growops command"
    calls = []
    monkeypatch.setattr(growops.cli, "grow", lambda *args: calls.append(("grow", args)) or [])
    monkeypatch.setattr(growops.cli, "describe", lambda *args: calls.append(("plan", args)) or [])
    for where, argv in lines:
        if argv == ["--version"]:
            with pytest.raises(SystemExit) as exit_:
                growops.cli.main(argv)
            assert exit_.value.code == 0, where
            continue
        try:
            code = growops.cli.main(argv)
        except SystemExit as e:  # argparse rejected it
            pytest.fail(f"{where}: growops {shlex.join(argv)} does not parse ({capsys.readouterr().err.strip()})")
            raise AssertionError from e
        assert code == 0 and calls and calls[-1][0] == argv[0], where


def _nav_pages(entries) -> list[str]:
    out = []
    for entry in entries:
        for value in entry.values() if isinstance(entry, dict) else [entry]:
            out += _nav_pages(value) if isinstance(value, list) else [value]
    return out


def test_every_page_is_in_the_nav():
    yaml = pytest.importorskip("yaml")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    assert sorted(_nav_pages(config["nav"])) == sorted(_name(p) for p in PAGES)


def test_every_public_name_has_a_reference_entry():
    import growops

    documented = set()
    for page in (DOCS / "reference").glob("*.md"):
        documented |= {m.rsplit(".", 1)[-1] for m in re.findall(r"^::: ([\w.]+)", page.read_text(), re.M)}
    assert sorted(set(growops.__all__) - documented) == []


def test_site_builds_strict(tmp_path):
    for package in ("mkdocs", "material", "mkdocstrings", "mkdocstrings_handlers.python"):
        if importlib.util.find_spec(package.split(".")[0]) is None or importlib.util.find_spec(package) is None:
            pytest.skip(f"{package} is not installed (pip install 'growops[docs]')")
    done = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
                          cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert done.returncode == 0, done.stderr[-4000:]
    assert (tmp_path / "site" / "reference" / "apollo" / "index.html").is_file()
