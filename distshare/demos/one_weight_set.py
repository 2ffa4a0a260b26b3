"""Claim 3: 40 samples in batches of 4 are 10 updates of ONE weight set, not 10 weight sets.

Training runs through the one training loop (`distshare.training.train`); after every
optimizer step a hook records the fingerprint of all parameters together. Measured:

- a chain: every update starts from the weights the previous update left. Each step t is
  replayed from the recorded state (parameters and optimizer state) after step t - 1, on
  global batch t: the replay must land bit for bit on the recorded state t. (Had each batch
  its own weight set, step t would start from the initial weights instead.)
- every update changes the weights (11 distinct fingerprints, initial included), and the
  40 samples are each used once;
- on W = 2 gloo ranks (one global batch of 4 per step, 2 samples per rank), with DDP's
  all-reduce, both ranks hold the same weights, digest for digest, after every update;
- with the exact sum (`sync=exact`: per-sample gradients added in integers, so the order of
  summation does not matter), the 2 ranks hold bit for bit the weights of one process
  training on the same batches. DDP's ranks are not bitwise the one-process weights: each
  rank sums 2 samples and the all-reduce adds the two sums, another rounding order than one
  process summing 4; that difference is measured and printed, and it is rounding, not a
  second weight set.

Controls, each the same experiment with the claim false for a real reason:

- no sync: the same 2 ranks with the gradient all-reduce removed (each rank steps on its
  own 2 samples): their weights part at the first update;
- a weight set per batch (what "8 different weights" would mean): each batch trains its own
  copy of the initial weights; the chain breaks from the second batch on.
"""

from __future__ import annotations

import contextlib
import copy
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distshare.config import RunConfig
from distshare.demos.common import config, finding_title, pyplot, save
from distshare.demos.finding import Control, Finding, verdict
from distshare.distributed.spawn import run_distributed
from distshare.distributed.sync import DDPSync, GradSync
from distshare.distributed.world import World
from distshare.integrity.fingerprint import combined_fingerprint, fingerprint
from distshare.numerics.diff import diff
from distshare.training import Component, Loop, Run, build_run, train, train_step

NAME = "one-weight-set"
QUESTION = "So if my image has 40 images and batch size of 4. Will there be 8 different weights"
CLAIM = (
    "No: one weight set, each update starting from the last (40 / 4 = 10 updates), and the same single set on "
    "every rank when the batches are spread over ranks: bit for bit the one-process set with an exact sum."
)
BY_CONSTRUCTION = (
    "torch.optim updates parameters in place (add_, addcdiv_), so the model holds the same tensors (storages) "
    "at every step: recorded (one storage set), but true by construction, not evidence of one weight set."
)
SAMPLES, BATCH, RANKS = 40, 4, 2
SKIPPED_STEP = 4  # the step the "no-sync-one-step" mutant leaves unsynchronized
LR_FACTOR = 1.001  # rank 1's learning rate under the "rank-lr" mutant
MUTANTS = {
    "no-sync-one-step": f"DDP's all-reduce is skipped on step {SKIPPED_STEP + 1} (every rank steps on its own samples)",
    "rank-lr": f"rank 1's learning rate is {LR_FACTOR} x the others'",
}
OVERRIDES = (
    f"data.num_samples={SAMPLES}",
    f"plan.global_batch={BATCH}",
    "plan.accum_steps=1",
    f"steps={SAMPLES // BATCH}",
    "check_every=0",
)


def params_fingerprint(model: nn.Module) -> str:
    """One digest of every parameter (not buffers, not optimizer state): the weight set."""
    return combined_fingerprint({n: fingerprint(p) for n, p in model.named_parameters()})


class _SkipOneSync(DDPSync):
    """Mutant: DDP, except that one step's backward runs under no_sync() on every rank."""

    def __init__(self) -> None:
        self.step = -1

    def start_step(self, model: nn.Module, global_items: int, global_samples: int) -> None:
        self.step += 1

    @contextlib.contextmanager
    def micro_step(self, wrapped: nn.Module, last: bool) -> Iterator[None]:
        if self.step == SKIPPED_STEP:
            with wrapped.no_sync():
                yield
        else:
            with super().micro_step(wrapped, last):
                yield


class _RankLr(Component):
    """Mutant: rank 1's optimizer takes a slightly larger learning rate."""

    def begin(self, loop: Loop) -> None:
        if loop.world.rank == 1:
            for group in loop.run.optimizer.param_groups:
                group["lr"] *= LR_FACTOR


def _state(run: Run) -> dict[str, Any]:
    return {"model": copy.deepcopy(run.model.state_dict()), "optimizer": copy.deepcopy(run.optimizer.state_dict())}


