"""MkDocs hook: render the ``jaxspec`` command line help into ``cli.md``.

``cli.md`` holds the marker ``<!-- jaxspec-cli -->``; at build time it is replaced
by the ``--help`` text of ``jaxspec`` and of every subcommand, taken from
:func:`jaxspec._cli.main.build_parser`, so the page always matches the code.  Run this
file directly (``python docs/gen_cli.py``) to print the generated Markdown.
"""

from __future__ import annotations

import argparse
import os

MARKER = "<!-- jaxspec-cli -->"
WIDTH = "88"


def _help(parser: argparse.ArgumentParser) -> str:
    if hasattr(parser, "color"):  # Python >= 3.14 may colour help text
        parser.color = False
    return parser.format_help().rstrip()


def _subparsers(parser: argparse.ArgumentParser) -> list[tuple[str, str, argparse.ArgumentParser]]:
    out = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            helps = {a.dest: (a.help or "") for a in action._choices_actions}
            for name, sub in action.choices.items():
                out.append((name, helps.get(name, ""), sub))
    return out


def render() -> str:
    """Markdown for the whole command line interface."""
    old = {k: os.environ.get(k) for k in ("COLUMNS", "NO_COLOR")}
    os.environ["COLUMNS"] = WIDTH  # argparse wraps to this width: stable output
    os.environ["NO_COLOR"] = "1"
    try:
        from jaxspec._cli.main import build_parser

        parser = build_parser()
        parts = ["## `jaxspec`", "", "```text", _help(parser), "```", ""]
        for name, summary, sub in _subparsers(parser):
            parts += [f"## `jaxspec {name}`", ""]
            if summary:
                parts += [summary[0].upper() + summary[1:] + ".", ""]
            parts += ["```text", _help(sub), "```", ""]
        return "\n".join(parts)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def on_page_markdown(markdown: str, page, config, files) -> str:  # mkdocs hook
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, render())
    return markdown


if __name__ == "__main__":
    print(render())
