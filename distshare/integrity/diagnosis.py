"""Why replicas differ: the likely cause, read from what differs, when, and on which ranks.

`distshare.integrity.replicas` finds *where* replicas differ; this module says *why*. It is
pure: it reads a report (which tensors differ, on which ranks, element by element) and what
each rank knows of itself (`RankFacts`: has it taken a step yet, does its DDP wrapper sync
buffers, which tensors it changed since the ranks last agreed), and names one cause:

    cause                   the evidence that names it
    buffers_only            only buffers differ (parameters, gradients, optimizer state agree)
    optimizer_hyperparams   a learning rate, beta, weight decay... of a param group differs
    init_mismatch           parameters differ before any update; or later, with the optimizer's
                            moments equal everywhere (so every update was the same: the
                            parameters must have started apart)
    corruption              a few elements of one rank differ (at most 16, in under half of
                            each tensor), everything else agrees
    optimizer_state         the gradients agree (or one rank's are the others' times one
                            factor: clipping), but the update or the state differs: another
                            step count, other moments
    grads_not_synced        the gradients the optimizer used differ: DDP did not reduce
                            them (bypassed, or parameters it does not know)
    unknown                 nothing above fits

The rules are tried in that order. Where the evidence cannot decide between two causes (the
optimizer state differs but the gradients were not compared: unsynced gradients, or a
differing update?), the diagnosis names the likelier one, the other as an alternative, and the
call that would decide (`Diagnosis.decide`).

With two ranks there is no majority: every difference is seen on both. The culprit is then
named only from evidence that tells the two apart: a NaN on one side, a tensor that only one
rank changed since they last agreed, one rank's gradients a scaled copy of the other's.

A sharded model (FSDP2 / HSDP: `layout`, as `compare_replicas` read it from the model's
`DTensor`s) changes the words, not the rules: copies are replica groups, and an init mismatch
there has its own mechanism and fix (`fully_shard` never broadcasts what each rank built:
allenai/OLMo-core#319).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from enum import Enum
from typing import Any

from distshare.numerics.diff import TensorDiff


class Cause(str, Enum):
    """The causes a diagnosis names (str-valued: `diagnosis.cause == "init_mismatch"` holds)."""

    INIT_MISMATCH = "init_mismatch"
    GRADS_NOT_SYNCED = "grads_not_synced"
    BUFFERS_ONLY = "buffers_only"
    OPTIMIZER_HYPERPARAMS = "optimizer_hyperparams"
    OPTIMIZER_STATE = "optimizer_state"
    CORRUPTION = "corruption"
    UNKNOWN = "unknown"

    def __str__(self) -> str:
        return self.value


KINDS = ("param", "grad", "state", "hyper", "buffer", "extra")
# Causes that usually come from one rank, where "which one?" is worth a sentence; the others
# (a bypassed wrapper, unsynced buffers, weights never broadcast) are in every rank's code.
_ONE_RANK_CAUSES = (Cause.CORRUPTION, Cause.OPTIMIZER_STATE, Cause.OPTIMIZER_HYPERPARAMS, Cause.UNKNOWN)
KIND_WORDS = {
    "param": "parameters",
    "grad": "gradients",
    "state": "optimizer state",
    "hyper": "hyperparameters",
    "buffer": "buffers",
    "extra": "extra state",
}
# Corruption is "a few elements": at most this many in all, each tensor less than half changed.
CORRUPTION_MAX_ELEMENTS = 16
# One factor explains a rank's gradients when it fits every element this well (float32
# rounding of g * c is about 1e-7 relative; a gradient of other data misses by order 1).
SCALE_FIT = 1e-4
STEPS_TAKEN = "optim/steps_taken"  # distshare.watch's own count of optimizer.step() calls
BEFORE_FIRST_STEP = "before the first step"  # how a check before any update is named
_GROUP = re.compile(r"group\d+")
# Buffer names in a checkpoint, where parameters and buffers share the `model/` prefix.
_BUFFER_LEAVES = ("running_mean", "running_var", "num_batches_tracked")


def kind_of(name: str) -> str:
    """The kind of a state tensor by its name (`distshare.integrity.state` names; checkpoint names too)."""
    head, _, rest = name.partition("/")
    if head == "optim":
        first, _, key = rest.partition("/")
        return "hyper" if _GROUP.fullmatch(first) and "/" not in key else "state"
    if head == "model":  # a checkpoint's model file: parameters and buffers together
        return "buffer" if rest.rsplit(".", 1)[-1] in _BUFFER_LEAVES else "param"
    return head if head in ("param", "grad", "buffer") else "extra"


def parameter_of(name: str) -> str | None:
    """The parameter a tensor belongs to: `param/x`, `grad/x`, `optim/x/exp_avg` -> `x`."""
    kind = kind_of(name)
    rest = name.partition("/")[2]
    if kind in ("param", "grad"):
        return rest
    if kind == "state":
        return rest.rsplit("/", 1)[0]
    return None


@dataclass
class RankFacts:
    """What one rank knows of its own state that digests cannot say; gathered only when replicas differ."""

    rank: int
    updated: bool | None = None  # has an optimizer step (or a backward) happened here? None: unknown
    buffer_sync: bool | None = None  # the DDP wrapper's forward buffer sync; None: no DDP wrapper was passed
    # Buffers as the last training forward received them (after DDP's broadcast), by digest;
    # recorded by `distshare.watch`, None otherwise.
    forward_buffers: dict[str, str] | None = None
    # Of the differing tensors, those this rank changed since the ranks last agreed (None: no earlier check).
    changed: list[str] | None = None
    steps: int | None = None  # optimizer steps this rank's state counts (largest `step` entry, or watch's count)
    baseline: bool | None = None  # the check before the first update: in sync? (None: none was made)
    last_in_sync: str | None = None  # "step 3", "before the first step": the last check that agreed
    prior: dict[str, Any] | None = None  # the first divergence this rank saw of this model: step, diagnosis
    # How the model has left what its DDP wrapper wrapped (`distshare.integrity.wrapper_facts`):
    # kind ("never_forward", "replaced", "joined", "dtype", "device", "unused") -> names or values.
    wrapper: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class Diagnosis:
    """The likely cause of a divergence, in the user's terms, with the evidence it rests on."""

    cause: Cause
    explanation: str  # one sentence: what happened
    fix: str  # one sentence: what to change
    evidence: dict[str, Any] = field(default_factory=dict)
    culprit: int | None = None  # the rank that most likely went wrong (None: cannot tell)
    alternatives: list[str] = field(default_factory=list)  # other causes the evidence does not exclude
    decide: str | None = None  # the call that would decide between them

    def describe(self) -> str:
        """ "<cause>: <explanation> Fix: <fix>" (+ what would decide), one line."""
        text = f"{self.cause.value}: {_sentence(self.explanation)} Fix: {_sentence(self.fix)}"
        why = self.evidence.get("culprit_evidence")
        if self.culprit is not None:
            text += f" Likely culprit: rank {self.culprit}" + (f" ({why})." if why else ".")
        elif why and self.cause in _ONE_RANK_CAUSES:
            text += f" No culprit named: {why}."
        if self.alternatives:
            text += f" (Could also be {', '.join(self.alternatives)}; to decide: {self.decide}.)"
        return text

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["cause"] = self.cause.value
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Diagnosis:
        return cls(**{**d, "cause": Cause(d["cause"])})


