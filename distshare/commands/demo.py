"""`distshare demo`: placeholder until its issue lands (replaced by the real command)."""

from __future__ import annotations

import argparse

from distshare.errors import UsageError


def demo_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("demo", help="(not built yet)")
    parser.set_defaults(func=demo_command)
    return parser


def demo_command(args: argparse.Namespace) -> int:
    raise UsageError("distshare demo is not built yet")
