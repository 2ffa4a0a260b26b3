"""Claim 4: 40 samples as 5 accumulated micro-batches of 8 make the same update as one batch of 40.

The task is per-token (the role of every word) on sentences of 3 to 5 words, so micro-batches
hold different numbers of loss items: the case where the normalization matters. The
measurement is the partition grid's (`distshare.equivalence.run_grid`, as `distshare
equivalence` runs it), on G = 40 for one SGD step from the same initial weights:

- reference: one process, one batch of 40 (W = 1, k = 1);
- the seed's case: one process, k = 5 micro-batches of 8;
- its distributed forms: W = 2 gloo ranks x k = 1 (b = 20) and x k = 5 (b = 4).

Each partition is compared with the reference as measured: its synced gradient against the
big-batch gradient at the same parameters (bitwise, or normwise rel / max abs, judged
elementwise against the rounding bound of summing the same terms in another order, built
from measured per-sample magnitudes: `distshare.numerics.rounding`), the weights after the update
(bitwise, or normwise rel / max abs / max ULP, against the grid's envelope), and the sample
accounting. "The same" means bitwise, or within that bound. The same partitions are run again
in exact mode (`sync=exact`, `distshare.numerics.exact_sum`: per-sample gradients added in integers), where
the order of summation no longer matters and every one of them must be bitwise.

Control: the common bug, the mean loss of each micro-batch divided by k (pitfall 1 of
`distshare.equivalence.pitfalls`, its step reused here on the seed's case, measured by the same grid).
It weights a token of a short micro-batch more than a token of a long one, so its gradient is
not the batch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from distshare.demos.common import config, finding_title, pyplot, save
from distshare.demos.finding import Control, Finding, verdict
from distshare.distributed.world import World
from distshare.equivalence import ConfigTask, PartitionResult, run_grid
from distshare.equivalence.pitfalls import MicroMeanTask
from distshare.equivalence.tasks import StepFn
from distshare.report import LogRows
from distshare.training import Run, build_run, loss_sum, optimizer_step

NAME = "accumulation"
QUESTION = (
    "So if I have 40 samples and batch size 8 they accumulate the loss and back prop to update the same "
    "weight matrix for all 40 samples in"
)
CLAIM = (
    "Yes: accumulating the gradients of 5 micro-batches of 8 (normalized by the items of all 40) updates the "
    "same weights exactly as one batch of 40 would, up to the order of summation (bitwise in exact mode)."
)
CONTROL = "mean loss per micro-batch divided by k (micro-batches with different token counts)"
SAMPLES, MICRO, RANKS = 40, 8, 2
K = SAMPLES // MICRO
BASE = (
    "data.task=roles",
    "data.variable_length=true",
    f"data.num_samples={SAMPLES}",
    f"plan.global_batch={SAMPLES}",
    "plan.micro_batch=null",
    "steps=1",
    "optim.name=sgd",
    "optim.lr=0.1",
    "check_every=0",
)
MUTANTS = {
    "skip-micro-batch": "each rank's last micro-batch is never loaded (its items still in the normalizer)",
    "loss-scale": "every accumulated micro-batch's loss scaled by 1 + 1e-4",
    "nan-loss": "the first micro-batch's loss is NaN",
}
SCALE_ERROR = 1e-4
TIMEOUT_S = 120.0  # the spawned ranks' collectives: a hung rank fails the demo instead of blocking it


def run(out_dir: Path, seed: int = 0, mutant: str | None = None) -> Finding:
    cfg = config(BASE, seed)
    task = ConfigTask(cfg) if mutant is None else _Mutated(cfg, mutant)
    grid = run_grid(task, (1, RANKS), (1, K), [None], cfg.steps, progress=False, timeout_s=TIMEOUT_S)
    exact_cfg = config((*BASE, "sync=exact"), seed)
    exact = run_grid(ConfigTask(exact_cfg), (1, RANKS), (1, K), [None], cfg.steps, progress=False, timeout_s=TIMEOUT_S)
    bug = run_grid(MicroMeanTask(cfg), (1,), (K,), [None], cfg.steps, progress=False, timeout_s=TIMEOUT_S)
    rows = {_name(p): _row(p) for p in grid.partitions}
    exact_rows = {_name(p): _row(p) for p in exact.partitions}
    exact_bitwise = sum(r["bitwise_equal"] and r["grad_bitwise_equal"] for r in exact_rows.values())
    control = _row(bug.partitions[0])
    bound = grid.partitions[0].grad_bound_norm_rel  # the reference's: the same for every partition
    numbers = {
        "samples": SAMPLES,
        "micro_batch": MICRO,
        "accum_steps": K,
        "tokens_per_micro_batch": _tokens_per_micro_batch(seed),
        "steps": grid.steps,
        "rounding_terms_per_element": grid.n_terms,
        "grad_bound_norm_rel": bound,
        "bound_notes": grid.bound_notes,
        "vs_one_batch_of_40": rows,
        "control_vs_one_batch_of_40": {_name(bug.partitions[0]): control},
        "exact_mode_vs_one_batch_of_40": exact_rows,
    }
    seeds_case = [f"{n}: {_describe(r)}" for n, r in rows.items() if r["accum_steps"] == K]
    headline = (
        "; ".join(seeds_case) + f" (bound {bound:.1e}); "
        f"exact mode: {exact_bitwise} of {len(exact_rows)} bitwise; "
        f"mean/k bug: grad norm rel {control['grad_norm_rel_diff']:.1e}, {control['grad_excess']:.0f} x bound"
    )
    holds = grid.ok and exact.ok and exact_bitwise == len(exact_rows)
    shown = {**rows, f"control: mean / k\n{_name(bug.partitions[0])}": control}
    figure = save(figure_of(shown, bound, holds), out_dir, NAME)
    return Finding(
        NAME,
        QUESTION,
        CLAIM,
        verdict(holds),
        [Control("mean / k", CONTROL, verdict(bug.ok))],
        numbers,
        figure,
        headline,
    )


@dataclass
class _Mutated(ConfigTask):
    """The seed's step with one of `MUTANTS` in every partition but the reference (W = 1, k = 1).

    The step is written out as `train_step` writes it (the loss summed per micro-batch, the
    global batch's items as the normalizer), so the only difference is the fault.
    """

    mutant: str = ""

    def make_step(self, run: Run) -> StepFn:
        plan = run.plan.plan
        if (plan.world_size, plan.accum_steps) == (1, 1):
            return super().make_step(run)

        def step(s: int) -> tuple[float, list[list[int]]]:
            micro = run.plan.rank_micro_batches(s, run.world.rank)
            if self.mutant == "skip-micro-batch" and len(micro) > 1:
                micro = micro[:-1]
            global_indices = run.plan.global_batch(s)
            sums: list[torch.Tensor] = []
            consumed: list[list[int]] = []

            def loss(module: torch.nn.Module, batch: Any) -> torch.Tensor:
                consumed.append(batch.indices.tolist())
                total = loss_sum(module(**batch.inputs), batch.labels)
                sums.append(total.detach())
                if self.mutant == "loss-scale":
                    return total * (1 + SCALE_ERROR)
                if self.mutant == "nan-loss" and len(sums) == 1:
                    return total * float("nan")
                return total

            batches = [run.table.select(indices).to(run.world.device) for indices in micro]
            items = run.table.count_items(global_indices)
            optimizer_step(run.model, run.wrapped, run.optimizer, run.sync, batches, items, len(global_indices), loss)
            return sum(float(x) for x in sums), consumed

        return step


def _name(p: PartitionResult) -> str:
    return f"{p.world_size} x {p.accum_steps} x {p.micro_batch}"  # W x k x b


def _row(p: PartitionResult) -> dict[str, Any]:
    """The grid's numbers for one partition: gradient against the bound, weights after the update."""
    return {
        "world_size": p.world_size,
        "accum_steps": p.accum_steps,
        "micro_batch": p.micro_batch,
        "within_rounding": p.within_rounding,
        "bitwise_equal": p.bitwise_equal,  # gradient and weights, every step
        "grad_bitwise_equal": p.grad_bitwise_equal,
        "grad_norm_rel_diff": p.grad_norm_rel_diff,
        "grad_max_abs_diff": p.grad_max_abs_diff,
        "grad_bound_norm_rel": p.grad_bound_norm_rel,
        "grad_excess": p.grad_excess,  # max elementwise |diff| / bound: <= 1 is rounding
        "params_norm_rel_diff": p.norm_rel_diff,
        "params_max_abs_diff": p.max_abs_diff,
        "params_max_ulp": p.max_ulp,
        "envelope_excess": p.envelope_excess,
        "nonfinite": p.nonfinite,  # "" or where the first NaN / infinity is: a failure
        "accounting_ok": p.accounting_ok,  # every sample of the global batch counted exactly once
        "accounting": p.accounting,
    }


def _tokens_per_micro_batch(seed: int) -> list[int]:
    """Loss items in each of the seed's 5 micro-batches of 8: they differ, so normalization matters."""
    run = build_run(config([*BASE, f"plan.accum_steps={K}"], seed), World())
    return [run.table.count_items(indices) for indices in run.plan.rank_micro_batches(0, 0)]


def _describe(r: dict[str, Any]) -> str:
    if r["bitwise_equal"]:
        return "bitwise"
    if r["nonfinite"]:
        return f"NON-FINITE ({r['nonfinite']})"
    return (
        f"grad norm rel {r['grad_norm_rel_diff']:.1e} (elementwise {r['grad_excess']:.2f} x bound), "
        f"weights {r['params_max_ulp']} ULP"
    )


def figure_of(rows: dict[str, dict[str, Any]], bound: float, holds: bool) -> Any:
    """Each split's gradient difference from one batch of 40 (log), beside the rounding bound; a
    bitwise-equal split drawn on the row "0 (bitwise)" below every measured difference."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.6), layout="constrained")
    diffs = [0.0 if r["grad_bitwise_equal"] else float(r["grad_norm_rel_diff"]) for r in rows.values()]
    log = LogRows([*diffs, bound])
    names = list(rows)
    colours = ["tab:green" if r["within_rounding"] else "tab:red" for r in rows.values()]
    ax.bar(names, [log.y(d) for d in diffs], color=colours)
    for i, (d, r) in enumerate(zip(diffs, rows.values(), strict=True)):
        text = "bitwise" if r["grad_bitwise_equal"] else f"{d:.1e}" if math.isfinite(d) else "NaN/inf"
        ax.annotate(text, (i, log.y(d)), xytext=(0, 3), textcoords="offset points", ha="center")
    ax.axhline(bound, color="k", linestyle="--", label=f"rounding bound {bound:.1e}")
    log.finish(ax)
    ax.set_xlabel("split: W ranks x k micro-batches x b samples")
    ax.set_ylabel("gradient: ||a - b|| / ||b||")
    ax.set_title("each split's gradient vs one batch of 40 (W = 1, k = 1)")
    ax.legend(loc="upper left")
    splits = [r for n, r in rows.items() if not n.startswith("control")]
    control = [r for n, r in rows.items() if n.startswith("control")]
    worst = max((float(r["grad_excess"]) for r in splits), default=0.0)
    numbers = f"every split within {worst:.2g} x the elementwise rounding bound" + (
        f"; the mean/k bug {float(control[0]['grad_excess']):.0f} x" if control else ""
    )
    fig.suptitle(finding_title("Accumulating micro-batches gives the gradient of the whole batch", holds, numbers))
    return fig
