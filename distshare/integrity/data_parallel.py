"""Is it really data-parallel? Three facts about one training step that replica checks cannot see.

Replica checks prove every rank holds the same parameters. A run that is not data-parallel
passes them too: when every rank trains on *all* the data with an unwrapped model and the
same seed, every replica stays identical, and the run is W copies of one process. This check
looks at one step and verifies what makes it data-parallel:

    (a) different data     the inputs each training forward received differ between ranks
    (b) different grads    each rank's local gradient (before any sync) differs from the others'
    (c) synced grads       the gradient the optimizer sees equals the all-reduced mean (or sum)
                           of the ranks' local gradients

    check = DataParallelCheck(ddp_model)     # a collective: every rank, same point
    check.arm()                              # the step starts
    for micro in micro_batches: loss_fn(ddp_model(micro)).backward()
    report = check.verify(step=0)            # a collective; before clipping and optimizer.step()
    check.remove()

(`distshare.testing.assert_data_parallel` wraps that in a `with` block; `distshare.watch(...,
data_parallel=True)` runs it at its check points.)

How each fact is seen, and why there:

- the inputs: a forward pre-hook digests the tensors every training forward receives
  (positional and keyword arguments), only while armed. Two ranks with one identical forward
  saw the same data.
- the local gradient: a hook on each parameter tensor fires with this backward's contribution
  *before* it is accumulated into `.grad`, so before DDP's reducer (a hook on the accumulator)
  reads it. Adding it to `.grad` as it stands then repeats autograd's accumulation exactly: the
  local `.grad` DDP all-reduces at the step's last backward, bit for bit (earlier micro-batches
  under `no_sync` are in it as local sums, synced ones as their reduced values).
- the synced gradient: copied at the very end of each backward, by an autograd engine callback
  queued from a callback, so it runs after DDP's own (which writes the reduced buckets back).
  That is before any clipping or loss-scale unscaling the loop does next, which would otherwise
  look like a wrong sync.

(c) costs one all-reduce of the gradients (the local ones, as DDP divides them: each by W
first), only on checked steps. Where the arithmetic is the same as DDP's (2 ranks: one addition)
the synced gradient equals it bit for bit; in general two orders of summing W terms differ by
at most 2 gamma(W) sum |x_r| (`distshare.numerics.rounding`), the tolerance used. Hooks are
registered only while armed: an unarmed check costs one Python call per forward.

Intentionally replicated data (every rank the same batch, e.g. per-rank augmentation after the
forward's inputs) fails (a) and usually (b): pass `replicated_inputs=True` to keep them as notes.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from enum import Enum
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from distshare.distributed.launchers import launched_place
from distshare.errors import UsageError, VerificationFailed
from distshare.integrity.fingerprint import combined_fingerprint, fingerprint_many
from distshare.integrity.state import unwrap
from distshare.numerics.rounding import gamma_for

REDUCTIONS = ("mean", "sum")


class NotParallelCause(str, Enum):
    """Why a step is not data-parallel (str-valued, like `distshare.Cause`)."""

    ACCELERATE_NOT_DISTRIBUTED = "accelerate_not_distributed"
    NO_PROCESS_GROUP = "no_process_group"
    NOT_WRAPPED = "not_wrapped"
    GRADS_NOT_SYNCED = "grads_not_synced"
    SAME_DATA = "same_data"
    SAME_LOCAL_GRADS = "same_local_grads"

    def __str__(self) -> str:
        return self.value


@dataclass
class DataParallelReport:
    """One step seen from every rank: did they see different data, and was their gradient synced?"""

    world_size: int
    step: int | None = None
    forwards: list[int] = field(default_factory=list)  # training forwards seen, by rank
    same_inputs: list[list[int]] = field(default_factory=list)  # groups of ranks with an identical forward
    same_local_grads: bool = False  # every rank's local gradient identical (world_size > 1)
    parameters: int = 0  # parameters judged by (c): those with a synced gradient
    unsynced: dict[str, list[int]] = field(default_factory=dict)  # parameter -> ranks where (c) fails
    reduction: str = "mean"
    other_reduction: bool = False  # the failing gradients match the other reduction (sum vs mean)
    bitwise: bool = True  # (c) held bit for bit where it held
    max_abs_diff: float = 0.0  # largest |synced - expected| over the judged parameters and ranks
    max_excess: float = 0.0  # largest |synced - expected| / tolerance (<= 1: within rounding)
    wrapped: bool = False  # the model passed is a DDP wrapper
    accelerate: str | None = None  # accelerate's distributed type, when accelerate is in use
    replicated_inputs: bool = False
    cause: NotParallelCause | None = None
    explanation: str = ""
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.cause is None

    def describe(self) -> str:
        """The cause and its fix first, then what each fact measured; one line."""
        at = f" at step {self.step}" if self.step is not None else ""
        facts = self.facts()
        if self.ok:
            return f"data-parallel{at} on {self.world_size} ranks: {facts}"
        return f"not data-parallel{at}: {self.cause.value}: {self.explanation} Fix: {self.fix} | {facts}"

    def facts(self) -> str:
        if self.same_inputs:
            groups = "; ".join("ranks " + ", ".join(map(str, g)) for g in self.same_inputs)
            inputs = f"identical inputs on {groups}"
        else:
            inputs = "inputs differ on every rank" if any(self.forwards) else "no tensor inputs seen"
        grads = "local gradients identical on every rank" if self.same_local_grads else "local gradients differ"
        synced = f"{self.parameters - len(self.unsynced)} of {self.parameters} synced gradients equal the "
        synced += f"{self.reduction} of local ones"
        if self.parameters:
            how = "bitwise" if self.bitwise and not self.unsynced else f"max abs diff {self.max_abs_diff:.3g}"
            synced += f" ({how}, {self.max_excess:.3g} x the rounding bound)"
            if self.same_local_grads:
                synced += ", which proves nothing when the local ones are identical"
        forwards = "/".join(map(str, self.forwards))
        return f"{inputs} ({forwards} forwards); {grads}; {synced}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cause"] = self.cause.value if self.cause else None
        d["ok"] = self.ok
        d["summary"] = self.describe()
        return d


class DataParallelCheckTimeout(VerificationFailed):
    """The ranks did not all reach the data-parallel check within the timeout."""


class NotDataParallelError(VerificationFailed):
    """A step that should be data-parallel is not; the message starts with the likely cause and fix."""

    def __init__(self, report: DataParallelReport) -> None:
        super().__init__(report.describe())
        self.report = report

    def __reduce__(self):  # picklable with its report (it crosses from a rank to its parent)
        return (type(self), (self.report,))


class DataParallelCheck:
    """Hooks that see one step's inputs, local and synced gradients; `verify` compares the ranks.

    A collective at creation when a process group exists (its own group, with a timeout:
    `group` reuses one). `model`: the DDP wrapper where there is one (that it is one is
    evidence), or the module. `reduction`: what the sync does to the ranks' gradients, "mean"
    (DDP, accelerate) or "sum".
    """

    def __init__(
        self,
        model: nn.Module,
        reduction: str = "mean",
        replicated_inputs: bool = False,
        timeout_s: float = 300.0,
        group: dist.ProcessGroup | None = None,
    ) -> None:
        if reduction not in REDUCTIONS:
            raise UsageError(f"reduction={reduction!r}: expected 'mean' (DDP, accelerate) or 'sum'")
        self.model, self.reduction, self.replicated_inputs = model, reduction, replicated_inputs
        self.timeout_s = timeout_s
        self.inner = unwrap(model)
        self.parameters = [(n, p) for n, p in self.inner.named_parameters() if p.requires_grad]
        if any(hasattr(p, "to_local") for _, p in self.parameters):
            raise UsageError("the data-parallel check needs replicated parameters (DDP); sharded (FSDP) ones are not")
        self._distributed = dist.is_available() and dist.is_initialized()
        self._group = group
        if self._distributed and group is None:
            self._group = dist.new_group(timeout=timedelta(seconds=timeout_s))
        self.armed = False
        self.report: DataParallelReport | None = None  # the latest verdict
        self._forward_handle = self.inner.register_forward_pre_hook(self._before_forward, with_kwargs=True)
        self._grad_handles: list[Any] = []
        self._reset()

    def _reset(self) -> None:
        self._inputs: list[str] = []  # one combined digest per training forward with tensor inputs
        self._forwards = 0
        self._local: dict[str, torch.Tensor] = {}  # the local .grad of the latest backward, before any sync
        self._synced: dict[str, torch.Tensor] = {}  # .grad at the end of the last backward
        self._callback_queued = False

    # ------------------------------------------------------------------------------ capture

    def arm(self) -> None:
        """Start watching a step: its forwards' inputs and every gradient until `verify`."""
        self._remove_grad_hooks()
        self._reset()
        self.armed = True
        self._grad_handles = [p.register_hook(self._local_hook(n, p)) for n, p in self.parameters]

    def _before_forward(self, module: nn.Module, args: Any, kwargs: Any) -> None:
        if not (self.armed and module.training and torch.is_grad_enabled()):
            return
        self._forwards += 1
        tensors = dict(_tensors("args", args))
        tensors.update(_tensors("kwargs", kwargs))
        if tensors:
            self._inputs.append(combined_fingerprint(fingerprint_many({k: v.detach() for k, v in tensors.items()})))

    def _local_hook(self, name: str, param: torch.Tensor):
        def hook(grad: torch.Tensor) -> None:
            # Runs before autograd adds `grad` into param.grad: the local contribution. Repeat
            # the accumulation (param.grad as it is now, plus this contribution). Per backward:
            # what DDP reduces at a backward that syncs is .grad as it stands then, whether the
            # earlier micro-batches ran under no_sync (local sums) or synced (already reduced).
            if not self._callback_queued:  # the first gradient of a new backward
                self._local = {}
            held = self._local.get(name)
            if held is None:
                base = param.grad
                held = grad.detach().clone() if base is None else base.detach() + grad.detach()
            else:
                held = held + grad.detach()
            self._local[name] = held
            if not self._callback_queued:
                self._callback_queued = True
                torch.autograd.Variable._execution_engine.queue_callback(self._after_callbacks)

        return hook

    def _after_callbacks(self) -> None:
        # Queued during the backward, it runs among the engine's final callbacks; queuing the
        # copy from here puts it after every callback queued so far, DDP's finalize included.
        torch.autograd.Variable._execution_engine.queue_callback(self._copy_synced)

    def _copy_synced(self) -> None:
        self._callback_queued = False
        self._synced = {n: p.grad.detach().clone() for n, p in self.parameters if p.grad is not None}

    # ------------------------------------------------------------------------------ verdict

    def verify(self, step: int | None = None) -> DataParallelReport:
        """Collective: compare what every rank captured since `arm()`; the report (raises nothing).

        Call it after the step's last backward and before anything changes `.grad` further
        (clipping, unscaling happen after the copy it judges, so before or after them is fine).
        """
        self.armed = False
        self._remove_grad_hooks()
        try:
            self.report = self._verdict(step)
        except RuntimeError as exc:
            if "timeout" not in str(exc).lower() and "timed out" not in str(exc).lower():
                raise
            raise DataParallelCheckTimeout(
                f"the data-parallel check timed out after {self.timeout_s:g} s: some rank did not reach it "
                "(it skipped the step, or stopped)"
            ) from None
        finally:
            self._reset()
        return self.report

    def _verdict(self, step: int | None) -> DataParallelReport:
        accelerate = _accelerate_distributed_type()
        wrapped = isinstance(self.model, DistributedDataParallel)
        place = launched_place()
        if not self._distributed:
            report = DataParallelReport(world_size=1, step=step, forwards=[self._forwards], wrapped=wrapped)
            report.accelerate = accelerate
            if place is not None and place.world_size > 1:
                _name_cause(report, place.world_size, grouped=False)
            return report
        world_size = dist.get_world_size(self._group)
        local_digest = combined_fingerprint(fingerprint_many(self._local)) if self._local else None
        gathered: list[Any] = [None] * world_size
        mine = (self._forwards, self._inputs, local_digest, bool(self._local))
        dist.all_gather_object(gathered, mine, group=self._group)
        forwards = [g[0] for g in gathered]
        if not all(g[3] for g in gathered):
            missing = [r for r, g in enumerate(gathered) if not g[3]]
            raise UsageError(
                f"data-parallel check: no gradient reached rank(s) {', '.join(map(str, missing))} since it was armed: "
                "arm it before the step's first forward and verify after its last backward"
            )
        report = DataParallelReport(
            world_size=world_size,
            step=step,
            forwards=forwards,
            same_inputs=_same_groups([g[1] for g in gathered]),
            same_local_grads=world_size > 1 and len({g[2] for g in gathered}) == 1,
            reduction=self.reduction,
            wrapped=wrapped,
            accelerate=accelerate,
            replicated_inputs=self.replicated_inputs,
        )
        found = self._compare_synced(world_size)
        findings: list[Any] = [None] * world_size
        dist.all_gather_object(findings, found, group=self._group)
        report.parameters = max(f["parameters"] for f in findings)  # the same on every rank, as the report
        for r, per in enumerate(findings):
            for name in per["unsynced"]:
                report.unsynced.setdefault(name, []).append(r)
        report.unsynced = dict(sorted(report.unsynced.items()))
        report.bitwise = all(f["bitwise"] for f in findings)
        report.max_abs_diff = max(f["max_abs_diff"] for f in findings)
        report.max_excess = max(f["max_excess"] for f in findings)
        report.other_reduction = bool(report.unsynced) and all(f["other_reduction"] for f in findings)
        _name_cause(report, place.world_size if place is not None else world_size, grouped=True)
        return report

    def _compare_synced(self, world_size: int) -> dict[str, Any]:
        """(c) on this rank: the synced gradients against the all-reduced local ones."""
        names = [n for n, _ in self.parameters]
        params = dict(self.parameters)
        # Every rank all-reduces one vector over every trainable parameter, in one order (a
        # parameter without a local gradient here contributes zeros, as DDP's reducer does for
        # one whose .grad is None; it is judged only on ranks where a gradient reached it).
        parts = []
        for name in names:
            held = self._local.get(name)
            parts.append((held if held is not None else torch.zeros_like(params[name])).reshape(-1))
        flat = torch.cat(parts) if parts else torch.zeros(0)
        # DDP divides each rank's gradient by W before it sums (mean); the same arithmetic here.
        share = flat / world_size if self.reduction == "mean" else flat
        reduced = torch.stack([share, share.abs()])  # the sum, and the sum of magnitudes (the bound)
        dist.all_reduce(reduced, group=self._group)
        expected, magnitude = reduced[0], reduced[1]
        # The other reduction, for a hint only (approximate: no all-reduce of its own).
        factor = world_size if self.reduction == "mean" else 1 / world_size
        out = {"unsynced": [], "bitwise": True, "max_abs_diff": 0.0, "max_excess": 0.0, "other_reduction": True}
        out["parameters"] = 0
        offset = 0
        for name in names:
            n = params[name].numel()
            synced = self._synced.get(name)
            want, size = (t[offset : offset + n].view_as(params[name]) for t in (expected, magnitude))
            offset += n
            if synced is None or name not in self._local:
                continue  # no gradient in the step's last backward here (a frozen or unused parameter)
            out["parameters"] += 1
            synced = synced.to(want.dtype)
            if torch.equal(synced, want):
                continue
            out["bitwise"] = False
            gap = (synced.double() - want.double()).abs()
            tolerance = _tolerance(want.dtype, world_size, size.double())
            # NaN never passes: a NaN gap compares False with every bound.
            within = bool((gap <= tolerance).all())
            out["max_abs_diff"] = max(out["max_abs_diff"], float(gap.max()))
            excess = gap / tolerance.clamp_min(torch.finfo(torch.float64).tiny)
            worst = float(torch.nan_to_num(excess, nan=float("inf")).max())  # a NaN is infinitely wrong
            out["max_excess"] = max(out["max_excess"], worst)
            if not within:
                out["unsynced"].append(name)
                alt_gap = (synced.double() - want.double() * factor).abs()
                alt_tol = 4 * gamma_for(want.dtype, world_size + 1) * size.double() * factor
                out["other_reduction"] = out["other_reduction"] and bool((alt_gap <= alt_tol).all())
        if not out["unsynced"]:
            out["other_reduction"] = False
        return out

    # ------------------------------------------------------------------------------ lifecycle

    def _remove_grad_hooks(self) -> None:
        for handle in self._grad_handles:
            handle.remove()
        self._grad_handles = []

    def remove(self) -> None:
        """Remove every hook."""
        self.armed = False
        self._remove_grad_hooks()
        if self._forward_handle is not None:
            self._forward_handle.remove()
            self._forward_handle = None

    def __enter__(self) -> DataParallelCheck:
        self.arm()
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None, tb: Any) -> None:
        try:
            if kind is None:  # an error on its way: no collective that peers may never join
                self.verify()
        finally:
            self.remove()
        if kind is None and self.report is not None and not self.report.ok:
            raise NotDataParallelError(self.report)


