"""The ways real training code breaks "k micro-batches on W ranks == one big batch".

    distshare equivalence --pitfalls

Each pitfall runs on small data in seconds, side by side with the correct version, and is
caught by a check that does not know it is there: the partition grid (a gradient further
from the big-batch gradient than rounding allows), the sample accounting (a sample counted
zero times or twice), or a count of all-reduces. The record says what was measured and
whether distshare's own step avoids it.

    1 token normalization   mean loss per micro-batch / k, with variable-length sequences
    2 accumulation scale    forgetting to divide by k, or dividing twice
    3 DistributedSampler    padding repeats samples; drop_last drops them
    4 BatchNorm             batch statistics depend on the split (SyncBatchNorm: ranks only)
    5 dropout               the random masks depend on the split
    6 forward outside no_sync  DDP syncs at every micro-batch
    7 summed loss + DDP average  the gradient is divided by W once too often
    8 Join with uneven inputs  divides by the initial world size

DDP pitfalls (6-8) run on 2 spawned gloo ranks, real DistributedDataParallel.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from distshare.config import PlanConfig, RunConfig, load_config
from distshare.data.accounting import account, account_epoch, distributed_sampler_indices
from distshare.data.plan import GlobalBatchPlan
from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World
from distshare.equivalence import ConfigTask, GridResult, UserTask, run_grid
from distshare.numerics.rounding import bounds, excess
from distshare.training import Run, loss_sum


@dataclass
class Pitfall:
    """One pitfall, measured against its correct version."""

    number: int
    name: str
    explanation: str
    discrepancy: str  # the headline measurement, one line
    detected_by: str  # grid | accounting | all-reduce count
    detected: bool  # the check flagged the pitfall (and passed the correct version)
    distshare_avoids: bool
    measured: dict[str, Any] = field(default_factory=dict)  # the numbers behind the headline

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------
# Small grids in one process (W = 1 is enough to break accumulation).

KS = (1, 2, 4)
G = 16


def _config(*overrides: str) -> RunConfig:
    base = [
        f"plan.global_batch={G}",
        "plan.accum_steps=1",
        "plan.micro_batch=null",
        "data.num_samples=128",
        "data.task=roles",
        "data.variable_length=true",
        "model.dtype=float64",
        "steps=2",
    ]
    return load_config(None, base + list(overrides))


def _grid(task: Any, ks: tuple[int, ...] = KS, world_sizes: tuple[int, ...] = (1,)) -> GridResult:
    return run_grid(task, world_sizes, ks, [None], steps=2, progress=False)


def _worst(result: GridResult) -> dict[str, float]:
    return {
        "grad_norm_rel_diff": max(p.grad_norm_rel_diff for p in result.partitions),
        "grad_excess_over_bound": max(p.grad_excess for p in result.partitions),
        "param_norm_rel_diff": max(p.norm_rel_diff for p in result.partitions),
        "bound_norm_rel": max(p.grad_bound_norm_rel for p in result.partitions),
    }


@dataclass
class MicroMeanTask(ConfigTask):
    """distshare's model and data, but a step that means the loss per micro-batch.

    `divide_by` is what the per-micro-batch mean is divided by, as a power of k:
    1 (the usual "loss / accum_steps"), 0 (forgot), 2 (divided by k twice).
    """

    k_power: int = 1

    def make_step(self, run: Run) -> Callable[[int], tuple[float, list[list[int]]]]:
        def step(s: int) -> tuple[float, list[list[int]]]:
            micro = run.plan.rank_micro_batches(s, run.world.rank)
            k = len(micro)
            run.optimizer.zero_grad(set_to_none=True)
            total = 0.0
            for i, indices in enumerate(micro):
                batch = run.table.select(indices)
                with run.sync.micro_step(run.wrapped, i == k - 1):
                    loss = loss_sum(run.wrapped(**batch.inputs), batch.labels)
                    # The pitfall: each micro-batch's own mean, then / k (HF transformers < 4.46).
                    run.sync.backward(loss / batch.num_items / k**self.k_power)
                total += float(loss.detach())
            run.sync.synchronize(run.model)
            run.optimizer.step()
            return total, [m.tolist() for m in micro]

        return step


def token_normalization() -> Pitfall:
    correct = _grid(ConfigTask(_config()))
    wrong = _grid(MicroMeanTask(_config()))
    fixed = _grid(MicroMeanTask(_config("data.variable_length=false")))
    w, c = _worst(wrong), _worst(correct)
    return Pitfall(
        1,
        "mean loss per micro-batch / k with variable-length sequences",
        "Averaging the loss inside each micro-batch and dividing by k gives every micro-batch the "
        "same weight, however many tokens it holds; the big batch gives every token the same "
        "weight. With variable-length sequences a token in a short micro-batch counts more. With "
        "fixed lengths the two agree, which is why the bug (HF transformers, fixed in 2024 by "
        "normalizing by num_items_in_batch) went unnoticed: nobody measured the grid on varied "
        "lengths. distshare sums the loss and divides by the global batch's token count.",
        f"gradient off by {w['grad_norm_rel_diff']:.1e} (normwise rel), {w['grad_excess_over_bound']:.1e} x the "
        f"rounding bound; correct step: {c['grad_excess_over_bound']:.2f} x; same bug on fixed lengths: "
        f"{_worst(fixed)['grad_excess_over_bound']:.2f} x (invisible)",
        "grid",
        detected=not wrong.ok and correct.ok and fixed.ok,
        distshare_avoids=correct.ok,
        measured={"wrong": w, "correct": c, "wrong_on_fixed_lengths": _worst(fixed)},
    )


def accumulation_scale() -> Pitfall:
    cfg = _config("data.task=subject", "data.variable_length=false")
    correct = _grid(ConfigTask(cfg))
    forgot = _grid(MicroMeanTask(cfg, k_power=0))
    twice = _grid(MicroMeanTask(cfg, k_power=2))
    k4 = {
        name: next(p for p in r.partitions if p.accum_steps == 4).grad_norm_rel_diff
        for name, r in (("forgot", forgot), ("twice", twice))
    }
    return Pitfall(
        2,
        "forgetting to divide by k, or dividing twice",
        "Accumulating k micro-batch means without dividing by k makes the gradient k times the "
        "big batch's; dividing by hand when the framework already does (accelerate's "
        "`Accelerator.backward` divides the loss by gradient_accumulation_steps) makes it 1/k of "
        "it. With Adam the parameters barely show it (Adam's update is nearly scale-invariant), "
        "with SGD the step is k times off; the gradient shows it at once. distshare divides once, "
        "by the global item count, and never leaves it to a wrapper.",
        f"k=4: gradient off by {k4['forgot']:.2f} (forgot, expected k-1 = 3) and {k4['twice']:.2f} "
        "(twice, expected 1-1/k = 0.75), normwise rel",
        "grid",
        detected=not forgot.ok and not twice.ok and correct.ok,
        distshare_avoids=correct.ok,
        measured={"forgot": _worst(forgot), "twice": _worst(twice), "correct": _worst(correct), "k4": k4},
    )


def distributed_sampler(num_samples: int = 42, world_size: int = 4) -> Pitfall:
    padded = account_epoch(num_samples, distributed_sampler_indices(num_samples, world_size, drop_last=False))
    dropped = account_epoch(num_samples, distributed_sampler_indices(num_samples, world_size, drop_last=True))
    # distshare's plan over the same data: the last incomplete global batch is split over the slots.
    resolved = PlanConfig(world_size=world_size, global_batch=8, accum_steps=1, micro_batch=None).resolve()
    plan = GlobalBatchPlan(num_samples, resolved, seed=0, drop_last=False)
    steps = plan.steps_per_epoch
    ours = account(plan, [[plan.rank_micro_batches(s, r) for s in range(steps)] for r in range(world_size)])
    n_dup = sum(len(v) for v in padded.duplicated.values())
    n_missing = sum(len(v) for v in dropped.missing.values())
    return Pitfall(
        3,
        "DistributedSampler pads with duplicates; drop_last drops samples",
        f"torch's DistributedSampler gives every rank the same number of samples. With {num_samples} "
        f"samples on {world_size} ranks, drop_last=False pads the epoch to a multiple of {world_size} by "
        "repeating samples from the start of the order, so their gradient counts twice; drop_last=True "
        "cuts the tail, so some samples never count. distshare's plan splits the last global batch "
        "over the ranks instead (some slots smaller or empty, normalized by the global count).",
        f"drop_last=False: {n_dup} samples counted twice; drop_last=True: {n_missing} never counted; "
        f"distshare's plan: {ours.summary()}",
        "accounting",
        detected=not padded.ok and not dropped.ok and ours.ok,
        distshare_avoids=ours.ok,
        measured={
            "padded": {"histogram": padded.count_histogram[0], "duplicated": n_dup},
            "drop_last": {"histogram": dropped.count_histogram[0], "missing": n_missing},
            "distshare_plan": {"ok": ours.ok, "steps": steps},
        },
    )


def batchnorm() -> Pitfall:
    cnn = ("model.name=cnn", "data.name=shapes", "data.num_samples=64", "model.conv_channels=4")
    bn = _grid(ConfigTask(_config(*cnn, "model.norm=batch")))
    gn = _grid(ConfigTask(_config(*cnn, "model.norm=group")))
    wb, wg = _worst(bn), _worst(gn)
    return Pitfall(
        4,
        "BatchNorm: batch statistics depend on the partition",
        "BatchNorm normalizes each micro-batch by its own mean and variance, so k micro-batches of "
        "b samples compute a different function than one batch of k x b, and the running statistics "
        "follow the micro-batches. SyncBatchNorm only pools statistics across ranks, not across "
        "micro-steps: on W ranks with k micro-batches it normalizes over W x b samples, exactly what "
        "one process with micro-batch W x b does (the W = 1, k rows below). (On the CPU torch refuses "
        "SyncBatchNorm outright: 'SyncBatchNorm layers only work with GPU modules'.) GroupNorm has no "
        "cross-sample statistics and passes the grid. distshare cannot make BatchNorm split-invariant; "
        "its grid flags it.",
        f"BatchNorm: gradient off by {wb['grad_norm_rel_diff']:.1e} normwise, "
        f"{wb['grad_excess_over_bound']:.1e} x the rounding bound; GroupNorm: {wg['grad_excess_over_bound']:.2f} x",
        "grid",
        detected=not bn.ok and gn.ok,
        distshare_avoids=False,
        measured={"batchnorm": wb, "groupnorm": wg},
    )


# Dropout: a model of its own (distshare's models have none, on purpose).


class DropoutMLP(nn.Module):
    """Linear, ReLU, dropout, linear. `keyed`: masks drawn per sample from its global index."""

    def __init__(self, keyed: bool = False, p: float = 0.5) -> None:
        super().__init__()
        self.keyed, self.p = keyed, p
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 4)

    def forward(self, x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.fc1(x))
        if not self.keyed:
            h = F.dropout(h, self.p, self.training)
        elif self.training:
            # A sample's mask depends on the sample, not on which micro-batch it landed in.
            rows = [torch.rand(h.shape[1], generator=torch.Generator().manual_seed(int(i))) for i in index]
            keep = (torch.stack(rows) >= self.p).to(h.dtype) if rows else h.new_zeros(h.shape)
            h = h * keep / (1 - self.p)
        return self.fc2(h)


def dropout_model() -> nn.Module:
    return DropoutMLP().double()


def keyed_dropout_model() -> nn.Module:
    return DropoutMLP(keyed=True).double()


def mlp_loss(model: nn.Module, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    x, y, index = batch
    return F.cross_entropy(model(x, index), y, reduction="sum")


def toy_dataset(n: int = 64, seed: int = 0) -> torch.utils.data.TensorDataset:
    """Random 8-feature inputs, 4 classes, and each sample's own index (for keyed masks)."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 8, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 4, (n,), generator=gen)
    return torch.utils.data.TensorDataset(x, y, torch.arange(n))