def diagnose(
    differing: dict[str, list[int]],
    majority: dict[str, bool],
    elements: dict[str, list[TensorDiff]],
    names: Iterable[str],
    world_size: int,
    step: int | None = None,
    facts: Sequence[RankFacts] = (),
    layout: Mapping[str, Any] | None = None,
) -> Diagnosis:
    """The likely cause of `differing` (tensor -> ranks off the majority), from the evidence.

    `names`: every tensor the ranks compared (to know what was *not* different: were
    gradients compared at all, does the optimizer keep moments); `facts`: one per rank,
    or none (a comparison of digests alone, or of two checkpoints); `layout`: a sharded
    model's mesh (`ReplicaReport.layout`), None for replicas that each hold everything.
    """
    names = set(names)
    by_kind: dict[str, list[str]] = {k: [] for k in KINDS}
    for name in differing:
        by_kind[kind_of(name)].append(name)
    totals = {k: 0 for k in KINDS}
    for name in names:
        totals[kind_of(name)] += 1
    ev = Evidence(differing, majority, elements, by_kind, totals, world_size, step, list(facts), dict(layout or {}))
    for rule in (_prior, _buffers_only, _hyperparams, _before_update, _corruption, _gradients, _state, _params_only):
        found = rule(ev)
        if found is not None:
            found.evidence = {**ev.summary(), **found.evidence}
            return found
    return Diagnosis(
        Cause.UNKNOWN,
        f"only {', '.join(KIND_WORDS[k] for k in KINDS if by_kind[k])} differ ({_names(sum(by_kind.values(), []))}), "
        "which fits none of the known causes.",
        "compare what your code does on each rank to this state (a per-rank branch, a rank-dependent value).",
        ev.summary(),
    )