def _trail(
    cfg: RunConfig, world: World, sync: GradSync | None = None, mutant: str | None = None, states: bool = False
) -> dict[str, Any]:
    """Train, recording after every update the weights' fingerprint (and, if asked, the whole state)."""
    trail: list[str] = []
    kept: list[dict[str, Any]] = []
    storages: set[tuple[int, ...]] = set()
    final: dict[str, torch.Tensor] = {}

    def on_step(run: Run, step: int) -> None:
        trail.append(params_fingerprint(run.model))
        final.update({n: p.detach().clone() for n, p in run.model.named_parameters()})
        storages.add(tuple(p.untyped_storage().data_ptr() for p in run.model.parameters()))
        if states:
            kept.append(_state(run))

    components = [_RankLr()] if mutant == "rank-lr" else []
    result = train(cfg, world, progress=False, on_step=on_step, sync=sync, components=components)
    used = sorted(i for step in result.samples_by_step for micro in step for i in micro)
    return {"trail": trail, "storage_sets": len(storages), "samples_used": used, "states": kept, "params": final}


def _rank_trails(world: World, cfg: RunConfig, exact: RunConfig, mutant: str | None) -> dict[str, Any]:
    """On each rank: DDP, the exact sum, and no gradient sync at all."""
    ddp = _SkipOneSync() if mutant == "no-sync-one-step" else None
    return {
        "ddp": _trail(cfg, world, sync=ddp, mutant=mutant),
        "exact": _trail(exact, world, mutant=mutant),
        "no sync": _trail(cfg, world, sync=GradSync(), mutant=mutant),
    }


def chain_links(cfg: RunConfig, initial: dict[str, Any], states: list[dict[str, Any]], trail: list[str]) -> int:
    """Steps t whose recorded weights are one step, on batch t, from the recorded state after step t - 1."""
    run = build_run(cfg, World())
    links = 0
    for t, fp in enumerate(trail):
        start = initial if t == 0 else states[t - 1]
        run.model.load_state_dict(start["model"])
        run.optimizer.load_state_dict(start["optimizer"])
        train_step(run, t)
        links += params_fingerprint(run.model) == fp
    return links


def _weight_set_per_batch(cfg: RunConfig, initial: dict[str, Any]) -> dict[str, Any]:
    """The counterfactual: batch t trains its own copy of the initial weights (and optimizer)."""
    run = build_run(cfg, World())
    trail, states = [], []
    for t in range(cfg.steps):
        run.model.load_state_dict(initial["model"])
        run.optimizer.load_state_dict(initial["optimizer"])
        train_step(run, t)
        trail.append(params_fingerprint(run.model))
        states.append(_state(run))
    return {"trail": trail, "states": states}


def run(out_dir: Path, seed: int = 0, mutant: str | None = None) -> Finding:
    cfg = config(OVERRIDES, seed)
    start = build_run(cfg, World())
    initial_state, initial = _state(start), params_fingerprint(start.model)
    single = _trail(cfg, World(), states=True)
    single_exact = _trail(config([*OVERRIDES, "sync=exact"], seed), World())
    wcfg = config([*OVERRIDES, f"plan.world_size={RANKS}"], seed)
    wexact = config([*OVERRIDES, f"plan.world_size={RANKS}", "sync=exact"], seed)
    ranks = run_distributed(_rank_trails, RANKS, wcfg, wexact, mutant, timeout_s=wcfg.timeout_s, deadline_s=None)
    per_batch = _weight_set_per_batch(cfg, initial_state)

    updates = len(single["trail"])
    distinct = len(set(single["trail"]) | {initial})
    links = chain_links(cfg, initial_state, single["states"], single["trail"])
    per_batch_links = chain_links(cfg, initial_state, per_batch["states"], per_batch["trail"])
    trails = {mode: [r[mode]["trail"] for r in ranks] for mode in ("ddp", "exact", "no sync")}

    def agree(rows: list[list[str]]) -> int:
        """Steps at which every row holds the same weights."""
        return sum(len(set(column)) == 1 for column in zip(*rows, strict=True))

    everything_once = single["samples_used"] == list(range(SAMPLES))
    ddp_agree = agree(trails["ddp"])
    exact_agree = agree([single_exact["trail"], *trails["exact"]])
    ddp_vs_single = diff(ranks[0]["ddp"]["params"], single["params"])

    def one_weight_set(links: int, ranks_agree: int, exact_agree: int) -> bool:
        return (
            updates == SAMPLES // BATCH
            and distinct == updates + 1  # every update produced new weights ...
            and links == updates  # ... each from the weights the previous update left
            and everything_once
            and ranks_agree == updates  # the same set on every rank
            and exact_agree == updates  # and, summed exactly, the one-process set
        )

    numbers = {
        "samples": SAMPLES,
        "batch_size": BATCH,
        "updates": updates,
        "distinct_weight_states_incl_initial": distinct,
        "chain_links": links,
        "each_sample_used_once": everything_once,
        "storage_sets_single_process": single["storage_sets"],
        "final_fingerprint": single["trail"][-1],
        "ranks": RANKS,
        "ddp_steps_all_ranks_agree": ddp_agree,
        "ddp_storage_sets_per_rank": [r["ddp"]["storage_sets"] for r in ranks],
        "exact_steps_ranks_agree_with_one_process": exact_agree,
        "ddp_steps_bitwise_equal_to_one_process": agree([single["trail"], trails["ddp"][0]]),
        "ddp_vs_one_process_final": ddp_vs_single.to_dict(),
    }
    controls = [
        Control(
            "no sync",
            "the same 2 ranks with the gradient all-reduce removed: each rank steps on its own 2 samples",
            verdict(
                one_weight_set(links, agree(trails["no sync"]), agree([single_exact["trail"], *trails["no sync"]]))
            ),
            {
                "steps_all_ranks_agree": agree(trails["no sync"]),
                "final_weight_sets": len({t[-1] for t in trails["no sync"]}),
            },
        ),
        Control(
            "a weight set per batch",
            "each batch trains its own copy of the initial weights (what '8 different weights' would be)",
            verdict(one_weight_set(per_batch_links, ddp_agree, exact_agree)),
            {"chain_links": per_batch_links, "final_weight_sets": len(set(per_batch["trail"]))},
        ),
    ]
    holds = one_weight_set(links, ddp_agree, exact_agree)
    figure = save(figure_of(initial, single, single_exact, trails, per_batch["trail"], numbers, holds), out_dir, NAME)
    headline = (
        f"{updates} updates, each from the last ({links}/{updates} replayed bit for bit); {RANKS} DDP ranks agree at "
        f"{ddp_agree}/{updates} steps; exact sum = one process at {exact_agree}/{updates}; unsynced ranks agree at "
        f"{agree(trails['no sync'])}/{updates}; a set per batch chains {per_batch_links}/{updates}"
    )
    return Finding(
        NAME,
        QUESTION,
        CLAIM,
        verdict(holds),
        controls,
        numbers,
        figure,
        headline,
        by_construction=BY_CONSTRUCTION,
        mutant=mutant,
    )


