"""`distshare compare`: two checkpoints, tensor by tensor, and where they differ.

    distshare compare ckpt/rank0/step-000010 ckpt/rank1/step-000010   # two ranks' replicas (train --save-every-rank)
    distshare compare run-a/step-100 run-b/step-100 --json
    distshare compare ckpt/step-100 gpt2-finetuned/  # a distshare checkpoint against an HF folder

Either side may be a distshare checkpoint, a `.safetensors` file or a folder of them (an HF
`save_pretrained` folder, sharded or not). Tensors are paired by name; a distshare
checkpoint's `model/x` is a safetensors file's `x` (both are state_dict keys), and its
optimizer and other state, which a weights file cannot hold, are listed as not compared. A
tied alias one side stores once and the other not at all (HF drops GPT-2's
`lm_head.weight`) is listed as tied, not as missing.

Both are verified against their manifests first (a damaged tensor is named, exit 1). Then
every tensor's digest is compared; for each differing tensor, B is compared with A element by
element: how many elements differ, the first differing index, the values there, the largest
absolute difference and the largest ULP distance. When they differ, a diagnosis reads which
kinds of tensors differ and how (parameters only, with the optimizer's moments equal: they
started apart; a few elements: corruption; ...), as for replicas (`distshare.integrity.diagnosis`;
two checkpoints are two replicas without a majority, and without gradients). Exit codes: 0
identical, 1 different or damaged, 2 a path is missing or not a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from distshare.commands.common import add_command
from distshare.integrity.checkpoint import CheckpointComparison, compare_checkpoints
from distshare.integrity.diagnosis import Diagnosis, diagnose
from distshare.numerics.diff import describe


def compare_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers, "compare", "compare two checkpoints tensor by tensor, down to elements", __doc__, compare_command
    )
    parser.add_argument("a", metavar="A", help="checkpoint, .safetensors file or folder of them (the reference)")
    parser.add_argument("b", metavar="B", help="checkpoint, .safetensors file or folder of them")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def compare_command(args: argparse.Namespace) -> int:
    cmp = compare_checkpoints(args.a, args.b)
    damaged = {f"A {n}": why for n, why in cmp.a.problems.items()} | {
        f"B {n}": why for n, why in cmp.b.problems.items()
    }
    total = cmp.compared + len(cmp.only_in_a) + len(cmp.only_in_b)
    diagnosis = _diagnosis(cmp)
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
                    "tied": cmp.tied,
                    "not_compared": cmp.not_compared,
                    "damaged": damaged,
                    "diagnosis": diagnosis.to_dict() if diagnosis else None,
                }
            )
        )
        sys.stdout.flush()
        return 0 if cmp.same else 1
    rows = [(n, "DAMAGED", why) for n, why in sorted(damaged.items())]
    rows += [(n, "differ", describe(d, ("A", "B"))) for n, d in cmp.differing.items()]
    rows += [(n, "only A", "missing in B") for n in cmp.only_in_a]
    rows += [(n, "only B", "missing in A") for n in cmp.only_in_b]
    rows += [(n, "tied", f"stored once, as {target}, on the side that has it") for n, target in cmp.tied.items()]
    width = max((len(r[0]) for r in rows), default=0)
    for name, status, detail in rows:
        print(f"  {name:<{width}}  {status:<7}  {detail}")
    if diagnosis is not None:
        print(f"  why: {diagnosis.describe()}")
    print(f"  A {cmp.a.combined}  {args.a}")
    print(f"  B {cmp.b.combined}  {args.b}")
    if cmp.not_compared:
        print(f"  not compared: {len(cmp.not_compared)} optimizer/state tensors a safetensors weights file cannot hold")
    if cmp.same:
        print(f"distshare compare: OK {cmp.compared} tensors identical")
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


def _diagnosis(cmp: CheckpointComparison) -> Diagnosis | None:
    """Why two checkpoints differ, when both verified and hold the same tensors (else: the damage speaks)."""
    if not cmp.differing or not (cmp.a.ok and cmp.b.ok) or cmp.only_in_a or cmp.only_in_b:
        return None
    # Two weights files name tensors by bare state_dict keys; the diagnosis reads kinds from
    # checkpoint names, where those are `model/<key>`.
    prefix = "" if "distshare" in (cmp.a.kind, cmp.b.kind) else "model/"
    differing = {prefix + name: [0, 1] for name in cmp.differing}
    majority = dict.fromkeys(differing, False)
    elements = {prefix + name: [d] for name, d in cmp.differing.items()}
    info = {prefix + name: i for name, i in cmp.info.items()}
    diagnosis = diagnose(differing, majority, elements, info, world_size=2)
    # A is compared as rank 0, B as rank 1: say A and B.
    if diagnosis.culprit is not None:
        side = "AB"[diagnosis.culprit]
        diagnosis.evidence["culprit_evidence"] = f"{side}: " + diagnosis.evidence.get("culprit_evidence", "")
        diagnosis.culprit = None
    else:
        diagnosis.evidence["culprit_evidence"] = "two checkpoints: no majority to say which one is off"
    return diagnosis
