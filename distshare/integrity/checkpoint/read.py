"""Reading a checkpoint that may be damaged: its manifest, and each stored tensor on its own.

Verification reads the safetensors files itself (the format is an 8-byte header length, a
JSON header and raw bytes), tensor by tensor: a truncated file still has its intact tensors
read, and every damaged one is named.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path
from typing import Any

import torch

from distshare.errors import UsageError
from distshare.integrity.checkpoint.format import FORMAT, MANIFEST, SAFETENSORS_DTYPES, CheckpointCorrupted


def load_manifest_json(path: Path) -> Any:
    """The parsed manifest.json of a checkpoint directory, whatever its format: UsageError (exit 2)
    when there is none, CheckpointCorrupted when it cannot be read or parsed."""
    if not path.is_dir() or not (path / MANIFEST).is_file():
        raise UsageError(f"{path}: not a distshare checkpoint (no {MANIFEST})")
    try:
        return json.loads((path / MANIFEST).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointCorrupted(path, {MANIFEST: f"unreadable ({exc})"}) from None


def read_manifest(path: str | Path) -> dict[str, Any]:
    """The manifest of a checkpoint directory; UsageError (exit 2) if this is not one."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"{path}: no such file or directory")
    manifest = load_manifest_json(path)
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{path}: not a distshare checkpoint ({MANIFEST} is not a {FORMAT} manifest)")
    _check_entries(path, manifest)
    return manifest


def _check_entries(path: Path, manifest: dict[str, Any]) -> None:
    """A hand-edited (or damaged) manifest must not reach the readers as a Python error."""
    tensors = manifest.get("tensors")
    fields = {"file": str, "key": str, "dtype": str, "shape": list, "digest": str}
    bad = (
        {MANIFEST: "'tensors' is not a mapping of tensor names"}
        if not isinstance(tensors, dict)
        else {
            str(name): f"manifest entry lacks {', '.join(f for f, t in fields.items() if not isinstance(e.get(f), t))}"
            for name, e in tensors.items()
            if not isinstance(e, dict) or not all(isinstance(e.get(f), t) for f, t in fields.items())
        }
    )
    # Version 2's optional fields (tied aliases, live names, digests of what no file stores).
    optional = ("stored_as", "alias_of", "live")
    if not bad:
        bad = {
            str(name): f"manifest entry's {f} is not a string"
            for name, e in tensors.items()
            for f in optional
            if f in e and not isinstance(e[f], str)
        }
    live_only = manifest.get("live_only", {})
    if not isinstance(live_only, dict) or not all(isinstance(v, str) for v in live_only.values()):
        bad[MANIFEST] = "'live_only' is not a mapping of names to digests"
    if bad:
        raise CheckpointCorrupted(path, bad)


class SafetensorsFile:
    """Tensor-by-tensor access to a safetensors file that may be damaged."""

    def __init__(self, path: Path):
        self.path = path
        self.error: str | None = None
        self.header: dict[str, Any] = {}
        self.data_start = 0
        self.size = 0
        try:
            self.size = path.stat().st_size
            with path.open("rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise ValueError("shorter than a safetensors header")
                (n,) = struct.unpack("<Q", head)
                if n > self.size - 8:
                    raise ValueError(f"header of {n} bytes does not fit in a {self.size}-byte file")
                self.header = json.loads(f.read(n))
                self.data_start = 8 + n
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            self.error = f"{path.name}: unreadable ({exc})"

    def names(self) -> list[str]:
        return [k for k in self.header if k != "__metadata__"]

    def read(self, name: str) -> torch.Tensor:
        """The stored tensor; ValueError saying what is wrong if it cannot be read whole."""
        meta = self.header.get(name)
        if meta is None:
            raise ValueError(f"not in {self.path.name}")
        dtype = SAFETENSORS_DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise ValueError(f"unknown dtype {meta.get('dtype')!r}")
        begin, end = meta["data_offsets"]
        shape = meta["shape"]
        numel = 1
        for s in shape:
            numel *= s
        itemsize = torch.empty(0, dtype=dtype).element_size()
        if end - begin != numel * itemsize:
            raise ValueError(f"{end - begin} bytes stored for {numel} elements of {dtype}")
        if self.data_start + end > self.size:
            raise ValueError(
                f"truncated: {self.path.name} ends before its bytes ({self.size} < {self.data_start + end})"
            )
        with self.path.open("rb") as f:
            f.seek(self.data_start + begin)
            raw = bytearray(f.read(end - begin))
        if not raw:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(raw, dtype=dtype).reshape(shape)
