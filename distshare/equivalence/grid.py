"""The grid: every partition W x k of a global batch against its precision's reference.

Each world size is spawned once and runs every k (and dtype) inside it; W = 1 runs in this
process. Each partition is then judged (`compare`): its synced gradient of every step
against the big-batch gradient at the same parameters, elementwise, with the predicted
rounding bound; its parameters against the reference trajectory and the envelope; its
samples by the accounting (every sample of every global batch counted exactly once).
`assert_accumulation_equivalent` is the grid for a user's own model, loss and data.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from distshare.config import nearest_global_batch
from distshare.data.accounting import account_batches
from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World
from distshare.equivalence.reference import Reference, run_reference
from distshare.equivalence.runs import PartitionRun, Tensors, grid_rank
from distshare.equivalence.tasks import GridTask, UserTask
from distshare.errors import UsageError
from distshare.numerics.diff import Diff, diff, worst
from distshare.numerics.rounding import excess, norm_rel

MIN_MICRO_BATCH = 2  # samples per micro-batch in a default grid: BatchNorm needs two to train


@dataclass
class PartitionResult:
    """One partition's comparison with the reference; `to_dict` is what result.json holds."""

    world_size: int
    accum_steps: int
    micro_batch: int
    dtype: str
    unit_roundoff: float  # u of the precision gradients are accumulated in
    bitwise_equal: bool  # every step's parameters (and gradient) identical to the reference's
    max_abs_diff: float  # over every step's parameters
    max_rel_diff: float  # elementwise max |a - b| / |b|, over every step's parameters
    norm_rel_diff: float  # normwise ||a - b|| / ||b||, worst step
    max_ulp: int
    grad_bitwise_equal: bool  # every step's gradient identical to the big-batch gradient at the same parameters
    grad_max_abs_diff: float
    grad_excess: float  # max over elements and steps of |observed - reference| / predicted bound (<= 1: rounding)
    grad_bound_norm_rel: float  # the predicted bound, normwise relative (worst step)
    grad_norm_rel_diff: float  # the observed gradient difference, normwise relative (worst step)
    envelope_excess: float  # max over steps of observed normwise parameter diff / envelope (<= 1: rounding)
    state_ints_equal: bool  # integer buffers (BatchNorm's batch counter) equal
    accounting_ok: bool
    accounting: str
    nonfinite: str  # "" or where the first NaN / infinity is (gradient, parameters or loss): a failure
    update_mismatch: str  # "" or the first step whose update is not the configured one (replayed bitwise)
    matches_reference: bool  # every check but the accounting: gradients, updates, parameters, finite
    within_rounding: bool  # matches_reference, and every sample counted once
    losses: list[float]
    max_loss_diff: float
    steps: list[dict[str, Any]]  # per step: bitwise, max abs/rel, norm rel, envelope, max ULP, grad excess, loss

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def label(self) -> str:
        return f"{self.dtype} W={self.world_size} k={self.accum_steps} b={self.micro_batch}"

    def summary(self) -> str:
        if self.nonfinite:
            return f"NON-FINITE: {self.nonfinite}"
        if self.update_mismatch:
            return f"UPDATE: {self.update_mismatch}"
        if self.bitwise_equal:
            head = "bitwise equal at every step"
        else:
            head = (
                f"params norm rel {self.norm_rel_diff:.1e} (max {self.max_ulp} ULP), "
                f"gradient {self.grad_excess:.2g} x its rounding bound"
            )
        if not self.accounting_ok:
            head += f"; accounting: {self.accounting}"
        if not self.state_ints_equal:
            head += "; integer buffers differ"
        return head


def float_tensors(state: Tensors) -> Tensors:
    """The floating-point entries of a state (integer buffers are compared for equality apart)."""
    return {n: t for n, t in state.items() if t.is_floating_point()}


def _ints_equal(a: Tensors, b: Tensors) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a if not a[n].is_floating_point())


def _nonfinite(step: int, grads: Diff, params: Diff, loss: float, ref_loss: float) -> str:
    """Where the first NaN or infinity of a step is, or "" when it has none."""
    for what, d in (("gradient", grads), ("parameters", params)):
        if not d.finite:
            return f"{what} at step {step}: {d.nonfinite} non-finite value(s), first {d.first_nonfinite}"
    for what, value in (("loss", loss), ("reference loss", ref_loss)):
        if not math.isfinite(value):
            return f"{what} at step {step} is {value}"
    return ""


