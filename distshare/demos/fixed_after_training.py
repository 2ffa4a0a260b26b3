"""Claim 5: after training, W_Q (and every other weight) is fixed: using the model changes none of them.

Inference under `torch.no_grad()` with no optimizer has no code path that writes a
parameter (`by_construction`). So the experiment serves the trained tiny transformer the
way real serving and evaluation loops do, on 200 sentences drawn with another seed, in
batches of 20, three ways:

- `eval()` under `torch.inference_mode()` (a serving loop);
- train mode under `torch.no_grad()` (the mode left on by mistake);
- `eval()` with autograd on, a loss on every batch and `backward()` (an evaluation loop that
  computes gradients, e.g. for saliency), but no optimizer step;

and measures, after each run, which bits of W_Q, W_K, W_V and every other parameter changed
(fingerprints, and the count of changed elements), and whether a fixed probe batch gets
bit for bit the same answer as before serving. The claim holds when nothing changed.

Control, a fair counterfactual: test-time adaptation, the same serving loop with one
optimizer step per batch on the entropy of the model's own predictions (as Tent does; no
labels). Serving then does change W_Q, W_K, W_V.

Aside, the buffers pitfall: a batch-norm CNN served in train mode keeps its parameters but
its running statistics (buffers) move with every batch, and so do its answers.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distshare.data.tensors import TensorTable
from distshare.demos.common import CNN, TRANSFORMER, config, data, finding_title, pyplot, save, trained
from distshare.demos.finding import Control, Finding, verdict
from distshare.integrity.fingerprint import fingerprint_state
from distshare.training import build_optimizer, loss_sum

NAME = "fixed-after-training"
QUESTION = "After training transformer is the Q weight matrix WQ fixed"
CLAIM = (
    "Yes: serving the trained model on new data, in eval or train mode, with or without autograd and "
    "backward, leaves W_Q, W_K, W_V and every other parameter bit for bit unchanged, and its answers with them; "
    "only an optimizer step (test-time adaptation) changes them."
)
BY_CONSTRUCTION = (
    "Under torch.no_grad() or inference_mode() with no optimizer there is no code path that writes a parameter: "
    "autograd records nothing and nothing calls step(); and backward() alone writes .grad, never a weight. So "
    "the experiment measures whether the serving loops as written, and the model's forward, hide such a write "
    "(an optimizer step, an in-place update of a weight), which the fingerprints would see down to one bit."
)
BN_CNN = (*CNN, "model.norm=batch", "steps=60")
NEW_DATA = 200  # unseen samples served
INFER_BATCH = 20
MUTATED_BATCH = 5  # the served batch a mutant strikes
SERVING = ("eval, inference_mode", "train mode, no_grad", "eval, grad + backward")
TTA = "test-time adaptation"
MUTANTS = {
    "adapt": f"an optimizer step slips into the 'eval, grad + backward' loop at batch {MUTATED_BATCH}",
    "nudge": f"the forward moves one element of layer 0's W_Q by one ULP at batch {MUTATED_BATCH} (an in-place write)",
}


def _bits(t: Tensor) -> Tensor:
    """The tensor's bits as integers: compares -0.0 and 0.0, and NaNs, as what they are."""
    return t.detach().contiguous().view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def _group(name: str) -> str:
    """'layers.0.attn.W_Q.weight' -> 'L0 W_Q'; every other parameter -> 'other'."""
    parts = name.split(".")
    if len(parts) >= 4 and parts[-2] in ("W_Q", "W_K", "W_V"):
        return f"L{parts[1]} {parts[-2]}"
    return "other"


