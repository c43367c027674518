"""Every `prunescope` command shown in the README and under docs/ parses with today's CLI."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from engine.cli import build_parser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
SHELL_FENCES = {"```", "```bash", "```sh", "```console"}


def shown_commands(text: str) -> list[str]:
    """The `prunescope ...` lines of a page's code blocks, continuation lines joined."""
    blocks, current, fence = [], [], None
    for line in text.splitlines():
        if line.startswith("```"):
            if fence is None:
                fence, current = line.strip(), []
            else:
                if fence in SHELL_FENCES:
                    blocks.append("\n".join(current))
                fence = None
        elif fence is not None:
            current.append(line)
    commands = []
    for block in blocks:
        for line in re.sub(r"\\\n\s*", " ", block).splitlines():
            if line.strip().startswith("prunescope "):
                commands.append(line.strip())
    return commands


def _cases() -> list[tuple[str, str]]:
    return [(page.relative_to(ROOT).as_posix(), cmd)
            for page in PAGES for cmd in shown_commands(page.read_text())]


def test_the_pages_show_commands() -> None:
    pages = {page for page, _ in _cases()}
    assert "README.md" in pages and len(_cases()) >= 20, pages


@pytest.mark.parametrize(("page", "command"), _cases(),
                         ids=[f"{page}:{cmd[:60]}" for page, cmd in _cases()])
def test_shown_command_parses(page: str, command: str) -> None:
    argv = shlex.split(command, comments=True)[1:]
    try:
        build_parser().parse_args(argv)
    except SystemExit as exc:
        pytest.fail(f"{page}: `{command}` does not parse (exit {exc.code})")
