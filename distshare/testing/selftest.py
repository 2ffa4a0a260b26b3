"""The mutation catalogue: every verdict distshare gives, and the faults that must flip it.

    distshare selftest [--json] [--only verify,grid,...]

For each verdict (the four `verify` checks, the grid's bound and update replay, exact
mode's bitwise claim, sample accounting, the replica checks, each pitfall, each demo's
claim and controls, checkpoint verification, the diagnosis of each publicly reported cause of
divergence) it first runs the clean case, which must pass,
then each mutant, which must make that verdict fail. A row is caught when it does. The
mutation score is caught / rows; a run is OK only when the clean cases pass and every
mutant is caught. The mutants are real faults in real runs (`distshare.testing.mutants`,
`distshare.testing.faults`), not edits of the verdict's inputs.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from distshare.config import load_config
from distshare.errors import UsageError

GROUPS = ("verify", "grid", "accounting", "replicas", "diagnosis", "pitfalls", "checkpoint", "demos")
VERIFY_STEPS = 6  # enough for the mutants (they strike at steps 0 to 2) and the checks after them
GRID_STEPS = 4


@dataclass
class Row:
    """One verdict against one mutant (or, with `clean`, the unmutated run it must pass)."""

    group: str
    verdict: str  # which verdict: "verify: equals one big batch"
    mutant: str  # what was broken: "every gradient x (1 + 0.0001) from step 1, on every rank"
    caught: bool  # clean: the verdict passed; mutant: the verdict failed
    detail: str  # the verdict's own line
    seconds: float
    clean: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@contextlib.contextmanager
def _environment(env: dict[str, str]) -> Iterator[None]:
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _run_cli(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """A distshare command in this process, with `env` set (spawned ranks inherit it): its JSON."""
    from distshare.cli import main

    out = io.StringIO()
    with _environment(env or {}), contextlib.redirect_stdout(out):
        code = main([*args, "--json", "--no-progress"])
    lines = [line for line in out.getvalue().splitlines() if line.startswith("{")]
    if not lines:  # the inner command refused its input (e.g. a run directory it cannot make)
        raise UsageError(f"selftest could not run `distshare {' '.join(args)}` (exit code {code}, no result)")
    return json.loads(lines[-1])


def _timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    start = time.perf_counter()
    value = fn()
    return value, round(time.perf_counter() - start, 2)


# ------------------------------------------------------------------------------------ verify

# mutant -> the verify check that must fail
VERIFY_MUTANTS = {
    "bit-flip": "replicas identical",
    "skip-micro-batch": "each sample once",
    "repeat-sample": "each sample once",
    "same-data": "different data, one gradient",
    "rank-gradient-ulp": "different data, one gradient",
    "nan-gradient": "equals one big batch",
    "gradient-scale": "equals one big batch",
    "learning-rate": "equals one big batch",
}


def verify_rows(out: Path) -> list[Row]:
    from distshare.testing.mutants import make, mutant_env

    rows = []
    base = ["verify", "--set", f"steps={VERIFY_STEPS}"]
    for label, extra, mutants in (
        ("verify", [], VERIFY_MUTANTS),
        ("verify --sync exact", ["--sync", "exact"], {"gradient-ulp": "equals one big batch"}),
    ):
        clean, secs = _timed(lambda extra=extra, label=label: _run_cli([*base, *extra, f"--out={out / label}"]))
        for check in clean["checks"]:
            if check["name"] in mutants.values():
                rows.append(
                    Row(
                        "verify",
                        f"{label}: {check['name']}",
                        "none (clean run)",
                        check["ok"],
                        check["detail"],
                        secs,
                        True,
                    )
                )
        for name, target in mutants.items():
            where = out / f"{label}-{name}"
            result, secs = _timed(
                lambda name=name, where=where, extra=extra: _run_cli(
                    [*base, *extra, f"--out={where}"], mutant_env(name)
                )
            )
            check = next(c for c in result["checks"] if c["name"] == target)
            rows.append(Row("verify", f"{label}: {target}", make(name).what, not check["ok"], check["detail"], secs))
    return rows


# -------------------------------------------------------------------------------------- grid

GRID_MUTANTS = ("nan-gradient", "gradient-scale", "learning-rate", "skip-micro-batch", "repeat-sample")


def _grid(task: Any) -> Any:
    from distshare.equivalence.grid import run_grid

    return run_grid(task, [1], [2], [None], GRID_STEPS, progress=False)


def grid_rows(out: Path) -> list[Row]:
    from distshare.commands.verify import DEFAULTS
    from distshare.equivalence.tasks import ConfigTask
    from distshare.testing.mutants import MutantTask, make

    rows = []
    for label, sync, mutants in (
        ("grid (W=1, k=2 vs one batch)", "ddp", GRID_MUTANTS),
        ("grid --sync exact: bitwise", "exact", ("gradient-ulp",)),
    ):
        cfg = load_config(None, [*DEFAULTS, f"steps={GRID_STEPS}", f"sync={sync}"])

        def verdict(result: Any, sync: str = sync) -> bool:
            p = result.partitions[0]
            return p.within_rounding and (sync != "exact" or p.bitwise_equal)

        clean, secs = _timed(lambda cfg=cfg: _grid(ConfigTask(cfg)))
        rows.append(Row("grid", label, "none (clean run)", verdict(clean), clean.partitions[0].summary(), secs, True))
        for name in mutants:
            result, secs = _timed(lambda cfg=cfg, name=name: _grid(MutantTask(cfg, mutant=name)))
            rows.append(Row("grid", label, make(name).what, not verdict(result), result.partitions[0].summary(), secs))
    rows.extend(_user_grid_rows())
    return rows


def _nan_for_one_sample(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """The user's loss, except that sample 1's is NaN (a log of zero, an empty count)."""
    x, y = batch
    loss = (model(x).squeeze(-1) - y).pow(2)
    return torch.where(y == 0.25, loss * float("nan"), loss).sum()


def _clean_loss(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    x, y = batch
    return (model(x).squeeze(-1) - y).pow(2).sum()


def _linear() -> torch.nn.Module:
    return torch.nn.Linear(4, 1)


def _user_grid_rows() -> list[Row]:
    from distshare.equivalence.grid import assert_accumulation_equivalent

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, 4, generator=gen)
    y = torch.arange(16, dtype=torch.float32) / 4  # y == 0.25 for sample 1
    data = torch.utils.data.TensorDataset(x, y)
    rows = []
    for mutant, loss_fn in (("none (clean run)", _clean_loss), ("one sample's loss is NaN", _nan_for_one_sample)):
        start = time.perf_counter()
        try:
            result = assert_accumulation_equivalent(_linear, loss_fn, data, world_sizes=(1,), accum_steps=(1, 2))
            passed, detail = True, result.text().splitlines()[-1].strip()
        except AssertionError as exc:
            passed, detail = False, str(exc).splitlines()[-1].strip()
        secs = round(time.perf_counter() - start, 2)
        clean = mutant.startswith("none")
        rows.append(
            Row("grid", "assert_accumulation_equivalent", mutant, passed if clean else not passed, detail, secs, clean)
        )
    return rows


# -------------------------------------------------------------------------------- accounting


def accounting_rows(out: Path) -> list[Row]:
    """The accounting of one process's real steps, reading what each loss consumed."""
    from distshare.commands.verify import DEFAULTS
    from distshare.data.accounting import account
    from distshare.distributed.world import World
    from distshare.testing.mutants import make, stepping
    from distshare.training import build_run

    cfg = load_config(None, [*DEFAULTS, "plan.world_size=1", "steps=3"])
    rows = []
    for name in (None, "skip-micro-batch", "repeat-micro-batch", "repeat-sample"):
        start = time.perf_counter()
        run = build_run(cfg, World())
        step = stepping(run, make(name)) if name else (lambda s, run=run: _plain(run, s))
        used = [step(s)[1] for s in range(cfg.steps)]
        acc = account(run.plan, [used])
        secs = round(time.perf_counter() - start, 2)
        what = make(name).what if name else "none (clean run)"
        rows.append(
            Row(
                "accounting",
                "each sample once (1 process, k=2)",
                what,
                acc.ok if not name else not acc.ok,
                acc.summary(),
                secs,
                not name,
            )
        )
    return rows