def dropout() -> Pitfall:
    data = toy_dataset()
    both = (1, 2)
    wrong = _grid(UserTask(dropout_model, mlp_loss, data, G, optimizer="sgd", lr=0.1), world_sizes=both)
    keyed = _grid(UserTask(keyed_dropout_model, mlp_loss, data, G, optimizer="sgd", lr=0.1), world_sizes=both)
    one = GridResult(G, wrong.steps, wrong.n_terms, [p for p in wrong.partitions if p.world_size == 1], {})
    two = GridResult(G, wrong.steps, wrong.n_terms, [p for p in wrong.partitions if p.world_size == 2], {})
    w1, w2, c = _worst(one), _worst(two), _worst(keyed)
    return Pitfall(
        5,
        "dropout: the random masks depend on the partition",
        "Dropout draws its masks from the RNG stream as batches arrive, so a sample's mask depends on "
        "where in the stream its micro-batch came. In one CPU process torch draws the masks in order "
        "from one stream, and k micro-batches happen to get the very masks of the big batch (measured "
        "below: within rounding). On W ranks seeded alike, every rank draws the *start* of the stream "
        "for its own, different samples: different masks, a different gradient, a different model. "
        "Keying each sample's mask to its global index (and, in real training, the step) makes dropout "
        "split-invariant: the correct version below. distshare's models have no dropout, so its step "
        "cannot hit this.",
        f"2 ranks: gradient off by {w2['grad_norm_rel_diff']:.1e} normwise, parameters by "
        f"{w2['param_norm_rel_diff']:.1e} after 2 steps; 1 rank x k: {w1['grad_excess_over_bound']:.2f} x the "
        f"bound; per-sample keyed masks: {c['grad_excess_over_bound']:.2f} x",
        "grid",
        detected=one.ok and not two.ok and keyed.ok,
        distshare_avoids=True,
        measured={"torch_dropout_one_rank": w1, "torch_dropout_two_ranks": w2, "keyed_masks": c},
    )


