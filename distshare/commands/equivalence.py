"""`distshare equivalence`: placeholder until its issue lands (replaced by the real command)."""

from __future__ import annotations

import argparse

from distshare.errors import UsageError


def equivalence_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("equivalence", help="(not built yet)")
    parser.set_defaults(func=equivalence_command)
    return parser


def equivalence_command(args: argparse.Namespace) -> int:
    raise UsageError("distshare equivalence is not built yet")