def _plain(run: Any, s: int) -> tuple[float, list[list[int]]]:
    from distshare.training import train_step

    stats = train_step(run, s)
    return stats.loss_sum, stats.indices


# ---------------------------------------------------------------------------------- replicas


def replica_rows(out: Path) -> list[Row]:
    from distshare.distributed.spawn import run_distributed
    from distshare.testing.faults import clean_checks, run_all_faults

    clean, clean_secs = _timed(lambda: run_distributed(clean_checks, 2, 10, timeout_s=60, deadline_s=300)[0])
    outcomes, secs = _timed(lambda: run_distributed(run_all_faults, 2, timeout_s=60, deadline_s=300)[0])
    return replica_rows_of(clean, outcomes, clean_secs, secs)


def replica_rows_of(clean: list[Any], outcomes: list[Any], clean_secs: float = 0.0, secs: float = 0.0) -> list[Row]:
    """The replica group's rows from one rank's `clean_checks` and `run_all_faults` results
    (tests/test_faults.py builds them from its own 3-rank world)."""
    rows = [
        Row(
            "replicas",
            f"replica check ({label})",
            "none (clean run)",
            first is None,
            f"{checks} checks, all in sync" if first is None else first.summary(),
            clean_secs,
            True,
        )
        for label, checks, first in clean
    ]
    for o in outcomes:
        caught = o.detected_at is not None and o.report is not None and not o.report.in_sync
        detail = o.report.summary() if o.report is not None else "never detected"
        rows.append(
            Row(
                "replicas",
                "replica check (compare_replicas)",
                _fault_label(o.fault, o.faulty_rank, o.injected_at),
                caught,
                detail,
                round(secs / max(len(outcomes), 1), 2),
            )
        )
    return rows


