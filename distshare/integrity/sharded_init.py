"""Is a sharded model's initial state one logical state, whatever the layout? A check users run.

FSDP2's `fully_shard` keeps, on every rank, the shard of the tensor that rank built: it never
broadcasts initial weights. Built under per-rank seeds (`seed + rank`), HSDP's replica groups
start as different models and train on happily (allenai/OLMo-core#319); built by an init that
draws per shard (a meta-device model whose `reset_parameters` runs on each rank's shard), the
model depends on the layout: 2 shards and 4 shards are two different inits of "the same" run.

    model = build_model()                        # under the shared seed
    fully_shard(model, mesh=mesh)
    distshare.assert_sharded_init(model)         # a collective: every replica group the same?

    # ... and the very init one process builds from the seed, bit for bit (layout-independent):
    expected = state_digest(build_model(), algorithm="lsh128")   # in any one process
    distshare.assert_sharded_init(model, expected=expected)

Both read logical digests (`distshare.integrity.logical`: `lsh128` of each whole tensor from
its shards, one all-gather of two integers per tensor, never the tensor), so the expected
digest can come from one process, a DDP replica or any other layout. `expected` is that
state digest (one string) or `fingerprint_state(reference, algorithm="lsh128")` (a mapping:
then the tensors that differ are named). The same check works on an unsharded model (each
rank is its own copy) and in one process (only `expected` is checked).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

import torch.distributed as dist
from torch import nn

from distshare.errors import VerificationFailed
from distshare.integrity.diagnosis import SHARDED_INIT_FIX, SHARDED_INIT_WHY, Cause, Diagnosis
from distshare.integrity.fingerprint import combined_fingerprint
from distshare.integrity.logical import LOGICAL_ALGORITHM, is_dtensor, logical_fingerprints
from distshare.integrity.state import named_state_tensors

_LAYOUT_WHY = (
    "the model was built under another seed than the reference, or its initialization depends on the "
    "layout (an init that draws per shard, e.g. reset_parameters on each rank's shard of a meta-device "
    "model, or a seed offset by the rank)"
)
_LAYOUT_FIX = (
    "initialize the logical tensors under the reference's seed (build the whole model, then fully_shard; "
    "or draw each tensor whole from one generator), or load the reference's seed checkpoint; keep "
    "per-rank seeds for data and dropout only."
)


@dataclass
class Copy:
    """One version of the initial state and the ranks holding it (a replica group, or several)."""

    label: str  # "replica group 0 (ranks 0, 1)", "rank 2"
    ranks: list[int]
    digest: str  # combined lsh128 of its parameters and buffers: comparable to state_digest(..., "lsh128")


@dataclass
class InitReport:
    """What `check_sharded_init` found: the copies of the initial state, and how they compare."""

    world_size: int
    copies: list[Copy]  # the most common first (rank 0's on a tie)
    tensors: int  # parameters and buffers checked
    differing: dict[str, list[str]] = field(default_factory=dict)  # tensor -> labels of the copies off the first
    expected: str | None = None  # the expected state digest (given, or combined from the mapping)
    unexpected: list[str] = field(default_factory=list)  # labels of the copies that are not the expected state
    unexpected_tensors: list[str] = field(default_factory=list)  # with a mapping: the tensors that differ from it
    layout: str | None = None  # "hsdp mesh 2 x 2 (replicate, shard)", "fsdp mesh 4", None: unsharded
    diagnosis: Diagnosis | None = None

    @property
    def ok(self) -> bool:
        return len(self.copies) == 1 and not self.unexpected

    def summary(self) -> str:
        """One line: what was compared and found; a failure's diagnosis (cause, where, fix)."""
        if not self.ok:
            assert self.diagnosis is not None
            return self.diagnosis.describe()
        state = f"{self.tensors} tensors ({self.copies[0].digest})"
        vs = " = the expected state" if self.expected is not None else ""
        if self.layout is None:
            return f"all {self.world_size} ranks hold one initial state of {state}{vs}"
        if self.layout.startswith("fsdp"):  # one replica group: no copy of the shards to compare with
            tail = (
                f"its initial state of {state} is the expected one"
                if self.expected is not None
                else f"its state is {self.copies[0].digest}; pass expected= (a reference's "
                "state_digest(..., algorithm='lsh128')) to check it"
            )
            return f"{self.layout}: one replica group holds the sharded tensors, nothing to compare them with; {tail}"
        return f"{self.layout}: every replica group holds one initial state of {state}{vs}"

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["ok"] = self.ok
        d["diagnosis"] = self.diagnosis.to_dict() if self.diagnosis is not None else None
        d["summary"] = self.summary()
        return d


