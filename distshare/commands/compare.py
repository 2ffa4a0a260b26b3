"""`distshare compare`: placeholder until its issue lands (replaced by the real command)."""

from __future__ import annotations

import argparse

from distshare.errors import UsageError


def compare_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("compare", help="(not built yet)")
    parser.set_defaults(func=compare_command)
    return parser


def compare_command(args: argparse.Namespace) -> int:
    raise UsageError("distshare compare is not built yet")