def assert_data_parallel(
    model: nn.Module, reduction: str = "mean", replicated_inputs: bool = False, timeout_s: float = 300.0
) -> DataParallelCheck:
    """A `with` block around one training step that raises `NotDataParallelError` unless it was data-parallel.

        with assert_data_parallel(ddp_model) as check:    # a collective: every rank, same point
            for micro in micro_batches:                  # your forwards and backwards (no_sync...)
                loss_fn(ddp_model(micro)).backward()
        optimizer.step()                                 # check.report: what was measured

    Every rank must run the block (its end is a collective). The message names the likely
    cause: the model never wrapped, the ranks loading the same data, gradients not synced,
    accelerate not distributing (`Accelerator(cpu=True)` missing).
    """
    return DataParallelCheck(model, reduction, replicated_inputs, timeout_s)


def _tolerance(dtype: torch.dtype, world_size: int, magnitude: torch.Tensor) -> torch.Tensor:
    """How far a synced gradient may be from our all-reduce of the same local gradients.

    Two ranks: one addition, commutative, so any all-reduce gives the same bits; halving is
    exact too, except for subnormal values (one step of the smallest subnormal). More ranks:
    two orders of summing W terms are each within gamma(W - 1) sum |x_r| of the exact sum, so
    within 2 gamma(W) sum |x_r| of each other (one more rounding: a division after the sum).
    """
    if world_size <= 2:
        smallest = torch.finfo(dtype).tiny * torch.finfo(dtype).eps
        return torch.full_like(magnitude, smallest)
    return 2 * gamma_for(dtype, world_size) * magnitude