def diagnosis_rows(out: Path) -> list[Row]:
    """The diagnosis of each publicly reported cause, reproduced (`distshare.testing.divergences`,
    3 ranks; the sharded ones on 4 ranks, HSDP 2 x 2, by compare_replicas and by distshare.watch):
    its bug must be named as its cause, its fixed code must raise no alarm."""
    from distshare.distributed.spawn import run_distributed
    from distshare.testing.divergences import run_all, run_hsdp

    start = time.perf_counter()
    outcomes = run_distributed(run_all, 3, timeout_s=60, deadline_s=300)[0]
    outcomes += run_distributed(run_hsdp, 4, timeout_s=60, deadline_s=300)[0]
    return diagnosis_rows_of(outcomes, round((time.perf_counter() - start) / max(len(outcomes), 1), 2))


def diagnosis_rows_of(outcomes: list[Any], secs: float = 0.0) -> list[Row]:
    """The diagnosis group's rows from one rank's outcomes of `run_all` and `run_hsdp`
    (tests/test_divergences.py and tests/test_hsdp_replicas.py build them from their worlds)."""
    from distshare.testing.divergences import REPRODUCTIONS, SHARDED

    rows = []
    for o in outcomes:
        repro = {**REPRODUCTIONS, **SHARDED}[o.name]
        label = f"diagnosis ({o.name})" if o.checker == "compare" else f"diagnosis ({o.name}, {o.checker})"
        if o.fixed:
            detail = f"{o.checks} checks, all in sync" if o.report is None else o.report.summary()
            rows.append(
                Row(
                    "diagnosis",
                    label,
                    f"none (the fix: {repro.fix})",
                    o.report is None,
                    detail,
                    secs,
                    True,
                )
            )
            continue
        d = o.report.diagnosis if o.report is not None else None
        named = d is not None and d.cause == repro.cause
        detail = "never detected" if o.report is None else d.describe() if d is not None else o.report.summary()
        rows.append(Row("diagnosis", label, f"{repro.bug} -> {repro.cause}", named, detail, secs))
    return rows


def _fault_label(fault: str, rank: int | None, step: int) -> str:
    """ "bit_flip on rank 1 after step 2"; a fault on every rank, or from the start, says so."""
    who = "every rank its own way" if rank is None else f"rank {rank}"
    when = "from the start" if step < 0 else f"after step {step}"
    return f"{fault.replace('_', ' ')} on {who}, {when}"


# ---------------------------------------------------------------------------------- pitfalls


def pitfall_rows(out: Path) -> list[Row]:
    from distshare.equivalence.pitfalls import run_pitfalls

    pitfalls, secs = _timed(lambda: run_pitfalls(progress=False))
    return pitfall_rows_of(pitfalls, round(secs / max(1, len(pitfalls)), 2))


def pitfall_rows_of(pitfalls: list[Any], secs: float = 0.0) -> list[Row]:
    """The pitfall group's rows from the pitfalls' records (tests/test_pitfalls.py builds them
    from the pitfalls it runs)."""
    return [
        Row("pitfalls", f"{p.detected_by} vs pitfall {p.number}", p.name, p.detected, p.discrepancy, secs)
        for p in pitfalls
    ]


# -------------------------------------------------------------------------------- checkpoint


