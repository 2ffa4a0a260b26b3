"""Claim 4: 40 samples as 5 accumulated micro-batches of 8 make the same update as one batch of 40.

The task is per-token (the role of every word) on sentences of 3 to 5 words, so micro-batches
hold different numbers of loss items: the case where the normalization matters. Three runs
of one optimizer step through the one training loop, from the same initial weights:

- reference: one process, one batch of 40 (k = 1);
- accumulated: one process, k = 5 micro-batches of 8;
- distributed: W = 2 gloo ranks x k = 5 micro-batches of 4.

Each is compared with the reference as measured (bitwise, or max abs / norm rel / ULP) on the
step's gradient and on the weights after the update. "The same" means bitwise, or within the
rounding bound of summing the same terms in another order.

Control: the common bug, the mean loss of each micro-batch divided by k. It weights a token
of a short micro-batch more than a token of a long one, so its gradient is not the batch's.
"""

from __future__ import annotations

from pathlib import Path

from distshare.demos.common import config, data, pyplot, reorder_bound, save
from distshare.demos.finding import Finding, verdict
from distshare.diff import Diff, diff
from distshare.dist.world import World
from distshare.engines.torch import run_training
from distshare.train import DTYPES, build_run, loss_sum, train

NAME = "accumulation"
QUESTION = (
    "So if I have 40 samples and batch size 8 they accumulate the loss and back prop to update the same "
    "weight matrix for all 40 samples in"
)
CLAIM = (
    "Yes: accumulating the gradients of 5 micro-batches of 8 (normalized by the items of all 40) updates the "
    "same weights exactly as one batch of 40 would, up to the order of summation."
)
CONTROL = "mean loss per micro-batch divided by k (micro-batches with different token counts)"
SAMPLES, MICRO, RANKS = 40, 8, 2
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


def _one_step(overrides: list[str], seed: int) -> tuple[dict, dict]:
    """(gradient of the step, weights after it) from the one training loop."""
    cfg = config([*BASE, *overrides], seed)
    if cfg.plan.world_size > 1:
        results = run_training(cfg, progress=False, keep_state=True)
        assert results is not None
        r = results[0]
    else:
        r = train(cfg, World(), progress=False, keep_state=True)
    assert r.first_grads is not None and r.state is not None
    return r.first_grads, {n: t for n, t in r.state.items() if n in r.first_grads}


def _mean_per_micro_batch(seed: int, k: int) -> tuple[dict, dict, list[int]]:
    """The bug: loss.mean() per micro-batch, divided by k; then the same SGD step."""
    cfg = config([*BASE, f"plan.accum_steps={k}"], seed)
    run = build_run(cfg, World())
    run.optimizer.zero_grad(set_to_none=True)
    items = []
    for indices in run.plan.rank_micro_batches(0, 0):
        batch = run.table.select(indices)
        items.append(batch.num_items)
        (loss_sum(run.model(**batch.inputs), batch.labels) / batch.num_items / k).backward()
    grads = {n: p.grad.detach().clone() for n, p in run.model.named_parameters()}
    run.optimizer.step()
    return grads, {n: p.detach().clone() for n, p in run.model.named_parameters()}, items


def _same(d: Diff, bound: float) -> bool:
    return d.bitwise_equal or d.norm_rel_diff <= bound


def run(out_dir: Path, seed: int = 0) -> Finding:
    k = SAMPLES // MICRO
    ref_grads, ref_params = _one_step(["plan.accum_steps=1"], seed)
    acc_grads, acc_params = _one_step([f"plan.accum_steps={k}"], seed)
    w_grads, w_params = _one_step([f"plan.world_size={RANKS}", f"plan.accum_steps={k}"], seed)
    bug_grads, bug_params, items = _mean_per_micro_batch(seed, k)

    cfg = config(BASE, seed)
    info, _ = data(cfg)
    # Every weight element's gradient sums (at most) one term per token of the global batch.
    bound = reorder_bound(DTYPES[cfg.model.dtype], SAMPLES * info.max_len)
    diffs = {
        f"1 x {k} x {MICRO}": (diff(acc_grads, ref_grads), diff(acc_params, ref_params)),
        f"{RANKS} x {k} x {MICRO // RANKS}": (diff(w_grads, ref_grads), diff(w_params, ref_params)),
    }
    bug = (diff(bug_grads, ref_grads), diff(bug_params, ref_params))
    holds = all(_same(g, bound) for g, _ in diffs.values())
    control = _same(bug[0], bound)
    numbers = {
        "samples": SAMPLES,
        "micro_batch": MICRO,
        "accum_steps": k,
        "tokens_per_micro_batch": items,
        "rounding_bound_norm_rel": bound,
        "vs_one_batch_of_40": {
            name: {"grad": g.to_dict(), "params_after_update": p.to_dict()} for name, (g, p) in diffs.items()
        },
        "control_vs_one_batch_of_40": {"grad": bug[0].to_dict(), "params_after_update": bug[1].to_dict()},
    }
    figure = _figure(out_dir, {**{n: g for n, (g, _) in diffs.items()}, "control: mean / k": bug[0]}, bound)
    parts = [f"{n}: {_describe(g)}" for n, (g, _) in diffs.items()]
    headline = "; ".join(parts) + f" (bound {bound:.1e}); mean/k bug: norm rel {bug[0].norm_rel_diff:.1e}"
    return Finding(NAME, QUESTION, CLAIM, verdict(holds), CONTROL, verdict(control), numbers, figure, headline)


def _describe(d: Diff) -> str:
    return "bitwise" if d.bitwise_equal else f"norm rel {d.norm_rel_diff:.1e}, {d.max_ulp} ULP"


def _figure(out_dir: Path, diffs: dict[str, Diff], bound: float) -> str:
    plt = pyplot()
    floor = bound / 1e3  # where a bitwise-equal bar is drawn on the log axis
    fig, ax = plt.subplots(figsize=(7, 3.5))
    names = list(diffs)
    values = [floor if d.bitwise_equal else max(d.norm_rel_diff, floor) for d in diffs.values()]
    colours = ["tab:green"] * (len(names) - 1) + ["tab:red"]
    ax.bar(names, values, color=colours)
    for i, d in enumerate(diffs.values()):
        ax.text(i, values[i], "bitwise" if d.bitwise_equal else f"{d.norm_rel_diff:.1e}", ha="center", va="bottom")
    ax.axhline(bound, color="k", linestyle="--", label=f"rounding bound {bound:.1e}")
    ax.set(yscale="log", ylabel="gradient: norm rel diff vs one batch of 40", title="W x k x b vs one batch of 40")
    ax.legend()
    return save(fig, out_dir, NAME)
