"""MkDocs hook: writes the CLI reference from fastenc's argument parser at every build.

The page ``reference/cli.md`` holds the marker ``<!-- cli-reference -->``; this hook replaces it with
the ``--help`` text of ``fastenc`` and of each of its commands, so the page cannot drift from the parser.
"""

from __future__ import annotations

import argparse

MARKER = "<!-- cli-reference -->"


def cli_reference() -> str:
    """The help of ``fastenc`` and of every command (and ``run``'s tasks) as markdown sections."""
    import os

    from fastenc.cli import build_parser

    os.environ["COLUMNS"] = "100"  # the same wrapping on every machine

    parser = build_parser()
    parts = ["## fastenc", "", "```text", parser.format_help().rstrip(), "```", ""]

    def subcommands(p: argparse.ArgumentParser):
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                yield from action.choices.items()

    for name, sub in subcommands(parser):
        parts += [f"## fastenc {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
        for task, tp in subcommands(sub):
            parts += [f"### fastenc {name} {task}", "", "```text", tp.format_help().rstrip(), "```", ""]
    return "\n".join(parts)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        return markdown.replace(MARKER, cli_reference())
    return markdown