def compare(run: PartitionRun, ref: Reference) -> PartitionResult:
    """Judge one partition: gradients against the bound, parameters against the envelope."""
    steps = []
    u = ref.run.u
    bitwise = grad_bitwise = ints_equal = True
    max_abs = max_rel = norm_rel_worst = grad_abs = grad_excess = bound_rel = grad_rel = env_excess = 0.0
    max_ulp = 0
    nonfinite = ""
    for s, state in enumerate(run.states):
        d = diff(float_tensors(state), float_tensors(ref.run.states[s]))
        g = diff(run.grads[s], run.ref_grads[s])
        if not nonfinite:
            nonfinite = _nonfinite(s, g, d, run.losses[s], ref.run.losses[s])
        ex = excess(run.grads[s], run.ref_grads[s], ref.bounds[s])
        env = diff(float_tensors(ref.envelope_states[s]), float_tensors(ref.run.states[s])).norm_rel_diff
        # Both runs round every stored parameter once per step: (s + 1) x 2u of room besides.
        allowed = env + 2 * u * (s + 1)
        e_ex = d.norm_rel_diff / allowed
        ints = _ints_equal(state, ref.run.states[s])
        bitwise &= d.bitwise_equal and g.bitwise_equal and ints
        grad_bitwise &= g.bitwise_equal
        ints_equal &= ints
        # `worst`, not `max`: a NaN must survive to the verdict (max(x, nan) is x).
        max_abs, max_rel = worst(max_abs, d.max_abs_diff), worst(max_rel, d.max_rel_diff)
        norm_rel_worst, max_ulp = worst(norm_rel_worst, d.norm_rel_diff), max(max_ulp, d.max_ulp)
        grad_abs, grad_excess = worst(grad_abs, g.max_abs_diff), worst(grad_excess, ex)
        grad_rel = worst(grad_rel, g.norm_rel_diff)
        bound_rel = worst(bound_rel, norm_rel(ref.bounds[s], ref.run.grads[s]))
        env_excess = worst(env_excess, e_ex)
        steps.append(
            {
                "step": s,
                "bitwise_equal": d.bitwise_equal,
                "max_abs_diff": d.max_abs_diff,
                "max_rel_diff": d.max_rel_diff,
                "norm_rel_diff": d.norm_rel_diff,
                "envelope_norm_rel": allowed,
                "max_ulp": d.max_ulp,
                "grad_excess": ex,
                "grad_norm_rel_diff": g.norm_rel_diff,
                "loss_diff": abs(run.losses[s] - ref.run.losses[s]),
            }
        )
    acc = account_batches(run.global_batches, run.samples_by_rank)
    # Written so that NaN fails: every comparison with NaN is False.
    matches = (
        ints_equal
        and not nonfinite
        and not run.update_mismatch
        and run.updates_replayed == len(run.states)
        and grad_excess <= 1
        and env_excess <= 1
    )
    return PartitionResult(
        world_size=run.world_size,
        accum_steps=run.accum_steps,
        micro_batch=run.micro_batch,
        dtype=run.dtype,
        unit_roundoff=u,
        bitwise_equal=bitwise,
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        norm_rel_diff=norm_rel_worst,
        max_ulp=max_ulp,
        grad_bitwise_equal=grad_bitwise,
        grad_max_abs_diff=grad_abs,
        grad_excess=grad_excess,
        grad_bound_norm_rel=bound_rel,
        grad_norm_rel_diff=grad_rel,
        envelope_excess=env_excess,
        state_ints_equal=ints_equal,
        accounting_ok=acc.ok,
        accounting=acc.summary(),
        nonfinite=nonfinite,
        update_mismatch=run.update_mismatch
        or (
            ""
            if run.updates_replayed == len(run.states)
            else f"{run.updates_replayed} of {len(run.states)} updates replayed"
        ),
        matches_reference=matches,
        within_rounding=acc.ok and matches,
        losses=run.losses,
        max_loss_diff=worst(*(st["loss_diff"] for st in steps)) if steps else 0.0,
        steps=steps,
    )


