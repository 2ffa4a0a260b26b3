"""The checkpoint format: file names, the manifest's version and digests, and what a check reports."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from distshare.errors import VerificationFailed

FORMAT = "distshare-checkpoint"
# 2: tied tensors stored once (`stored_as`, `alias_of`), each tensor's live name (`live`), the
# live state's digest (`state_digest`, `live_only`). Version 1 manifests read as before.
VERSION = 2
MANIFEST = "manifest.json"
# A sharded checkpoint (`sharded.py`): every rank's DCP shard files beside one manifest.
SHARDED_FORMAT = "distshare-sharded-checkpoint"
SHARDED_VERSION = 1
DCP_METADATA = ".metadata"  # DCP's own index of the chunks, written by the coordinator (rank 0)
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.safetensors"
STATE_FILE = "state.safetensors"

SAFETENSORS_DTYPES = {  # safetensors dtype names
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}


class CheckpointCorrupted(VerificationFailed):
    """A checkpoint whose stored tensors do not match its manifest; names every bad tensor."""

    def __init__(self, path: Path, problems: dict[str, str]) -> None:
        shown = "; ".join(f"{name}: {why}" for name, why in sorted(problems.items())[:5])
        more = f"; and {len(problems) - 5} more" if len(problems) > 5 else ""
        super().__init__(f"checkpoint {path} is damaged in {len(problems)} tensor(s): {shown}{more}")
        self.path = path
        self.problems = problems


@dataclass
class CheckpointCheck:
    """The result of verifying one checkpoint (or a bare safetensors file, or a folder of them)."""

    path: str
    digests: dict[str, str]  # tensor -> digest of the bytes as stored now
    recorded: dict[str, str]  # tensor -> digest the manifest recorded (empty for a bare file)
    combined: str  # combined digest of the stored tensors
    problems: dict[str, str] = field(default_factory=dict)  # tensor (or file) -> what is wrong
    info: dict[str, Any] = field(default_factory=dict)  # tensor -> {"dtype", "shape", "file"}
    step: int | None = None
    # "distshare": a checkpoint with a manifest; "safetensors": a bare file or a folder of them
    # (an HF `save_pretrained` folder), whose digests are only computed: nothing recorded them.
    kind: str = "distshare"
    aliases: dict[str, str] = field(default_factory=dict)  # tied tensor -> the tensor it is stored as
    # The digest `state_digest(model, optimizer)` gives for the saved state (version 2 manifests):
    # recomputed from the stored bytes under the live names, None where no manifest records them.
    state_digest: str | None = None
    # What was verified, in words (a sharded checkpoint: the layout it was saved from, the files'
    # bytes, the logical digests recomputed or not); None where the table says it all.
    verified: str | None = None

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        return {
            "path": self.path,
            "ok": self.ok,
            "kind": self.kind,
            "step": self.step,
            "combined": self.combined,
            "state_digest": self.state_digest,
            "verified": self.verified,
            "aliases": self.aliases,
            "tensors": {
                name: {
                    **self.info.get(name, {}),
                    "digest": self.digests.get(name),
                    "alias_of": self.aliases.get(name),
                    "problem": self.problems.get(name),
                }
                for name in sorted(set(self.digests) | set(self.recorded) | set(self.info))
            },
            "problems": self.problems,
        }


_META_KEYS = ("step", "position", "optimizer", "config", "extra")


def meta_digest(manifest: dict[str, Any]) -> str:
    """A digest of the manifest's non-tensor parts, as they read back from the JSON file."""
    meta = json.loads(json.dumps({k: manifest.get(k) for k in _META_KEYS}, default=str))
    return "sha256:" + hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()


def entry_name(file: str, key: str, index_names: dict[int, str] | None = None) -> str:
    """The name a stored tensor is reported under: `model/<state_dict key>`, or
    `optim/<parameter name>/<state key>` (the names `fingerprint_state` uses too)."""
    if file == MODEL_FILE:
        return f"model/{key}"
    if file == STATE_FILE:
        return key
    _, idx, state_key = key.split("/", 2)
    return f"optim/{(index_names or {}).get(int(idx), idx)}/{state_key}"
