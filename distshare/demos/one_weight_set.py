"""Claim 3: 40 samples in batches of 4 are 10 updates of ONE weight set, not 10 weight sets.

Training runs through the one training loop (`distshare.training.train`), with a hook after
every optimizer step that records two things about the model's parameters:

- the fingerprint of all of them together (a trail: one digest per update, every one new,
  because each update changes the weights);
- the storage address of every parameter (the same at every step: the updates are written
  into the same tensors).

Then the same 40 samples on W = 2 gloo ranks (each step: one global batch of 4, two samples
per rank, gradients all-reduced): every rank's fingerprint trail is the same, digest for
digest. One weight set, replicated.

Control: the same two ranks with the gradient sync removed (each rank steps on its own two
samples): the trails part at the first update: two weight sets. The single-process picture
of "one weight set per batch" is shown beside it (a fresh copy trained on each batch ends as
10 different sets).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import nn

from distshare.config import RunConfig
from distshare.demos.common import config, data, pyplot, save
from distshare.demos.finding import Control, Finding, verdict
from distshare.distributed.spawn import run_distributed
from distshare.distributed.sync import GradSync
from distshare.distributed.world import World
from distshare.integrity.fingerprint import combined_fingerprint, fingerprint
from distshare.models import build_model
from distshare.training import Run, build_optimizer, loss_sum, train

NAME = "one-weight-set"
QUESTION = "So if my image has 40 images and batch size of 4. Will there be 8 different weights"
CLAIM = (
    "No: one weight set, updated batch after batch (40 / 4 = 10 updates), and the same single set on every "
    "rank when the batches are spread over ranks."
)
CONTROL = "ranks without gradient sync (and, in one process, a fresh weight copy per batch)"
SAMPLES, BATCH, RANKS = 40, 4, 2
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


def _trail(cfg: RunConfig, world: World, sync: GradSync | None = None) -> dict[str, Any]:
    """Train, recording after every update the weights' fingerprint and storage addresses."""
    trail: list[str] = []
    storages: set[tuple[int, ...]] = set()

    def on_step(run: Run, step: int) -> None:
        trail.append(params_fingerprint(run.model))
        storages.add(tuple(p.untyped_storage().data_ptr() for p in run.model.parameters()))

    result = train(cfg, world, out_dir=None, progress=False, on_step=on_step, sync=sync)
    used = sorted(i for step in result.samples_by_step for micro in step for i in micro)
    return {"trail": trail, "storage_sets": len(storages), "samples_used": used, "losses": result.losses}


def _rank_trails(world: World, cfg: RunConfig) -> dict[str, Any]:
    """On each rank: the synced run (ddp), then the same run with no gradient sync at all."""
    return {"synced": _trail(cfg, world), "unsynced": _trail(cfg, world, sync=GradSync())}


def _copy_per_batch(cfg: RunConfig) -> list[str]:
    """What "one weight set per batch" would be: a fresh copy of the model for each batch."""
    info, table = data(cfg)
    base = build_model(cfg.model, info, seed=cfg.seed)
    finals = []
    for b in range(SAMPLES // BATCH):
        model = copy.deepcopy(base)
        opt = build_optimizer(cfg, model)
        batch = table.select(list(range(b * BATCH, (b + 1) * BATCH)))
        (loss_sum(model(**batch.inputs), batch.labels) / BATCH).backward()
        opt.step()
        finals.append(params_fingerprint(model))
    return finals


def run(out_dir: Path, seed: int = 0) -> Finding:
    cfg = config(OVERRIDES, seed)
    info, _ = data(cfg)
    initial = params_fingerprint(build_model(cfg.model, info, seed=cfg.seed))
    single = _trail(cfg, World())
    wcfg = config([*OVERRIDES, f"plan.world_size={RANKS}"], seed)
    ranks = run_distributed(_rank_trails, RANKS, wcfg, timeout_s=wcfg.timeout_s, deadline_s=None)
    per_batch = _copy_per_batch(cfg)

    updates = len(single["trail"])
    distinct = len(set(single["trail"]) | {initial})
    synced = [r["synced"]["trail"] for r in ranks]
    unsynced = [r["unsynced"]["trail"] for r in ranks]

    def agree(trails: list[list[str]]) -> int:
        """Steps at which every rank holds the same weights."""
        return sum(len(set(column)) == 1 for column in zip(*trails, strict=True))

    everything_once = single["samples_used"] == list(range(SAMPLES))
    holds = (
        updates == SAMPLES // BATCH
        and distinct == updates + 1  # every update produced new weights ...
        and single["storage_sets"] == 1  # ... written into the same tensors
        and everything_once
        and agree(synced) == updates
        and all(r["synced"]["storage_sets"] == 1 for r in ranks)
    )
    control = agree(unsynced) == updates
    numbers = {
        "samples": SAMPLES,
        "batch_size": BATCH,
        "updates": updates,
        "distinct_weight_states_incl_initial": distinct,
        "storage_sets_single_process": single["storage_sets"],
        "each_sample_used_once": everything_once,
        "final_fingerprint": single["trail"][-1],
        "ranks": RANKS,
        "steps_all_ranks_agree": agree(synced),
        "ranks_trail_bitwise_equal_to_single_process": synced[0] == single["trail"],  # rounding: see accumulation
        "control_steps_all_ranks_agree": agree(unsynced),
        "control_final_weight_sets": len({t[-1] for t in unsynced}),
        "copy_per_batch_final_weight_sets": len(set(per_batch)),
    }
    figure = _figure(out_dir, initial, single["trail"], synced, unsynced)
    headline = (
        f"{updates} updates -> {distinct - 1} new fingerprints, 1 storage; {RANKS} ranks agree at "
        f"{agree(synced)}/{updates} steps; unsynced ranks agree at {agree(unsynced)}/{updates}"
    )
    return Finding(
        NAME,
        QUESTION,
        CLAIM,
        verdict(holds),
        [Control("no sync", CONTROL, verdict(control))],
        numbers,
        figure,
        headline,
    )


def _figure(out_dir: Path, initial: str, single: list[str], synced: list[list[str]], unsynced: list[list[str]]) -> str:
    """Each fingerprint drawn as a colour (from its digest): equal colours, equal weights."""
    plt = pyplot()
    rows = [("1 process", single)]
    rows += [(f"rank {r}, synced", t) for r, t in enumerate(synced)]
    rows += [(f"rank {r}, no sync", t) for r, t in enumerate(unsynced)]

    def colour(digest: str) -> list[float]:
        h = digest.split(":")[-1]
        return [int(h[i : i + 2], 16) / 255 for i in (0, 2, 4)]

    grid = torch.tensor([[colour(initial)] + [colour(d) for d in t] for _, t in rows])
    fig, ax = plt.subplots(figsize=(9, 3))
    ax.imshow(grid.numpy(), aspect="auto")
    ax.set_yticks(range(len(rows)), [label for label, _ in rows])
    ax.set_xticks(range(len(single) + 1), ["init"] + [str(i + 1) for i in range(len(single))])
    ax.set_xlabel("update (optimizer step)")
    for y, (_, t) in enumerate(rows):
        for x, d in enumerate([initial, *t]):
            ax.text(x, y, d.split(":")[-1][:4], ha="center", va="center", fontsize=6, color="white")
    ax.set_title("weight fingerprint trail: one colour per distinct weight set")
    return save(fig, out_dir, NAME)
