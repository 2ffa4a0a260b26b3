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
  elementwise rel, normwise rel, max ULP. Tiny gradient differences compound through the
  optimizer, so the trajectory is judged against an *envelope*: the reference retrained
  with every step's gradient pushed by its whole rounding bound (random signs), plus one
  rounding of the stored parameters per step. That envelope is measured, not hand-picked,
  and it is a heuristic (a linear response to random-sign pushes), which the report says.
- sample accounting: every sample of every global batch counted exactly once.

Precisions: float64, float32, and "bf16-autocast" (float32 weights and gradients,
bfloat16 matrix products), each against its own reference.

Spawning is the slow part, so each world size is spawned once and runs every k (and
dtype) inside it; W = 1 runs in this process. The sync mode is a parameter (`cfg.sync`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from distshare.config import PlanConfig, RunConfig
from distshare.data import build_dataset
from distshare.data.accounting import account_batches
from distshare.data.plan import GlobalBatchPlan
from distshare.distributed.spawn import run_distributed
from distshare.distributed.sync import ExactSync, make_sync
from distshare.distributed.world import World
from distshare.errors import UsageError
from distshare.models import build_model
from distshare.numerics.diff import diff
from distshare.numerics.rounding import bounds, excess, norm_rel, unit_roundoff
from distshare.training import Run, build_run, loss_sum, sample_losses, train_step

Tensors = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------
# What the grid drives: a Trainee is one training (one partition) built on one rank.


@dataclass
class Trainee:
    """One rank's training for one partition, reduced to what the grid needs to observe."""

    model: nn.Module  # the bare model: its .grad after the sync is the step's gradient
    optimizer: torch.optim.Optimizer
    micro_batch: int
    step: Callable[[int], tuple[float, list[list[int]]]]  # run a step -> (rank's loss sum, its micro-batches)
    global_batch: Callable[[int], list[int]]  # the step's global sample indices, in order
    normalizer: Callable[[int], float]  # what the step divides summed losses by
    batch_loss: Callable[[nn.Module, list[int]], torch.Tensor]  # summed loss of samples on a bare model
    fresh_model: Callable[[], nn.Module]  # a bare copy to compute reference gradients on
    label: str = ""  # the precision, as reports name it: float64, float32, bf16-autocast
    u: float = 0.0  # unit roundoff gradients are accumulated in
    slice_u: float = 0.0  # mixed precision: unit roundoff each partial gradient is rounded to first
    # Exact mode: sets a bare model's .grad to the big batch's exact-mode gradient at a step
    # (the reference's own arithmetic); None: one forward and backward over the whole batch.
    exact_grad: Callable[[nn.Module, int], None] | None = None


class GridTask(Protocol):
    """A training the grid can build for any (W, k, dtype) on any rank. Must pickle (spawn)."""

    global_batch: int
    seed: int

    def build(self, world: World, world_size: int, accum_steps: int, dtype: str | None) -> Trainee: ...

    def terms_per_sample(self) -> int: ...


@dataclass
class ConfigTask:
    """distshare's own training: `build_run` and the one `train_step`, as configured."""

    cfg: RunConfig

    @property
    def global_batch(self) -> int:
        return self.cfg.plan.resolve().global_batch

    @property
    def seed(self) -> int:
        return self.cfg.seed

    def build(self, world: World, world_size: int, accum_steps: int, dtype: str | None) -> Trainee:
        plan = dataclasses.replace(
            self.cfg.plan,
            world_size=world_size,
            global_batch=self.global_batch,
            accum_steps=accum_steps,
            micro_batch=None,
        )
        # bf16: float32 parameters and gradients, matrix products in bfloat16 under autocast.
        autocast = dtype == AUTOCAST
        model_cfg = dataclasses.replace(self.cfg.model, dtype="float32" if autocast else dtype or self.cfg.model.dtype)
        cfg = dataclasses.replace(self.cfg, plan=plan, model=model_cfg)
        run = build_run(cfg, world)
        inner = self.make_step(run)

        def step(s: int) -> tuple[float, list[list[int]]]:
            # The optimizer's pre-step hooks (the grid's observers) run inside this too, so the
            # reference gradients they compute are autocast alike.
            with _precision(autocast, world.device):
                return inner(s)

        def batch_loss(model: nn.Module, indices: list[int]) -> torch.Tensor:
            batch = run.table.select(indices).to(world.device)
            with _precision(autocast, world.device):
                return loss_sum(model(**batch.inputs), batch.labels)

        def exact_grad(model: nn.Module, s: int) -> None:
            indices = run.plan.global_batch(s)
            batch = run.table.select(indices).to(world.device)
            sample = {"inputs": batch.inputs, "labels": batch.labels}
            # The one exact arithmetic, on one process: what every partition reaches.
            sync = ExactSync()
            sync.start_step(model, run.table.count_items(indices), len(indices))
            sync.accumulate(model, sample, sample_losses)
            sync.synchronize(model)

        u = unit_roundoff(getattr(torch, model_cfg.dtype))
        return Trainee(
            model=run.model,
            optimizer=run.optimizer,
            micro_batch=run.plan.plan.micro_batch,
            step=step,
            global_batch=lambda s: [int(i) for i in run.plan.global_batch(s)],
            normalizer=lambda s: run.table.count_items(run.plan.global_batch(s)),
            batch_loss=batch_loss,
            fresh_model=lambda: build_model(cfg.model, run.info, seed=cfg.seed).to(world.device),
            label=AUTOCAST if autocast else model_cfg.dtype,
            u=u,
            slice_u=unit_roundoff(torch.bfloat16) if autocast else 0.0,
            exact_grad=exact_grad if cfg.sync == "exact" else None,
        )

    def make_step(self, run: Run) -> Callable[[int], tuple[float, list[list[int]]]]:
        """The step the grid runs: distshare's one `train_step` (a pitfall overrides this)."""

        def step(s: int) -> tuple[float, list[list[int]]]:
            stats = train_step(run, s)
            return stats.loss_sum, stats.indices

        return step

    def terms_per_sample(self) -> int:
        """How often one weight is used per sample: once per token, or per pixel."""
        _, info = build_dataset(self.cfg.data)
        if info.kind == "text":
            return max(1, info.max_len)
        _, h, w = info.image_shape
        return max(1, h * w)


# ---------------------------------------------------------------------------------------
# Running one partition, the reference, and the envelope.


@dataclass
class PartitionRun:
    """What rank 0 saw of one partition (rank > 0 keeps only its samples)."""

    world_size: int
    accum_steps: int
    micro_batch: int
    dtype: str  # the precision's label
    u: float  # its unit roundoff
    losses: list[float] = field(default_factory=list)  # global mean loss per step
    grads: list[Tensors] = field(default_factory=list)  # synced gradient of each step
    ref_grads: list[Tensors] = field(default_factory=list)  # one-big-batch gradient at the same parameters
    states: list[Tensors] = field(default_factory=list)  # model state after each step
    global_batches: list[list[int]] = field(default_factory=list)
    samples: list[list[list[int]]] = field(default_factory=list)  # this rank: step -> micro -> indices
    samples_by_rank: list[list[list[list[int]]]] = field(default_factory=list)  # filled by the parent


def _grads(model: nn.Module) -> Tensors:
    return {
        n: (p.grad if p.grad is not None else torch.zeros_like(p)).detach().cpu().clone()
        for n, p in model.named_parameters()
    }


def _state(model: nn.Module) -> Tensors:
    return {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}


def _dtype(model: nn.Module) -> torch.dtype:
    p = next(model.parameters(), None)
    return p.dtype if p is not None else torch.float32


AUTOCAST = "bf16-autocast"  # the grid's name for float32 parameters with bfloat16 matrix products


def _precision(autocast: bool, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()


def _full_batch_grad(t: Trainee, copy: nn.Module, step: int, rng: torch.Tensor) -> Tensors:
    """The reference (W = 1, k = 1) gradient at the trainee's current parameters.

    The same operations as the reference's own step (one forward over the whole global batch,
    summed loss divided by the global count), on a copy so the run itself is untouched. The
    CPU RNG is set to `rng`, its state when the step began, so that a model with randomness
    (dropout) draws what the reference step would have drawn; the run's own stream is
    restored afterwards.
    """
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        copy.load_state_dict(t.model.state_dict())
        copy.zero_grad(set_to_none=True)
        if t.exact_grad is not None:
            t.exact_grad(copy, step)
        else:
            (t.batch_loss(copy, t.global_batch(step)) / t.normalizer(step)).backward()
    return _grads(copy)


def _abs_sum(t: Trainee, copy: nn.Module, step: int, grad: Tensors, rng: torch.Tensor) -> tuple[Tensors, str | None]:
    """sum over samples of |that sample's contribution to the gradient|, elementwise.

    Returns it with None, or, when the model cannot run one sample alone (BatchNorm in
    training mode refuses a batch of one), |gradient| with the reason: that assumes no
    cancellation between samples, a tighter bound than the truth; said in the report.
    """
    total: Tensors = {n: torch.zeros_like(p, dtype=torch.float64).cpu() for n, p in copy.named_parameters()}
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        copy.load_state_dict(t.model.state_dict())
        norm = t.normalizer(step)
        for i in t.global_batch(step):
            copy.zero_grad(set_to_none=True)
            try:
                (t.batch_loss(copy, [i]) / norm).backward()
            except (ValueError, RuntimeError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                return {n: g.to(torch.float64).abs() for n, g in grad.items()}, f"one sample alone fails: {first}"
            for n, p in copy.named_parameters():
                if p.grad is not None:
                    total[n] += p.grad.detach().cpu().to(torch.float64).abs()
    return total, None


def run_partition(
    task: GridTask, world: World, world_size: int, accum_steps: int, dtype: str | None, steps: int
) -> PartitionRun:
    """Train one partition for `steps` steps; rank 0 records gradients and states every step."""
    torch.manual_seed(task.seed)  # any randomness in the model (dropout) starts alike everywhere
    t = task.build(world, world_size, accum_steps, dtype)
    rec = PartitionRun(world_size, accum_steps, t.micro_batch, t.label, t.u)
    current: list[Any] = [0, None]  # the step, and the CPU RNG state when it began
    if world.is_main:
        copy = t.fresh_model()

        def observe(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
            # Just before the update: parameters are still those the gradient was taken at.
            rec.grads.append(_grads(t.model))
            rec.ref_grads.append(_full_batch_grad(t, copy, current[0], current[1]))

        t.optimizer.register_step_pre_hook(observe)
    for s in range(steps):
        current[:] = [s, torch.get_rng_state()]
        loss, indices = t.step(s)
        total = torch.tensor([loss], dtype=torch.float64)
        if world.distributed:
            dist.all_reduce(total, op=dist.ReduceOp.SUM)
        rec.losses.append(float(total) / t.normalizer(s))
        rec.samples.append(indices)
        rec.global_batches.append(t.global_batch(s))
        if world.is_main:
            rec.states.append(_state(t.model))
    return rec


@dataclass
class Reference:
    """The W = 1, k = 1 run, with what the bound needs, and the envelope's trajectory."""

    run: PartitionRun
    abs_sums: list[Tensors]  # per step: sum over samples of |per-sample gradient|
    bounds: list[Tensors]  # per step: elementwise rounding bound of the gradient
    envelope_states: list[Tensors]  # the reference retrained with gradients pushed by their bound
    notes: list[str] = field(default_factory=list)  # why sum |x_i| fell back to |sum| (per-sample impossible)


def run_reference(task: GridTask, dtype: str | None, steps: int, n_terms: int) -> Reference:
    """The reference run, then the envelope run; both in this process."""
    world = World()
    torch.manual_seed(task.seed)
    t = task.build(world, 1, 1, dtype)
    rec = PartitionRun(1, 1, t.micro_batch, t.label, t.u)
    copy = t.fresh_model()
    abs_sums: list[Tensors] = []
    grad_bounds: list[Tensors] = []
    notes: list[str] = []
    current: list[Any] = [0, None]

    def observe(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        g = _grads(t.model)
        rec.grads.append(g)
        rec.ref_grads.append(g)
        s, why = _abs_sum(t, copy, current[0], g, current[1])
        if why and why not in notes:
            notes.append(why)
        abs_sums.append(s)
        grad_bounds.append(bounds(s, g, n_terms, t.u, t.slice_u))

    t.optimizer.register_step_pre_hook(observe)
    for s in range(steps):
        current[:] = [s, torch.get_rng_state()]
        loss, indices = t.step(s)
        rec.losses.append(loss / t.normalizer(s))
        rec.samples.append(indices)
        rec.samples_by_rank = [rec.samples]
        rec.global_batches.append(t.global_batch(s))
        rec.states.append(_state(t.model))
    return Reference(rec, abs_sums, grad_bounds, _envelope(task, dtype, steps, grad_bounds), notes)


def _envelope(task: GridTask, dtype: str | None, steps: int, grad_bounds: list[Tensors]) -> list[Tensors]:
    """The reference trajectory with every gradient element pushed by its whole bound.

    Signs are random (fixed seed): a rounding error has no preferred direction, and pushing
    every element the same way would measure a systematic bias that rounding does not have.
    """
    torch.manual_seed(task.seed)
    t = task.build(World(), 1, 1, dtype)
    gen = torch.Generator().manual_seed(12345)
    current = [0]

    def push(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        with torch.no_grad():
            for n, p in t.model.named_parameters():
                if p.grad is None:
                    continue
                b = grad_bounds[current[0]][n]
                sign = torch.randint(0, 2, b.shape, generator=gen, dtype=torch.int64) * 2 - 1
                p.grad.add_((b * sign).to(p.grad.dtype).to(p.grad.device))

    t.optimizer.register_step_pre_hook(push)
    states = []
    for s in range(steps):
        current[0] = s
        t.step(s)
        states.append(_state(t.model))
    return states


def _grid_rank(
    world: World, task: GridTask, accum_steps: Sequence[int], dtypes: Sequence[str | None], steps: int
) -> list[PartitionRun]:
    """Every (dtype, k) partition of this world size, one after another, on this rank."""
    return [run_partition(task, world, world.world_size, k, dtype, steps) for dtype in dtypes for k in accum_steps]


# ---------------------------------------------------------------------------------------
# Comparing a partition with the reference.


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
    within_rounding: bool
    losses: list[float]
    max_loss_diff: float
    steps: list[dict[str, Any]]  # per step: bitwise, max abs/rel, norm rel, envelope, max ULP, grad excess, loss

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @property
    def label(self) -> str:
        return f"{self.dtype} W={self.world_size} k={self.accum_steps} b={self.micro_batch}"

    def summary(self) -> str:
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


def _floats(state: Tensors) -> Tensors:
    return {n: t for n, t in state.items() if t.is_floating_point()}


def _ints_equal(a: Tensors, b: Tensors) -> bool:
    return all(torch.equal(a[n], b[n]) for n in a if not a[n].is_floating_point())


def compare(run: PartitionRun, ref: Reference) -> PartitionResult:
    """Judge one partition: gradients against the bound, parameters against the envelope."""
    steps = []
    u = ref.run.u
    bitwise = grad_bitwise = ints_equal = True
    max_abs = max_rel = norm_rel_worst = grad_abs = grad_excess = bound_rel = grad_rel = env_excess = 0.0
    max_ulp = 0
    for s, state in enumerate(run.states):
        d = diff(_floats(state), _floats(ref.run.states[s]))
        g = diff(run.grads[s], run.ref_grads[s])
        ex = excess(run.grads[s], run.ref_grads[s], ref.bounds[s])
        env = diff(_floats(ref.envelope_states[s]), _floats(ref.run.states[s])).norm_rel_diff
        # Both runs round every stored parameter once per step: (s + 1) x 2u of room besides.
        allowed = env + 2 * u * (s + 1)
        e_ex = d.norm_rel_diff / allowed
        ints = _ints_equal(state, ref.run.states[s])
        bitwise &= d.bitwise_equal and g.bitwise_equal and ints
        grad_bitwise &= g.bitwise_equal
        ints_equal &= ints
        max_abs, max_rel = max(max_abs, d.max_abs_diff), max(max_rel, d.max_rel_diff)
        norm_rel_worst, max_ulp = max(norm_rel_worst, d.norm_rel_diff), max(max_ulp, d.max_ulp)
        grad_abs, grad_excess = max(grad_abs, g.max_abs_diff), max(grad_excess, ex)
        grad_rel = max(grad_rel, g.norm_rel_diff)
        bound_rel = max(bound_rel, norm_rel(ref.bounds[s], ref.run.grads[s]))
        env_excess = max(env_excess, e_ex)
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
    ok = acc.ok and ints_equal and grad_excess <= 1 and env_excess <= 1
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
        within_rounding=ok,
        losses=run.losses,
        max_loss_diff=max(st["loss_diff"] for st in steps) if steps else 0.0,
        steps=steps,
    )


# ---------------------------------------------------------------------------------------
# The grid.


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
                raise UsageError(
                    f"global batch {global_batch} is not divisible by W x k = {w} x {k} = {w * k}; "
                    "pick a G that every partition divides (e.g. 32 for W in 1,2,4 and k in 1,2,4,8)"
                )


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
            per_rank = [_grid_rank(World(), task, accum_steps, dtypes, steps)]
        else:
            per_rank = run_distributed(_grid_rank, w, task, list(accum_steps), list(dtypes), steps, timeout_s=timeout_s)
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


# ---------------------------------------------------------------------------------------
# For users' own models.


@dataclass
class UserTask:
    """A user's model, loss and data set, trained by a step that mirrors distshare's."""

    model_fn: Callable[[], nn.Module]
    loss_fn: Callable[[nn.Module, Any], torch.Tensor]
    dataset: Any
    global_batch: int
    optimizer: str = "sgd"
    lr: float = 0.1
    sync: str = "ddp"
    seed: int = 0
    uses_per_sample: int = 1

    def terms_per_sample(self) -> int:
        return self.uses_per_sample

    def _fresh(self) -> nn.Module:
        # Seeded here so that every rank, and every copy, starts from the same bits even if
        # model_fn draws its initialization from the global RNG.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            return self.model_fn()

    def _collate(self, indices: list[int]) -> Any:
        ds = self.dataset
        idx = torch.as_tensor(indices, dtype=torch.long)
        if isinstance(ds, torch.utils.data.TensorDataset):
            return tuple(t[idx] for t in ds.tensors)
        if isinstance(ds, torch.Tensor):
            return ds[idx]
        return torch.utils.data.default_collate([ds[i] for i in indices])

    def build(self, world: World, world_size: int, accum_steps: int, dtype: str | None) -> Trainee:
        model = self._fresh()
        params = model.parameters()
        opt = torch.optim.SGD(params, lr=self.lr) if self.optimizer == "sgd" else torch.optim.AdamW(params, lr=self.lr)
        sync = make_sync(self.sync, world.world_size)
        wrapped, opt = sync.prepare(model, opt)
        resolved = PlanConfig(world_size, self.global_batch, accum_steps, None).resolve()
        plan = GlobalBatchPlan(len(self.dataset), resolved, seed=self.seed)

        def step(s: int) -> tuple[float, list[list[int]]]:
            # distshare's step: summed loss per micro-batch, divided by the global count.
            micro = plan.rank_micro_batches(s, world.rank)
            n = float(len(plan.global_batch(s)))
            opt.zero_grad(set_to_none=True)
            total = 0.0
            for i, indices in enumerate(micro):
                with sync.micro_step(wrapped, i == len(micro) - 1):
                    loss = self.loss_fn(wrapped, self._collate(indices.tolist()))
                    sync.backward(loss / n)
                total += float(loss.detach())
            sync.synchronize(model)
            opt.step()
            return total, [m.tolist() for m in micro]

        dtype = _dtype(model)
        return Trainee(
            label=str(dtype).removeprefix("torch."),
            u=unit_roundoff(dtype),
            model=model,
            optimizer=opt,
            micro_batch=resolved.micro_batch,
            step=step,
            global_batch=lambda s: [int(i) for i in plan.global_batch(s)],
            normalizer=lambda s: float(len(plan.global_batch(s))),
            batch_loss=lambda m, idx: self.loss_fn(m, self._collate(idx)),
            fresh_model=self._fresh,
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
) -> GridResult:
    """Assert that every W x k split trains `model_fn()` like one process on the whole batch.

    `model_fn()` returns a fresh model (module-level: spawned ranks import it; it is called
    under a fixed seed); `loss_fn(model, batch)` returns the *summed* loss of a batch (the
    step divides by the global batch size); `dataset` is a `TensorDataset`, a tensor, or a
    sequence of samples that `default_collate` can batch. Each world size W > 1 runs on W
    spawned CPU ranks (real gloo groups). `uses_per_sample` is how often one weight is used
    per sample (positions, pixels): it widens the rounding bound's term count.

    Returns the `GridResult`; raises AssertionError with the grid's table when a partition
    differs from the big batch by more than rounding.
    """
    if global_batch is None:
        lcm = math.lcm(*(w * k for w in world_sizes for k in accum_steps))
        global_batch = lcm * max(1, -(-8 // lcm))
    if len(dataset) < global_batch:
        raise ValueError(f"the data set has {len(dataset)} samples, fewer than one global batch of {global_batch}")
    if sync == "exact":
        raise ValueError("sync='exact' is for distshare's own models: run `distshare equivalence --sync exact`")
    if optimizer not in ("sgd", "adamw"):
        raise ValueError(f"optimizer must be 'sgd' or 'adamw', got {optimizer!r}")
    task = UserTask(model_fn, loss_fn, dataset, global_batch, optimizer, lr, sync, seed, uses_per_sample)
    result = run_grid(task, world_sizes, accum_steps, [None], steps, progress=progress, timeout_s=timeout_s)
    if not result.ok:
        raise AssertionError("gradient accumulation is not equivalent to one big batch:\n" + result.text())
    return result
