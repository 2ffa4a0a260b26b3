"""The user's own training loop, under every split W x k of the same global batches.

`assert_accumulation_equivalent` trains a user's model with distshare's step; this runs the
user's *loop*: their forward, loss and normalization, `no_sync` or `accelerator.accumulate`,
backward and optimizer step (`distshare.equivalence.loop_context`: what the loop gets and
what is recorded of it). Each split is compared, step by step, with the same loop at
W = 1, k = 1 (the reference): the gradient the optimizer used and the parameters after it.

Within what? A correct split changes only the *order* in which the same terms are added.
How far reordering alone moves this loop is measured, not predicted: the reference is rerun
with the samples of every global batch in other orders (reversed, and seeded permutations),
a counterfactual that changes nothing but the order of summation. At each step, the
largest normwise distance of those reruns from the reference (gradients, parameters) is the
*measured spread*; a split passes when its own distance is within `BOUND_FACTOR` times that
spread at every step, every sample of every global batch was used exactly once, and no
gradient was synced before a step's last micro-batch. In exact mode (`exact=True`) every
split must equal the reference bit for bit at every step, with no bound.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from tqdm import tqdm

from distshare.data.accounting import account_batches
from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World
from distshare.equivalence.grid import check_partitions
from distshare.equivalence.loop_context import (
    Collate,
    LoopRecorder,
    Tensors,
    make_context,
    permutation_orders,
)
from distshare.equivalence.loop_runs import Loop, LoopRun, loop_rank, run_loop
from distshare.errors import UsageError
from distshare.numerics.diff import Diff, diff, worst

# A split passes when its distance from the reference is within this many times the spread
# that reordering alone measured at the same step. The splits sum in other orders than the
# counterfactuals do (partial sums per micro-batch and rank, then an all-reduce): the same
# kind of error, not the same draw. Measured on the tests' GPT-2 loops (float32 and
# float64, W in 1, 2 x k in 1, 2, 4): correct splits reach 0.8-0.9 x the spread (ratio
# <= 0.09 to this bound); the bugs 2e4 x the bound and more; a loss 1e-4 too large 93 x.
# So a systematic error below about 1e-5 relative (float32) passes as rounding.
BOUND_FACTOR = 10.0


@dataclass
class SplitResult:
    """One split's comparison with the reference, as measured."""

    world_size: int
    accum_steps: int
    micro_batch: int
    bitwise_equal: bool  # every step's gradient and parameters identical to the reference's
    grad_max_abs: float
    grad_norm_rel: float  # worst step
    grad_max_ulp: int
    param_max_abs: float
    param_norm_rel: float  # worst step
    param_max_ulp: int
    ratio: float  # worst over steps of distance / bound (gradient or parameters); <= 1 passes; exact: none
    steps_taken: int
    accounting_ok: bool
    accounting: str
    early_sync: str
    problem: str  # "" or what makes the comparison itself fail (steps, names, non-finite values)
    ok: bool
    steps: list[dict[str, Any]]

    @property
    def label(self) -> str:
        return f"W={self.world_size} k={self.accum_steps} b={self.micro_batch}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def row(self, exact: bool) -> str:
        verdict = "ok  " if self.ok else "FAIL"
        if self.problem:
            return f"  {verdict}  {self.label:<16}  {self.problem}"
        ratio = "bitwise" if self.bitwise_equal else ("-" if exact else f"{self.ratio:.3g}")
        line = (
            f"  {verdict}  {self.label:<16}  {self.grad_max_abs:<9.2e} {self.grad_norm_rel:<9.2e} "
            f"{self.grad_max_ulp:<9} {self.param_max_abs:<9.2e} {self.param_norm_rel:<9.2e} "
            f"{self.param_max_ulp:<9} {ratio}"
        )
        if not self.accounting_ok:
            line += f"; accounting: {self.accounting}"
        if self.early_sync:
            line += f"; early sync: {self.early_sync}"
        return line


