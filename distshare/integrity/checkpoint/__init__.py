"""Checkpoints that prove their own integrity: safetensors files plus a manifest of fingerprints.

    format.py   file names, the manifest's digests, what a check reports
    write.py    save_checkpoint, save_run_checkpoint: atomic
    read.py     the manifest and the tolerant safetensors reader
    verify.py   verify_checkpoint, load_checkpoint
    folder.py   a bare .safetensors file, or a folder of them (HF save_pretrained, sharded index)
    ties.py     tied tensors: stored once, aliases recorded, ties restored on load
    live.py     the live names (`fingerprint_state`'s) of a checkpoint's tensors
    compare.py  compare_checkpoints
    match.py    match_checkpoint: a live model (and optimizer) against a checkpoint
    sharded.py  save_sharded_checkpoint, load_sharded_checkpoint: FSDP2 / HSDP state, every rank
                its own shards (torch.distributed.checkpoint), logical digests in the manifest;
                loads into another shard count, DDP or one process
    sharded_verify.py  its manifest, the bytes and the logical digests of a sharded checkpoint, on the host

    save_checkpoint("ckpt/step-100", model, optimizer, step=100, cfg=cfg)
    load_checkpoint("ckpt/step-100", model, optimizer)     # refuses any tensor whose digest is off
    verify_checkpoint("ckpt/step-100")                     # -> CheckpointCheck, per tensor
    match_checkpoint(model, "ckpt/step-100", optimizer)    # -> CheckpointMatch, under the live names

A checkpoint is a directory:

- `model.safetensors`: `model.state_dict()` (parameters and buffers), under their names; a
  tied tensor once, its other names recorded in the manifest as aliases (`ties.py`);
- `optimizer.safetensors`: every tensor of `optimizer.state_dict()["state"]`, as
  `state/<param index>/<key>` (Adam moments, step counts), stored losslessly so that a
  resume continues bit for bit;
- `state.safetensors` (optional): any other state a resume needs, under its own names
  (`distshare.integrity.resume` keeps every rank's RNG states and the run's loss history there);
- `manifest.json`: per tensor its file, dtype, shape and fingerprint; the combined digest;
  the optimizer's non-tensor parts (param groups, non-tensor state); the step, the position
  in the global batch plan, the run config and library versions; and a digest of those
  non-tensor parts, so a hand-edited learning rate or step is caught like a changed tensor;
  and (version 2) each tensor's live name and `state_digest`, the digest
  `state_digest(model, optimizer)` gives for the saved state (`live.py`).
"""

from distshare.integrity.checkpoint.compare import CheckpointComparison, compare_checkpoints
from distshare.integrity.checkpoint.format import (
    FORMAT,
    MANIFEST,
    MODEL_FILE,
    OPTIM_FILE,
    SHARDED_FORMAT,
    STATE_FILE,
    VERSION,
    CheckpointCheck,
    CheckpointCorrupted,
)
from distshare.integrity.checkpoint.match import CheckpointMatch, match_checkpoint
from distshare.integrity.checkpoint.read import read_manifest
from distshare.integrity.checkpoint.sharded import load_sharded_checkpoint, save_sharded_checkpoint
from distshare.integrity.checkpoint.sharded_verify import is_sharded_checkpoint, read_sharded_manifest
from distshare.integrity.checkpoint.verify import load_checkpoint, verify_checkpoint
from distshare.integrity.checkpoint.write import plan_position, save_checkpoint, save_run_checkpoint

__all__ = [
    "FORMAT",
    "MANIFEST",
    "MODEL_FILE",
    "OPTIM_FILE",
    "STATE_FILE",
    "SHARDED_FORMAT",
    "VERSION",
    "CheckpointCheck",
    "CheckpointComparison",
    "CheckpointCorrupted",
    "CheckpointMatch",
    "compare_checkpoints",
    "is_sharded_checkpoint",
    "load_sharded_checkpoint",
    "load_checkpoint",
    "match_checkpoint",
    "plan_position",
    "read_manifest",
    "read_sharded_manifest",
    "save_checkpoint",
    "save_run_checkpoint",
    "save_sharded_checkpoint",
    "verify_checkpoint",
]
