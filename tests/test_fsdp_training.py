"""One logical parameter set, sharded: FSDP2 and HSDP train the one step like one process.

Specifications, each with the mutant that must flip it:

- distshare's models start from the same whole tensors under any layout: the logical init
  digest is one for one process, DDP, FSDP at 2 and 4 shards and HSDP 2 x 2 (a per-rank
  init seed gives another digest);
- FSDP on 2 ranks and HSDP 2 x 2 on 4 ranks, with gradient accumulation, train like one
  process on the same global batches, within the measured rounding bound (judged as the
  equivalence grid judges a partition). Averaging instead of summing over the ranks
  (FSDP2's default divide factor) or never syncing fails it; on 2 ranks FSDP ends with the
  very bits DDP ends with (the logical digest);
- `distshare verify --parallel fsdp` under a real torchrun passes its checks and ends with the
  same logical state as the spawned ranks;
- what cannot run sharded is refused in one line, exit 2, before any rank starts.

Real gloo process groups, one spawned world per world size (each checks several things).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from conftest import get_launch_command, run_command
from torch import nn

from distshare.config import RunConfig, load_config
from distshare.distributed.spawn import run_distributed
from distshare.distributed.sync import ShardedSync
from distshare.distributed.world import World
from distshare.equivalence import ConfigTask
from distshare.equivalence.grid import compare
from distshare.equivalence.reference import run_reference
from distshare.equivalence.runs import PartitionRun, run_partition
from distshare.integrity.fingerprint import state_digest
from distshare.models import build_model
from distshare.training import build_run, train

STEPS = 2
BASE = [
    "plan.global_batch=16",
    "plan.accum_steps=1",
    "plan.micro_batch=null",
    "data.num_samples=64",
    "data.task=roles",
    "data.variable_length=true",  # items per sample differ: the global-count normalization matters
    f"steps={STEPS}",
    "check_every=1",
]


def config(parallel: str, world_size: int, *extra: str) -> RunConfig:
    return load_config(None, [*BASE, f"parallel={parallel}", f"plan.world_size={world_size}", *extra])


# --- mutants: each a fair counterfactual of one line of ShardedSync ---------------------------


class Averaging(ShardedSync):
    """FSDP2's default reduction: the summed gradient divided by W (already divided by the global count)."""

    def __init__(self, world_size: int, replicas: int = 1) -> None:
        super().__init__(world_size, replicas, divide=True)


class NeverSync(ShardedSync):
    """`set_requires_gradient_sync(False)` on every micro-batch, the last included."""

    @contextlib.contextmanager
    def micro_step(self, wrapped: nn.Module, last: bool) -> Iterator[None]:
        wrapped.set_requires_gradient_sync(False)  # type: ignore[operator]
        yield


