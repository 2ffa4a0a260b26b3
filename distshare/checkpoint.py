"""The public checkpoint API (`distshare.checkpoint`), kept at its documented path.

The implementation lives in `distshare.integrity.checkpoint`; this module only names what
users import: save, load, verify and compare verified safetensors checkpoints (and the
ecosystem's safetensors folders), and match a live model against one; save and load sharded
(FSDP2 / HSDP) checkpoints across layouts, verified by logical digests.
"""

from distshare.integrity.checkpoint import (
    MANIFEST,
    MODEL_FILE,
    OPTIM_FILE,
    STATE_FILE,
    CheckpointCheck,
    CheckpointComparison,
    CheckpointCorrupted,
    CheckpointMatch,
    compare_checkpoints,
    load_checkpoint,
    load_sharded_checkpoint,
    match_checkpoint,
    read_manifest,
    save_checkpoint,
    save_sharded_checkpoint,
    verify_checkpoint,
)

__all__ = [
    "MANIFEST",
    "MODEL_FILE",
    "OPTIM_FILE",
    "STATE_FILE",
    "CheckpointCheck",
    "CheckpointComparison",
    "CheckpointCorrupted",
    "CheckpointMatch",
    "compare_checkpoints",
    "load_checkpoint",
    "load_sharded_checkpoint",
    "match_checkpoint",
    "read_manifest",
    "save_checkpoint",
    "save_sharded_checkpoint",
    "verify_checkpoint",
]
