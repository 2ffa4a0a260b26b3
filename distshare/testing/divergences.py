"""Reproductions of publicly reported causes of silent replica divergence, each beside its fix.

Every reproduction is a function `fn(world, fixed, checker="compare") -> Outcome` run on every
rank of a spawned world (`run_distributed(run_all, 3)`). It builds a tiny model, trains it for
a few steps with its own plain loop, written the way the user in the report wrote it
(zero_grad, forward, loss, backward, step; every rank on its own data), and checks the
replicas: once before training (the baseline), then after every `optimizer.step()`, with the
gradients the step just used. The bug is reproduced by its mechanism, what the user's code
really did wrong (a bypassed wrapper, a parameter swapped under DDP's hooks, a scheduler
stepped under `if rank == 0:`), never by a shortcut that sets a tensor; the one exception is
silent data corruption, whose mechanism is a flipped bit. With `fixed=True` the same loop runs
with the fix, and no check may report a divergence.

    cause                  reproduction               the bug (the fix)
    init_mismatch          init_seed_allreduce        per-rank seeds, hand-written gradient all-reduce
                                                      (seed the model with the shared seed)
                           init_sync_false            per-rank seeds, DDP(init_sync=False) (init_sync=True)
                           hsdp_init_mismatch         per-rank seeds, then fully_shard on an HSDP mesh
                                                      (the shared seed before fully_shard; `SHARDED`,
                                                      a world of 4: `run_hsdp`)
    grads_not_synced       module_bypass              training through ddp.module(x) (through ddp(x))
                           gpt2_module_bypass         the same on transformers' GPT-2, tied embeddings
                           dtype_after_wrap           model.double() after DDP(...) (before)
                           param_replaced             a new nn.Parameter assigned after DDP(...) (before)
                           param_replaced_find_unused the same under find_unused_parameters=True
                           unfrozen_after_wrap        requires_grad flipped on after DDP(...) (re-wrap)
                           unused_param               a parameter the forward never uses
                                                      (find_unused_parameters=True)
    buffers_only           bn_no_buffer_broadcast     BatchNorm, broadcast_buffers=False
                                                      (running statistics averaged over ranks)
                           bn_buffers_after_step      BatchNorm under DDP's default buffer sync, state
                                                      read after a step (rank 0's buffers broadcast)
    optimizer_hyperparams  scheduler_one_rank         scheduler.step() under `if rank == 0:` (every rank)
                           lr_from_local_progress     lr from this rank's data progress (from the step)
    optimizer_state        clip_one_rank              gradient clipping under `if rank == 0:` (every rank)
                           step_skipped_one_rank      a loss-spike guard on the local loss (global loss)
    corruption             bit_flip                   one bit flipped in one parameter element of one rank

What differs, where and when, is written in each function's docstring (measured on torch 2.13,
gloo, 2 and 3 ranks): it is the evidence a diagnosis of the cause has to go on.

`Outcome.detected_at` is the step of the first failing check: steps count from 0 as in
`distshare.training` (the check after the first `optimizer.step()` is step 0), `BASELINE`
(-1) is the check before any training, None means no check failed. A reproduction whose loop
DDP itself stops (it raises at a later forward) says so in `Outcome.raised`.

With `checker="watch"` the checks come from `distshare.watch(model, optimizer)` (a baseline
when it is created, then one check in every `optimizer.step()`'s post-hook) instead of explicit
`compare_replicas` calls. Two
things differ under watch: state changed between one `step()` and the next (a scheduler step)
is seen one check later, and a rank that skips `step()` also skips watch's collective, so the
other ranks would wait for it until the timeout: `step_skipped_one_rank`'s bug runs only with
`checker="compare"`. The sharded reproduction runs under both checkers with no group passed: the
checks read the HSDP mesh from the model's DTensors.

Test tooling (like `distshare.testing.faults`): no production module imports it.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn import functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from distshare.distributed.world import World
from distshare.integrity.replicas import ReplicaReport, compare_replicas
from distshare.testing.faults import BEFORE_FIRST_STEP

BASELINE = BEFORE_FIRST_STEP  # `detected_at` of the check before any training (-1, as for the faults)
STEPS = 5  # optimizer steps per reproduction: a divergence shows within one or two
LR = 0.1  # SGD learning rate of the MLP reproductions (Adam ones use 0.01)
FLIP_TENSOR = "0.weight"  # bit_flip: the parameter, its element and bit
FLIP_ELEMENT = (3, 1)
FLIP_BIT = 20  # a float32 mantissa bit: the value moves by about 1e-1 relative, never NaN
FLIP_AT = 2  # ... flipped while step 2 runs (between backward and optimizer.step())
UNFREEZE_AFTER = 1  # unfrozen_after_wrap: the first layer joins training after step 1
SPIKE_AT = 2  # step_skipped_one_rank: the step whose batch holds a corrupt record on one rank
MAX_LOSS = 10.0  # ... the loss-spike guard: skip the update above this loss (normal losses are ~1)
CLIP_NORM = 0.05  # clip_one_rank: small enough that every step's gradient is clipped


@dataclass
class Outcome:
    """What one reproduction saw on this rank: the first failing check, and its report."""

    name: str
    cause: str  # the cause a diagnosis must name (the bug's; a fixed run must not be diagnosed)
    fixed: bool
    checker: str  # "compare" (explicit compare_replicas calls) or "watch"
    checks: int  # every check made, the baseline included
    detected_at: int | None  # step of the first failing check; BASELINE: before training; None: none failed
    report: ReplicaReport | None  # the first failing check's report
    culprit: int | None = None  # the one rank whose code misbehaved (None: no single rank)
    raised: str | None = None  # the error that ended the user's loop (DDP's own), if one did
    raised_at: int | None = None  # ... at this step


# ------------------------------------------------------------------------------ the user's pieces


def _mlp(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 16), nn.Tanh(), nn.Linear(16, 2))


def _cnn() -> nn.Sequential:
    """A conv net whose BatchNorm running statistics are buffers that follow the data."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2)
    )