# ---------------------------------------------------------------------------------------
# DDP pitfalls on 2 real gloo ranks.


def _mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def _grads(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: float) -> tuple[dict, dict]:
    """Single-process gradient of the whole batch at `model`'s parameters, and sum |per-sample|."""
    copy = _mlp()
    copy.load_state_dict(model.state_dict())
    copy.zero_grad()
    (F.cross_entropy(copy(x), y, reduction="sum") / norm).backward()
    ref = _grads(copy)
    abs_sum = {n: torch.zeros_like(g) for n, g in ref.items()}
    for i in range(len(x)):
        copy.zero_grad()
        (F.cross_entropy(copy(x[i : i + 1]), y[i : i + 1], reduction="sum") / norm).backward()
        for n, p in copy.named_parameters():
            abs_sum[n] += p.grad.abs()
    return ref, abs_sum


def _versus(grads: dict, ref: dict, abs_sum: dict, n_terms: int) -> dict[str, float]:
    """How a gradient compares with the reference: normwise rel diff, norm ratio, excess over the bound."""
    num = sum(float((grads[n] - ref[n]).pow(2).sum()) for n in ref) ** 0.5
    den = sum(float(ref[n].pow(2).sum()) for n in ref) ** 0.5
    size = sum(float(grads[n].pow(2).sum()) for n in ref) ** 0.5
    return {
        "norm_rel_diff": num / den,
        "norm_ratio": size / den,
        "excess_over_bound": excess(grads, ref, bounds(abs_sum, ref, n_terms)),
    }