class PerRankSeed(ShardedSync):
    """Each rank initializes its model from `seed + rank` before it keeps its shard."""

    def __init__(self, cfg: RunConfig, world: World, replicas: int = 1) -> None:
        super().__init__(world.world_size, replicas)
        self.cfg, self.rank = cfg, world.rank

    def prepare(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> Any:
        from distshare.data import build_dataset

        _, info = build_dataset(self.cfg.data)
        fresh = build_model(self.cfg.model, info, seed=self.cfg.seed + self.rank)
        model.load_state_dict(fresh.state_dict())
        return super().prepare(model, optimizer)


@dataclasses.dataclass
class MutantTask(ConfigTask):
    """The grid's task with a mutant's sync in place of the configured one."""

    mutant: str = ""

    def make_sync(self, cfg: RunConfig, world: World) -> Any:
        if world.world_size == 1:
            return None
        replicas = cfg.hsdp_replicas if cfg.parallel == "hsdp" else 1
        if self.mutant == "averaging":
            return Averaging(world.world_size, replicas)
        if self.mutant == "never_sync":
            return NeverSync(world.world_size, replicas)
        return PerRankSeed(cfg, world, replicas)


# --- what the spawned ranks do ---------------------------------------------------------------


def _init_digest(cfg: RunConfig, world: World, sync: Any = None) -> str:
    """The logical digest of the freshly built (and, by the layout, sharded) model."""
    run = build_run(cfg, world, sync)
    return state_digest(run.model, algorithm="lsh128")  # a collective on a sharded model


def _partition(task: ConfigTask, world: World, k: int) -> PartitionRun:
    return run_partition(task, world, world.world_size, k, None, STEPS)


def _world(world: World, parallel: str) -> dict[str, Any]:
    """Everything one spawned world checks, in the same order on every rank."""
    w = world.world_size
    out: dict[str, Any] = {"init": {}}
    for layout in ("ddp", "fsdp", "hsdp") if w == 4 else ("ddp", "fsdp"):
        out["init"][layout] = _init_digest(config(layout, w), world)
    cfg = config(parallel, w)
    out["init"]["per_rank_seed"] = _init_digest(cfg, world, PerRankSeed(cfg, world, cfg.hsdp_replicas if w == 4 else 1))
    out["runs"] = {"k=2": _partition(ConfigTask(cfg), world, 2)}
    for mutant in ("averaging", "never_sync") if w == 2 else ("averaging",):
        out["runs"][mutant] = _partition(MutantTask(cfg, mutant), world, 2)
    k2 = dataclasses.replace(cfg.plan, accum_steps=2)
    result = train(dataclasses.replace(cfg, plan=k2), world, progress=False, keep_state=True)
    out["train"] = {"layout": result.layout_facts(), "sync": result.sync, "losses": result.losses}
    out["train"]["state"] = result.state  # whole tensors, gathered from the shards (rank 0)
    out["train"]["in_sync"] = result.replicas_in_sync
    if w == 2:  # the same training with replicas: on 2 ranks a + b is b + a, so bit for bit the same
        ddp = config("ddp", w)
        kept = train(dataclasses.replace(ddp, plan=k2), world, progress=False, keep_state=True)
        out["ddp_train"] = {**kept.layout_facts(), "state": kept.state}
    return out


@pytest.fixture(scope="module")
def worlds() -> dict[str, Any]:
    """One spawned world of 2 ranks (fsdp) and one of 4 (hsdp 2 x 2), each checking everything."""
    out = {}
    for parallel, w in (("fsdp", 2), ("hsdp", 4)):
        ranks = run_distributed(_world, w, parallel, timeout_s=60, deadline_s=240)
        main = ranks[0]
        for name, run in main["runs"].items():
            run.samples_by_rank = [r["runs"][name].samples for r in ranks]
        main["ranks"] = ranks
        out[parallel] = main
    return out


@pytest.fixture(scope="module")
def one_process() -> dict[str, Any]:
    """The reference: one process on the same global batches, and its init digest."""
    cfg = config("ddp", 1)
    task = ConfigTask(cfg)
    return {
        "init": _init_digest(cfg, World()),
        "ref": run_reference(task, None, STEPS, task.global_batch * task.terms_per_sample()),
    }


@pytest.mark.slow
def test_one_logical_init_under_every_layout(worlds, one_process):
    """One process, DDP on 2 and 4 ranks, FSDP at 2 and 4 shards, HSDP 2 x 2: one init digest."""
    digests = {
        f"{layout} W={w}": d
        for parallel, w in (("fsdp", 2), ("hsdp", 4))
        for layout, d in worlds[parallel]["init"].items()
    }
    every_rank = {r["init"][k] for p in worlds for r in worlds[p]["ranks"] for k in r["init"] if k != "per_rank_seed"}
    assert every_rank == {one_process["init"]}, digests
    # The mutant: every rank keeps its shard of a different init.
    assert digests["per_rank_seed W=2"] != one_process["init"]
    assert digests["per_rank_seed W=4"] != one_process["init"]


@pytest.mark.slow
@pytest.mark.parametrize("parallel", ["fsdp", "hsdp"])
def test_sharded_training_equals_one_big_batch(worlds, one_process, parallel):
    """FSDP 2 ranks / HSDP 2 x 2, k = 2: every step's gradient within the rounding bound, updates replayed."""
    judged = compare(worlds[parallel]["runs"]["k=2"], one_process["ref"])
    assert judged.within_rounding, judged.summary()
    assert judged.grad_excess <= 1 and judged.accounting_ok
    facts = worlds[parallel]["train"]
    assert facts["layout"]["parallel"] == parallel
    assert facts["layout"]["mesh"] == ([1, 2] if parallel == "fsdp" else [2, 2])
    assert facts["sync"] == ("fsdp" if parallel == "fsdp" else "hsdp 2x2")
    # Every rank ends with one logical state (under hsdp: each replica group's digest).
    assert len({r["train"]["layout"]["logical_fingerprint"] for r in worlds[parallel]["ranks"]}) == 1
    assert facts["in_sync"]  # the replica checker: hsdp's shard replicas, fsdp's unsharded tensors


@pytest.mark.slow
def test_fsdp_and_ddp_end_in_one_logical_state_on_two_ranks(worlds):
    """Shards or replicas, the same training on 2 ranks ends with the same whole tensors, bit for bit."""
    fsdp, ddp = worlds["fsdp"]["train"]["layout"], worlds["fsdp"]["ddp_train"]
    assert ddp["parallel"] == "ddp" and ddp["mesh"] is None
    assert fsdp["logical_fingerprint"] == ddp["logical_fingerprint"]
    # And the kept final state (what --save-params writes): whole tensors, bit for bit DDP's.
    kept, replica = worlds["fsdp"]["train"]["state"], ddp["state"]
    assert kept.keys() == replica.keys() and all(torch.equal(kept[n], replica[n]) for n in kept)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("parallel", "mutant"),
    [("fsdp", "averaging"), ("fsdp", "never_sync"), ("hsdp", "averaging")],
)
def test_mutants_flip_the_verdict(worlds, one_process, parallel, mutant):
    judged = compare(worlds[parallel]["runs"][mutant], one_process["ref"])
    assert not judged.matches_reference, f"{mutant} passed for proof: {judged.summary()}"
    if mutant == "averaging":  # W times too small: far outside rounding
        assert judged.grad_excess > 100