@dataclass
class GridResult:
    """Every partition of the grid, compared with its dtype's reference."""

    global_batch: int
    steps: int
    n_terms: int  # terms per gradient element assumed by the bound: G x uses per sample
    partitions: list[PartitionResult]
    reference_losses: dict[str, list[float]]  # dtype -> reference loss curve
    bound_notes: dict[str, list[str]] = field(default_factory=dict)  # dtype -> fallbacks of the bound

    @property
    def ok(self) -> bool:
        return all(p.within_rounding for p in self.partitions)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "global_batch": self.global_batch,
            "steps": self.steps,
            "n_terms": self.n_terms,
            "reference_losses": self.reference_losses,
            "bound_notes": self.bound_notes,
            "partitions": [p.to_dict() for p in self.partitions],
        }

    def text(self) -> str:
        """A plain table, the message of a failed `assert_accumulation_equivalent`."""
        lines = [f"G={self.global_batch}, {self.steps} steps; each partition vs W=1, k=1 (b=G):"]
        for p in self.partitions:
            lines.append(f"  {'ok  ' if p.within_rounding else 'FAIL'}  {p.label:<28}  {p.summary()}")
        for dtype, notes in self.bound_notes.items():
            lines.append(f"  ({dtype}: per-sample magnitudes unavailable, bound from |gradient|: {'; '.join(notes)})")
        return "\n".join(lines)


def check_partitions(global_batch: int, world_sizes: Sequence[int], accum_steps: Sequence[int]) -> None:
    """Refuse, in one line, a grid in which some W x k does not divide G."""
    if not world_sizes or not accum_steps:
        raise UsageError("the grid needs at least one world size and one accumulation step count")
    for w in world_sizes:
        for k in accum_steps:
            if w < 1 or k < 1:
                raise UsageError(f"world sizes and accumulation steps must be positive, got W={w}, k={k}")
            if global_batch % (w * k):
                fix = nearest_global_batch(global_batch, [a * b for a in world_sizes for b in accum_steps])
                raise UsageError(
                    f"global batch {global_batch} is not divisible by W x k = {w} x {k} = {w * k}; "
                    f"the nearest that every partition of this grid divides: global_batch={fix}"
                )