class _Counter:
    """A comm hook that all-reduces (SUM or AVG) and counts how often it ran."""

    def __init__(self, world_size: int, average: bool) -> None:
        self.calls = 0

        # A plain function without annotations: DDP reads a hook's __name__ and checks its
        # annotations at runtime, and this module's are strings (`from __future__`).
        def hook(state, bucket):  # noqa: ANN001, ANN202
            self.calls += 1
            buf = bucket.buffer()
            if average:
                buf.div_(world_size)
            fut = dist.all_reduce(buf, op=dist.ReduceOp.SUM, async_op=True).get_future()
            return fut.then(lambda f: f.value()[0])

        self.hook = hook


def _ddp(hook: _Counter | None) -> DistributedDataParallel:
    ddp = DistributedDataParallel(_mlp())
    if hook is not None:
        ddp.register_comm_hook(state=None, hook=hook.hook)
    return ddp


def _rank_data(world: World, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch (every rank knows it) and this rank's half of it."""
    data = toy_dataset(n, seed=1)
    x, y = data.tensors[0], data.tensors[1]
    half = n // world.world_size
    lo = world.rank * half
    return x, y, x[lo : lo + half], y[lo : lo + half]


def _no_sync_case(world: World, k: int, forward_inside: bool, average: bool) -> tuple[int, dict]:
    """One step of k micro-batches per rank; returns (all-reduces on this rank, synced gradient)."""
    n = 32
    _, _, x, y = _rank_data(world, n)
    hook = _Counter(world.world_size, average)
    ddp = _ddp(hook)
    # With SUM the loss is divided by the global count; DDP's average wants the local count.
    norm = n / world.world_size if average else n
    for i, (xs, ys) in enumerate(zip(x.chunk(k), y.chunk(k), strict=True)):
        ctx = contextlib.nullcontext() if i == k - 1 else ddp.no_sync()
        if forward_inside:
            with ctx:
                (F.cross_entropy(ddp(xs), ys, reduction="sum") / norm).backward()
        else:
            loss = F.cross_entropy(ddp(xs), ys, reduction="sum") / norm  # forward outside no_sync
            with ctx:
                loss.backward()
    return hook.calls, _grads(ddp.module)


def _ddp_rank(world: World) -> dict[str, Any] | None:
    """Pitfalls 6-8 on this rank; rank 0 returns the measurements."""
    out: dict[str, Any] = {}
    n, k = 32, 4
    x_all, y_all, _, _ = _rank_data(world, n)
    ref, abs_sum = _reference(_mlp(), x_all, y_all, n)

    # 6: no_sync with the forward outside it.
    for name, inside, average in (
        ("inside_sum", True, False),
        ("outside_sum", False, False),
        ("outside_average", False, True),
    ):
        calls, grads = _no_sync_case(world, k, inside, average)
        out[f"no_sync_{name}"] = {"allreduces": calls, **_versus(grads, ref, abs_sum, n)}

    # 7: the loss already normalized by the global count, and DDP's default average on top.
    _, _, x, y = _rank_data(world, n)
    for name, hook in (("sum_hook", _Counter(world.world_size, average=False)), ("ddp_average", None)):
        ddp = _ddp(hook)
        (F.cross_entropy(ddp(x), y, reduction="sum") / n).backward()
        out[f"summed_{name}"] = _versus(_grads(ddp.module), ref, abs_sum, n)

    # 8: uneven inputs under Join. Rank 0 has 3 batches of 4, rank 1 has 2.
    data = toy_dataset(20, seed=2)
    xs, ys = data.tensors[0], data.tensors[1]
    batches = [(xs[i : i + 4], ys[i : i + 4]) for i in range(0, 20, 4)]
    mine = batches[world.rank :: world.world_size]
    for name, divide in (("initial_world_size", True), ("active_ranks", False)):
        ddp = DistributedDataParallel(_mlp())
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        with Join([ddp], divide_by_initial_world_size=divide):
            for step, (bx, by) in enumerate(mine):
                opt.zero_grad()
                F.cross_entropy(ddp(bx), by).backward()  # the usual per-rank mean
                if world.rank == 0 and step == len(mine) - 1:
                    # The last global batch holds only this rank's 4 samples.
                    r, a = _reference(ddp.module, bx, by, len(bx))
                    out[f"join_{name}"] = _versus(_grads(ddp.module), r, a, len(bx))
                opt.step()
    return out if world.is_main else None


def ddp_pitfalls(timeout_s: float = 120.0) -> list[Pitfall]:
    m = run_distributed(_ddp_rank, 2, timeout_s=timeout_s)[0]
    inside, outside, outside_avg = m["no_sync_inside_sum"], m["no_sync_outside_sum"], m["no_sync_outside_average"]
    summed, avg = m["summed_sum_hook"], m["summed_ddp_average"]
    j_init, j_active = m["join_initial_world_size"], m["join_active_ranks"]
    k = 4
    return [
        Pitfall(
            6,
            "forward pass outside no_sync syncs early",
            "DDP decides at the forward pass whether the coming backward will all-reduce: `no_sync()` "
            "must hold the forward *and* the backward. With only the backward inside it, every "
            "micro-batch all-reduces: k times the communication. Under DDP's default average the "
            "gradient still comes out right (the early syncs average what is already equal), so only a "
            "count of all-reduces sees it; under a SUM reduction (distshare's) the early micro-batches "
            "are summed over the ranks again at every sync and the gradient is wrong. distshare's step "
            "runs forward and backward inside the same micro-step context.",
            f"k={k}: {outside['allreduces']} all-reduces per step instead of {inside['allreduces']}; with SUM "
            f"the gradient is off by {outside['norm_rel_diff']:.2f} normwise; with the default average "
            f"{outside_avg['excess_over_bound']:.2f} x the rounding bound (right, but {k} x the traffic)",
            "all-reduce count",
            detected=outside["allreduces"] > inside["allreduces"] and inside["excess_over_bound"] <= 1,
            distshare_avoids=True,
            measured={"inside_no_sync": inside, "outside_no_sync_sum": outside, "outside_no_sync_average": outside_avg},
        ),
        Pitfall(
            7,
            "summed loss with DDP's averaging over W",
            "A loss already normalized for the whole global batch (summed, divided by the global item "
            "count, as large-batch semantics need) must be *summed* over ranks. DDP averages by default, "
            "dividing by W once more: the gradient is 1/W of the big batch's, and changes with W at a "
            "fixed global batch. distshare registers a SUM comm hook.",
            f"W=2: gradient norm {avg['norm_ratio']:.3f} x the big batch's (expected 1/W = 0.5), "
            f"{avg['excess_over_bound']:.1e} x the rounding bound; SUM hook: {summed['excess_over_bound']:.2f} x",
            "grid",
            detected=avg["excess_over_bound"] > 1 and summed["excess_over_bound"] <= 1,
            distshare_avoids=True,
            measured={"sum_hook": summed, "ddp_average": avg},
        ),
        Pitfall(
            8,
            "uneven inputs with Join divide by the initial world size",
            "With uneven inputs, `Join` lets ranks that ran out of data shadow the all-reduce with zeros. "
            "By default (divide_by_initial_world_size=True) DDP still divides by the initial W, so a step "
            "where only some ranks have data gets a gradient scaled by active/initial ranks. "
            "divide_by_initial_world_size=False divides by the active ranks instead. distshare never has "
            "uneven inputs: every rank runs k micro-steps (a short slot holds fewer or zero samples, which "
            "contribute exactly zero) and the loss is divided by the global count.",
            f"last step (1 of 2 ranks with data): gradient norm {j_init['norm_ratio']:.3f} x the big batch's "
            f"(expected 0.5), {j_init['excess_over_bound']:.1e} x the bound; dividing by active ranks: "
            f"{j_active['excess_over_bound']:.2f} x",
            "grid",
            detected=j_init["excess_over_bound"] > 1 and j_active["excess_over_bound"] <= 1,
            distshare_avoids=True,
            measured={"divide_by_initial_world_size": j_init, "divide_by_active_ranks": j_active},
        ),
    ]


PITFALLS: tuple[Callable[[], Pitfall], ...] = (
    token_normalization,
    accumulation_scale,
    distributed_sampler,
    batchnorm,
    dropout,
)


def run_pitfalls(progress: bool = True, timeout_s: float = 120.0) -> list[Pitfall]:
    """Every pitfall, in order; the three DDP ones share one spawn of 2 ranks."""
    out = []
    with _bar(len(PITFALLS) + 1, progress) as bar:
        for fn in PITFALLS:
            out.append(fn())
            bar.update(1)
        out.extend(ddp_pitfalls(timeout_s))
        bar.update(1)
    return out


@contextlib.contextmanager
def _bar(total: int, progress: bool) -> Iterator[tqdm]:
    bar = tqdm(total=total, desc="pitfalls", unit="pitfall", disable=not progress, leave=False)
    try:
        yield bar
    finally:
        bar.close()