@dataclass
class Evidence:
    """What the rules read; `summary()` is what a diagnosis reports of it."""

    differing: dict[str, list[int]]
    majority: dict[str, bool]
    elements: dict[str, list[TensorDiff]]
    by_kind: dict[str, list[str]]
    totals: dict[str, int]  # kind -> how many tensors of it were compared
    world_size: int
    step: int | None
    facts: list[RankFacts]
    layout: dict[str, Any] = field(default_factory=dict)  # a sharded model's mesh; empty otherwise

    @property
    def sharded(self) -> bool:
        """FSDP2 / HSDP: the copies compared are replica groups, each holding one shard per rank."""
        return self.layout.get("kind") in ("fsdp", "hsdp")

    @property
    def compared(self) -> set[str]:
        """The kinds of tensors the ranks compared (were gradients compared at all?)."""
        return {k for k, n in self.totals.items() if n}

    @property
    def odd_ranks(self) -> list[int]:
        return sorted({r for ranks in self.differing.values() for r in ranks})

    @property
    def has_majority(self) -> bool:
        return all(self.majority.get(n, True) for n in self.differing)

    @property
    def updated(self) -> bool | None:
        """Has any rank updated yet? False only when every rank says it has not."""
        known = [f.updated for f in self.facts if f.updated is not None]
        return any(known) if known else None

    @property
    def when(self) -> str:
        if self.updated is False:
            return BEFORE_FIRST_STEP
        return f"step {self.step}" if self.step is not None else "this check"

    def kinds(self, *kinds: str) -> list[str]:
        return [n for k in kinds for n in self.by_kind[k]]

    def only(self, *kinds: str) -> bool:
        return bool(self.differing) and all(kind_of(n) in kinds for n in self.differing)

    def summary(self) -> dict[str, Any]:
        localized = [d for ds in self.elements.values() for d in ds]
        return {
            "differ": {k: len(v) for k, v in self.by_kind.items() if v},
            "compared": sorted(self.compared, key=KINDS.index),
            "check": self.when,
            "ranks": self.odd_ranks,
            "majority": self.has_majority,
            "world_size": self.world_size,
            "elements_localized": sum(d.differing for d in localized),
            "last_in_sync": next((f.last_in_sync for f in self.facts if f.last_in_sync), None),
            **({"layout": self.layout.get("kind")} if self.sharded else {}),
        }

    def single_odd_rank(self) -> int | None:
        """The one rank off a strict majority, if there is exactly one."""
        odd = self.odd_ranks
        return odd[0] if self.has_majority and len(odd) == 1 else None

    def culprit(self, names: list[str]) -> tuple[int | None, str]:
        """The likely culprit for these tensors and the evidence naming it ('' when none does)."""
        rank = self.single_odd_rank()
        if rank is not None:
            return rank, f"rank {rank} is off a majority of {self.world_size - 1} of {self.world_size}"
        bad = sorted({d.rank for n in names for d in self.elements.get(n, []) if d.nonfinite_mine})
        bad_ref = sorted({d.reference_rank for n in names for d in self.elements.get(n, []) if d.nonfinite_reference})
        if len(bad + bad_ref) == 1:
            rank = (bad + bad_ref)[0]
            return rank, f"only rank {rank}'s copy holds NaN or infinity"
        # "Who changed it" names a culprit only for state that stays put unless code moves it
        # (a learning rate, a scheduler's count): parameters and step counts change on every
        # rank at every step, and a rank that skipped a step is the one that did *not* change.
        steady = all(kind_of(n) in ("hyper", "extra") for n in names)
        changers = [f.rank for f in self.facts if f.changed is not None and set(f.changed) & set(names)]
        if steady and len(changers) == 1 and all(f.changed is not None for f in self.facts):
            rank = changers[0]
            return rank, f"only rank {rank} changed {_names(names)} since the ranks last agreed"
        return None, ""

    def no_majority_note(self) -> str:
        if self.has_majority or not self.differing:
            return ""
        if self.sharded and self.layout.get("replica_groups") == 2:
            return "with 2 replica groups there is no majority to say which copy is off"
        if self.world_size == 2:
            return "with 2 ranks there is no majority to say which copy is off"
        return "the ranks split without a majority"


