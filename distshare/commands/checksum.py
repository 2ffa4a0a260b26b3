"""`distshare checksum`: placeholder until its issue lands (replaced by the real command)."""

from __future__ import annotations

import argparse

from distshare.errors import UsageError


def checksum_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser("checksum", help="(not built yet)")
    parser.set_defaults(func=checksum_command)
    return parser


def checksum_command(args: argparse.Namespace) -> int:
    raise UsageError("distshare checksum is not built yet")
