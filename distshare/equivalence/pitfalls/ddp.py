"""Pitfalls 6-8: DDP used the usual way, on 2 spawned gloo ranks of real DistributedDataParallel.

    6 forward outside no_sync    DDP syncs at every micro-batch
    7 summed loss + DDP average  the gradient is divided by W once too often
    8 Join with uneven inputs    divides by the initial world size

Each case is distshare's one step (`optimizer_step`) with one ingredient swapped: the sync
(`no_sync()` around the backward only; DDP's own average instead of a SUM hook) or the
normalizer (each rank's own sample count), measured against the single-process gradient
of the whole batch and its rounding bound. A comm hook counts the all-reduces.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.distributed.algorithms.join import Join
from torch.nn.parallel import DistributedDataParallel

from distshare.distributed.spawn import run_distributed
from distshare.distributed.sync import DDPSync
from distshare.distributed.world import World
from distshare.equivalence.gradient import step_gradient
from distshare.equivalence.pitfalls.grid import toy_dataset
from distshare.equivalence.pitfalls.record import Pitfall
from distshare.equivalence.runs import Tensors, grads_of
from distshare.numerics.rounding import bounds, excess, norm_rel
from distshare.training import optimizer_step


def _mlp() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def _summed_loss(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction="sum")


def _reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor, norm: float) -> tuple[Tensors, Tensors]:
    """Single-process gradient of the whole batch at `model`'s parameters, and sum |per-sample|."""
    copy = _mlp()
    copy.load_state_dict(model.state_dict())
    step_gradient(copy, [(x, y)], norm, len(x), _summed_loss)
    ref = grads_of(copy)
    abs_sum = {n: torch.zeros_like(g) for n, g in ref.items()}
    for i in range(len(x)):
        step_gradient(copy, [(x[i : i + 1], y[i : i + 1])], norm, len(x), _summed_loss)
        for n, p in copy.named_parameters():
            abs_sum[n] += p.grad.abs()
    return ref, abs_sum


def _versus(grads: Tensors, ref: Tensors, abs_sum: Tensors, n_terms: int) -> dict[str, float]:
    """How a gradient compares with the reference: normwise rel diff, norm ratio, excess over the bound."""
    return {
        "norm_rel_diff": norm_rel({n: grads[n] - ref[n] for n in ref}, ref),
        "norm_ratio": norm_rel({n: grads[n] for n in ref}, ref),
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


class _DDP(DDPSync):
    """distshare's DDP sync with another comm hook: a counting one, or none (torch's average over W)."""

    def __init__(self, counter: _Counter | None = None) -> None:
        self.counter = counter

    def wrap(self, model: nn.Module) -> nn.Module:
        ddp = DistributedDataParallel(model)
        if self.counter is not None:
            ddp.register_comm_hook(state=None, hook=self.counter.hook)
        return ddp


class _ForwardOutsideNoSync(_DDP):
    """The pitfall: `no_sync()` holds only the backward; the forward ran outside it."""

    wrapped: Any = None
    last = True

    @contextlib.contextmanager
    def micro_step(self, wrapped: nn.Module, last: bool) -> Iterator[None]:
        self.wrapped, self.last = wrapped, last
        yield  # the forward runs here, outside no_sync(): DDP has already decided to sync

    def backward(self, loss: torch.Tensor) -> None:
        with contextlib.nullcontext() if self.last else self.wrapped.no_sync():
            loss.backward()


def _rank_data(world: World, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The global batch (every rank knows it) and this rank's half of it."""
    data = toy_dataset(n, seed=1)
    x, y = data.tensors[0], data.tensors[1]
    half = n // world.world_size
    lo = world.rank * half
    return x, y, x[lo : lo + half], y[lo : lo + half]


def _no_sync_case(world: World, k: int, forward_inside: bool, average: bool) -> tuple[int, Tensors]:
    """One step of k micro-batches per rank; returns (all-reduces on this rank, synced gradient)."""
    n = 32
    _, _, x, y = _rank_data(world, n)
    counter = _Counter(world.world_size, average)
    sync = _DDP(counter) if forward_inside else _ForwardOutsideNoSync(counter)
    # With SUM the loss is divided by the global count; DDP's average wants the local count.
    norm = n / world.world_size if average else n
    model = _mlp()
    step_gradient(model, list(zip(x.chunk(k), y.chunk(k), strict=True)), norm, n, _summed_loss, sync=sync)
    return counter.calls, grads_of(model)


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
    for name, sync in (("sum_hook", _DDP(_Counter(world.world_size, average=False))), ("ddp_average", _DDP())):
        model = _mlp()
        step_gradient(model, [(x, y)], n, n, _summed_loss, sync=sync)
        out[f"summed_{name}"] = _versus(grads_of(model), ref, abs_sum, n)

    # 8: uneven inputs under Join. Rank 0 has 3 batches of 4, rank 1 has 2.
    data = toy_dataset(20, seed=2)
    xs, ys = data.tensors[0], data.tensors[1]
    batches = [(xs[i : i + 4], ys[i : i + 4]) for i in range(0, 20, 4)]
    mine = batches[world.rank :: world.world_size]
    for name, divide in (("initial_world_size", True), ("active_ranks", False)):
        model, sync = _mlp(), _DDP()  # DDP as torch ships it: the all-reduce averages over W
        wrapped, opt = sync.prepare(model, torch.optim.SGD(model.parameters(), lr=0.1))
        with Join([wrapped], divide_by_initial_world_size=divide):
            for step, (bx, by) in enumerate(mine):
                if world.rank == 0 and step == len(mine) - 1:
                    # The last global batch holds only this rank's 4 samples.
                    opt.register_step_pre_hook(_measure_join(out, f"join_{name}", model, bx, by))
                # The usual per-rank mean: the normalizer is this rank's own sample count.
                optimizer_step(model, wrapped, opt, sync, [(bx, by)], len(bx), len(bx), _summed_loss)
    return out if world.is_main else None


def _measure_join(out: dict[str, Any], key: str, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> Any:
    """An optimizer pre-step hook: the synced gradient against the reference, before the update."""

    def measure(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        r, a = _reference(model, x, y, len(x))
        out[key] = _versus(grads_of(model), r, a, len(x))

    return measure


def ddp_pitfalls(timeout_s: float = 120.0) -> list[Pitfall]:
    m = run_distributed(_ddp_rank, 2, timeout_s=timeout_s, deadline_s=None)[0]
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