def _tensors(prefix: str, value: Any) -> list[tuple[str, torch.Tensor]]:
    """The tensors in a forward's arguments (nested lists, tuples, dicts), by path."""
    if isinstance(value, torch.Tensor):
        return [(prefix, value)]
    if isinstance(value, dict):
        return [t for k in sorted(value, key=str) for t in _tensors(f"{prefix}.{k}", value[k])]
    if isinstance(value, list | tuple):
        return [t for i, v in enumerate(value) for t in _tensors(f"{prefix}.{i}", v)]
    return []


def _same_groups(per_rank: list[list[str]]) -> list[list[int]]:
    """Groups (2 ranks or more) of ranks that share at least one forward's inputs, exactly."""
    owners: dict[str, set[int]] = {}
    for rank, digests in enumerate(per_rank):
        for d in digests:
            owners.setdefault(d, set()).add(rank)
    groups: list[set[int]] = []
    for ranks in owners.values():
        if len(ranks) < 2:
            continue
        joined = [g for g in groups if g & ranks]
        merged = set(ranks).union(*joined)
        groups = [g for g in groups if not (g & ranks)] + [merged]
    return sorted(sorted(g) for g in groups)


def _accelerate_distributed_type() -> str | None:
    """accelerate's distributed type ("NO", "MULTI_CPU", ...) if accelerate set one up in this process."""
    state = sys.modules.get("accelerate.state")  # never imported here: only read if the user's code did
    if state is None:
        return None
    shared = getattr(getattr(state, "PartialState", None), "_shared_state", None) or {}
    kind = shared.get("distributed_type")
    return None if kind is None else str(getattr(kind, "value", kind))


