"""`distshare selftest`: every verdict distshare gives, against the faults that must flip it.

    distshare selftest                   # the whole catalogue, a few minutes on 2 cores
    distshare selftest --only verify,grid --json

Each verdict is run clean (it must pass) and with each of its mutants (it must fail): a NaN
gradient, a gradient or learning rate off by 1e-4, a skipped or repeated micro-batch, a
flipped bit, a damaged checkpoint byte, an untrained model, ... The table says, row by row,
verdict x mutant x caught; the mutation score is the share of mutants caught. Exit 0 only
when every clean run passes and every mutant is caught, 1 otherwise.

This is the one command that runs distshare's own fault injection (`distshare.testing`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from distshare.commands.common import add_command, versions
from distshare.errors import UsageError
from distshare.report import markdown_table, run_dir, write_atomic, write_result


def selftest_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers, "selftest", "every verdict against the mutants that must flip it", __doc__, selftest_command
    )
    parser.add_argument("--only", default="", help="comma-separated groups (default: all)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--out", default=None, help="run directory (default runs/selftest-<time>/)")
    parser.add_argument("--no-progress", action="store_true", help="no progress lines")
    return parser


def selftest_command(args: argparse.Namespace) -> int:
    from distshare.testing.selftest import GROUPS, run_selftest, score

    groups = tuple(g.strip() for g in args.only.split(",") if g.strip()) or GROUPS
    unknown = [g for g in groups if g not in GROUPS]
    if unknown:
        raise UsageError(f"unknown group {unknown[0]!r}; expected some of: {', '.join(GROUPS)}")
    out = run_dir(args.out, "selftest")
    start = time.perf_counter()

    def on_group(group: str) -> None:
        if not args.no_progress:
            print(f"selftest: {group} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)

    rows = run_selftest(groups, out / "runs", on_group)
    caught, total = score(rows)
    clean_ok = all(r.caught for r in rows if r.clean)
    ok = clean_ok and caught == total
    result: dict[str, Any] = {
        "ok": ok,
        "command": "selftest",
        "groups": list(groups),
        "mutants": total,
        "caught": caught,
        "mutation_score": caught / total if total else None,
        "clean_runs_pass": clean_ok,
        "rows": [r.to_dict() for r in rows],
        "seconds": round(time.perf_counter() - start, 1),
        "versions": versions(),
        "run_dir": str(out),
    }
    write_atomic(out / "report.md", report(result))
    write_result(out, result)
    if args.json:
        print(json.dumps(result))
    else:
        width = max((len(r.verdict) for r in rows), default=0)
        for r in rows:
            status = ("passes" if r.caught else "FAILS") if r.clean else ("caught" if r.caught else "MISSED")
            print(f"  {r.verdict:<{width}}  {status:<7} {r.mutant}")
        print(f"  results in {out}/")
        missed = [f"{r.verdict} x {r.mutant}" for r in rows if not r.caught]
        line = f"{caught} of {total} mutants caught, clean runs {'pass' if clean_ok else 'DO NOT all pass'}"
        print(f"distshare selftest: {'OK' if ok else 'FAILED'} {line}" + (f"; missed: {missed[0]}" if missed else ""))
    sys.stdout.flush()
    return 0 if ok else 1


def report(result: dict[str, Any]) -> str:
    """report.md: the mutation table, grouped as run."""
    rows = [
        (
            r["verdict"],
            r["mutant"],
            ("passes" if r["caught"] else "FAILS") if r["clean"] else ("caught" if r["caught"] else "MISSED"),
            r["detail"].replace("|", "/")[:160],
        )
        for r in result["rows"]
    ]
    score = result["mutation_score"]
    return "\n".join(
        [
            "# distshare selftest: every verdict against the mutants that must flip it",
            "",
            f"Mutation score: **{result['caught']} / {result['mutants']}**"
            + (f" ({score:.0%})" if score is not None else "")
            + f"; clean runs {'all pass' if result['clean_runs_pass'] else 'DO NOT all pass'}. "
            f"{result['seconds']:.0f} s.",
            "",
            markdown_table(rows, ("verdict", "mutant", "result", "what the verdict said")),
            "",
            f"Verdict: **{'OK' if result['ok'] else 'FAILED'}**",
            "",
        ]
    )
