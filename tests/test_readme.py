"""The README's Python example runs as written (and its asserts hold)."""

from __future__ import annotations

import importlib.util
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


def test_cli_reference_is_generated_from_the_parser():
    """docs/cli.md is what scripts/gen_cli_docs.py writes for today's parser."""
    spec = importlib.util.spec_from_file_location("gen_cli_docs", REPO / "scripts/gen_cli_docs.py")
    assert spec is not None and spec.loader is not None
    gen = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gen)
    text = gen.render()
    assert "`--gpus GPUS`" in text and "## Distributed (Ray)" in text
    assert (REPO / "docs" / "cli.md").read_text(encoding="utf-8") == text, (
        "docs/cli.md is stale: run python scripts/gen_cli_docs.py"
    )
