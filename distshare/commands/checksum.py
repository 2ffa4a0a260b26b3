"""`distshare checksum`: the fingerprints of a checkpoint, each checked against its manifest.

    distshare checksum runs/ckpt/step-100                 # per-tensor digests, combined digest
    distshare checksum ckpt/rank0/step-000010 ckpt/rank1/step-000010 --json   # several, as one JSON object
    distshare checksum weights.safetensors                 # a bare file: digests only
    distshare checksum gpt2-finetuned/                     # an HF save_pretrained folder, sharded or not
    distshare checksum ckpt/fsdp-step-100                  # a sharded (FSDP2 / HSDP) checkpoint

A checkpoint that `distshare train` wrote, `step-000030`, is the state after 30 steps (steps
0..29): its header says "after 30 steps (0..29)", the same count as its name. A checkpoint a
caller saved with `save_checkpoint(..., step=4)` and no plan position says "step 4", as given.

A checkpoint directory (written by `distshare.checkpoint.save_checkpoint`) is read tensor by
tensor and every digest is recomputed from the stored bytes: a flipped bit, a truncated file
or a hand-edited manifest is named by tensor. A tied tensor (GPT-2's `lm_head.weight`) is
stored once; its row says which tensor it is stored as. The `state digest` line is what
`distshare.state_digest(model, optimizer)` gives for the saved state.

A sharded checkpoint (`save_sharded_checkpoint`: every rank's shard files and a manifest of
logical digests) is checked file by file against the manifest (a changed byte is named by
file and by the tensor whose chunk holds it; a missing shard file by the tensors it held a
piece of), then every tensor is reassembled from the shards in this process and its logical
digest (lsh128) recomputed and compared: what `state_digest(model, optimizer)` gave on the
ranks that saved it, whatever layout loads it. `--bytes-only` skips the reassembly.

A bare `.safetensors` file or a folder of them (an HF `save_pretrained` folder) has no
manifest: its digests are computed, not verified (compare it with another copy to find a
changed value), and its structure is checked: every tensor inside its file, and a sharded
folder's index against its shards (a missing shard, a tensor missing from its shard, a
truncated shard: each named). Exit codes: 0 every tensor verified (or read), 1 a tensor is
damaged, 2 a path is missing or not a checkpoint.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from distshare.commands.common import add_command
from distshare.integrity.checkpoint import MANIFEST, CheckpointCheck, verify_checkpoint


def checksum_command_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = add_command(
        subparsers,
        "checksum",
        "per-tensor and combined digests of checkpoints, verified against their manifests",
        __doc__,
        checksum_command,
    )
    parser.add_argument(
        "paths", nargs="+", metavar="PATH", help="checkpoint directory, .safetensors file or folder of them"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    parser.add_argument(
        "--bytes-only",
        action="store_true",
        help="sharded checkpoints: check the files' bytes, do not recompute logical digests from the shards",
    )
    return parser


def checksum_command(args: argparse.Namespace) -> int:
    # Every path is opened before anything is printed: a missing one is a usage error (exit 2)
    # that must not arrive after half a report.
    checks = [verify_checkpoint(p, logical=not args.bytes_only) for p in args.paths]
    ok = all(c.ok for c in checks)
    if args.json:
        print(json.dumps({"ok": ok, "checkpoints": [{**c.to_dict(), "steps_done": steps_done(c)} for c in checks]}))
    else:
        for c in checks:
            _print_table(c)
        tensors = sum(len(c.info) for c in checks)
        if ok:
            unrecorded = sum(len(c.info) for c in checks if not c.kind.startswith("distshare"))
            parts = [f"{tensors - unrecorded} tensors verified"] if tensors > unrecorded or not unrecorded else []
            if unrecorded:
                read = "read from safetensors (no manifest: structure checked, digests computed)"
                parts.append(f"{unrecorded} tensors {read}")
            verdict = f"OK {len(checks)} checkpoint(s), {', '.join(parts)}"
        else:
            bad = sum(len(c.problems) for c in checks)
            verdict = (
                f"FAILED {bad} damaged tensor(s) in {sum(not c.ok for c in checks)} of {len(checks)} checkpoint(s)"
            )
        print(f"distshare checksum: {verdict}")
    sys.stdout.flush()
    return 0 if ok else 1


def steps_done(c: CheckpointCheck) -> int | None:
    """How many steps the checkpointed state has taken: its plan position's next step (a
    `distshare train` checkpoint: `step-000030` holds 30), None when it records no position."""
    if c.kind not in ("distshare", "distshare-sharded"):
        return None
    try:
        position = json.loads((Path(c.path) / MANIFEST).read_text()).get("position") or {}
    except (OSError, ValueError):  # a damaged manifest is reported by the verification itself
        return None
    done = position.get("next_step") if isinstance(position, dict) else None
    return done if isinstance(done, int) else None


def _step_text(c: CheckpointCheck) -> str:
    done = steps_done(c)
    if done is not None:  # the manifest's `step` is the index of the last step: 29 after 30 steps
        return f"after {done} steps (0..{done - 1}), " if done else "after 0 steps, "
    return f"step {c.step}, " if c.step is not None else ""


def _print_table(c: CheckpointCheck) -> None:
    step = _step_text(c)
    what = {"distshare": "", "distshare-sharded": ", sharded"}.get(
        c.kind, ", safetensors: no manifest, digests computed only"
    )
    tied = f", {len(c.aliases)} tied (stored once)" if c.aliases else ""
    print(f"{c.path}  ({step}{len(c.info)} tensors{tied}{what})")
    names = sorted(set(c.info) | set(c.problems))
    width = max((len(n) for n in names), default=0)
    for name in names:
        info = c.info.get(name, {})
        shape = "[" + ", ".join(str(s) for s in info["shape"]) + "]" if info.get("shape") is not None else ""
        digest = c.digests.get(name, "-")
        status = "DAMAGED " + c.problems[name] if name in c.problems else ("ok" if c.recorded else "")
        if name in c.aliases and name not in c.problems:
            status += f" (tied: stored once, as {c.aliases[name]})"
        print(f"  {name:<{width}}  {info.get('dtype') or '':<8} {shape:<12} {digest}  {status}".rstrip())
    print(f"  {'combined':<{width}}  {'':<8} {'':<12} {c.combined}")
    if c.state_digest is not None:
        print(f"  {'state digest':<{width}}  {'':<8} {'':<12} {c.state_digest}  (= state_digest(model, optimizer))")
    if c.verified:
        print(f"  verified: {c.verified}")
