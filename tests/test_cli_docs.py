"""docs/cli.md is checked against the argparse parser: usage lines, every argument and option of
every command, and the exit codes (`statemap COMMAND --help` shows the same)."""

from __future__ import annotations

import re

import pytest

from statemap.cli import EXIT_CODES, _subparser, build_parser


def _norm(text: str) -> str:
    return " ".join(text.split())


def _sections(root) -> dict[str, str]:
    text = (root / "docs" / "cli.md").read_text()
    parts = re.split(r"^## ", text, flags=re.M)
    return {p.split("\n", 1)[0].strip(): p for p in parts[1:]}


COMMANDS = sorted(next(a for a in build_parser()._actions if a.dest == "command").choices)


def _documented_args(section: str) -> tuple[set[str], set[str]]:
    """(option flags, positional names) from the first column of the section's argument table."""
    flags: set[str] = set()
    positionals: set[str] = set()
    for line in section.splitlines():
        if not line.startswith("| `"):
            continue
        first = line.split("|")[1]
        for item in re.findall(r"`([^`]+)`", first):
            word = item.split()[0]
            (flags if word.startswith("-") else positionals).add(word)
    return flags, positionals


def _parser_args(name: str) -> tuple[set[str], set[str]]:
    sub = _subparser(build_parser(), name)
    flags = {o for a in sub._actions for o in a.option_strings if o not in ("-h", "--help")}
    positionals = {a.dest for a in sub._actions if not a.option_strings}
    return flags, positionals


def test_every_command_has_a_section(root):
    assert set(_sections(root)) - {"Exit codes"} == set(COMMANDS)


@pytest.mark.parametrize("name", COMMANDS)
def test_usage_line_matches_the_parser(root, name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "100")
    usage = _subparser(build_parser(), name).format_usage().removeprefix("usage: ")
    block = re.search(r"```text\n(.*?)```", _sections(root)[name], re.S)
    assert block and _norm(block.group(1)) == _norm(usage), f"docs/cli.md `{name}` usage should be:\n{usage}"


@pytest.mark.parametrize("name", COMMANDS)
def test_every_argument_is_documented_and_nothing_else(root, name):
    assert _documented_args(_sections(root)[name]) == _parser_args(name)


@pytest.mark.parametrize("name", COMMANDS)
def test_exit_codes_match_the_help(root, name):
    m = re.search(r"^Exit codes: (.*?)\.?\n\n", _sections(root)[name] + "\n\n", re.S | re.M)
    assert m and _norm(m.group(1)) == _norm(EXIT_CODES[name]), f"docs/cli.md `{name}`: Exit codes: {EXIT_CODES[name]}."
    assert EXIT_CODES[name] in _norm(_subparser(build_parser(), name).format_help())


def test_the_check_can_fail(root):
    """A documented option the parser does not have is caught (the comparison is not vacuous)."""
    flags, positionals = _documented_args("| `--no-such-option` | x |\n| `spec` | y |\n")
    assert (flags, positionals) != _parser_args("check")
