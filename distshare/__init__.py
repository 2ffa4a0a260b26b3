"""distshare: make data-parallel weight sharing visible and verifiable.

The Python surface (the CLI is `distshare`):

- `fingerprint(tensor)`, `fingerprint_state(model, optimizer)`, `state_digest(...)`: 128-bit
  digests of tensors and of a whole training state (parameters, buffers, optimizer state);
- `compare_replicas(model, optimizer)`, `assert_replicas_in_sync(model, optimizer)`:
  collectives that say whether every rank holds the same state, and where not: tensor,
  rank, element (`TensorDiff`);
- `watch(model, optimizer, every=N)`: those checks placed by hooks in your own loop (a
  baseline, then after every N-th `optimizer.step()`, gradients included); a divergence's
  report carries its likely cause (`ReplicaReport.diagnosis`);
- `check_sharded_init(model, expected=None)`, `assert_sharded_init(...)`: does every replica
  group of an FSDP2 / HSDP model hold one logical initial state (and the expected one, e.g.
  `state_digest(reference, algorithm="lsh128")` from one process)?
- `distshare.checkpoint`: safetensors checkpoints with a manifest of fingerprints;
  `save_sharded_checkpoint(path, model, optimizer)` / `load_sharded_checkpoint(...)`: an
  FSDP2 / HSDP state saved by every rank as its own shards, loaded into any layout (another
  shard count, DDP, one process), its logical digests checked against the manifest;
- `distshare.exact.ExactGradients(model)`: exact mode in your own loop: per-sample gradients
  added as integers, the same bits for every split W x k of the global batch;
- `distshare.testing.run_distributed(fn, world_size)`: run a function on simulated ranks.
"""

from distshare.integrity.checkpoint.sharded import load_sharded_checkpoint, save_sharded_checkpoint
from distshare.integrity.data_parallel import DataParallelReport, NotDataParallelError
from distshare.integrity.diagnosis import Cause, Diagnosis
from distshare.integrity.fingerprint import combined_fingerprint, fingerprint, fingerprint_state, state_digest
from distshare.integrity.replicas import (
    ReplicaDivergenceError,
    ReplicaReport,
    TensorDiff,
    assert_replicas_in_sync,
    compare_replicas,
)
from distshare.integrity.sharded_init import InitMismatchError, InitReport, assert_sharded_init, check_sharded_init
from distshare.integrity.watch import Watch, watch

__version__ = "0.1.0"

__all__ = [
    "DataParallelReport",
    "NotDataParallelError",
    "Cause",
    "Diagnosis",
    "InitMismatchError",
    "InitReport",
    "ReplicaDivergenceError",
    "ReplicaReport",
    "TensorDiff",
    "Watch",
    "assert_replicas_in_sync",
    "assert_sharded_init",
    "check_sharded_init",
    "combined_fingerprint",
    "compare_replicas",
    "fingerprint",
    "fingerprint_state",
    "load_sharded_checkpoint",
    "save_sharded_checkpoint",
    "state_digest",
    "watch",
]