def _diagnosis(ev: Evidence, cause: Cause, explanation: str, fix: str, names: list[str], **evidence: Any) -> Diagnosis:
    rank, why = ev.culprit(names)
    if rank is not None:
        evidence["culprit_evidence"] = why
    elif ev.no_majority_note():
        evidence["culprit_evidence"] = ev.no_majority_note()
    return Diagnosis(cause, explanation, fix, evidence, rank)


# ------------------------------------------------------------------------------------ the rules


def _prior(ev: Evidence) -> Diagnosis | None:
    """A divergence found earlier (of more than buffers) is still the cause of what follows."""
    prior = next((f.prior for f in ev.facts if f.prior), None)
    if not prior or prior["diagnosis"]["cause"] == Cause.BUFFERS_ONLY.value or prior["at"] == ev.when:
        return None
    first = Diagnosis.from_dict(prior["diagnosis"])
    at = prior["at"]
    when = at if at.startswith("before") else f"at {at}"
    first.explanation = f"the replicas already differed {when} ({first.cause.value}); {first.explanation}"
    first.evidence = {"first_diverged_at": at}
    return first


def _buffers_only(ev: Evidence) -> Diagnosis | None:
    if not ev.only("buffer"):
        return None
    names = ev.kinds("buffer")
    flags = {f.buffer_sync for f in ev.facts if f.buffer_sync is not None}
    entered = [f.forward_buffers for f in ev.facts if f.forward_buffers is not None]
    synced_at_forward = None
    if entered and len(entered) == len(ev.facts):
        synced_at_forward = all(e == entered[0] for e in entered)
    if synced_at_forward or (synced_at_forward is None and flags == {True}):
        seen = (
            "the last forward received them identical on every rank"
            if synced_at_forward
            else "the DDP wrapper has forward_sync_buffers=True"
        )
        d = Diagnosis(
            Cause.BUFFERS_ONLY,
            f"{_names(names)} differ only by what each rank's last forward added to them, DDP's normal "
            f"behaviour: rank 0's buffers are broadcast at the start of every forward, then each rank's "
            f"BatchNorm updates them from its own batch ({seen}).",
            "expected under DDP with BatchNorm: check the rest with buffers='separate' (or 'ignore'), use "
            "SyncBatchNorm to share the statistics, or compare the buffers right after the next forward's broadcast.",
            {"buffer_sync": "broadcast at every forward"},
        )
        return d
    if synced_at_forward is False or flags == {False}:
        seen = (
            "they differed as the last forward received them"
            if synced_at_forward is False
            else "the DDP wrapper does not sync buffers (broadcast_buffers=False)"
        )
        return _diagnosis(
            ev,
            Cause.BUFFERS_ONLY,
            f"{_names(names)} are never synchronized: {seen}, so each rank's running statistics follow "
            "only its own batches.",
            "drop broadcast_buffers=False (or use SyncBatchNorm), or all-reduce the buffers before you "
            "evaluate or save.",
            names,
            buffer_sync="never",
        )
    d = _diagnosis(
        ev,
        Cause.BUFFERS_ONLY,
        f"only buffers differ ({_names(names)}): either DDP's normal per-forward broadcast (each rank's "
        "forward then updates them from its own batch) or buffers never synchronized (broadcast_buffers=False).",
        "use SyncBatchNorm to share the statistics, or check the rest with buffers='separate'.",
        names,
        buffer_sync="unknown",
    )
    d.alternatives = []
    d.decide = None
    d.evidence["decide"] = (
        "pass the DDP-wrapped model (its buffer sync setting is read), or use distshare.watch, which "
        "records the buffers as each forward receives them"
    )
    return d


def _hyperparams(ev: Evidence) -> Diagnosis | None:
    names = ev.kinds("hyper")
    if not names:
        return None
    values = _values(ev, names)
    return _diagnosis(
        ev,
        Cause.OPTIMIZER_HYPERPARAMS,
        f"the optimizer's {_names(names)} {'differs' if len(names) == 1 else 'differ'} across ranks{values}: "
        "every update after that differs, "
        "whatever the gradients.",
        "step the learning-rate scheduler on every rank (not under `if rank == 0`), and take every "
        "hyperparameter from the config, never from the rank.",
        names,
    )