def _name_cause(report: DataParallelReport, launched_ranks: int, grouped: bool) -> None:
    """The likely cause of whatever failed, most fundamental first; nothing failed: none."""
    all_unsynced = report.parameters > 0 and len(report.unsynced) == report.parameters
    same_data = bool(report.same_inputs) and not report.replicated_inputs
    same_grads = report.same_local_grads and not report.replicated_inputs
    failed = not grouped or report.unsynced or same_data or same_grads
    if not failed:
        return
    if report.accelerate == "NO" and launched_ranks > 1:
        report.cause = NotParallelCause.ACCELERATE_NOT_DISTRIBUTED
        no_gpu = not torch.cuda.is_available()
        report.explanation = (
            f"accelerate reports DistributedType.NO although the launcher started {launched_ranks} processes"
            + (
                ": with a MULTI_GPU + use_cpu config on a machine without GPUs, accelerate launch does not pass "
                "use_cpu on to the processes, so a plain Accelerator() finds no device to distribute over"
                if no_gpu
                else ""
            )
            + "; it neither wraps the model nor shards the data, every rank trains alone on all of it."
        )
        report.fix = (
            "create Accelerator(cpu=True) (or export ACCELERATE_USE_CPU=1 for accelerate launch)."
            if no_gpu
            else "check accelerate's config (accelerate env) and that the processes see their devices."
        )
        return
    if not grouped:
        report.cause = NotParallelCause.NO_PROCESS_GROUP
        report.explanation = (
            f"the launcher started {launched_ranks} processes but this one has no torch.distributed process group:"
            " each trains alone."
        )
        report.fix = "call torch.distributed.init_process_group() (or let accelerate / your trainer do it) first."
        return
    if all_unsynced and not report.wrapped:
        report.cause = NotParallelCause.NOT_WRAPPED
        report.explanation = (
            f"no parameter's gradient is the {report.reduction} of the ranks' local gradients: the model is not "
            "wrapped in DistributedDataParallel, so nothing syncs them."
        )
        report.fix = "wrap it (DistributedDataParallel(model), accelerator.prepare(model)) and train the wrapper."
        return
    if report.unsynced:
        report.cause = NotParallelCause.GRADS_NOT_SYNCED
        names = list(report.unsynced)
        shown = ", ".join(names[:5]) + (f", and {len(names) - 5} more" if len(names) > 5 else "")
        report.explanation = (
            f"the synced gradient of {len(names)} of {report.parameters} parameters is not the {report.reduction} "
            f"of the ranks' local gradients ({shown})"
            + (
                f"; it is their {'sum' if report.reduction == 'mean' else 'mean'}."
                if report.other_reduction
                else ": they were not (or not all) reduced."
            )
        )
        if report.other_reduction:
            report.fix = f"pass reduction={'sum' if report.reduction == 'mean' else 'mean'!r} if your sync means it."
        else:
            report.fix = (
                "train through the DDP wrapper's forward, with these parameters known to it when wrapping "
                "(not ignored, not added or replaced later), and nothing overwriting .grad after the backward."
            )
        return
    if same_data:
        report.cause = NotParallelCause.SAME_DATA
        report.explanation = (
            "ranks trained on identical inputs: the data is not sharded across ranks (no DistributedSampler, "
            "the same seed shuffling every rank's copy, or a loader not passed to accelerator.prepare)"
            + (
                "; and the model passed is not a DDP wrapper: if it is not wrapped, wrap it too."
                if not report.wrapped
                else "."
            )
        )
        report.fix = (
            "give each rank its shard (DistributedSampler(dataset), accelerator.prepare(loader)); if every rank is "
            "meant to see the same inputs, pass replicated_inputs=True."
        )
        return
    report.cause = NotParallelCause.SAME_LOCAL_GRADS
    report.explanation = (
        "the inputs differ but every rank's local gradient is identical: "
        "the loss does not depend on the sharded inputs."
    )
    report.fix = "check that the loss is computed from this step's batch (not a cached or constant one)."