@dataclass
class LoopResult:
    """Every split of the user's loop against the loop at W = 1, k = 1."""

    global_batch: int
    steps: int
    exact: bool
    bound_factor: float
    spread: list[dict[str, float]]  # per step: the counterfactual orders' worst distance (gradient, parameters)
    orders: list[str]
    splits: list[SplitResult]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return all(s.ok for s in self.splits)

    def to_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            **{k: v for k, v in asdict(self).items() if k != "splits"},
            "splits": [s.to_dict() for s in self.splits],
        }

    def text(self) -> str:
        """The table a failed `assert_loop_equivalent` raises with."""
        rule = "bitwise at every step" if self.exact else f"within {self.bound_factor:g} x the measured spread"
        lines = [
            f"G={self.global_batch}, {self.steps} steps; the loop under each split vs W=1, k=1 ({rule}):",
            "  verdict split             grad:abs  norm rel  ULP       param:abs norm rel  ULP       ratio",
        ]
        lines += [s.row(self.exact) for s in self.splits]
        if not self.exact:
            spread = ", ".join(f"{sp['grad']:.2e}/{sp['params']:.2e}" for sp in self.spread)
            lines.append(f"  measured spread of {len(self.orders)} reorderings per step (grad/params): {spread}")
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def _distance(a: Tensors, b: Tensors) -> Diff | str:
    if set(a) != set(b):
        return f"the loop's parameters differ from the reference's: {sorted(set(a) ^ set(b))[:3]}"
    if any(a[n].shape != b[n].shape or a[n].dtype != b[n].dtype for n in a):
        return "the loop's parameters differ from the reference's in shape or dtype"
    return diff(a, b)


def _ratio(d: Diff, bound: float) -> float:
    if not d.finite:
        return math.nan
    if d.bitwise_equal or d.norm_rel_diff == 0:
        return 0.0
    return d.norm_rel_diff / bound if bound > 0 else math.inf


def measure_spread(reference: LoopRun, reorderings: list[LoopRun]) -> list[dict[str, float]]:
    """Per step, the largest normwise distance of a reordered rerun from the reference."""
    spread = []
    for s in range(reference.steps_taken):
        g = p = 0.0
        for run in reorderings:
            if run.steps_taken <= s:
                return spread
            dg, dp = diff(run.grads[s], reference.grads[s]), diff(run.params[s], reference.params[s])
            g, p = worst(g, dg.norm_rel_diff), worst(p, dp.norm_rel_diff)
        spread.append({"grad": g, "params": p})
    return spread


def compare_split(
    run: LoopRun,
    reference: LoopRun,
    spread: list[dict[str, float]],
    expected: list[list[int]] | None,
    exact: bool,
    factor: float,
) -> SplitResult:
    """Judge one split: every step's gradient and parameters, the samples, the sync."""
    problem = run.error
    if not problem and run.steps_taken != reference.steps_taken:
        problem = f"took {run.steps_taken} optimizer steps, the reference {reference.steps_taken}"
    steps: list[dict[str, Any]] = []
    bitwise = True
    g_abs = g_rel = p_abs = p_rel = ratio = 0.0
    g_ulp = p_ulp = 0
    for s in range(min(run.steps_taken, reference.steps_taken)):
        dg, dp = _distance(run.grads[s], reference.grads[s]), _distance(run.params[s], reference.params[s])
        if isinstance(dg, str) or isinstance(dp, str):
            problem = problem or (dg if isinstance(dg, str) else str(dp))
            break
        for what, d in (("gradient", dg), ("parameters", dp)):
            if not d.finite and not problem:
                problem = f"{what} at step {s}: {d.describe()}"
        bitwise &= dg.bitwise_equal and dp.bitwise_equal
        # Exact mode measures no spread; a step the reorderings did not reach has none (NaN: fails).
        sp = spread[s] if s < len(spread) else {"grad": math.nan, "params": math.nan}
        r = worst(_ratio(dg, factor * sp["grad"]), _ratio(dp, factor * sp["params"])) if not exact else 0.0
        g_abs, g_rel, g_ulp = worst(g_abs, dg.max_abs_diff), worst(g_rel, dg.norm_rel_diff), max(g_ulp, dg.max_ulp)
        p_abs, p_rel, p_ulp = worst(p_abs, dp.max_abs_diff), worst(p_rel, dp.norm_rel_diff), max(p_ulp, dp.max_ulp)
        ratio = worst(ratio, r)
        steps.append(
            {
                "step": s,
                "grad": dg.to_dict(),
                "params": dp.to_dict(),
                "ratio": r,
                "bound_grad": None if exact else factor * sp["grad"],
                "bound_params": None if exact else factor * sp["params"],
            }
        )
    if expected is not None:
        acc = account_batches(expected, run.samples_by_rank)
        acc_ok, acc_text = acc.ok, acc.summary()
        leftover = sorted(set(run.leftover))
        if leftover:
            acc_ok, acc_text = False, f"samples drawn after the last optimizer step: {leftover[:5]}"
    else:
        acc_ok, acc_text = account_draws(reference, run)
    # Written so that NaN fails: a comparison with NaN is False.
    within = bitwise if exact else (bitwise or ratio <= 1)
    ok = not problem and within and acc_ok and not run.early_sync
    return SplitResult(
        world_size=run.world_size,
        accum_steps=run.accum_steps,
        micro_batch=run.micro_batch,
        bitwise_equal=bitwise and not problem,
        grad_max_abs=g_abs,
        grad_norm_rel=g_rel,
        grad_max_ulp=g_ulp,
        param_max_abs=p_abs,
        param_norm_rel=p_rel,
        param_max_ulp=p_ulp,
        ratio=ratio,
        steps_taken=run.steps_taken,
        accounting_ok=acc_ok,
        accounting=acc_text,
        early_sync=run.early_sync,
        problem=problem,
        ok=ok,
        steps=steps,
    )


