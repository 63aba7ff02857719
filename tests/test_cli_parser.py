"""Every command of the ``vitalgate`` parser names itself in its errors (``prog``) and has a handler."""

from __future__ import annotations

import argparse

from gateway.cli import build_parser


def leaves(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # noqa: SLF001
    if not subs:
        return [parser]
    return [leaf for sub in subs for child in sub.choices.values() for leaf in leaves(child)]


def test_every_command_has_a_handler_and_its_name_for_messages():
    commands = leaves(build_parser())
    assert len(commands) > 20
    missing = [p.prog for p in commands if p.get_default("func") is None or p.get_default("prog") != p.prog]
    assert not missing, missing
