"""The docs site cannot drift: the API page covers statemap.__all__, the CLI page every command and
option, and mkdocs.yml's nav every page (the site itself: mkdocs build --strict)."""

from __future__ import annotations

import argparse
import importlib
import re

import yaml

import statemap
from statemap.cli import build_parser


def test_api_page_documents_every_public_name(root):
    text = (root / "docs" / "api.md").read_text()
    documented = dict(re.findall(r"^::: ((?:\w+\.)*(\w+))$", text, re.M))
    by_name = {short: full for full, short in documented.items()}
    missing = [n for n in statemap.__all__ if n != "__version__" and n not in by_name]
    assert not missing, f"docs/api.md has no '::: statemap.<module>.<name>' for {missing}"
    for name, full in by_name.items():
        module, _, attr = full.rpartition(".")
        assert getattr(importlib.import_module(module), attr) is getattr(statemap, name), f"{full} is not statemap.{name}"


def _subcommands() -> dict[str, argparse.ArgumentParser]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def test_cli_page_documents_every_command_and_option(root):
    text = (root / "docs" / "cli.md").read_text()
    sections = dict(re.findall(r"^## (\S+)\n(.*?)(?=^## |\Z)", text, re.S | re.M))
    for name, parser in _subcommands().items():
        assert name in sections, f"docs/cli.md has no '## {name}' section"
        for action in parser._actions:
            if isinstance(action, argparse._HelpAction):
                continue
            for spelling in action.option_strings or [action.dest]:
                assert f"`{spelling}" in sections[name], f"docs/cli.md: {name} does not document {spelling}"


def _nav_pages(nav) -> list[str]:
    out = []
    for item in nav:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            for v in item.values():
                out.extend(_nav_pages(v) if isinstance(v, list) else [v])
    return out


def test_mkdocs_nav_lists_every_page(root):
    config = yaml.safe_load((root / "mkdocs.yml").read_text())
    nav = _nav_pages(config["nav"])
    pages = sorted(str(p.relative_to(root / "docs")) for p in (root / "docs").rglob("*.md"))
    assert sorted(set(pages) - set(nav)) == [], "pages missing from mkdocs.yml nav"
    assert sorted(set(nav) - set(pages)) == [], "mkdocs.yml nav names pages that do not exist"