def _draws(run: LoopRun) -> Counter[int]:
    """How often each sample was drawn in a run, by every rank together, after-the-end draws included."""
    return Counter(i for rank in run.samples_by_rank for step in rank for micro in step for i in micro) + Counter(
        run.leftover
    )


def account_draws(reference: LoopRun, run: LoopRun) -> tuple[bool, str]:
    """A loop that shards the data itself: no sample drawn more often than at W = 1, k = 1.

    Its global batches are its own, and a data loader may fetch ahead of the step it serves
    (accelerate's does, one batch): which step a draw belongs to is not known, so the draws
    of the whole run are counted. At W = 1, k = 1 the loader fetches ahead one global batch,
    at least as much as W loaders fetching one micro-batch each: a correct split draws no
    sample more often than the reference. A padding sampler draws one twice.
    """
    ref, mine = _draws(reference), _draws(run)
    extra = sorted(i for i, c in mine.items() if c > ref.get(i, 0))
    if extra:
        return False, f"counted twice: {len(extra)} sample(s) drawn more often than at W=1, k=1: {extra[:5]}"
    return True, f"{sum(mine.values())} draws, no sample more often than at W=1, k=1"


def _expected_batches(reference: LoopRun, dataset: Any, global_batch: int, seed: int) -> list[list[int]] | None:
    """What each step must consume: the plan's global batches (None: the loop shards the data itself).

    A loop fed by `ctx.batches()` must use exactly the plan's global batches, step by step.
    A loop that shards the data itself (`ctx.dataset`) is held to its own run at W = 1,
    k = 1 instead (`account_draws`).
    """
    if not reference.used_plan:
        return None
    ctx = make_context(World(), dataset, 1, 1, global_batch, reference.steps_taken, seed, None, LoopRecorder(False))
    return [ctx.global_indices(s) for s in range(reference.steps_taken)]