def _entropy(logits: Tensor) -> Tensor:
    """Summed entropy of the predicted distributions: a loss that needs no labels."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum()


def serve(model: nn.Module, table: TensorTable, how: str, cfg: Any, mutant: str | None = None) -> dict[str, Any]:
    """Serve every sample of `table` in batches, `how` one of SERVING or TTA; what changed."""
    params = {n: p.detach().clone() for n, p in model.named_parameters()}
    before = fingerprint_state(model)
    probe = table.select(list(range(INFER_BATCH))).inputs
    model.eval()
    with torch.inference_mode():
        answer = model(**probe).clone()
    optimizer = build_optimizer(cfg, model) if how == TTA or mutant == "adapt" else None
    watched = next((n for n in params if _group(n) != "other"), None)  # the first W_Q, if the model has one
    drift = []
    for b, start in enumerate(range(0, len(table), INFER_BATCH)):
        batch = table.select(list(range(start, min(start + INFER_BATCH, len(table)))))
        strike = b == MUTATED_BATCH
        hook = None
        if mutant == "nudge" and strike and watched is not None:
            hook = model.get_submodule(watched.rsplit(".", 1)[0]).register_forward_pre_hook(_nudge)
        if how == "eval, inference_mode":
            model.eval()
            with torch.inference_mode():
                model(**batch.inputs)
        elif how == "train mode, no_grad":
            model.train()
            with torch.no_grad():
                model(**batch.inputs)
        elif how == "eval, grad + backward":
            model.eval()
            model.zero_grad(set_to_none=True)
            loss_sum(model(**batch.inputs), batch.labels).backward()
            if mutant == "adapt" and strike and optimizer is not None:
                optimizer.step()
        else:  # test-time adaptation: an optimizer step on the predictions' entropy, every batch
            model.eval()
            optimizer.zero_grad(set_to_none=True)
            (_entropy(model(**batch.inputs)) / len(batch.labels)).backward()
            optimizer.step()
        if hook is not None:
            hook.remove()
        if watched is not None:
            w, w0 = model.get_parameter(watched).detach(), params[watched]
            drift.append(float((w - w0).norm() / w0.norm()))
    model.zero_grad(set_to_none=True)
    after = fingerprint_state(model)
    model.eval()
    with torch.inference_mode():
        answer_after = model(**probe)
    order = {"W_Q": 0, "W_K": 1, "W_V": 2}
    groups = sorted({_group(n) for n in params}, key=lambda g: (g == "other", g[:2], order.get(g[3:], 3)))
    changed, elements = dict.fromkeys(groups, 0), dict.fromkeys(groups, 0)
    for n, p in model.named_parameters():
        changed[_group(n)] += int((_bits(p) != _bits(params[n])).sum())
        elements[_group(n)] += p.numel()
    changed_tensors = sorted(n for n in before if before[n] != after[n])
    return {
        "batches": -(-len(table) // INFER_BATCH),
        "param_tensors": sum(n.startswith("param/") for n in before),
        "params_changed": sum(n.startswith("param/") for n in changed_tensors),
        "buffers_changed": sum(n.startswith("buffer/") for n in changed_tensors),
        "changed_elements": changed,
        "elements": elements,
        "changed": changed_tensors,
        "probe_answer_bitwise_equal": bool(torch.equal(_bits(answer), _bits(answer_after))),
        "probe_max_abs_change": float((answer_after - answer).abs().max()),
        "relative_change_of": watched,
        "relative_change": drift,
    }


def _nudge(module: nn.Module, args: Any) -> None:
    """Mutant: one element of the weight moves to the next float up."""
    with torch.no_grad():
        w = module.weight.view(-1)
        w[0] = torch.nextafter(w[0], torch.tensor(float("inf"), dtype=w.dtype))


def _new_data(overrides: tuple[str, ...], seed: int) -> tuple[Any, TensorTable]:
    cfg = config([*overrides, f"data.num_samples={NEW_DATA}"], seed + 1000)  # another data seed: new data
    return cfg, data(cfg)[1]


def run(out_dir: Path, seed: int = 0, mutant: str | None = None) -> Finding:
    cfg, new = _new_data(TRANSFORMER, seed)
    runs = {how: serve(trained(TRANSFORMER, seed).model, new, how, cfg, mutant) for how in SERVING}
    tta = serve(trained(TRANSFORMER, seed).model, new, TTA, cfg)
    bn_cfg, bn_new = _new_data(BN_CNN, seed)
    bn = {
        mode: serve(trained(BN_CNN, seed).model, bn_new, how, bn_cfg)
        for mode, how in (("eval", "eval, inference_mode"), ("train mode", "train mode, no_grad"))
    }

    def unchanged(r: dict[str, Any]) -> bool:
        return r["params_changed"] == 0 and sum(r["changed_elements"].values()) == 0 and r["probe_answer_bitwise_equal"]

    holds = all(unchanged(r) for r in runs.values()) and all(r["params_changed"] == 0 for r in bn.values())
    numbers = {
        "new_samples": NEW_DATA,
        "batch_size": INFER_BATCH,
        **{f"transformer, {how}": r for how, r in runs.items()},
        **{f"batch-norm CNN, {mode} (buffers pitfall)": r for mode, r in bn.items()},
    }
    control = Control(
        TTA,
        "the same serving loop with one optimizer step per batch on the entropy of the model's own predictions",
        verdict(unchanged(tta)),
        tta,
    )
    figure = save(figure_of(runs, tta, bn, holds), out_dir, NAME)
    q = [g for g in tta["changed_elements"] if g.endswith("W_Q")]
    headline = (
        f"served {NEW_DATA} new samples 3 ways: "
        f"{sum(sum(r['changed_elements'].values()) for r in runs.values())} parameter elements changed, probe answers "
        f"{'bitwise equal' if all(r['probe_answer_bitwise_equal'] for r in runs.values()) else 'changed'}; "
        f"test-time adaptation changed {sum(tta['changed_elements'][g] for g in q)} W_Q elements; "
        f"train-mode BN: {bn['train mode']['params_changed']} params, {bn['train mode']['buffers_changed']} buffers"
    )
    return Finding(
        NAME,
        QUESTION,
        CLAIM,
        verdict(holds),
        [control],
        numbers,
        figure,
        headline,
        by_construction=BY_CONSTRUCTION,
        mutant=mutant,
    )


def _zero_bar(ax: Any, x: float, width: float, colour: str) -> None:
    """A bar of height 0 drawn as what it is: a thick stroke on the axis in the bar's colour (an
    empty bar is otherwise invisible), labelled "0" above it."""
    ax.plot([x - width / 2, x + width / 2], [0, 0], color=colour, lw=5, solid_capstyle="butt", clip_on=False)


def figure_of(runs: dict, tta: dict, bn: dict, holds: bool) -> Any:
    """Top: parameter elements changed by each way of serving (counts; colour: the fraction).
    Bottom left: how far the first W_Q moved batch by batch. Bottom right: the BN CNN aside."""
    plt = pyplot()
    fig, ax = plt.subplot_mosaic([["grid", "grid"], ["drift", "bn"]], figsize=(10, 8.4), layout="constrained")
    rows = {**runs, f"control: {TTA}": tta}
    groups = list(tta["changed_elements"])
    grid = torch.tensor([[r["changed_elements"][g] / r["elements"][g] for g in groups] for r in rows.values()])
    im = ax["grid"].imshow(grid.numpy(), cmap="Reds", vmin=0, vmax=1, aspect="auto")
    for y, r in enumerate(rows.values()):
        for x, g in enumerate(groups):
            colour = "white" if grid[y, x] > 0.5 else "black"
            ax["grid"].text(x, y, str(r["changed_elements"][g]), ha="center", va="center", color=colour)
    ax["grid"].set_xticks(range(len(groups)), groups)
    ax["grid"].set_yticks(range(len(rows)), list(rows))
    ax["grid"].set_xlabel("parameters (layer, projection; 'other': every other parameter)")
    ax["grid"].set_title(f"Parameter elements whose bits changed after serving {NEW_DATA} new samples (count)")
    fig.colorbar(im, ax=ax["grid"], label="fraction of elements changed")

    watched = _group(tta["relative_change_of"])
    drift = ax["drift"]
    for (name, r), style in zip(rows.items(), ("o-", "s--", "^:", "x-"), strict=True):
        drift.plot(range(1, len(r["relative_change"]) + 1), r["relative_change"], style, label=name)
    drift.set(xlabel="served batch", ylabel="||W - W_trained|| / ||W_trained||", title=f"{watched} during serving")
    drift.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    drift.legend(loc="upper left")

    bars = ax["bn"]
    modes = list(bn)
    for i, m in enumerate(modes):
        for offset, key, colour, label in (
            (-0.2, "params_changed", "tab:blue", "parameter tensors"),
            (0.2, "buffers_changed", "tab:orange", "buffer tensors"),
        ):
            value = bn[m][key]
            bars.bar(i + offset, value, 0.4, color=colour, label=label if i == 0 else None)
            if value == 0:
                _zero_bar(bars, i + offset, 0.4, colour)
            bars.annotate(str(value), (i + offset, value), xytext=(0, 4), textcoords="offset points", ha="center")
    bars.set_xticks(range(len(modes)), [f"served in\n{m}" for m in modes])
    bars.set_ylim(
        0, max(1, *(r["buffers_changed"] for r in bn.values()), *(r["params_changed"] for r in bn.values())) * 1.25
    )
    bars.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    bars.set(xlabel="batch-norm CNN", ylabel="state tensors changed", title="Aside: the buffers pitfall")
    bars.legend(loc="upper left")

    changed = sum(sum(r["changed_elements"].values()) for r in runs.values())
    q = sum(tta["changed_elements"][g] for g in groups if g.endswith("W_Q"))
    fig.suptitle(
        finding_title(
            "After training, using the model changes no weight",
            holds,
            f"{len(runs)} ways of serving: {changed} parameter elements changed; "
            f"test-time adaptation (control): {q} W_Q elements",
        )
    )
    return fig
