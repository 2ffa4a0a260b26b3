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
- `distshare.checkpoint`: safetensors checkpoints with a manifest of fingerprints;
- `distshare.exact.ExactGradients(model)`: exact mode in your own loop: per-sample gradients
  added as integers, the same bits for every split W x k of the global batch;
- `distshare.testing.run_distributed(fn, world_size)`: run a function on simulated ranks.
"""

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
from distshare.integrity.watch import Watch, watch

__version__ = "0.1.0"

__all__ = [
    "DataParallelReport",
    "NotDataParallelError",
    "Cause",
    "Diagnosis",
    "ReplicaDivergenceError",
    "ReplicaReport",
    "TensorDiff",
    "Watch",
    "assert_replicas_in_sync",
    "combined_fingerprint",
    "compare_replicas",
    "fingerprint",
    "fingerprint_state",
    "state_digest",
    "watch",
]