def default_global_batch(world_sizes: Sequence[int], accum_steps: Sequence[int]) -> int:
    """The global batch a grid uses when none is given: the smallest multiple of every W x k
    that is at least 8 and gives every micro-batch at least `MIN_MICRO_BATCH` samples.

    Why not simply the smallest G every split divides: with W x k = 8 that is G = 8, and the
    split W = 2, k = 4 then runs one-sample micro-batches, on which a BatchNorm model fails
    inside its rank ("Expected more than 1 value per channel") before anything is compared.
    """
    products = [w * k for w in world_sizes for k in accum_steps]
    if not products:
        return 8  # check_partitions refuses the empty grid, in its own words
    need = max(8, MIN_MICRO_BATCH * max(products))
    step = math.lcm(*products)
    return step * -(-need // step)


def run_grid(
    task: GridTask,
    world_sizes: Sequence[int],
    accum_steps: Sequence[int],
    dtypes: Sequence[str | None],
    steps: int,
    progress: bool = True,
    timeout_s: float = 120.0,
) -> GridResult:
    """Run every partition, each world size spawned once, and compare each with the reference."""
    check_partitions(task.global_batch, world_sizes, accum_steps)
    # The runs in this process seed torch's RNG (dropout must start alike everywhere); the
    # caller's stream is left as it was.
    with torch.random.fork_rng(devices=[]):
        return _run_grid(task, world_sizes, accum_steps, dtypes, steps, progress, timeout_s)


def _run_grid(
    task: GridTask,
    world_sizes: Sequence[int],
    accum_steps: Sequence[int],
    dtypes: Sequence[str | None],
    steps: int,
    progress: bool,
    timeout_s: float,
) -> GridResult:
    n_terms = task.global_batch * task.terms_per_sample()
    total = len(dtypes) * (1 + len(world_sizes) * len(accum_steps))
    bar = tqdm(total=total, desc="equivalence", unit="partition", disable=not progress, leave=False)
    refs: dict[str, Reference] = {}
    ref_by_dtype: dict[str | None, Reference] = {}
    for dtype in dtypes:
        bar.set_postfix_str(f"reference {dtype or ''}".strip())
        ref = run_reference(task, dtype, steps, n_terms)
        refs[ref.run.dtype] = ref_by_dtype[dtype] = ref
        bar.update(1)
    runs: list[PartitionRun] = []
    for w in world_sizes:
        bar.set_postfix_str(f"W={w}")
        if w == 1:
            per_rank = [grid_rank(World(), task, accum_steps, dtypes, steps)]
        else:
            per_rank = run_distributed(
                grid_rank, w, task, list(accum_steps), list(dtypes), steps, timeout_s=timeout_s, deadline_s=None
            )
        for i, main in enumerate(per_rank[0]):
            main.samples_by_rank = [rank_runs[i].samples for rank_runs in per_rank]
            runs.append(main)
        bar.update(len(dtypes) * len(accum_steps))
    bar.close()
    order = {d: i for i, d in enumerate(refs)}
    partitions = sorted(
        (compare(r, refs[r.dtype]) for r in runs), key=lambda p: (order[p.dtype], p.world_size, p.accum_steps)
    )
    return GridResult(
        global_batch=task.global_batch,
        steps=steps,
        n_terms=n_terms,
        partitions=partitions,
        reference_losses={d: r.run.losses for d, r in refs.items()},
        bound_notes={d: r.notes for d, r in refs.items() if r.notes},
    )


def assert_accumulation_equivalent(
    model_fn: Callable[[], nn.Module],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    dataset: Any,
    world_sizes: Sequence[int] = (1, 2),
    accum_steps: Sequence[int] = (1, 2, 4),
    global_batch: int | None = None,
    steps: int = 3,
    optimizer: str = "sgd",
    lr: float = 0.1,
    sync: str = "ddp",
    seed: int = 0,
    uses_per_sample: int = 1,
    timeout_s: float = 120.0,
    progress: bool = False,
    sample_loss_fn: Callable[[nn.Module, Any], torch.Tensor] | None = None,
    count_items: Callable[[Any], int] | None = None,
) -> GridResult:
    """Assert that every W x k split trains `model_fn()` like one process on the whole batch.

    `model_fn()` returns a fresh model (module-level: spawned ranks import it; it is called
    under a fixed seed); `loss_fn(model, batch)` returns the *summed* loss of a batch (the
    step divides by the global batch size, or its item count: `count_items`); `dataset` is
    a `TensorDataset`, a tensor, or a sequence of samples that `default_collate` can batch.
    Each world size W > 1 runs on W spawned CPU ranks (real gloo groups). `uses_per_sample`
    is how often one weight is used per sample (positions, pixels): it widens the rounding
    bound's term count. `global_batch` defaults to `default_global_batch(world_sizes,
    accum_steps)`: 16 for the default grid, two samples in its smallest micro-batch.

    `sync="exact"` (`distshare.exact`) differentiates `sample_loss_fn(model, batch)`, each
    sample's summed loss ([n]), instead of `loss_fn`, and requires every partition to be
    bitwise equal to the big batch (parameters and gradients at every step), not merely
    within rounding. (Per-sample losses are not derived from `loss_fn`: calling it on one
    sample at a time would change the shapes the model computes in.) Given with any `sync`,
    it also lets the reference take the rounding bound's per-sample magnitudes in one batched
    pass instead of one forward and backward per sample.

    `count_items(batch) -> int` counts a collated batch's loss items (a causal LM: its label
    tokens != -100): the step, and its reference, then divide the summed loss by the count
    over the whole global batch instead of its number of samples, which is the large-batch
    normalization of a token-level loss with sequences of varying length.

    Returns the `GridResult`; raises AssertionError with the grid's table when a partition
    differs from the big batch by more than rounding.
    """
    if global_batch is None:
        global_batch = default_global_batch(world_sizes, accum_steps)
    if len(dataset) < global_batch:
        raise ValueError(f"the data set has {len(dataset)} samples, fewer than one global batch of {global_batch}")
    if sync == "exact" and sample_loss_fn is None:
        raise UsageError("sync='exact' needs sample_loss_fn(model, batch) -> each sample's summed loss, shape [n]")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    task = UserTask(model_fn, loss_fn, dataset, global_batch, optimizer, lr, sync, seed, uses_per_sample)
    task.sample_loss_fn = sample_loss_fn
    task.count_items = count_items
    result = run_grid(task, world_sizes, accum_steps, [None], steps, progress=progress, timeout_s=timeout_s)
    if not result.ok:
        raise AssertionError("gradient accumulation is not equivalent to one big batch:\n" + result.text())
    not_bitwise = [p.label for p in result.partitions if not (p.bitwise_equal and p.grad_bitwise_equal)]
    if sync == "exact" and not_bitwise:  # exact mode promises bits: within rounding is a failure
        raise AssertionError(
            f"exact mode is not bitwise for {', '.join(not_bitwise)} (sync='exact'):\n" + result.text()
        )
    return result