def checkpoint_rows(out: Path) -> list[Row]:
    from distshare.checkpoint import save_checkpoint, verify_checkpoint

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randn(4, 8)).sum().backward()
    optimizer.step()
    rows = []

    def damage(name: str, how: Callable[[Path], None]) -> None:
        path = out / "checkpoint" / name.replace(" ", "-")
        start = time.perf_counter()
        save_checkpoint(path, model, optimizer, step=1)
        how(path)
        check = verify_checkpoint(path)
        clean = name == "none (clean run)"
        detail = "verified" if check.ok else "; ".join(f"{k}: {v}" for k, v in check.problems.items())[:200]
        rows.append(
            Row(
                "checkpoint",
                "checkpoint verification",
                name,
                check.ok if clean else not check.ok,
                detail,
                round(time.perf_counter() - start, 2),
                clean,
            )
        )

    def flip_bit(path: Path) -> None:
        file = sorted(path.glob("*.safetensors"))[0]
        raw = bytearray(file.read_bytes())
        raw[-3] ^= 0x01  # the lowest bit of a byte inside the last tensor's data
        file.write_bytes(bytes(raw))

    def truncate(path: Path) -> None:
        file = sorted(path.glob("*.safetensors"))[0]
        file.write_bytes(file.read_bytes()[:-4])

    def manifest_digest(path: Path) -> None:
        manifest = path / "manifest.json"
        text = manifest.read_text()
        data = json.loads(text)
        tensors = data["tensors"]
        first = sorted(tensors)[0]
        digest = tensors[first]["digest"]
        tensors[first]["digest"] = ("0" if digest[0] != "0" else "1") + digest[1:]
        manifest.write_text(json.dumps(data))

    damage("none (clean run)", lambda path: None)
    damage("one bit flipped in a tensor file", flip_bit)
    damage("a tensor file cut short by 4 bytes", truncate)
    damage("one digest in the manifest changed", manifest_digest)
    return rows


# ------------------------------------------------------------------------------------- demos


def demo_rows(out: Path) -> list[Row]:
    from distshare.demos import DEMOS, mutants, run_demo

    rows = []
    for name in DEMOS:
        where = out / "demos" / name
        where.mkdir(parents=True, exist_ok=True)
        finding, secs = _timed(lambda name=name, where=where: run_demo(name, where))
        rows.extend(demo_claim_rows(finding.to_dict(), secs))
        for mutant in mutants(name):
            f, secs = _timed(lambda name=name, where=where, mutant=mutant: run_demo(name, where, mutant=mutant))
            rows.append(demo_mutant_row(f, secs))
    return rows


def demo_claim_rows(f: dict[str, Any], secs: float = 0.0) -> list[Row]:
    """A demo's real experiment (its claim must hold) and its controls (each must flip it), from
    the finding as written (`Finding.to_dict()`; tests/test_demos.py passes `demo all`'s)."""
    from distshare.demos import FAILS, HOLDS

    claim = f"demo {f['name']}: claim"
    rows = [Row("demos", claim, "none (the real experiment)", f["verdict"] == HOLDS, f["headline"], secs, True)]
    for c in f["controls"]:
        what = f"control {c['name']}: {c['what']}"
        rows.append(Row("demos", claim, what, c["verdict"] == FAILS, f"control {c['verdict']}", 0.0))
    return rows


def demo_mutant_row(finding: Any, secs: float = 0.0) -> Row:
    """A demo run with one of its mutants: the claim's own verdict must turn to fails
    (tests/test_demo_weights.py and tests/test_demo_attention.py run every mutant)."""
    from distshare.demos import FAILS, mutants

    what = mutants(finding.name)[finding.mutant]
    mutant = f"{finding.mutant}: {what}"
    return Row("demos", f"demo {finding.name}: claim", mutant, finding.verdict == FAILS, finding.headline, secs)


RUNNERS: dict[str, Callable[[Path], list[Row]]] = {
    "verify": verify_rows,
    "grid": grid_rows,
    "accounting": accounting_rows,
    "replicas": replica_rows,
    "diagnosis": diagnosis_rows,
    "pitfalls": pitfall_rows,
    "checkpoint": checkpoint_rows,
    "demos": demo_rows,
}


def run_selftest(
    groups: tuple[str, ...] = GROUPS, out: Path | None = None, on_group: Callable[[str], None] | None = None
) -> list[Row]:
    """Every group's rows, in order; files of the runs go under `out` (a temporary directory if None)."""
    with tempfile.TemporaryDirectory(prefix="distshare-selftest-") as tmp:
        base = out or Path(tmp)
        rows: list[Row] = []
        for group in groups:
            if on_group is not None:
                on_group(group)
            with torch.random.fork_rng(devices=[]):
                rows.extend(RUNNERS[group](base))
        return rows


def score(rows: list[Row]) -> tuple[int, int]:
    """(mutants caught, mutants): the mutation score's numerator and denominator."""
    mutants = [r for r in rows if not r.clean]
    return sum(r.caught for r in mutants), len(mutants)
