"""The README's Python example runs as written (and its asserts hold)."""

from __future__ import annotations

import re

from clips import REPO


def test_readme_python_example_runs(capsys):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert "Egyptian cat" in capsys.readouterr().out


def test_readme_commands_match_ci():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8")
    setup = "python3 -m venv .venv && . .venv/bin/activate && pip install -e '.[test]'"
    test = ". .venv/bin/activate && ruff check . && pytest -q"
    for command in (setup, test):
        assert command in readme and command in ci
