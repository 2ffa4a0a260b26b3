"""`--engine torchrun`: the same command again, its ranks started by a real torchrun.

    distshare verify --engine torchrun --nproc 2
      = python -m torch.distributed.run --standalone --nproc_per_node 2 -m distshare verify --engine=torch

torchrun starts the processes and the torch engine runs in each of them, exactly as when a
user types the torchrun line (which is also how `verify --engine all` runs its torchrun row).
The rendezvous is `--standalone`: a free port on localhost, found by torchrun.

The command line is rebuilt from the parsed flags, not copied from sys.argv: `--nproc` must
not reach torchrun, whose own parser reads every flag after `-m` too and refuses `--nproc` as
an abbreviation of both `--nproc-per-node` and `--nproc_per_node` (the number of ranks is
torchrun's `--nproc_per_node`; the workers read it as WORLD_SIZE).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

# How long a worker group may take to stop after Ctrl-C before it is killed.
STOP_GRACE_S = 30.0


def torchrun_command(nproc: int, args: list[str]) -> list[str]:
    """`torchrun --standalone --nproc_per_node N -m distshare ARGS`, with this interpreter
    (the `torchrun` script may be missing or belong to another environment)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc)] + [
        "-m",
        "distshare",
        *args,
    ]


def command_flags(parser: argparse.ArgumentParser, args: argparse.Namespace, leave_out: tuple[str, ...]) -> list[str]:
    """The flags that reproduce `args` for `parser`, as `--flag=value` (a value may start
    with a dash); flags at their default and the dests in `leave_out` are left out."""
    flags: list[str] = []
    for action in parser._actions:  # argparse has no public list of a parser's actions
        if not action.option_strings or action.dest in leave_out or not hasattr(args, action.dest):
            continue
        option = max(action.option_strings, key=len)
        value = getattr(args, action.dest)
        if value is None or value == action.default:
            continue
        if action.nargs == 0:  # store_true: the flag alone
            flags.append(option)
        elif isinstance(value, list):  # append (--set): once per value
            flags.extend(f"{option}={item}" for item in value)
        else:
            flags.append(f"{option}={value}")
    return flags


def relaunch(nproc: int, args: list[str]) -> int:
    """Run `distshare ARGS` under torchrun with `nproc` ranks; its exit code.

    Its output is this command's output (rank 0 prints the table and the verdict). Not
    bounded in time: a training run takes what it takes, and every collective inside is
    bounded by the run's `timeout_s`, so a silent rank ends the run.
    """
    # torchrun sets OMP_NUM_THREADS=1 in each worker anyway; given here, it skips its banner saying so.
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(torchrun_command(nproc, args), env=env)
    try:
        return proc.wait()
    except KeyboardInterrupt:
        # Ctrl-C reached torchrun too (one process group): let it stop its workers.
        try:
            proc.wait(timeout=STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=STOP_GRACE_S)
        raise
