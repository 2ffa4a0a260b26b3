"""The partition grid: W ranks x k micro-batches against one process on one big batch.

    distshare equivalence                                   # W in 1,2,4 x k in 1,2,4,8, float64 and float32
    distshare equivalence --world-sizes 1,2 --accum-steps 1,4 --dtype float64 --json

The seed asks whether 40 samples in batches of 8, accumulated, update the same weights as
one batch of 40. Here every split of a global batch G = W x k x b trains the same model
(same init, same global batches, N steps) and is compared, step by step, with the
reference W = 1, k = 1 (b = G):

- the synced gradient of each step against the large-batch gradient *at the same
  parameters*, elementwise, with a predicted rounding bound (`distshare.numerics.rounding`: two
  orders of one sum of n terms differ by at most 2 gamma(n-1) sum |x_i|, with sum |x_i|
  measured as the per-sample gradient magnitudes). This is the check that a pitfall fails
  by orders of magnitude, and the one that says *why* a split is not bitwise: the order of
  summation.
- the parameters after each step against the reference trajectory: bitwise, max abs, max
  elementwise rel, normwise rel, max ULP, judged against an *envelope*: the reference
  retrained with every step's gradient pushed by its whole rounding bound.
- sample accounting: every sample of every global batch counted exactly once.

Precisions: float64, float32, and "bf16-autocast" (float32 weights and gradients,
bfloat16 matrix products), each against its own reference. The sync mode is a parameter
(`cfg.sync`).

The modules, in the order they build on each other:

    gradient.py    the one step's gradient without its update
    tasks.py       what the grid trains: distshare's config (ConfigTask), a user's model (UserTask)
    runs.py        one partition run, and what rank 0 records of it
    reference.py   the reference run, the rounding bound's magnitudes, the envelope
    grid.py        comparing a partition with its reference; the grid; the public assert
    loop_context.py   what a user's own training loop gets on each rank, and what is recorded of it
    loop_runs.py   one run of the user's loop on one rank, and what it left
    loop.py        the user's loop under every split, against its measured reordering spread
    pitfalls/      eight ways training code breaks the equivalence, each beside its fix
    report.py      tables, heatmap and report.md from the result
"""

from distshare.equivalence.gradient import HoldParameters, step_gradient
from distshare.equivalence.grid import (
    GridResult,
    PartitionResult,
    assert_accumulation_equivalent,
    check_partitions,
    compare,
    run_grid,
)
from distshare.equivalence.loop import LoopResult, SplitResult, assert_loop_equivalent
from distshare.equivalence.loop_context import LoopContext
from distshare.equivalence.reference import Reference, run_reference
from distshare.equivalence.runs import PartitionRun, Tensors, run_partition
from distshare.equivalence.tasks import AUTOCAST, ConfigTask, GridTask, Trainee, UserTask

__all__ = [
    "AUTOCAST",
    "ConfigTask",
    "GridResult",
    "GridTask",
    "HoldParameters",
    "LoopContext",
    "LoopResult",
    "PartitionResult",
    "PartitionRun",
    "Reference",
    "SplitResult",
    "Tensors",
    "Trainee",
    "UserTask",
    "assert_accumulation_equivalent",
    "assert_loop_equivalent",
    "check_partitions",
    "compare",
    "run_grid",
    "run_partition",
    "run_reference",
    "step_gradient",
]