@pytest.mark.slow
@pytest.mark.launcher
def test_verify_fsdp_under_torchrun(tmp_path, worlds):
    """`distshare verify` on an fsdp run started by a real torchrun: its four checks pass, and it
    ends with the logical state the spawned ranks ended with."""
    overrides = [f"--set={o}" for o in BASE] + ["--set=plan.accum_steps=2"]
    out = tmp_path / "run"
    proc = run_command(
        get_launch_command("torchrun", nproc_per_node=2)
        + ["verify", "--parallel", "fsdp", "--json", "--no-progress", "--out", str(out), *overrides],
        timeout=180,
    )
    result = json.loads((out / "result.json").read_text())
    assert proc.returncode == 0 and result["ok"], [(c["name"], c["detail"]) for c in result.get("checks", [])]
    assert result["launcher"] == "torchrun" and result["parallel"] == "fsdp" and result["mesh"] == [1, 2]
    assert [c["name"] for c in result["checks"] if c["ok"]] == [
        "replicas identical",
        "each sample once",
        "different data, one gradient",
        "equals one big batch",
    ]
    assert result["logical_fingerprint"] == worlds["fsdp"]["train"]["layout"]["logical_fingerprint"]
    assert result["losses"] == worlds["fsdp"]["train"]["losses"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["train", "--parallel", "fsdp", "--sync", "exact"], "none of its methods runs"),
        (["train", "--nproc", "2", "--parallel", "fsdp", "--sync", "allreduce"], "reduce-scatters"),
        (["train", "--nproc", "4", "--parallel", "hsdp", "--set", "hsdp_replicas=3"], "3 does not divide 4"),
        (["train", "--parallel", "fsdp", "--engine", "accelerate"], "does not run under --engine accelerate"),
        (["verify", "--parallel", "fsdp", "--engine", "all"], "accelerate does not run --parallel fsdp"),
        (
            [
                "equivalence",
                "--parallel",
                "hsdp",
                "--world-sizes",
                "1,3",
                "--accum-steps",
                "1",
                "--set",
                "plan.global_batch=48",
            ],
            "does not divide 3",
        ),
    ],
)
def test_refusals_are_one_line(cli, argv, says):
    code, out, err = cli(*argv, "--no-progress")
    assert code == 2, (out, err)
    lines = [line for line in err.strip().splitlines() if line]
    assert len(lines) == 1 and says in lines[0] and "Traceback" not in err, err