def _before_update(ev: Evidence) -> Diagnosis | None:
    baseline_failed = any(f.baseline is False for f in ev.facts)
    if not (ev.updated is False or baseline_failed) or not ev.kinds("param", "buffer"):
        return None
    names = ev.kinds("param", "buffer")
    when = "before any update" if ev.updated is False else "already at the check before the first step"
    if ev.sharded:
        return _diagnosis(
            ev,
            Cause.INIT_MISMATCH,
            f"the replica groups differ {when} ({_count(ev.kinds('param'), 'parameter')}): {SHARDED_INIT_WHY}.",
            SHARDED_INIT_FIX,
            names,
        )
    return _diagnosis(
        ev,
        Cause.INIT_MISMATCH,
        f"the replicas differ {when} ({_count(ev.kinds('param'), 'parameter')}): the initial weights were "
        "never made the same on every rank.",
        _INIT_FIX,
        names,
    )


_INIT_FIX = (
    "seed every rank alike before building the model, or broadcast rank 0's weights (DDP does it "
    "unless init_sync=False; FSDP2/HSDP and hand-written all-reduce loops never do)."
)
# Under FSDP2 / HSDP (allenai/OLMo-core#319): each rank keeps the shard of the tensor it built itself.
SHARDED_INIT_WHY = (
    "each replica group kept the weights its own ranks built, because fully_shard never broadcasts "
    "initial weights (per-rank init seeds, e.g. seed + rank, as in allenai/OLMo-core#319)"
)
SHARDED_INIT_FIX = (
    "build the model under the shared seed before fully_shard (seed per rank only afterwards, for data "
    "and dropout), or broadcast/load a seed checkpoint; distshare.check_sharded_init(model) checks it."
)


def _corruption(ev: Evidence) -> Diagnosis | None:
    names = list(ev.differing)
    if ev.kinds("hyper", "extra") or any(n not in ev.elements for n in names):
        return None  # every differing tensor must be localized to count its elements
    diffs = [d for n in names for d in ev.elements[n]]
    ranks = {d.rank for d in diffs}
    total = sum(d.differing for d in diffs)
    if not diffs or total > CORRUPTION_MAX_ELEMENTS or any(d.note or 2 * d.differing >= d.numel for d in diffs):
        return None
    if not (ev.single_odd_rank() is not None or ev.world_size == 2 or len(ranks) == 1):
        return None
    where = "; ".join(
        f"{n}[{', '.join(str(i) for i in d.first_index or [])}]" for n in names for d in ev.elements[n][:1]
    )
    in_state = " (in optimizer state)" if ev.kinds("state") and not ev.kinds("param") else ""
    return _diagnosis(
        ev,
        Cause.CORRUPTION,
        f"{total} element(s) in {len(names)} tensor(s){in_state} differ and everything else agrees "
        f"(first at {where}): a flipped bit or silent data corruption on one rank, not a bug that touches "
        "whole tensors.",
        "restore the replicas from a verified checkpoint (or broadcast rank 0's state), and if it recurs "
        "on one machine, test its memory and accelerator.",
        names,
        elements=total,
    )


def _gradients(ev: Evidence) -> Diagnosis | None:
    grads = ev.kinds("grad")
    if not grads:
        return None
    scaled = _common_scale(ev, grads)
    if scaled is not None:
        rank, factor, reference = scaled
        smaller = rank if factor < 1 else reference
        d = _diagnosis(
            ev,
            Cause.OPTIMIZER_STATE,
            f"rank {rank}'s gradients are {factor:.6g} x rank {reference}'s, the same factor in every "
            "tensor: they were synced, then clipped or rescaled on one rank only.",
            "clip (clip_grad_norm_) and scale gradients on every rank alike, after the sync, never inside "
            "a rank-dependent branch.",
            grads,
            factor=factor,
        )
        if d.culprit is None:
            d.culprit = smaller
            d.evidence["culprit_evidence"] = f"rank {smaller}'s gradients are the smaller (clipping lowers a norm)"
        return d
    params = {parameter_of(n) for n in grads}
    with_grad = " that have one" if ev.totals["grad"] < ev.totals["param"] else ""
    scope = (
        f"for all {len(params)} parameters{with_grad}"
        if len(params) >= ev.totals["grad"]
        else f"for {_count(sorted(params), 'parameter')}"
    )
    why, fix, seen = _unsynced(ev)
    return _diagnosis(
        ev,
        Cause.GRADS_NOT_SYNCED,
        f"the gradients the optimizer used differ across ranks {scope}: {why}.",
        fix,
        grads,
        parameters=len(params),
        **seen,
    )


