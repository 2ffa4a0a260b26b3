"""`distshare`: the command line. Each subcommand lives in `distshare/commands/<name>.py`
with a `<name>_command_parser(subparsers)` and a `<name>_command(args)`; this module only
registers them and turns deliberate errors into exit codes:

    0  every check held
    1  a verification failed (replicas diverged, equivalence broken)
    2  bad input (config, path, argument): one line, never a traceback

A rank that went silent (a collective timed out waiting for it) is one line naming it, exit 1.
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import os
import sys
from collections.abc import Sequence

from distshare.distributed import watchdog
from distshare.errors import DistshareError, RankError, RankSilent, UsageError


class ArgumentMistake(UsageError):
    """A command line argparse refused, told as argparse tells it: `distshare train: error: ...`,
    under the prog of the (sub)command whose flags were wrong, with its own --help."""

    def __init__(self, prog: str, message: str) -> None:
        super().__init__(f"{message} (see {prog} --help)")
        self.prog = prog


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one line (not usage + error) and exit code 2, and a
    near miss is named: `--stpes` -> did you mean --steps?"""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ArgumentMistake(self.prog, message)

    def parse_args(self, args=None, namespace=None):  # type: ignore[no-untyped-def, override]
        # argparse hands a subcommand's unknown flags up to the top-level parser, which
        # reports them as its own; say them under the subcommand that was given them.
        namespace, extras = self.parse_known_args(args, namespace)
        if extras:
            commands: dict[str, argparse.ArgumentParser] = getattr(self, "commands", {})
            parser = commands.get(getattr(namespace, "command", None) or "", self)
            parser.error(f"unrecognized arguments: {' '.join(extras)}{_near_misses(extras, parser, commands)}")
        return namespace

    def _check_value(self, action: argparse.Action, value) -> None:  # type: ignore[no-untyped-def]
        if action.choices is not None and value not in action.choices:
            close = difflib.get_close_matches(str(value), [str(c) for c in action.choices], n=1)
            if close:
                choices = ", ".join(repr(c) for c in action.choices)
                raise argparse.ArgumentError(
                    action, f"invalid choice: {value!r} (choose from {choices}); did you mean {close[0]!r}?"
                )
        super()._check_value(action, value)

    def _get_values(self, action: argparse.Action, arg_strings: list[str]):  # type: ignore[no-untyped-def]
        # `--config=--`: argparse before Python 3.12 drops the "--" and hands the flag an
        # empty list where it promised one string; refuse it like any missing value.
        # (Checked on the strings given, not the value: a `type=` may turn one string into a list.)
        if action.option_strings and action.nargs is None and arg_strings in ([], ["--"]):
            self.error(f"argument {'/'.join(action.option_strings)}: expected one argument")
        value = super()._get_values(action, arg_strings)
        # The same for a positional: `compare -- A --` gives B an empty list, not a path.
        if not action.option_strings and action.nargs is None and isinstance(value, list):
            self.error(f"argument {action.metavar or action.dest}: expected one argument")
        return value


def _options(parser: argparse.ArgumentParser) -> list[str]:
    return [o for action in parser._actions for o in action.option_strings if o.startswith("--")]


def _near_misses(
    extras: list[str], parser: argparse.ArgumentParser, commands: dict[str, argparse.ArgumentParser]
) -> str:
    """The hints after an unknown flag: `; did you mean --steps?` for one close to this
    command's own, or the command that has it (`verify --checkpoint-dir`: a flag of train)."""
    own = {o.lstrip("-"): o for o in _options(parser)}
    hints = []
    for extra in extras:
        flag = extra.split("=", 1)[0]
        if not flag.startswith("--") or flag == "--":
            continue
        owners = [other.prog for other in commands.values() if other is not parser and flag in _options(other)]
        word = flag.lstrip("-")
        # A typo (--stpes), or another tool's spelling that starts with ours (--nproc-per-node, --output-dir).
        close = difflib.get_close_matches(word, list(own), n=1, cutoff=0.75)
        close = close or [name for name in own if len(name) >= 3 and word.startswith(name)][:1]
        if owners:
            hints.append(f"{flag} is a flag of {', '.join(owners)}")
        elif close:
            hints.append(f"did you mean {own[close[0]]}?")
    return "".join(f"; {h}" for h in hints)


# Order is the order of `distshare --help`. Each name is a module distshare/commands/<name>.py.
COMMANDS = ("verify", "train", "equivalence", "demo", "checksum", "compare", "selftest", "env")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="distshare", description="Make data-parallel weight sharing visible and verifiable.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    sub.required = True
    for name in COMMANDS:
        module = importlib.import_module(f"distshare.commands.{name}")
        getattr(module, f"{name}_command_parser")(sub)
    parser.commands = sub.choices  # type: ignore[attr-defined]  # name -> subcommand parser, for its errors
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # distshare never downloads; fail fast if asked to
    try:
        args = build_parser().parse_args(argv)
        return int(args.func(args) or 0)
    except ArgumentMistake as exc:  # argparse's form: the prog whose arguments were wrong
        print(f"{exc.prog}: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except UsageError as exc:
        print(f"distshare: error: {exc}", file=sys.stderr)
        return exc.exit_code
    except RankSilent as exc:
        return _silent(exc)
    except RankError as exc:
        print(f"distshare: error: {exc}", file=sys.stderr)
        if os.environ.get("DISTSHARE_DEBUG"):
            print(exc.traceback_text, file=sys.stderr)
        elif exc.exit_code != UsageError.exit_code:  # a user's mistake found in a rank stays one line
            print("(set DISTSHARE_DEBUG=1 for the rank's traceback)", file=sys.stderr)
        return exc.exit_code
    except DistshareError as exc:
        print(f"distshare: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print("distshare: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:
        # Under torchrun the collectives run in this process: a timed-out one is explained
        # here (which peer went silent?), after the engine closed the process group.
        explained = watchdog.explain(exc)
        if isinstance(explained, RankSilent):
            return _silent(explained)
        raise
    finally:
        watchdog.forget()


def _silent(exc: RankSilent) -> int:
    # Every survivor found the same silent rank; the lowest surviving rank says so, once.
    if exc.reporter:
        print(f"distshare: error: {exc}", file=sys.stderr)
    return exc.exit_code


if __name__ == "__main__":
    sys.exit(main())
