"""What the run-making subcommands share: the same flags, the same config loading, the
same pre-flight checks, the same ending (a table, result files, one verdict line)."""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from distshare.config import ENGINES, PARALLEL, SYNC_MODES, RunConfig, load_config, shipped_configs, to_dict
from distshare.data import build_dataset
from distshare.data.accounting import Accounting, account
from distshare.data.plan import GlobalBatchPlan
from distshare.data.types import DataInfo
from distshare.distributed import launchers, watchdog
from distshare.engines.torchrun import command_flags, relaunch
from distshare.errors import DistshareError, RankError, RankSilent, UsageError
from distshare.integrity.diagnosis import BEFORE_FIRST_STEP
from distshare.integrity.replicas import ReplicaReport
from distshare.report import mark_failed, write_atomic, write_result
from distshare.training import TrainResult


class RunInterrupted(DistshareError):
    """Ctrl-C during a run: said in one line, with the command that continues it."""

    exit_code = 130  # 128 + SIGINT, as a shell reports an interrupted program


def failure_reason(exc: BaseException) -> str:
    """Why a run ended without a result, in one line starting with its kind: hang, interrupted, error."""
    exc = watchdog.explain(exc)  # a timed-out collective: which rank went silent?
    if isinstance(exc, RunInterrupted):
        return str(exc)
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted (Ctrl-C)"
    if isinstance(exc, RankSilent):
        return f"hang: {exc}"
    if isinstance(exc, UsageError) or (isinstance(exc, RankError) and exc.exit_code == UsageError.exit_code):
        return f"bad input: {exc}"  # also a user's mistake found inside a rank
    if isinstance(exc, RankError):
        return f"error: {exc}"
    return f"error: {type(exc).__name__}: {exc}".splitlines()[0]


def record_failure(out_dir: Path | None, exc: BaseException) -> None:
    """Write why the run failed into its `INCOMPLETE` marker (rank 0's run directory)."""
    if out_dir is None:
        return
    # The directory went away or filled up: the failure itself is what must be reported.
    with contextlib.suppress(OSError):
        mark_failed(out_dir, failure_reason(exc))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"expected 0 or a positive integer, got {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {text!r}") from None
    if not 0 < value < math.inf:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(f"expected a positive number, got {value}")
    return value


def add_command(
    subparsers: argparse._SubParsersAction,
    name: str,
    summary: str,
    doc: str | None,
    func: Callable[[argparse.Namespace], int],
) -> argparse.ArgumentParser:
    """A subcommand: its one-line help, its module docstring as the description, its handler."""
    parser = subparsers.add_parser(
        name, help=summary, description=doc, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    # The parser travels with the arguments: `--engine torchrun` rebuilds the command line from it.
    parser.set_defaults(func=func, command_parser=parser)
    return parser


def add_config_arguments(parser: argparse.ArgumentParser) -> None:
    """--config and --set: where a run's config comes from."""
    parser.add_argument(
        "--config",
        metavar="PATH|NAME",
        help="YAML run config: a path, or a config shipped with distshare by name "
        f"({', '.join(shipped_configs())}); a file of that name here wins",
    )
    parser.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        dest="overrides",
        help="override a config field, dotted (repeatable): --set plan.accum_steps=4",
    )


