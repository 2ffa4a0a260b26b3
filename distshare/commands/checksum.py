"""`distshare checksum`: the fingerprints of a checkpoint, each checked against its manifest.

    distshare checksum runs/ckpt/step-100                 # per-tensor digests, combined digest
    distshare checksum ckpt/rank0 ckpt/rank1 --json        # several, as one JSON object
    distshare checksum weights.safetensors                 # a bare file: digests only

A checkpoint directory (written by `distshare.checkpoint.save_checkpoint`) is read tensor by
tensor and every digest is recomputed from the stored bytes: a flipped bit, a truncated file
or a hand-edited manifest is named by tensor. Exit codes: 0 every tensor verified, 1 a
tensor is damaged, 2 a path is missing or not a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys

from distshare.commands.common import add_command
from distshare.integrity.checkpoint import CheckpointCheck, verify_checkpoint


def checksum_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "checksum",
        "per-tensor and combined digests of checkpoints, verified against their manifests",
        __doc__,
        checksum_command,
    )
    parser.add_argument("paths", nargs="+", metavar="PATH", help="checkpoint directory or .safetensors file")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def checksum_command(args: argparse.Namespace) -> int:
    # Every path is opened before anything is printed: a missing one is a usage error (exit 2)
    # that must not arrive after half a report.
    checks = [verify_checkpoint(p) for p in args.paths]
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checkpoints": [c.to_dict() for c in checks]}))
    else:
        for c in checks:
            _print_table(c)
        tensors = sum(len(c.info) for c in checks)
        if ok:
            verdict = f"OK {len(checks)} checkpoint(s), {tensors} tensors verified"
        else:
            bad = sum(len(c.problems) for c in checks)
            verdict = (
                f"FAILED {bad} damaged tensor(s) in {sum(not c.ok for c in checks)} of {len(checks)} checkpoint(s)"
            )
        print(f"distshare checksum: {verdict}")
    sys.stdout.flush()
    return 0 if ok else 1


def _print_table(c: CheckpointCheck) -> None:
    step = f"step {c.step}, " if c.step is not None else ""
    print(f"{c.path}  ({step}{len(c.info)} tensors)")
    names = sorted(set(c.info) | set(c.problems))
    width = max((len(n) for n in names), default=0)
    for name in names:
        info = c.info.get(name, {})
        shape = "[" + ", ".join(str(s) for s in info.get("shape") or []) + "]" if info else ""
        digest = c.digests.get(name, "-")
        status = "DAMAGED " + c.problems[name] if name in c.problems else ("ok" if c.recorded else "")
        print(f"  {name:<{width}}  {info.get('dtype', ''):<8} {shape:<12} {digest}  {status}".rstrip())
    print(f"  {'combined':<{width}}  {'':<8} {'':<12} {c.combined}")