class InitMismatchError(VerificationFailed):
    """A sharded model's initial state differs between replica groups, or from the expected one."""

    def __init__(self, report: InitReport) -> None:
        super().__init__(report.summary())
        self.report = report

    def __reduce__(self):  # picklable with its report (it crosses from a rank to its parent)
        return (type(self), (self.report,))


def check_sharded_init(model: nn.Module, expected: str | Mapping[str, str] | None = None) -> InitReport:
    """Collective: do all replica groups hold one logical initial state (and is it `expected`)?

    Every rank calls it at the same point, before training. `expected`: a state digest
    (`state_digest(reference, algorithm="lsh128")`) or per-tensor digests
    (`fingerprint_state(reference, algorithm="lsh128")`) of the reference model's parameters and
    buffers, computed anywhere (one process, from the seed). Reads nothing but digests.
    """
    named = dict(named_state_tensors(model, shards=False))  # param/ and buffer/: the initial state
    mine = logical_fingerprints(named)  # this rank's replica group's digests of the logical tensors
    assert isinstance(mine, dict)
    layout, key = _layout(named)
    if dist.is_available() and dist.is_initialized():
        world = dist.get_world_size()
        views: list[Any] = [None] * world
        # Whole digest maps only when the states differ; first one combined digest per rank.
        dist.all_gather_object(views, (combined_fingerprint(mine), key))
        if len({v[0] for v in views}) > 1:
            keys = [v[1] for v in views]
            dist.all_gather_object(views, mine)
            views = [(v, k) for v, k in zip(views, keys, strict=True)]
        else:
            views = [(mine, v[1]) for v in views]
    else:
        views = [(mine, key)]
    return _report(views, layout, expected)


def assert_sharded_init(model: nn.Module, expected: str | Mapping[str, str] | None = None) -> InitReport:
    """Collective: raise `InitMismatchError` on every rank unless `check_sharded_init` is clean.

    Its message starts with the likely cause and the fix, then names the tensors and the
    replica groups (with their ranks) that differ."""
    report = check_sharded_init(model, expected)
    if not report.ok:
        raise InitMismatchError(report)
    return report


# ---------------------------------------------------------------------------------- helpers


def _layout(named: Mapping[str, Any]) -> tuple[str | None, tuple[int, ...] | None]:
    """("hsdp mesh 2 x 2 (replicate, shard)", this rank's replica group) from the first DTensor;
    (None, None) unsharded."""
    from torch.distributed.tensor import Replicate

    t = next((t for t in named.values() if is_dtensor(t)), None)
    if t is None:
        return None, None
    shape = list(t.device_mesh.mesh.shape)
    replicated = [isinstance(p, Replicate) for p in t.placements]
    groups = 1
    for n, r in zip(shape, replicated, strict=True):
        groups *= n if r else 1
    kind = "hsdp" if groups > 1 and groups < t.device_mesh.mesh.numel() else "fsdp" if groups == 1 else "replicated"
    names = t.device_mesh.mesh_dim_names
    dims = f" ({', '.join(names)})" if names else ""
    coordinate = t.device_mesh.get_coordinate() or []
    key = tuple(c for c, r in zip(coordinate, replicated, strict=True) if r)
    return f"{kind} mesh {' x '.join(str(n) for n in shape)}{dims}", key


def _label(ranks: list[int], keys: list[tuple[int, ...] | None]) -> str:
    """A copy in words: by the replica groups it spans when it holds them whole, else by its ranks."""
    ranks_text = f"rank{'s' if len(ranks) > 1 else ''} {', '.join(str(r) for r in ranks)}"
    groups = sorted({keys[r] for r in ranks if keys[r] is not None})
    whole = groups and all(
        sorted(r for r, k in enumerate(keys) if k == g) == [r for r in ranks if keys[r] == g] for g in groups
    )
    if not whole or len(groups) == len(ranks):  # one rank per group: ranks say it better
        return ranks_text
    names = ", ".join(str(g[0]) if len(g) == 1 else str(g) for g in groups)
    return f"replica group{'s' if len(groups) > 1 else ''} {names} ({ranks_text})"