# What the DDP wrapper shows (`distshare.integrity.wrapper_facts`): why it reduced no gradient, the fix.
_WRAPPER_WHY = {
    "never_forward": (
        "the DDP wrapper's forward never ran, so DDP reduced no gradient: training went through model.module",
        "call the DDP wrapper, ddp(x), never ddp.module(x)",
    ),
    "replaced": (
        "{count} {be} not among the parameter objects DDP wrapped (replaced after wrapping), so DDP's hooks "
        "never see their gradients",
        "assign new parameters before wrapping the model, then build the optimizer from it",
    ),
    "joined": (
        "more parameters require gradients than when DDP wrapped the model ({values}): those unfrozen "
        "after wrapping are never reduced",
        "set requires_grad before wrapping, or wrap the model again after unfreezing it",
    ),
    "dtype": (
        "the parameters' dtype changed after DDP wrapped them ({values}): converted parameters get new "
        "gradient accumulators, which DDP's hooks are not on",
        "convert the model (.double(), .half(), .to(dtype)) before wrapping it",
    ),
    "device": ("{count} moved to another device after DDP wrapped them", "move the model before wrapping it"),
    "unused": (
        "{count} got no gradient this step (unused by the forward): with find_unused_parameters=False "
        "DDP's reduction never completes, so none of this step's gradients was reduced (the next "
        "forward raises 'Expected to have finished reduction')",
        "pass find_unused_parameters=True to DDP, or use every parameter in the forward",
    ),
}
_UNSYNCED_WHY = (
    "DDP did not reduce them (training through model.module, parameters converted, moved, replaced or "
    "unfrozen after DDP wrapped the model, a parameter unused by the forward; pass the DDP-wrapped model "
    "to the check to be told which)"
)
_UNSYNCED_FIX = (
    "call the DDP wrapper (ddp(x)), never ddp.module(x); wrap the model after converting, moving, freezing or "
    "unfreezing its parameters, and build the optimizer from the wrapped model's parameters; for parameters "
    "a forward may not use, pass find_unused_parameters=True"
)


def _unsynced(ev: Evidence) -> tuple[str, str, dict[str, Any]]:
    """Why the gradients were not reduced, its fix, and the wrapper's notes: from the DDP wrapper
    when one was passed, else the list of known mechanisms."""
    notes = next((f.wrapper for f in ev.facts if f.wrapper), {})
    if not notes:
        return _UNSYNCED_WHY, _UNSYNCED_FIX, {}
    whys, fixes = [], []
    for kind, values in notes.items():
        why, fix = _WRAPPER_WHY[kind]
        be = "is" if len(values) == 1 else "are"
        whys.append(why.format(count=_count(values, "parameter"), be=be, values=", ".join(values)))
        fixes.append(fix)
    return "; ".join(whys), "; ".join(fixes), {"wrapper": notes}


def _state(ev: Evidence) -> Diagnosis | None:
    state = ev.kinds("state")
    if not state:
        return None
    step_names = [n for n in state if n.endswith("/step") or n == STEPS_TAKEN]
    steps = {f.rank: f.steps for f in ev.facts if f.steps is not None}
    if step_names:
        counts = f" ({', '.join(f'rank {r}: {s}' for r, s in sorted(steps.items()))})" if steps else ""
        return _diagnosis(
            ev,
            Cause.OPTIMIZER_STATE,
            f"the ranks have taken different numbers of optimizer steps{counts}: a step skipped or doubled "
            "on some rank (a skipped non-finite step, a second optimizer.step()).",
            "call optimizer.step() exactly once per global step on every rank; when a step is skipped "
            "(an overflow), decide it from a value all-reduced over the ranks.",
            step_names,
        )
    if "grad" in ev.compared:
        return _diagnosis(
            ev,
            Cause.OPTIMIZER_STATE,
            f"the gradients agree, but the optimizer state differs ({_count(_params_of(state), 'parameter')}): "
            "the update or the state was changed on some rank.",
            "look for code that writes optimizer state, or steps differently, on one rank only.",
            state,
        )
    why, fix, seen = _unsynced(ev)
    if seen:  # the DDP wrapper says which gradients it did not reduce: decided
        return _diagnosis(
            ev,
            Cause.GRADS_NOT_SYNCED,
            f"the optimizer state differs ({_count(_params_of(state), 'parameter')}) because the gradients "
            f"it was fed differed: {why}.",
            fix,
            state,
            **seen,
        )
    d = _diagnosis(
        ev,
        Cause.GRADS_NOT_SYNCED,
        f"the optimizer state differs ({_count(_params_of(state), 'parameter')}), most likely because the "
        f"gradients it was fed differed: {why}.",
        fix,
        state,
    )
    d.alternatives = [Cause.OPTIMIZER_STATE.value]
    d.decide = "compare_replicas(model, optimizer, grads=True) right after optimizer.step() (or distshare.watch)"
    return d