def _generator(rank: int, step: int) -> torch.Generator:
    # Each rank its own data, as a DistributedSampler gives; independent of call order.
    return torch.Generator().manual_seed(10_000 * (rank + 1) + step)


def _batch(rank: int, step: int, rows: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator(rank, step)
    return torch.randn(rows, 4, generator=g), torch.randn(rows, 2, generator=g)


def _images(rank: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = _generator(rank, step)
    return torch.randn(8, 1, 6, 6, generator=g), torch.randn(8, 2, generator=g)


def _sgd(model: nn.Module) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)


def _allreduce_grads(model: nn.Module, world_size: int) -> None:
    """The hand-written data-parallel step of the PyTorch distributed tutorial: average the gradients."""
    for p in model.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad)
            p.grad /= world_size


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    # torch 2.13 deprecates broadcast_buffers (a FutureWarning); the reproduction uses it on purpose.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)
        yield


# ------------------------------------------------------------------------------------ the checks


def _compare(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    step: int | None,
    extra: Callable[[], dict] | None,
    group: Any = None,
) -> ReplicaReport:
    """The check the user writes: before training (step None), then right after each step, gradients included."""
    return compare_replicas(model, optimizer, grads=step is not None, step=step, extra=extra, group=group)


class _Checks:
    """The replica checks of one run: the baseline now, then one after every optimizer step.

    With `checker="compare"` each `after_step` is one `compare_replicas` collective (every rank
    calls it at the same point of the loop); with "watch" `distshare.watch` checks from the
    optimizer's step hooks and `after_step` does nothing. Use it as a context manager around
    the training loop.
    """

    def __init__(
        self,
        name: str,
        cause: str,
        fixed: bool,
        checker: str,
        model: nn.Module,
        optimizer: torch.optim.Optimizer,
        culprit: int | None = None,
        extra: Callable[[], dict] | None = None,
        group: Any = None,
    ) -> None:
        if checker not in ("compare", "watch"):
            raise ValueError(f"checker must be 'compare' or 'watch', got {checker!r}")
        self.outcome = Outcome(name, cause, fixed, checker, 0, None, None, culprit)
        self.model, self.optimizer, self.extra, self.group = model, optimizer, extra, group
        self.watcher: Any = None
        if checker == "watch":
            from distshare.integrity.watch import watch

            self.watcher = watch(model, optimizer, every=1, grads=True, raise_on_divergence=False, extra=extra)
        else:
            self._record(BASELINE, _compare(model, optimizer, None, extra, group))

    def _record(self, step: int, report: ReplicaReport) -> None:
        self.outcome.checks += 1
        if not report.in_sync and self.outcome.report is None:
            self.outcome.detected_at, self.outcome.report = step, report

    def after_step(self, step: int) -> None:
        """Right after `optimizer.step()` of step `step` (0-based), before the next zero_grad."""
        if self.watcher is None:
            self._record(step, _compare(self.model, self.optimizer, step, self.extra, self.group))

    def stopped(self, step: int, exc: BaseException) -> None:
        """The user's loop ended at step `step` with `exc` (DDP raising at a forward)."""
        self.outcome.raised = f"{type(exc).__name__}: {str(exc).splitlines()[0]}"
        self.outcome.raised_at = step

    def __enter__(self) -> _Checks:
        if self.watcher is not None:
            self.watcher.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        if self.watcher is None:
            return
        self.watcher.__exit__(*exc)  # removes its hooks (after a last check, if a step went unchecked)
        for report in self.watcher.reports:  # the baseline (step None), then one per step (0-based)
            self._record(BASELINE if report.step is None else report.step, report)


# ------------------------------------------------------------------------------- init_mismatch


