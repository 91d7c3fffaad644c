"""README facts: the Python example runs, CI runs its commands, docs/cli.md is current."""

from __future__ import annotations

import importlib.util
import re

import pytest
from clips import REPO


@pytest.mark.slow  # the full Score-CAM of a real photo
def test_readme_python_example_runs(capsys):
    text = (REPO / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert blocks, "the README has no Python example"
    for block in blocks:
        exec(compile(block, "README.md", "exec"), {})
    assert "Egyptian cat" in capsys.readouterr().out


def _command_under(readme: str, heading: str) -> str:
    """Return the one indented command line of a README section."""
    section = readme.split(f"\n## {heading}\n", 1)[1].split("\n## ", 1)[0]
    commands = [line[4:] for line in section.splitlines() if line.startswith("    ")]
    assert len(commands) == 1, f"## {heading} should show exactly one command: {commands}"
    return commands[0]


def test_ci_runs_exactly_the_readme_set_up_and_test_commands():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    setup, test = _command_under(readme, "Install"), _command_under(readme, "Test")
    ci = (REPO / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    preamble = {"set -euo pipefail", 'cd "$(dirname "$0")/.."', "rm -rf .venv"}
    run = [line for line in ci[1:] if line and not line.startswith("#") and line not in preamble]
    assert run == [setup, test]
    assert "pip install -e '.[test]'" in setup
    for step in ("ruff check .", "mypy", "pytest -q"):  # lint, types, the whole suite
        assert f"&& {step}" in test


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
