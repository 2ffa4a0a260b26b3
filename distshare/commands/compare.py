"""`distshare compare`: two checkpoints, tensor by tensor, and where they differ.

    distshare compare ckpt/rank0 ckpt/rank1          # two ranks' checkpoints of one step
    distshare compare run-a/step-100 run-b/step-100 --json

Both are verified against their manifests first (a damaged tensor is named, exit 1). Then
every tensor's digest is compared; for each differing tensor, B is compared with A element by
element: how many elements differ, the first differing index, the values there, the largest
absolute difference and the largest ULP distance. Exit codes: 0 identical, 1 different or
damaged, 2 a path is missing or not a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from distshare.commands.common import add_command
from distshare.integrity.checkpoint import compare_checkpoints
from distshare.numerics.diff import describe


def compare_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers, "compare", "compare two checkpoints tensor by tensor, down to elements", __doc__, compare_command
    )
    parser.add_argument("a", metavar="A", help="checkpoint directory or .safetensors file (the reference)")
    parser.add_argument("b", metavar="B", help="checkpoint directory or .safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def compare_command(args: argparse.Namespace) -> int:
    cmp = compare_checkpoints(args.a, args.b)
    damaged = {f"A {n}": why for n, why in cmp.a.problems.items()} | {
        f"B {n}": why for n, why in cmp.b.problems.items()
    }
    total = len(set(cmp.a.info) | set(cmp.b.info))
    if args.json:
        print(
            json.dumps(
                {
                    "ok": cmp.same,
                    "a": args.a,
                    "b": args.b,
                    "combined": {"a": cmp.a.combined, "b": cmp.b.combined},
                    "tensors": total,
                    "differing": {
                        n: {**d.__dict__, "description": describe(d, ("A", "B"))} for n, d in cmp.differing.items()
                    },
                    "only_in_a": cmp.only_in_a,
                    "only_in_b": cmp.only_in_b,
                    "damaged": damaged,
                }
            )
        )
        sys.stdout.flush()
        return 0 if cmp.same else 1
    rows = [(n, "DAMAGED", why) for n, why in sorted(damaged.items())]
    rows += [(n, "differ", describe(d, ("A", "B"))) for n, d in cmp.differing.items()]
    rows += [(n, "only A", "missing in B") for n in cmp.only_in_a]
    rows += [(n, "only B", "missing in A") for n in cmp.only_in_b]
    width = max((len(r[0]) for r in rows), default=0)
    for name, status, detail in rows:
        print(f"  {name:<{width}}  {status:<7}  {detail}")
    print(f"  A {cmp.a.combined}  {args.a}")
    print(f"  B {cmp.b.combined}  {args.b}")
    if cmp.same:
        print(f"distshare compare: OK {total} tensors identical")
    else:
        parts = []
        if damaged:
            parts.append(f"{len(damaged)} damaged")
        if cmp.differing:
            parts.append(f"{len(cmp.differing)} of {total} tensors differ")
        if cmp.only_in_a or cmp.only_in_b:
            parts.append(f"{len(cmp.only_in_a) + len(cmp.only_in_b)} in one only")
        print(f"distshare compare: FAILED {', '.join(parts)}")
    sys.stdout.flush()
    return 0 if cmp.same else 1