def _params_only(ev: Evidence) -> Diagnosis | None:
    params = ev.kinds("param", "buffer")
    if not ev.kinds("param"):
        return None
    moments = "state" in ev.compared
    agreed_since = [f.last_in_sync for f in ev.facts if f.last_in_sync and f.last_in_sync != BEFORE_FIRST_STEP]
    if agreed_since:
        return _diagnosis(
            ev,
            Cause.OPTIMIZER_STATE,
            f"the replicas agreed at {agreed_since[0]}, and since then the parameters moved differently "
            "though the gradients and the optimizer state agree: the update was changed, or the weights were "
            "written outside the optimizer, on some rank.",
            "look for code that writes weights, or steps differently, on one rank only.",
            params,
        )
    proof = (
        "the optimizer's moments agree, so every update was the same on every rank"
        if moments
        else "the gradients agree"
        if "grad" in ev.compared
        else "nothing else differs"
    )
    started = (
        f"the replica groups must have started apart ({SHARDED_INIT_WHY})"
        if ev.sharded
        else "the replicas must have started apart (the initial weights were never broadcast)"
    )
    d = _diagnosis(
        ev,
        Cause.INIT_MISMATCH,
        f"{_count(ev.kinds('param'), 'parameter')} differ while {proof}: {started}.",
        SHARDED_INIT_FIX if ev.sharded else _INIT_FIX,
        params,
    )
    if not moments:
        d.alternatives = [Cause.OPTIMIZER_STATE.value]
        d.decide = (
            "a check before the first step (compare_replicas(model, optimizer) before training, or distshare.watch)"
        )
    return d


# ---------------------------------------------------------------------------------- helpers


def _common_scale(ev: Evidence, grads: list[str]) -> tuple[int, float, int] | None:
    """(rank, factor, reference rank) if one rank's localized gradients are all one factor x the reference's."""
    diffs = [d for n in grads for d in ev.elements.get(n, [])]
    if not diffs or len({d.rank for d in diffs}) != 1:
        return None
    scales = [d.scale for d in diffs]
    fits = [d.scale_residual for d in diffs]
    if any(s is None for s in scales) or any(r is None or r > SCALE_FIT for r in fits):
        return None
    first = scales[0]
    if first == 1.0 or any(abs(s - first) > SCALE_FIT * abs(first) for s in scales):
        return None
    return diffs[0].rank, first, diffs[0].reference_rank


def _params_of(names: list[str]) -> list[str]:
    return sorted({p for n in names if (p := parameter_of(n)) is not None})


def _values(ev: Evidence, names: list[str]) -> str:
    """ " (lr: rank 1 0.002 vs rank 0 0.001)" from the localized values, or ''."""
    parts = []
    for n in names:
        for d in ev.elements.get(n, [])[:1]:
            if d.mine is not None and d.reference is not None:
                parts.append(
                    f"{n.rsplit('/', 1)[-1]}: rank {d.rank} {d.mine:.6g} vs rank {d.reference_rank} {d.reference:.6g}"
                )
    return f" ({'; '.join(parts)})" if parts else ""


def _names(names: list[str], limit: int = 3) -> str:
    shown = ", ".join(sorted(names)[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _count(names: list[str], what: str) -> str:
    n = len(names)
    return f"{n} {what}{'s' if n != 1 else ''} ({_names(names)})"


def _sentence(text: str) -> str:
    return text if text.endswith((".", "?", "!")) else text + "."