def _report(
    views: list[tuple[dict[str, str], tuple[int, ...] | None]],
    layout: str | None,
    expected: str | Mapping[str, str] | None,
) -> InitReport:
    keys = [k for _, k in views]
    by_digest: dict[str, list[int]] = {}
    for rank, (digests, _) in enumerate(views):
        by_digest.setdefault(combined_fingerprint(digests), []).append(rank)
    order = sorted(by_digest, key=lambda d: (-len(by_digest[d]), by_digest[d][0]))
    copies = [Copy(_label(by_digest[d], keys), by_digest[d], d) for d in order]
    reference = views[copies[0].ranks[0]][0]
    differing: dict[str, list[str]] = {}
    for copy in copies[1:]:
        other = views[copy.ranks[0]][0]
        for name in sorted(set(reference) | set(other)):
            if reference.get(name) != other.get(name):
                differing.setdefault(name, []).append(copy.label)
    report = InitReport(len(views), copies, len(reference), differing, layout=layout)
    if expected is not None:
        _against(report, views, expected)
    report.diagnosis = _diagnosis(report)
    return report


def _against(report: InitReport, views: list, expected: str | Mapping[str, str]) -> None:
    """Compare every copy with the expected state (a digest, or per-tensor digests)."""
    if isinstance(expected, Mapping):
        wanted = {n: d for n, d in expected.items() if n.startswith(("param/", "buffer/"))}
        _same_algorithm(wanted.values())
        report.expected = combined_fingerprint(wanted)
        for copy in report.copies:
            view = views[copy.ranks[0]][0]
            off = sorted(n for n in set(wanted) | set(view) if wanted.get(n) != view.get(n))
            if off:
                report.unexpected.append(copy.label)
                report.unexpected_tensors = sorted(set(report.unexpected_tensors) | set(off))
        return
    # A state digest is an xxh3 of per-tensor digests whatever their algorithm: it cannot be
    # refused here, only named in the diagnosis if it differs.
    report.expected = expected
    report.unexpected = [c.label for c in report.copies if c.digest != expected]


def _same_algorithm(digests: Any) -> None:
    for d in digests:
        if not str(d).startswith(f"{LOGICAL_ALGORITHM}:"):
            # A digest of another algorithm never equals a logical one: refuse rather than "differ".
            raise ValueError(
                f"expected digest {str(d)[:20]}... is not {LOGICAL_ALGORITHM}: compute it with "
                f"state_digest(reference, algorithm={LOGICAL_ALGORITHM!r}) (or fingerprint_state(..., algorithm=...))"
            )


def _names(names: list[str], limit: int = 4) -> str:
    shown = ", ".join(names[:limit])
    return shown + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _diagnosis(report: InitReport) -> Diagnosis | None:
    if report.ok:
        return None
    sharded = report.layout is not None and not report.layout.startswith("replicated")
    evidence: dict[str, Any] = {
        "layout": report.layout,
        "copies": {c.label: c.digest for c in report.copies},
        "check": "initial state",
    }
    if len(report.copies) > 1:
        names = sorted(report.differing)
        first, others = report.copies[0], report.copies[1:]
        who = "replica groups" if sharded else "ranks"
        explanation = (
            f"the {who} hold different initial weights: {len(names)} of {report.tensors} tensors differ "
            f"({_names(names)}) between {first.label} and {', '.join(c.label for c in others)}: "
            + (
                SHARDED_INIT_WHY
                if sharded
                else "each rank built its own weights (per-rank seeds) and none were broadcast"
            )
        )
        fix = (
            SHARDED_INIT_FIX
            if sharded
            else "seed every rank alike before building the model, or broadcast rank 0's weights (DDP does it)."
        )
        evidence["differing"] = report.differing
        if report.unexpected:
            evidence["unexpected"] = report.unexpected
        return Diagnosis(Cause.INIT_MISMATCH, explanation, fix, evidence)
    tensors = f" ({_names(report.unexpected_tensors)})" if report.unexpected_tensors else ""
    who = (
        "the sharded model's initial state (held by its one replica group) is"
        if report.layout is not None and report.layout.startswith("fsdp")
        else "every replica group holds one initial state, but"
        if report.layout is not None
        else "every rank holds one initial state, but"
    )
    explanation = (
        f"{who} not the expected one: {report.copies[0].digest} vs expected {report.expected}{tensors}: {_LAYOUT_WHY}"
    )
    if not report.unexpected_tensors:
        explanation += (
            " (the expected digest must be state_digest(reference, algorithm='lsh128') of the parameters and "
            "buffers alone; pass fingerprint_state(reference, algorithm='lsh128') to be told which tensors differ)"
        )
    evidence["unexpected"] = report.unexpected
    evidence["unexpected_tensors"] = report.unexpected_tensors
    return Diagnosis(Cause.INIT_MISMATCH, explanation, _LAYOUT_FIX, evidence)
