"""Write docs/cli.md, the reference of every scorecam-video option, from the argparse parser.

    python scripts/gen_cli_docs.py            # rewrite docs/cli.md
    python scripts/gen_cli_docs.py --check    # exit 1 if docs/cli.md is not what it would write

The page is generated, so it cannot drift from ``scorecam_stream.cli_parser.build_parser``; a test
(tests/test_readme.py) fails when it is not current.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from scorecam_stream.cli_parser import PROG, build_parser

DOC = Path(__file__).resolve().parent.parent / "docs" / "cli.md"
WIDTH = 100  # fixed, so the usage block does not depend on the terminal

HEADER = f"""\
# `{PROG}` options

Generated from the argument parser (`scorecam_stream/cli_parser.py`) by
`scripts/gen_cli_docs.py`: do not edit by hand; run `python scripts/gen_cli_docs.py` after
changing an option.

Every option may also be given in a config file (`--config FILE.yaml`) as a key with
underscores (`batch_size: 64`); options on the command line win. Options that are not given
take their defaults from the configuration (`scorecam_stream/config.py`), as stated below.
"""


def _formatter() -> argparse.HelpFormatter:
    return argparse.HelpFormatter(prog=PROG, width=WIDTH)


def _invocation(action: argparse.Action) -> str:
    return _formatter()._format_action_invocation(action)


def _help(action: argparse.Action) -> str:
    text = _formatter()._expand_help(action) if action.help else ""
    return " ".join(text.split())


def render() -> str:
    """Return the text of docs/cli.md for the current parser."""
    parser = build_parser()
    usage = _formatter()
    usage.add_usage(parser.usage, parser._actions, parser._mutually_exclusive_groups, prefix="")
    parts = [HEADER, "## Usage\n", "```", usage.format_help().rstrip("\n"), "```\n"]
    if parser.description:
        parts.append(parser.description + "\n")
    for group in parser._action_groups:
        actions = [a for a in group._group_actions if a.help != argparse.SUPPRESS]
        if not actions:
            continue
        parts.append(f"## {group.title[0].upper()}{group.title[1:]}\n")
        for action in actions:
            parts.append(f"- `{_invocation(action)}`: {_help(action)}")
        parts.append("")
    return "\n".join(parts).rstrip("\n") + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="compare, do not write")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
        if current != text:
            print(f"{DOC} is not current: run python {__file__}", file=sys.stderr)
            return 1
        return 0
    DOC.write_text(text, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
