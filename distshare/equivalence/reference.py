"""The reference (W = 1, k = 1: one process, one big batch) and its envelope.

Besides its own trajectory, the reference measures what the rounding bound needs: at every
step, sum over samples of |that sample's gradient contribution| (per-sample gradients in one
batched pass where the model allows, else one step per sample), and from it the elementwise
bound `distshare.numerics.rounding.bounds`. The envelope is the reference retrained with
every step's gradient pushed by its whole bound (random signs): how far rounding-sized
gradient differences can carry the parameters through the optimizer. It is measured, not
hand-picked, and a heuristic (a linear response to random-sign pushes), which the report says.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from distshare.distributed.world import World
from distshare.equivalence.gradient import SampleMagnitudes, step_gradient
from distshare.equivalence.runs import PartitionRun, Tensors, grads_of, state_of
from distshare.equivalence.tasks import GridTask, Trainee
from distshare.errors import UsageError
from distshare.integrity.fingerprint import state_digest
from distshare.numerics.rounding import bounds


@dataclass
class Reference:
    """The W = 1, k = 1 run, with what the bound needs, and the envelope's trajectory."""

    run: PartitionRun
    abs_sums: list[Tensors]  # per step: sum over samples of |per-sample gradient|
    bounds: list[Tensors]  # per step: elementwise rounding bound of the gradient
    envelope_states: list[Tensors]  # the reference retrained with gradients pushed by their bound
    notes: list[str] = field(default_factory=list)  # why sum |x_i| fell back to |sum| (per-sample impossible)
    final_fingerprint: str = ""  # digest of the final training state (parameters, buffers, optimizer state)


def _abs_sum(t: Trainee, copy: nn.Module, step: int, grad: Tensors, rng: torch.Tensor) -> tuple[Tensors, str | None]:
    """sum over samples of |that sample's contribution to the gradient|, elementwise.

    Each contribution is that sample's gradient, divided by the global count: all samples'
    in one batched per-sample pass where the model allows (`_batched_abs_sum`), else the one
    step on each sample alone. Returns it with None, or, when the model cannot run one sample
    alone (BatchNorm in training mode refuses a batch of one), |gradient| with the reason: that
    assumes no cancellation between samples, a tighter bound than the truth; said in the report.
    """
    with torch.random.fork_rng(devices=[]):
        torch.set_rng_state(rng)
        copy.load_state_dict(t.model.state_dict())
        norm = t.normalizer(step)
        indices = t.global_batch(step)
        batched = _batched_abs_sum(t, copy, indices, norm)
        if batched is not None:
            return batched, None
        total: Tensors = {n: torch.zeros_like(p, dtype=torch.float64).cpu() for n, p in copy.named_parameters()}
        for i in indices:
            try:
                step_gradient(copy, [[i]], norm, len(indices), t.batch_loss)
            except (ValueError, RuntimeError) as exc:
                first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
                return {n: g.to(torch.float64).abs() for n, g in grad.items()}, f"one sample alone fails: {first}"
            for n, p in copy.named_parameters():
                if p.grad is not None:
                    total[n] += p.grad.detach().cpu().to(torch.float64).abs()
    return total, None


def _batched_abs_sum(t: Trainee, copy: nn.Module, indices: list[int], norm: float) -> Tensors | None:
    """`_abs_sum` in one batched per-sample pass, or None where it cannot be: the trainee gives
    no per-sample losses, the model mixes samples (BatchNorm in training mode, dropout), or
    per-sample gradients cannot run it. The one-sample loop then computes the same sums."""
    if t.sample_batch is None or t.sample_losses is None:
        return None
    sync = SampleMagnitudes()
    try:
        step_gradient(
            copy, [t.sample_batch(indices)], norm, len(indices), t.batch_loss, sync=sync, sample_loss_fn=t.sample_losses
        )
    except (UsageError, ValueError, RuntimeError):
        # A property of the model (its layers, its precision), not of the step: every later
        # step of this trainee takes the loop at once instead of failing the same way again.
        t.sample_batch = None
        return None
    return sync.totals


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
        g = grads_of(t.model)
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
        rec.states.append(state_of(t.model))
    final = state_digest(t.model, t.optimizer)
    return Reference(rec, abs_sums, grad_bounds, _envelope(task, dtype, steps, grad_bounds), notes, final)


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
        states.append(state_of(t.model))
    return states