def init_seed_allreduce(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """Per-rank seeds, no DDP: a hand-written gradient all-reduce never makes the replicas agree.

    Reports: allenai/OLMo-core#319 (after #307 seeded each rank's init with `seed + rank`, a
    wrapper that does not broadcast, FSDP's `fully_shard`, left the replica groups with
    different parameters); pytorch/torchtitan#166 (no seed before the model was built, FSDP1
    never synced the weights at start-up: N different models trained on one gradient, the loss
    still went down).

    The user seeds every rank with `seed + rank` (so that data order and dropout differ) before
    building the model, then averages gradients by hand (`all_reduce` every `.grad`, the
    PyTorch distributed tutorial's `average_gradients`): nothing ever copies rank 0's
    parameters to the others. Fix: build the model under the shared seed, seed per rank after.

    What differs (bug): at the baseline every `param/*`, on every rank (each its own init: no
    majority even with 3 ranks); the all-reduced gradients (`grad/*`) and hence the momentum
    buffers are identical on every rank at every later check, while every parameter stays
    apart by its initial offset (every rank takes the same update: with 3 ranks the largest
    difference is 0.799 at the baseline and at every check after). Fixed: nothing, at any check.
    """
    model = _mlp(seed=0) if fixed else _mlp(seed=1 + world.rank)
    torch.manual_seed(1 + world.rank)  # per-rank randomness from here on (data, dropout)
    opt = _sgd(model)
    with _Checks("init_seed_allreduce", "init_mismatch", fixed, checker, model, opt) as checks:
        for step in range(STEPS):
            x, y = _batch(world.rank, step)
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            _allreduce_grads(model, world.world_size)
            opt.step()
            checks.after_step(step)
    return checks.outcome


def init_sync_false(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """Per-rank seeds under `DDP(model, init_sync=False)`: the start-up broadcast is switched off.

    Reports: pytorch/pytorch#142824 (added `init_sync`, for fault-tolerant process groups; its
    docstring warns that with False the user must make the parameters identical); the
    per-rank seeds of allenai/OLMo-core#307, undone in allenai/OLMo-core#319. DDP's
    constructor normally broadcasts rank 0's parameters and buffers (`_sync_module_states`),
    which is why per-rank seeds are harmless under plain DDP (karpathy/nanoGPT#22);
    `init_sync=False` skips exactly that. Fix: `init_sync=True` (the default), per-rank seeds
    kept.

    What differs (bug): the baseline, every `param/*` on every rank (no majority); afterwards
    gradients are synced (`grad/*` identical) and the parameters stay apart. Fixed: nothing.
    """
    model = _mlp(seed=1 + world.rank)  # the user's per-rank seed, in both variants
    ddp = DDP(model) if fixed else DDP(model, init_sync=False)
    opt = _sgd(model)
    with _Checks("init_sync_false", "init_mismatch", fixed, checker, ddp, opt) as checks:
        for step in range(STEPS):
            x, y = _batch(world.rank, step)
            opt.zero_grad()
            loss = F.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
            checks.after_step(step)
    return checks.outcome


# ---------------------------------------------------------------------------- grads_not_synced


def module_bypass(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """Training through `ddp.module(x)`: DDP's forward never runs, so its reducer never arms.

    Report: k2-fsa/icefall#226 (does calling a submodule through `model.module` skip DDP's
    gradient sync?). The maintainers' demo showed that it does not when the same backward also
    passes through `model(x)`: DDP's forward prepares the reducer and its hooks sit on the
    parameters, so every parameter's gradient is reduced (measured here too). It does when no
    DDP forward comes before the backward, which is what this reproduces: every gradient stays
    local, silently. Fix: call the wrapper, `ddp(x)`.

    What differs (bug): from step 0, every `grad/*`, `param/*` and the SGD momentum buffers
    (`optim/*/momentum_buffer`) on every rank (each its own data: no majority with 3 ranks);
    the baseline agrees. Fixed: nothing.
    """
    model = _mlp()
    ddp = DDP(model)
    opt = _sgd(model)
    forward = ddp if fixed else ddp.module  # the bug: every rank bypasses the wrapper alike
    with _Checks("module_bypass", "grads_not_synced", fixed, checker, ddp, opt) as checks:
        for step in range(STEPS):
            x, y = _batch(world.rank, step)
            opt.zero_grad()
            loss = F.mse_loss(forward(x), y)
            loss.backward()
            opt.step()
            checks.after_step(step)
    return checks.outcome


def gpt2_module_bypass(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """`module_bypass` on a model nobody here wrote: transformers' GPT-2, tied embeddings.

    Report: k2-fsa/icefall#226. The model is built offline from a tiny config (no download):
    2 layers, 32 wide, 2 heads, a vocabulary of 64, 16 positions; `lm_head.weight` is
    `transformer.wte.weight` (tied), listed once, as `transformer.wte.weight`. Its default
    dropout (0.1) stays on: seeded alike, every rank draws the same masks, which does not
    matter to the sync. Fix: `ddp(input_ids, labels=input_ids)`.

    What differs (bug): from step 0, the `grad/*` and `param/*` of every parameter (the tied
    embedding included) and AdamW's `exp_avg`/`exp_avg_sq`, on every rank; the step counts
    agree. Fixed: nothing.
    """
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing here downloads; make sure of it
    from transformers import GPT2Config, GPT2LMHeadModel
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=64, n_positions=16, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    ddp = DDP(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    forward = ddp if fixed else ddp.module
    with _Checks("gpt2_module_bypass", "grads_not_synced", fixed, checker, ddp, opt) as checks:
        for step in range(STEPS):
            g = _generator(world.rank, step)
            tokens = torch.randint(0, config.vocab_size, (4, config.n_positions), generator=g)
            opt.zero_grad()
            loss = forward(input_ids=tokens, labels=tokens).loss
            loss.backward()
            opt.step()
            checks.after_step(step)
    return checks.outcome


def dtype_after_wrap(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """`model.double()` after `DDP(model)`: the parameters' gradient accumulators are replaced.

    Reports: pytorch/pytorch#104336 (moving a DDP-wrapped model to CPU and back to GPU silently
    ends the gradient sync: "effectively trained on a single device"), pytorch/pytorch#12603
    (parameters changed after the constructor). DDP's reducer hooks each parameter's
    AccumulateGrad node when it is built; a conversion that changes dtype or device assigns
    `param.data`, which gives the parameter a new AccumulateGrad node, without DDP's hook. On
    CPU the device round trip is a no-op (measured: still in sync), so the dtype conversion
    stands for it; a same-dtype `.to(torch.float32)` after wrapping is a no-op too. No error,
    no warning. Fix: convert before wrapping.

    What differs (bug): from step 0, every `grad/*`, `param/*` and momentum buffer on every
    rank. Fixed: nothing.
    """
    model = _mlp()
    if fixed:
        model.double()
    ddp = DDP(model)
    if not fixed:
        model.double()  # the bug: converted after DDP registered its hooks
    opt = _sgd(model)
    with _Checks("dtype_after_wrap", "grads_not_synced", fixed, checker, ddp, opt) as checks:
        for step in range(STEPS):
            x, y = _batch(world.rank, step)
            opt.zero_grad()
            loss = F.mse_loss(ddp(x.double()), y.double())
            loss.backward()
            opt.step()
            checks.after_step(step)
    return checks.outcome


def _replaced(world: World, fixed: bool, checker: str, name: str, find_unused: bool) -> Outcome:
    model = _mlp()

    def replace() -> None:  # e.g. re-initializing a head, or loading "weights" by assignment
        model[2].weight = nn.Parameter(model[2].weight.detach().clone())

    if fixed:
        replace()
    ddp = DDP(model, find_unused_parameters=find_unused)
    if not fixed:
        replace()  # the bug: DDP's hook stays on the old parameter
    opt = _sgd(model)  # built on the module's parameters: the new one
    with _Checks(name, "grads_not_synced", fixed, checker, ddp, opt) as checks:
        step = 0
        try:
            for step in range(STEPS):
                x, y = _batch(world.rank, step)
                opt.zero_grad()
                loss = F.mse_loss(ddp(x), y)
                loss.backward()
                opt.step()
                checks.after_step(step)
        except RuntimeError as exc:  # DDP's "Expected to have finished reduction ..." (see docstring)
            checks.stopped(step, exc)
    return checks.outcome


def param_replaced(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """A new `nn.Parameter` assigned into the module after `DDP(model)` wrapped it.

    Report: pytorch/pytorch#12603 ("DistributedDataParallel does not get the same grad at
    all": the maintainer explains that DDP registers its reduction hooks on the parameters it
    sees at construction; a parameter assigned afterwards has none). The optimizer is built
    afterwards, on the new parameter (built before, it would not train it at all). Fix: assign
    before wrapping.

    What torch 2.13 does, with DDP's default flags: the old parameter's hook never fires, so
    its bucket, which here holds every parameter (one bucket for a tiny model), is never
    reduced: at step 0 *every* gradient stays local, silently, and the next forward raises
    `RuntimeError: Expected to have finished reduction in the prior iteration before starting
    a new one` (recorded in `Outcome.raised`, at step 1). With several buckets only the one
    holding the replaced parameter would stay local (by the same logic; not measured here).
    `param_replaced_find_unused` never raises.

    What differs (bug): at step 0, every `grad/*`, `param/*` and momentum buffer on every rank;
    then the loop ends. Fixed: nothing, no error.
    """
    return _replaced(world, fixed, checker, "param_replaced", find_unused=False)


def param_replaced_find_unused(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """`param_replaced` under `DDP(model, find_unused_parameters=True)`: silent for ever.

    Report: pytorch/pytorch#12603. With unused-parameter detection the reducer marks the old
    parameter (no longer in the graph) unused and reduces every other bucket entry, so nothing
    raises and only the replaced parameter trains on local gradients, at every step. Fix:
    assign before wrapping.

    What differs (bug): from step 0, exactly `grad/2.weight` and `param/2.weight` (and its
    momentum buffer) on every rank; every other tensor agrees. Fixed: nothing.
    """
    return _replaced(world, fixed, checker, "param_replaced_find_unused", find_unused=True)


def unfrozen_after_wrap(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """A layer frozen when DDP wrapped the model, unfrozen later (backbone fine-tuning).

    Report: Lightning-AI/pytorch-lightning#20340 ("DDP doesn't work with
    pl.callbacks.BackboneFinetuning": the weights stay in sync while the backbone is frozen and
    part after it is unfrozen, at `unfreeze_backbone_at_epoch`). DDP builds its reducer from the
    parameters that require grad at construction; a parameter that starts requiring grad later
    gets gradients but no hook. Here the first layer is frozen for steps 0-1, then unfrozen and
    added to the optimizer as a new param group (what BackboneFinetuning does). Fix: wrap
    again after unfreezing (`ddp = DDP(model)`: the replicas agree, so its broadcast changes
    nothing).

    What differs (bug): the checks of steps 0 and 1 agree; from step 2, `grad/0.*`, `param/0.*`
    and their momentum buffers on every rank; the head (`2.*`) stays in sync. Fixed: nothing.
    """
    model = _mlp()
    backbone = list(model[0].parameters())
    for p in backbone:
        p.requires_grad_(False)
    ddp = DDP(model)
    opt = torch.optim.SGD(model[2].parameters(), lr=LR, momentum=0.9)
    with _Checks("unfrozen_after_wrap", "grads_not_synced", fixed, checker, ddp, opt) as checks:
        for step in range(STEPS):
            if step == UNFREEZE_AFTER + 1:  # the fine-tuning callback unfreezes the backbone
                for p in backbone:
                    p.requires_grad_(True)
                opt.add_param_group({"params": backbone, "lr": LR / 10})
                if fixed:
                    ddp = DDP(model)
            x, y = _batch(world.rank, step)
            opt.zero_grad()
            loss = F.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
            checks.after_step(step)
    return checks.outcome


class _TwoHeads(nn.Module):
    """The model of pytorch/pytorch#128949: two layers, the forward uses only the first."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a = nn.Linear(4, 2)
        self.b = nn.Linear(4, 2)  # never used

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.a(x)


def unused_param(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """A parameter the forward never uses, under DDP's default `find_unused_parameters=False`.

    Report: pytorch/pytorch#128949 ("Parameters out of sync over different ranks due to unused
    parameters": no error after one step, yet the replicas differ). What torch 2.13 does: the
    unused parameter's hook never fires, so the bucket it shares with the used ones (one bucket
    here) is never reduced: after step 0 the *used* layer's gradients are local and its
    parameters differ, silently; the *next* forward raises `RuntimeError: Expected to have
    finished reduction in the prior iteration ...` (recorded in `Outcome.raised`, at step 1).
    A one-step script, as in the report, never sees the error. Fix:
    `find_unused_parameters=True` (the reducer then marks `b` unused and reduces the rest).

    What differs (bug): at step 0, `grad/a.*`, `param/a.*` and their momentum buffers on every
    rank; `b` has no gradient and agrees; then the loop ends. Fixed: nothing, no error.
    """
    model = _TwoHeads()
    ddp = DDP(model, find_unused_parameters=fixed)
    opt = _sgd(model)
    with _Checks("unused_param", "grads_not_synced", fixed, checker, ddp, opt) as checks:
        step = 0
        try:
            for step in range(STEPS):
                x, y = _batch(world.rank, step)
                opt.zero_grad()
                loss = F.mse_loss(ddp(x), y)
                loss.backward()
                opt.step()
                checks.after_step(step)
        except RuntimeError as exc:  # DDP's "Expected to have finished reduction ..." (see docstring)
            checks.stopped(step, exc)
    return checks.outcome


# -------------------------------------------------------------------------------- buffers_only


def _bn_buffers(model: nn.Module) -> list[torch.Tensor]:
    return [b for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) for b in m.buffers()]


def bn_no_buffer_broadcast(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """BatchNorm under `DDP(model, broadcast_buffers=False)`: running statistics never synced.

    Reports: open-mmlab/mmdetection#2539 ("`broadcast_buffers=False` makes BN buffers different
    on each GPU"; the maintainers: a common practice, use SyncBN if you care),
    pytorch/pytorch#13711 (in eval the running_mean differs between GPUs). In torch 2.13
    `broadcast_buffers` is deprecated, and False still means no buffer sync at all, not even at
    construction; gradients are still synced (BatchNorm normalizes with the batch's own
    statistics in training), so the parameters agree. SyncBatchNorm needs a GPU; the CPU fix
    here averages the BatchNorm running statistics over the ranks after every backward (the
    all-reduce SyncBN's statistics amount to, and what precise-BN style hooks do before eval).

    What differs (bug): from step 0, `buffer/1.running_mean` and `buffer/1.running_var` on every
    rank (each its own data: no majority); `num_batches_tracked`, every `param/*`, `grad/*` and
    optimizer state agree. Each rank's statistics carry its whole own history: with 3 ranks the
    largest `running_var` difference is 0.009 at step 0 and 0.030 at step 4. Fixed: nothing.
    """
    model = _cnn()
    with _quiet():
        ddp = DDP(model, broadcast_buffers=False)
    opt = _sgd(model)
    with _Checks("bn_no_buffer_broadcast", "buffers_only", fixed, checker, ddp, opt) as checks:
        for step in range(STEPS):
            x, y = _images(world.rank, step)
            opt.zero_grad()
            loss = F.mse_loss(ddp(x), y)
            loss.backward()
            if fixed:
                for b in _bn_buffers(model):
                    if b.is_floating_point():
                        dist.all_reduce(b)
                        b /= world.world_size
            opt.step()
            checks.after_step(step)
    return checks.outcome


def bn_buffers_after_step(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """BatchNorm under DDP's default buffer sync, the state read after a step.

    Reports: pytorch/pytorch#13711 (BatchNorm running_mean differs between GPUs after training),
    open-mmlab/mmdetection#4582 (the fix mmdetection adopted: broadcast rank 0's BatchNorm
    buffers before evaluating, so the logged results match a test of the saved checkpoint).
    DDP's normal behaviour (`forward_sync_buffers`, formerly `broadcast_buffers=True`):
    rank 0's buffers are broadcast at the start of every forward, then that forward updates
    them from each rank's own batch. Read after a step, before the next forward's broadcast
    (a check, an evaluation, a checkpoint of rank 1), they differ. Fix: broadcast rank 0's
    BatchNorm buffers after the backward, as mmdetection's eval hook does before evaluating.

    What differs (bug): at every check from step 0, `buffer/1.running_mean` and
    `buffer/1.running_var` on every rank (no majority), each off rank 0's by one update from
    its own batch (momentum 0.1), so the differences stay that size (with 3 ranks the largest
    `running_var` difference is 0.007-0.013 from step 0 to 4); parameters, gradients and
    optimizer state agree. Fixed: nothing.
    """
    model = _cnn()
    ddp = DDP(model)
    opt = _sgd(model)
    with _Checks("bn_buffers_after_step", "buffers_only", fixed, checker, ddp, opt) as checks:
        for step in range(STEPS):
            x, y = _images(world.rank, step)
            opt.zero_grad()
            loss = F.mse_loss(ddp(x), y)
            loss.backward()
            if fixed:
                for b in _bn_buffers(model):
                    dist.broadcast(b, src=0)
            opt.step()
            checks.after_step(step)
    return checks.outcome


# ----------------------------------------------------------------------- optimizer_hyperparams


def scheduler_one_rank(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """A warm-up scheduler stepped inside `if rank == 0:` (the block that logs the learning rate).

    Report: none specific (the same cause as karpathy/nanochat#857: a learning rate that differs
    between ranks). Rank 0 logs and steps the schedule; the others stay at the first learning
    rate. Fix: step the scheduler on every rank, log on rank 0. The scheduler's state
    (`last_epoch`, `_last_lr`) is passed to the check as `extra` where `compare_replicas` takes it.

    What differs (bug): at the check of step 0 (after `scheduler.step()`), `optim/group0/lr` on
    rank 0 (3 ranks: rank 0 alone; 2 ranks: both, no majority), and the scheduler's state when
    compared; from step 1 every `param/*` too, while gradients and SGD's momentum buffers
    (which do not depend on the rate) agree. Under `watch` (checks inside `optimizer.step()`,
    before the scheduler steps) it shows at step 1, with the parameters. Fixed: nothing.
    """
    model = _mlp()
    ddp = DDP(model)
    opt = _sgd(model)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda epoch: min(1.0, (epoch + 1) / 4))
    log: list[str] = []

    def extra() -> dict:  # the scheduler's state, compared beside the optimizer's
        return {"scheduler": sched.state_dict()}

    with _Checks("scheduler_one_rank", "optimizer_hyperparams", fixed, checker, ddp, opt, 0, extra) as checks:
        for step in range(STEPS):
            x, y = _batch(world.rank, step)
            opt.zero_grad()
            loss = F.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
            if fixed:
                sched.step()
            if world.rank == 0:  # the main process logs ...
                log.append(f"step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.4f}")
                if not fixed:
                    sched.step()  # ... and (the bug) steps the schedule, here only
            checks.after_step(step)
    return checks.outcome


def _documents(rank: int) -> list[int]:
    """This rank's shard of a corpus of documents of varying length (lengths only)."""
    g = torch.Generator().manual_seed(500 + rank)  # at step 0 ranks 0, 1, 2 pack 4, 2, 5 documents
    return torch.randint(1, 9, (64,), generator=g).tolist()


def lr_from_local_progress(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """A learning-rate schedule driven by this rank's own progress through its data.

    Report: karpathy/nanochat#857 ("Fix LR divergence across ranks in SFT": in epoch-based SFT
    the learning-rate multiplier comes from `progress`, which depends on the rank's dataloader;
    a rank that packs more short conversations progresses faster and decays its learning rate
    sooner). Here every rank packs whole documents into a batch of at most 16 tokens, so ranks
    take different numbers of documents per step, and sets `lr = base * (1 - progress / 2)`.
    Fix: a step-based schedule (`progress = step / steps`), as the maintainers did.

    What differs (bug): from step 0, `optim/group0/lr` on every rank (each its own progress: no
    majority) and every `param/*`, since step 0 already used the differing rates; gradients and
    Adam's moments agree (synced, and the moments do not depend on the rate). Fixed: nothing.
    """
    model = _mlp()
    ddp = DDP(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    docs = _documents(world.rank)
    taken = 0
    with _Checks("lr_from_local_progress", "optimizer_hyperparams", fixed, checker, ddp, opt) as checks:
        for step in range(STEPS):
            start, tokens = taken, 0
            while taken < len(docs) and tokens + docs[taken] <= 16:  # pack whole documents
                tokens += docs[taken]
                taken += 1
            rows = taken - start
            progress = step / STEPS if fixed else taken / len(docs)
            for group in opt.param_groups:
                group["lr"] = 0.01 * (1 - progress / 2)
            x, y = _batch(world.rank, step, rows=rows)
            opt.zero_grad()
            loss = F.mse_loss(ddp(x), y)
            loss.backward()
            opt.step()
            checks.after_step(step)
    return checks.outcome


# ----------------------------------------------------------------------------- optimizer_state


def clip_one_rank(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """Gradient clipping inside `if rank == 0:` (where the gradient norm is logged).

    Report: none specific. `clip_grad_norm_` returns the norm, so it lands in the block that
    logs it, on rank 0 only; the other ranks step with unclipped gradients. Fix: clip on every
    rank (DDP's gradients are already identical, so every rank clips alike), log on rank 0.

    What differs (bug): from step 0, every `grad/*` on rank 0 (3 ranks: rank 0 alone, each a
    uniform scale of the majority's by max_norm / norm; 2 ranks: both, no majority) and Adam's
    `exp_avg`/`exp_avg_sq`; the parameters differ only where Adam's update is not
    scale-invariant (`eps`): by at most a few hundred ULP (1e-6) at step 0, about 1e-3 by step 4.
    Fixed: nothing.
    """
    model = _mlp()
    ddp = DDP(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    log: list[str] = []
    with _Checks("clip_one_rank", "optimizer_state", fixed, checker, ddp, opt, culprit=0) as checks:
        for step in range(STEPS):
            x, y = _batch(world.rank, step)
            opt.zero_grad()
            loss = F.mse_loss(ddp(x), y)
            loss.backward()
            if fixed:
                norm = nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)
            if world.rank == 0:  # the main process logs the gradient norm ...
                if not fixed:
                    norm = nn.utils.clip_grad_norm_(model.parameters(), CLIP_NORM)  # ... (the bug) clipping here only
                log.append(f"step {step} loss {loss.item():.4f} grad norm {norm.item():.4f}")
            opt.step()
            checks.after_step(step)
    return checks.outcome


def step_skipped_one_rank(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """A loss-spike guard that skips `optimizer.step()` on the local loss: one rank skips.

    Report: none specific; step skipping on loss spikes is a real technique (OLMo-core's
    SkipStepAdamW, allenai/OLMo-core#309), and whatever decides a skip must be the same on
    every rank. Rank `world_size - 1`'s batch at step
    `SPIKE_AT` holds a corrupt record (targets 50 times too large); the guard `if loss <
    MAX_LOSS: optimizer.step()` reads this rank's own loss, so that rank alone skips the step
    that the others take (with the huge, all-reduced gradient). Every rank still runs forward
    and backward (DDP's all-reduce), so nothing hangs. Fix: decide on the loss averaged over
    the ranks (`all_reduce`), so every rank skips together.

    Not under `watch`: a rank that skips `step()` skips watch's check too, and the others would
    wait for it.

    What differs (bug): checks of steps 0-1 agree; at step `SPIKE_AT`, the Adam step count
    (`optim/*/step`), `exp_avg`, `exp_avg_sq` and every `param/*` on the skipping rank (3
    ranks: it alone; 2 ranks: both, no majority); the gradients agree (all-reduced). Fixed:
    nothing.
    """
    model = _mlp()
    ddp = DDP(model)
    opt = torch.optim.Adam(model.parameters(), lr=0.01)
    culprit = world.world_size - 1
    with _Checks("step_skipped_one_rank", "optimizer_state", fixed, checker, ddp, opt, culprit) as checks:
        for step in range(STEPS):
            x, y = _batch(world.rank, step)
            if step == SPIKE_AT and world.rank == culprit:
                y = y * 50  # a corrupt record in this rank's shard
            opt.zero_grad()
            loss = F.mse_loss(ddp(x), y)
            loss.backward()
            guard = loss.detach().clone()
            if fixed:
                dist.all_reduce(guard)
                guard /= world.world_size
            if guard.item() < MAX_LOSS:
                opt.step()
            checks.after_step(step)
    return checks.outcome


def hsdp_model(world: World, fixed: bool) -> nn.Module:
    """The OLMo-core user's model under HSDP: built under `seed + rank` (the bug) or the shared
    seed (the fix), then `fully_shard` on a replicate x shard mesh (replica groups x 2 shards)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    if world.world_size % 2 or world.world_size < 4:
        raise ValueError(f"HSDP needs a world of 4 or more, even (replica groups x 2 shards), not {world.world_size}")
    mesh = init_device_mesh("cpu", (world.world_size // 2, 2), mesh_dim_names=("replicate", "shard"))
    # allenai/OLMo-core#307 seeded each rank with seed + rank before the model was built; FSDP2
    # keeps what each rank built (it never broadcasts), so every replica group got its own init.
    model = _mlp(seed=0) if fixed else _mlp(seed=1 + world.rank)
    fully_shard(model, mesh=mesh)
    torch.manual_seed(1 + world.rank)  # the fix seeds per rank too, but only after the model exists
    return model


def hsdp_init_mismatch(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """HSDP (FSDP2's `fully_shard` on a replicate x shard mesh) with per-rank seeds.

    Reports: allenai/OLMo-core#319 (per-rank init seeds under HSDP: the replica groups trained
    as different models, found only by restarting a bad run), pytorch/torchtitan#166 (FSDP
    never syncs the weights at start-up). FSDP2 never broadcasts initial weights: each rank
    keeps the shard of the tensor it initialized itself. Across the shard dimension that is
    fine (different shards), across the replicate dimension the same shard must agree, and with
    `seed + rank` it does not. The user's check is the plain one, `compare_replicas(model, opt)`
    (or `distshare.watch(model, opt)`): the mesh is read from the model's DTensors, and each
    shard is compared with the same shard in the other replica groups. Fix: build the model
    under the shared seed. Needs an even world of 4 or more (replica groups x 2 shards).

    What differs (bug): at the baseline every `param/*` shard (each replica group its own init:
    no majority of 2), on every rank; afterwards the gradients are all-reduced across the
    replica groups and agree, the parameters stay apart. Fixed: nothing.
    """
    model = hsdp_model(world, fixed)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    with _Checks("hsdp_init_mismatch", "init_mismatch", fixed, checker, model, opt) as checks:
        for step in range(STEPS):
            x, y = _batch(world.rank, step)
            opt.zero_grad()
            loss = F.mse_loss(model(x), y)
            loss.backward()
            opt.step()
            checks.after_step(step)
    return checks.outcome


def run_hsdp(world: World, checkers: tuple[str, ...] = ("compare", "watch")) -> list[Outcome]:
    """Every sharded reproduction (`SHARDED`), bug then fixed, under each checker (a world of 4:
    2 replica groups x 2 shards)."""
    return [
        repro.fn(world, fixed, checker) for checker in checkers for repro in SHARDED.values() for fixed in (False, True)
    ]


# ---------------------------------------------------------------------------------- corruption


def bit_flip(world: World, fixed: bool, checker: str = "compare") -> Outcome:
    """One bit flips in one parameter element of one rank, during step `FLIP_AT` (silent data corruption).

    Report: The Llama 3 Herd of Models (Meta, 2024), section 3.3.4: silent data corruption
    among the unexpected interruptions of pre-training (Table 5). The mechanism is the flipped
    bit itself, in memory, between the backward and `optimizer.step()`, on rank
    `world_size - 1`: nothing in the program is wrong, and the fix is only to find it (the
    fixed run has no flip).

    What differs (bug): checks of steps 0-1 agree; from step `FLIP_AT`, exactly
    `param/0.weight` on the flipped rank (3 ranks: it alone; 2 ranks: both, no majority), one
    element, at `FLIP_ELEMENT`; gradients and momentum stay identical (all-reduced).
    Fixed: nothing.
    """
    model = _mlp()
    ddp = DDP(model)
    opt = _sgd(model)
    culprit = world.world_size - 1
    with _Checks("bit_flip", "corruption", fixed, checker, ddp, opt, culprit) as checks:
        for step in range(STEPS):
            x, y = _batch(world.rank, step)
            opt.zero_grad()
            loss = F.mse_loss(ddp(x), y)
            loss.backward()
            if not fixed and step == FLIP_AT and world.rank == culprit:
                with torch.no_grad():
                    words = dict(model.named_parameters())[FLIP_TENSOR].view(torch.int32)
                    words[FLIP_ELEMENT] ^= 1 << FLIP_BIT
            opt.step()
            checks.after_step(step)
    return checks.outcome


# ------------------------------------------------------------------------------------ registry


@dataclass(frozen=True)
class Reproduction:
    """One public cause of divergence, reproduced: what it is, where it was reported, its run."""

    name: str
    cause: str  # the diagnosis it must get (`report.diagnosis.cause`)
    reports: tuple[str, ...]  # public reports, owner/repo#number or a paper
    bug: str  # what the user's code does wrong, in one line
    fix: str  # what the fixed code does instead, in one line
    fn: Callable[..., Outcome]
    detect_at: int  # step of the bug's first failing check (BASELINE: before training)
    kinds: tuple[str, ...]  # what differs there: the prefixes of the differing tensors' names
    watch_detect_at: int | None = None  # under checker="watch", when it is later (None: the same)
    watch_safe: bool = True  # False: the bug desynchronizes watch's own collectives
    stops_at: int | None = None  # the bug's loop ends with DDP's RuntimeError at this step
    world_size: int | None = None  # the world it needs (None: any of 2 or more)


GRADS = ("grad", "optim", "param")  # gradients that differ, and the parameters and optimizer state they updated

REPRODUCTIONS: dict[str, Reproduction] = {
    r.name: r
    for r in (
        Reproduction(
            name="init_seed_allreduce",
            cause="init_mismatch",
            reports=("allenai/OLMo-core#319", "pytorch/torchtitan#166"),
            bug="per-rank seeds before building the model, gradients averaged by a hand-written all-reduce",
            fix="build the model under the shared seed; seed per rank afterwards",
            fn=init_seed_allreduce,
            detect_at=BASELINE,
            kinds=("param",),
        ),
        Reproduction(
            name="init_sync_false",
            cause="init_mismatch",
            reports=("pytorch/pytorch#142824", "allenai/OLMo-core#319"),
            bug="per-rank seeds and DDP(model, init_sync=False): rank 0's parameters are never broadcast",
            fix="DDP(model): init_sync=True broadcasts rank 0's parameters and buffers",
            fn=init_sync_false,
            detect_at=BASELINE,
            kinds=("param",),
        ),
        Reproduction(
            name="module_bypass",
            cause="grads_not_synced",
            reports=("k2-fsa/icefall#226",),
            bug="training through ddp.module(x): DDP's forward never arms its reducer",
            fix="train through ddp(x)",
            fn=module_bypass,
            detect_at=0,
            kinds=GRADS,
        ),
        Reproduction(
            name="gpt2_module_bypass",
            cause="grads_not_synced",
            reports=("k2-fsa/icefall#226",),
            bug="transformers' GPT-2 trained through ddp.module(input_ids, labels=...)",
            fix="train through ddp(input_ids, labels=...)",
            fn=gpt2_module_bypass,
            detect_at=0,
            kinds=GRADS,
        ),
        Reproduction(
            name="dtype_after_wrap",
            cause="grads_not_synced",
            reports=("pytorch/pytorch#104336", "pytorch/pytorch#12603"),
            bug="model.double() after DDP(model): new gradient accumulators, without DDP's hooks",
            fix="convert the model before wrapping it",
            fn=dtype_after_wrap,
            detect_at=0,
            kinds=GRADS,
        ),
        Reproduction(
            name="param_replaced",
            cause="grads_not_synced",
            reports=("pytorch/pytorch#12603",),
            bug="a new nn.Parameter assigned into the module after DDP(model)",
            fix="assign the parameter before wrapping",
            fn=param_replaced,
            detect_at=0,
            kinds=GRADS,
            stops_at=1,
        ),
        Reproduction(
            name="param_replaced_find_unused",
            cause="grads_not_synced",
            reports=("pytorch/pytorch#12603",),
            bug="a new nn.Parameter assigned after DDP(model, find_unused_parameters=True): silent for ever",
            fix="assign the parameter before wrapping",
            fn=param_replaced_find_unused,
            detect_at=0,
            kinds=GRADS,
        ),
        Reproduction(
            name="unfrozen_after_wrap",
            cause="grads_not_synced",
            reports=("Lightning-AI/pytorch-lightning#20340",),
            bug="a layer frozen at DDP(model), unfrozen later (backbone fine-tuning)",
            fix="wrap again after unfreezing",
            fn=unfrozen_after_wrap,
            detect_at=UNFREEZE_AFTER + 1,
            kinds=GRADS,
        ),
        Reproduction(
            name="unused_param",
            cause="grads_not_synced",
            reports=("pytorch/pytorch#128949",),
            bug="a parameter the forward never uses, find_unused_parameters=False",
            fix="DDP(model, find_unused_parameters=True)",
            fn=unused_param,
            detect_at=0,
            kinds=GRADS,
            stops_at=1,
        ),
        Reproduction(
            name="bn_no_buffer_broadcast",
            cause="buffers_only",
            reports=("open-mmlab/mmdetection#2539", "pytorch/pytorch#13711"),
            bug="BatchNorm under DDP(model, broadcast_buffers=False): running statistics never synced",
            fix="average the BatchNorm running statistics over the ranks after every backward",
            fn=bn_no_buffer_broadcast,
            detect_at=0,
            kinds=("buffer",),
        ),
        Reproduction(
            name="bn_buffers_after_step",
            cause="buffers_only",
            reports=("pytorch/pytorch#13711", "open-mmlab/mmdetection#4582"),
            bug="BatchNorm under DDP's per-forward buffer broadcast, the state read after a step",
            fix="broadcast rank 0's BatchNorm buffers before reading the state",
            fn=bn_buffers_after_step,
            detect_at=0,
            kinds=("buffer",),
        ),
        Reproduction(
            name="scheduler_one_rank",
            cause="optimizer_hyperparams",
            reports=("karpathy/nanochat#857",),
            bug="scheduler.step() inside `if rank == 0:`",
            fix="step the scheduler on every rank",
            fn=scheduler_one_rank,
            detect_at=0,
            kinds=("optim",),
            watch_detect_at=1,
        ),
        Reproduction(
            name="lr_from_local_progress",
            cause="optimizer_hyperparams",
            reports=("karpathy/nanochat#857",),
            bug="the learning rate follows this rank's own progress through its data",
            fix="a step-based schedule, the same on every rank",
            fn=lr_from_local_progress,
            detect_at=0,
            kinds=("optim", "param"),
        ),
        Reproduction(
            name="clip_one_rank",
            cause="optimizer_state",
            reports=(),
            bug="clip_grad_norm_ inside `if rank == 0:` (where the norm is logged)",
            fix="clip on every rank",
            fn=clip_one_rank,
            detect_at=0,
            kinds=GRADS,
        ),
        Reproduction(
            name="step_skipped_one_rank",
            cause="optimizer_state",
            reports=("allenai/OLMo-core#309",),
            bug="a loss-spike guard on the local loss skips optimizer.step() on one rank",
            fix="decide on the loss averaged over the ranks",
            fn=step_skipped_one_rank,
            detect_at=SPIKE_AT,
            kinds=("optim", "param"),
            watch_safe=False,
        ),
        Reproduction(
            name="bit_flip",
            cause="corruption",
            reports=("The Llama 3 Herd of Models (Meta, 2024)",),
            bug="one bit flips in one parameter element of one rank (silent data corruption)",
            fix="none in the program: find it, restart from a verified checkpoint",
            fn=bit_flip,
            detect_at=FLIP_AT,
            kinds=("param",),
        ),
    )
}


# Reproductions on a sharded model: they need a world of their own (`run_hsdp`, 4 ranks).
SHARDED: dict[str, Reproduction] = {
    r.name: r
    for r in (
        Reproduction(
            name="hsdp_init_mismatch",
            cause="init_mismatch",
            reports=("allenai/OLMo-core#319", "pytorch/torchtitan#166"),
            bug="per-rank seeds (seed + rank) before building the model, then fully_shard on an HSDP mesh",
            fix="build the model under the shared seed before fully_shard; seed per rank afterwards",
            fn=hsdp_init_mismatch,
            detect_at=BASELINE,
            kinds=("param",),
            world_size=4,
        ),
    )
}


def run_all(world: World, names: list[str] | tuple[str, ...] | None = None, checker: str = "compare") -> list[Outcome]:
    """Every reproduction, bug then fixed, on the same ranks (one process-group start-up paid once).

    With `checker="watch"` a bug that desynchronizes watch's own collectives (`watch_safe`
    False) is left out; its fixed run is kept.
    """
    out = []
    for name in names or tuple(REPRODUCTIONS):
        repro = REPRODUCTIONS[name]
        for fixed in (False, True):
            if checker == "watch" and not fixed and not repro.watch_safe:
                continue
            out.append(repro.fn(world, fixed, checker))
    return out


__all__ = [
    "BASELINE",
    "REPRODUCTIONS",
    "SHARDED",
    "STEPS",
    "Outcome",
    "Reproduction",
    "bit_flip",
    "bn_buffers_after_step",
    "bn_no_buffer_broadcast",
    "clip_one_rank",
    "dtype_after_wrap",
    "gpt2_module_bypass",
    "hsdp_init_mismatch",
    "hsdp_model",
    "init_seed_allreduce",
    "init_sync_false",
    "lr_from_local_progress",
    "module_bypass",
    "param_replaced",
    "param_replaced_find_unused",
    "run_all",
    "run_hsdp",
    "scheduler_one_rank",
    "step_skipped_one_rank",
    "unfrozen_after_wrap",
    "unused_param",
]