def figure_of(
    initial: str,
    single: dict,
    single_exact: dict,
    trails: dict[str, list[list[str]]],
    per_batch: list[str],
    numbers: dict,
    holds: bool,
) -> Any:
    """Each fingerprint drawn as a colour (from its digest): equal colours, equal weights. The
    colours name weight sets, they measure nothing: no colour bar, the digest is written in the cell."""
    plt = pyplot()
    rows = [("1 process", single["trail"])]
    rows += [(f"rank {r}, ddp", t) for r, t in enumerate(trails["ddp"])]
    rows += [("1 process, exact sum", single_exact["trail"])]
    rows += [(f"rank {r}, exact sum", t) for r, t in enumerate(trails["exact"])]
    rows += [(f"control: rank {r}, no sync", t) for r, t in enumerate(trails["no sync"])]
    rows += [("control: a set per batch", per_batch)]

    def colour(digest: str) -> list[float]:
        h = digest.split(":")[-1]
        return [int(h[i : i + 2], 16) / 255 for i in (0, 2, 4)]

    grid = torch.tensor([[colour(initial)] + [colour(d) for d in t] for _, t in rows])
    fig, ax = plt.subplots(figsize=(10, 7), layout="constrained")
    ax.imshow(grid.numpy(), aspect="auto")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    steps = len(single["trail"])
    ax.set_xticks(range(steps + 1), ["init"] + [str(i + 1) for i in range(steps)])
    ax.set_xlabel("update (optimizer step)")
    ax.set_ylabel("who holds the weights")
    for y, (_, t) in enumerate(rows):
        for x, d in enumerate([initial, *t]):
            dark = sum(w * c for w, c in zip((0.3, 0.59, 0.11), colour(d), strict=True)) < 0.55
            ax.text(x, y, d.split(":")[-1][:4], ha="center", va="center", color="white" if dark else "black")
    for y in (2.5, 5.5):  # groups: local and ddp, exact sum, controls
        ax.axhline(y, color="white", lw=3)
    ax.set_title("weight fingerprint after every update: one colour (and digest) per distinct weight set")
    d = numbers["ddp_vs_one_process_final"]
    note = (
        f"ddp: the ranks agree at {numbers['ddp_steps_all_ranks_agree']}/{steps} steps; they differ from '1 process' "
        f"by rounding only (bitwise equal at {numbers['ddp_steps_bitwise_equal_to_one_process']}/{steps} steps; after "
        f"step {steps}: max abs {d['max_abs_diff']:.1e}, norm rel {d['norm_rel_diff']:.1e}): each rank sums its 2 "
        "samples and the all-reduce adds the two sums, another order than 1 process summing 4. The exact sum is "
        f"order-free: 2 ranks = 1 process at {numbers['exact_steps_ranks_agree_with_one_process']}/{steps} steps."
    )
    fig.supxlabel(textwrap.fill(note, 115), x=0.01, ha="left", fontsize=9)
    fig.suptitle(
        finding_title(
            "One weight set: every rank holds the same weights, each update starts from the last",
            holds,
            f"ddp ranks agree at {numbers['ddp_steps_all_ranks_agree']}/{steps} steps, the exact sum equals 1 process "
            f"at {numbers['exact_steps_ranks_agree_with_one_process']}/{steps}; "
            f"{numbers['chain_links']}/{steps} updates replayed bit for bit",
        )
    )
    return fig
