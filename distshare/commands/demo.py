"""`distshare demo`: the seed's questions, answered by experiment.

    distshare demo                    # all seven experiments (about 35 s on 2 idle cores)
    distshare demo context --json     # one experiment, one JSON object
    distshare demo all --out runs/demo --seed 1

Each experiment turns one answer of the seed Q&A into a measurement with a verdict
(`holds` / `fails`) and a control that breaks the mechanism, whose verdict must flip to
`fails`. The run directory gets a PNG per experiment, `report.md` (the seed's own questions
as headings, figures inline) and `result.json`, written last. Exit code 1 when a claim does
not hold or a control does not flip.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

from tqdm import tqdm

from distshare.commands.common import add_command, versions
from distshare.demos import DEMOS, Finding, run_demo
from distshare.errors import UsageError
from distshare.report import markdown_table, run_dir, write_atomic, write_result


def demo_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers, "demo", "the seed's questions answered by experiment, each with a control", __doc__, demo_command
    )
    parser.add_argument(
        "name", nargs="?", default="all", metavar="NAME", help=f"all (default) or one of: {', '.join(DEMOS)}"
    )
    parser.add_argument("--out", metavar="DIR", help="run directory (default runs/demo-<time>)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every experiment (default 0)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    return parser


def demo_command(args: argparse.Namespace) -> int:
    if args.name != "all" and args.name not in DEMOS:
        raise UsageError(f"unknown demo {args.name!r}; expected all or one of: {', '.join(DEMOS)}")
    names = list(DEMOS) if args.name == "all" else [args.name]
    out = run_dir(args.out, "demo")
    start = time.perf_counter()
    findings: list[Finding] = []
    seconds: dict[str, float] = {}
    bar = tqdm(names, desc="demo", unit="experiment", disable=args.no_progress, leave=False, file=sys.stderr)
    for name in bar:
        bar.set_postfix_str(name)
        t = time.perf_counter()
        findings.append(run_demo(name, out, args.seed))
        seconds[name] = round(time.perf_counter() - t, 3)
    ok = all(f.ok for f in findings)
    result: dict[str, Any] = {
        "ok": ok,
        "command": "demo",
        "seed": args.seed,
        "findings": [f.to_dict() for f in findings],
        "seconds": round(time.perf_counter() - start, 3),
        "seconds_by_demo": seconds,
        "versions": versions(),
        "run_dir": str(out),
    }
    write_atomic(out / "report.md", report(result))
    write_result(out, result)
    if args.json:
        print(json.dumps(result))
    else:
        width = max(len(f.name) for f in findings)
        print(f"  {'demo':<{width}}  {'claim':<6}  {'control':<7}  key numbers")
        for f in findings:
            print(f"  {f.name:<{width}}  {f.verdict:<6}  {f.control_verdict:<7}  {f.headline}")
        print(f"  results in {out}/")
        failed = [f.name for f in findings if not f.ok]
        summary = (
            f"{len(findings)} claim(s) hold and every control flips"
            if ok
            else f"not confirmed: {', '.join(failed)} (a claim that fails, or a control that does not flip)"
        )
        print(f"distshare demo: {'OK' if ok else 'FAILED'} {summary}")
    sys.stdout.flush()
    return 0 if ok else 1


def report(result: dict[str, Any]) -> str:
    """report.md from result.json's content: the seed's questions as headings, figures inline."""
    lines = [
        "# The seed's questions, answered by experiment",
        "",
        f"`distshare demo`, seed {result['seed']}, {result['seconds']:.0f} s. Every claim is measured, and every "
        "claim has a control that breaks its mechanism: the claim should hold and the control should fail.",
        "",
        markdown_table(
            [(f["name"], f["verdict"], f["control_verdict"], f["headline"]) for f in result["findings"]],
            ("demo", "claim", "control", "key numbers"),
        ),
        "",
    ]
    for f in result["findings"]:
        lines += [
            f"## {f['question']}",
            "",
            f"*Demo `{f['name']}`.* **Claim:** {f['claim']} — **{f['verdict']}**.",
            "",
            *[f"**Control ({c['name']}):** {c['what']} — **{c['verdict']}**." for c in f["controls"]],
            "",
            *([f"**True by construction:** {f['by_construction']}", ""] if f.get("by_construction") else []),
            f"Key numbers: {f['headline']}.",
            "",
        ]
        if f["figure"]:
            lines += [f"![{f['name']}]({f['figure']})", ""]
        lines += [
            "<details><summary>all numbers</summary>",
            "",
            "```json",
            json.dumps(f["numbers"], indent=2),
            "```",
            "",
            "</details>",
            "",
        ]
    lines += [f"Verdict: **{'OK' if result['ok'] else 'FAILED'}**", ""]
    return "\n".join(lines)