def assert_loop_equivalent(
    loop: Loop,
    dataset: Any,
    world_sizes: Sequence[int] = (1, 2),
    accum_steps: Sequence[int] = (1, 2, 4),
    global_batch: int | None = None,
    steps: int = 3,
    collate_fn: Collate | None = None,
    exact: bool = False,
    seed: int = 0,
    reorderings: int = 3,
    timeout_s: float = 120.0,
    progress: bool = False,
) -> LoopResult:
    """Assert that the user's loop trains alike under every split W x k of the same global batches.

    `loop(ctx)` is the user's whole training loop, a module-level function (spawned ranks
    import it by name) that returns the trained model (bare, DDP- or accelerate-wrapped);
    `ctx` is a `LoopContext`: `ctx.batches()` yields each step's k micro-batches of this
    rank (collated by `collate_fn`, default torch's `default_collate`), `ctx.dataset` is the
    data set for loops that shard it themselves. On W > 1 the gloo process group is already
    initialized. `dataset` is indexable (`len`, `[i]`): a `TensorDataset`, a list of dicts,
    a `datasets.Dataset`. G defaults to the smallest multiple of every W x k that is >= 8.

    Every split (W = 1, k = 1 included: a rerun, which shows the loop is deterministic) is
    compared with the reference at every optimizer step: the gradient the optimizer used
    and the parameters after it. It passes when its normwise distance from the reference is
    within `BOUND_FACTOR` x the spread measured by rerunning the reference with each global
    batch in `reorderings` other orders (reversed, then seeded permutations), every sample
    of every global batch was drawn exactly once, and no rank's gradients were synced
    before a step's last micro-batch. With `exact=True` (the loop uses exact mode) every
    split must equal the reference bit for bit, at every step.

    Returns the `LoopResult`; raises AssertionError with a table (per split: verdict, max
    abs, norm rel and ULP distance of gradients and parameters, ratio to the bound) when a
    split fails; the error's `.result` is the `LoopResult`.
    """
    if not callable(loop):
        raise UsageError(f"loop must be a function loop(ctx) -> model, got {type(loop).__name__}")
    if global_batch is None:
        lcm = math.lcm(*(w * k for w in world_sizes for k in accum_steps)) if world_sizes and accum_steps else 1
        global_batch = lcm * max(1, -(-8 // lcm))
    check_partitions(global_batch, world_sizes, accum_steps)
    if steps < 1:
        raise UsageError(f"steps must be >= 1, got {steps}")
    if not exact and reorderings < 1:
        raise UsageError("reorderings must be >= 1: the bound is measured by reordering the reference's batches")
    start = time.monotonic()
    with torch.random.fork_rng(devices=[]):
        result = _run(
            loop,
            dataset,
            world_sizes,
            accum_steps,
            global_batch,
            steps,
            collate_fn,
            exact,
            seed,
            reorderings,
            timeout_s,
            progress,
        )
    result.seconds = time.monotonic() - start
    if not result.ok:
        error = AssertionError("the training loop does not train alike under every split:\n" + result.text())
        error.result = result  # type: ignore[attr-defined]  # the numbers, for a test that inspects them
        raise error
    return result


def _run(
    loop: Loop,
    dataset: Any,
    world_sizes: Sequence[int],
    accum_steps: Sequence[int],
    global_batch: int,
    steps: int,
    collate_fn: Collate | None,
    exact: bool,
    seed: int,
    reorderings: int,
    timeout_s: float,
    progress: bool,
) -> LoopResult:
    orders = [] if exact else permutation_orders(reorderings)
    bar = tqdm(total=1 + len(orders) + len(world_sizes), desc="loop equivalence", disable=not progress, leave=False)
    here = World()
    reference = run_loop(here, loop, dataset, 1, 1, global_batch, steps, seed, collate_fn)
    if reference.error:
        raise UsageError(reference.error)
    reference.samples_by_rank = [reference.samples]
    if reference.steps_taken == 0:
        raise UsageError("the loop took no optimizer step: call optimizer.step() once per global batch")
    bar.update(1)
    reordered = []
    for order in orders:
        reordered.append(run_loop(here, loop, dataset, 1, 1, global_batch, steps, seed, collate_fn, order))
        bar.update(1)
    spread = measure_spread(reference, reordered)
    notes = []
    if not exact and all(sp["grad"] == 0 and sp["params"] == 0 for sp in spread):
        notes.append("reordering the reference's batches changed no bit: every split must then be bitwise equal")
    runs: list[LoopRun] = []
    for w in world_sizes:
        if w == 1:
            per_rank = [loop_rank(here, loop, dataset, list(accum_steps), global_batch, steps, seed, collate_fn)]
        else:
            per_rank = run_distributed(
                loop_rank, w, loop, dataset, list(accum_steps), global_batch, steps, seed, collate_fn,
                timeout_s=timeout_s, deadline_s=timeout_s * (2 + len(accum_steps)),
            )  # fmt: skip
        for i, main in enumerate(per_rank[0]):
            main.samples_by_rank = [rank_runs[i].samples for rank_runs in per_rank]
            main.leftover = [x for rank_runs in per_rank for x in rank_runs[i].leftover]
            runs.append(main)
        bar.update(1)
    bar.close()
    expected = _expected_batches(reference, dataset, global_batch, seed)
    splits = [compare_split(r, reference, spread, expected, exact, BOUND_FACTOR) for r in runs]
    return LoopResult(global_batch, steps, exact, BOUND_FACTOR, spread, orders, splits, 0.0, notes)