def add_run_arguments(parser: argparse.ArgumentParser, default_world: str, parity: bool = False) -> None:
    """Flags of every command that trains: config, overrides, ranks, output."""
    add_config_arguments(parser)
    parser.add_argument(
        "--nproc",
        type=positive_int,
        help=f"ranks: spawned gloo processes, or torchrun's with --engine torchrun (default: {default_world}). "
        "Under a launcher use its own flag instead (torchrun --nproc_per_node N, accelerate launch "
        "--num_processes N): torchrun refuses --nproc anywhere on its command line, as ambiguous",
    )
    parser.add_argument("--steps", type=positive_int, help="optimizer steps (overrides config 'steps')")
    parser.add_argument("--seed", type=int, help="parameter init seed (overrides config 'seed')")
    parser.add_argument(
        "--check-every",
        type=non_negative_int,
        metavar="N",
        help="compare replica fingerprints every N steps, 0 = only at the end (overrides config 'check_every')",
    )
    parser.add_argument(
        "--engine",
        choices=ENGINES + ("torchrun",) + (("all",) if parity else ()),
        help="who starts the ranks (default auto: the launcher's, else torch for N > 1, else local); "
        "torchrun: this command under torchrun --standalone --nproc_per_node N"
        + ("; all: every engine, fingerprints side by side" if parity else ""),
    )
    parser.add_argument(
        "--ray-address",
        metavar="ADDRESS",
        help="--engine ray: join this Ray cluster (default $RAY_ADDRESS, else start a local Ray)",
    )
    parser.add_argument(
        "--sync", choices=SYNC_MODES, help="gradient sync mode (exact: bitwise the same for every split)"
    )
    parser.add_argument(
        "--parallel",
        choices=PARALLEL,
        help="data-parallel layout: ddp (replicas, default) | fsdp (FSDP2 shards over all ranks) | "
        "hsdp (shards within groups, the groups replicated; --set hsdp_replicas=R, default 2) "
        "(overrides config 'parallel')",
    )
    parser.add_argument(
        "--timeout",
        type=positive_float,
        metavar="SECONDS",
        help="bound on every collective; a rank silent for longer is named (overrides config 'timeout_s')",
    )
    parser.add_argument("--out", metavar="DIR", help="run directory (default runs/<command>-<time>)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def config_from_args(args: argparse.Namespace, base: list[str] | None = None) -> RunConfig:
    """The run's config: defaults or --config, then `base`, --set, the flags, and the world
    size (--nproc or the launcher's), so validation speaks of the W that will really run."""
    overrides = list(base or []) + list(args.overrides)
    world_size = world_size_for(args)
    if world_size is not None:
        overrides.append(f"plan.world_size={world_size}")
    for flag, key in (
        ("steps", "steps"),
        ("seed", "seed"),
        ("sync", "sync"),
        ("parallel", "parallel"),
        ("timeout", "timeout_s"),
        ("check_every", "check_every"),
        ("engine", "engine"),
    ):
        if flag == "engine" and getattr(args, flag, None) == "all":
            continue  # verify's parity run: each engine is set per run
        value = getattr(args, flag, None)
        if flag == "engine" and value == "torchrun":
            value = "torch"  # torchrun starts the processes (run_under_torchrun); torch runs in each
        if value is not None:
            overrides.append(f"{key}={value}")
    return load_config(args.config, overrides)


def run_under_torchrun(args: argparse.Namespace, cfg: RunConfig) -> int:
    """`--engine torchrun`: this command again under a real torchrun with `--nproc` ranks
    (checked here first, so a mistake is one line, not one per rank); its exit code."""
    if getattr(args, "max_failures", None) is not None:
        raise UsageError("--max-failures restarts Ray Train workers; under torchrun use torchrun --max-restarts N")
    warn_oversubscribed(cfg.plan.world_size)
    flags = command_flags(args.command_parser, args, leave_out=("nproc", "engine"))
    return relaunch(cfg.plan.world_size, [args.command, *flags, "--engine=torch"])


def warn_if_oversubscribed(engine: str, cfg: RunConfig, args: argparse.Namespace) -> None:
    """`warn_oversubscribed` where this machine starts the ranks: spawned torch ranks, or
    Ray workers on a local Ray (not a launcher's ranks, not a cluster's)."""
    if launchers.launched():
        return
    if engine == "torch" or (engine == "ray" and not launchers.ray_address(getattr(args, "ray_address", None))):
        warn_oversubscribed(cfg.plan.world_size)


def under_torchrun(args: argparse.Namespace) -> bool:
    """`--engine torchrun` given to a plain command: start torchrun (inside one, run as torch)."""
    return getattr(args, "engine", None) == "torchrun" and not launchers.launched()


def output_file(text: str, flag: str) -> Path:
    """A file the command writes at its end (--save-params), checked at its start: a path
    that cannot be written would otherwise fail after all the work, with a traceback."""
    if "\x00" in text:  # no such path can exist (and pathlib answers "does not exist")
        raise UsageError(f"{flag} {text!r}: not a usable path (it holds a NUL character)")
    path = Path(text)
    if not text or path.is_dir():
        raise UsageError(f"{flag} {text!r}: expected a file name, got a directory")
    folder = path.parent
    while not folder.exists():  # the nearest existing folder: the rest will be created
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{flag} {path}: {folder} is not a directory")
    if not os.access(folder, os.W_OK):
        raise UsageError(f"{flag} {path}: directory {folder} is not writable")
    return path


def world_size_for(args: argparse.Namespace) -> int | None:
    """The launcher's world size when launched, else --nproc if given, else None (the config's);
    a --nproc that disagrees with the launcher is refused in one line."""
    return launchers.launched_world_size(args.nproc, args.command)


def preflight(cfg: RunConfig) -> tuple[GlobalBatchPlan, DataInfo]:
    """Build the data set and plan once here, so bad input fails in one line before any
    rank starts (a data error inside N ranks would otherwise arrive N times)."""
    dataset, info = build_dataset(cfg.data)
    plan = GlobalBatchPlan(len(dataset), cfg.plan.resolve(), cfg.plan.seed, cfg.plan.drop_last)
    if plan.dropped_per_epoch and cfg.steps > plan.steps_per_epoch and is_main_process():
        print(
            f"distshare: each epoch drops its last {plan.dropped_per_epoch} sample(s), an incomplete global "
            "batch (plan.drop_last=true); set plan.drop_last=false to split it over the ranks instead",
            file=sys.stderr,
        )
    return plan, info


def is_main_process() -> bool:
    return launchers.is_launched_main()


def available_cores() -> int:
    """The CPU cores this process may run on: its affinity mask where the OS keeps one (a
    container's or `taskset`'s share), else every core of the machine."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def warn_oversubscribed(ranks: int, flag: str = "--nproc") -> None:
    """One line on stderr when more rank processes start here than there are cores: they
    take turns, so a run is far slower; its results are the same."""
    cores = available_cores()
    if ranks > cores and is_main_process():
        print(
            f"distshare: warning: {flag} {ranks}: {ranks} rank processes on {cores} CPU core(s) take turns, "
            "so each step is much slower (the results are the same)",
            file=sys.stderr,
            flush=True,
        )


def exact_line(underflows: int) -> str:
    """What exact mode's integer sum lost: contributions below its resolution, rounded to 0."""
    if not underflows:
        return "every per-sample contribution represented (no underflow)"
    return (
        f"{underflows} per-sample contribution(s) 48 or more bits (fewer beyond 16,384 samples a step) "
        "below their element's largest, "
        "truncated to 0 (identically on every split)"
    )


def training_summary(cfg: RunConfig, results: list[TrainResult], plan: GlobalBatchPlan) -> dict[str, Any]:
    """The facts every training command reports, from every rank's account."""
    main = results[0]
    accounting: Accounting = account(plan, [r.samples_by_step for r in results])
    fingerprints = [r.final_fingerprint for r in results]
    in_sync = main.replicas_in_sync and len(set(fingerprints)) == 1
    diverged = None if in_sync else ReplicaReport.from_dict(main.first_divergence or main.final_report)
    return {
        "world_size": main.world_size,
        "steps": main.steps,
        "engine": main.engine,
        "launcher": main.launcher,
        "device": main.device,
        "plan": to_dict(cfg, main.world_size)["plan"],
        "sync": main.sync if main.world_size > 1 or main.sync == "exact" else "none (single process)",
        "dtype": cfg.model.dtype,
        "replicas_in_sync": in_sync,
        **({"exact_underflows": main.exact_underflows} if main.exact_underflows is not None else {}),
        "replica_checks": main.checks,
        # How the checks ran: full, or rolling (slices, batch, the tested bound in steps, gathers).
        **({"replica_check": main.extras["replica_check"]} if "replica_check" in main.extras else {}),
        "replicas_summary": _in_sync_summary(main) if diverged is None else diverged.summary(),
        # Why they differ (the likely cause, its evidence and fix), and where, apart.
        "replicas_diagnosis": diverged.diagnosis.to_dict() if diverged and diverged.diagnosis else None,
        "replicas_where": None if diverged is None else _where(diverged),
        "first_divergence": main.first_divergence,
        "final_fingerprint": main.final_fingerprint,
        "final_fingerprints_by_rank": fingerprints,
        "accounting": {**accounting.to_dict(), "summary": accounting.summary()},
        "dropped_per_epoch": main.dropped_per_epoch,
        "losses": main.losses,
        "final_loss": main.losses[-1] if main.losses else None,
        "seconds": round(main.seconds, 3),
    }


def _in_sync_summary(main: TrainResult) -> str:
    checks = f"{main.checks} checks over {main.world_size} rank(s) and one before the first step"
    final = ReplicaReport.from_dict(main.final_report) if main.final_report else None
    if final is None or final.identical:
        return f"{checks}, all bit-identical"
    # In sync, yet something differs: what check_buffers=separate compares apart.
    why = f" ({final.diagnosis.cause.value})" if final.diagnosis else ""
    return (
        f"{checks}: parameters and optimizer state bit-identical; "
        f"{len(final.differing)} buffer(s) differ at the last check{why}, checked apart (check_buffers=separate)"
    )


def _where(report: ReplicaReport) -> str:
    at = BEFORE_FIRST_STEP if report.step is None else f"at step {report.step}"
    return f"diverged {at}: {report.locations()}"


def versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for pkg in ("distshare", "torch", "accelerate", "ray", "datasets", "numpy", "xxhash", "safetensors"):
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def register(
    subparsers: argparse._SubParsersAction,
    name: str,
    summary: str,
    doc: str | None,
    func: Callable[[argparse.Namespace], int],
    default_world: str,
    parity: bool = False,
) -> argparse.ArgumentParser:
    """Add a training subcommand: its help, the shared run flags, and its handler."""
    parser = add_command(subparsers, name, summary, doc, func)
    add_run_arguments(parser, default_world, parity)
    return parser


def finish(
    command: str,
    cfg: RunConfig,
    result: dict[str, Any],
    table: list[tuple[str, str, str]],
    verdict: str,
    as_json: bool,
    out_dir: Path,
    report: Callable[[dict[str, Any], list[tuple[str, str, str]]], str],
) -> int:
    """Write report.md, then result.json (last: its presence means complete), then print the
    table (or the JSON object) and the one verdict line; return the exit code."""
    result = {**result, "config": to_dict(cfg), "versions": versions(), "run_dir": str(out_dir)}
    write_atomic(out_dir / "report.md", report(result, table))
    write_result(out_dir, result)
    ok = bool(result["ok"])
    if as_json:
        print(json.dumps(result))
    else:
        width = max(len(r[0]) for r in table) if table else 0
        for name, status, detail in table:
            print(f"  {name:<{width}}  {status:<6}  {detail}")
        print(f"  results in {out_dir}/")
        print(f"distshare {command}: {'OK' if ok else 'FAILED'} {verdict}")
    sys.stdout.flush()
    return 0 if ok else 1
