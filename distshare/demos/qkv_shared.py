"""Claim 1: one W_Q, W_K, W_V serves every sample of a batch, and their gradient is the batch's.

That a module holds one tensor per parameter whatever the batch is how PyTorch builds it
(`by_construction`). What is measured is what a batch does with those tensors, in one
forward and backward of a batch of 8 sentences through the tiny transformer:

- served by the stored matrix: hooks capture what enters and leaves every W_Q, W_K, W_V;
  for each sample b the output must be X_b W^T with the *stored* W, to within the
  dot-product rounding bound gamma_d |X_b| |W|^T (d terms per output element; the
  reference is computed in float64). A model whose weights depend on the sample fails it.
- one gradient: the batch gradient of each W_Q, W_K, W_V equals the sum of the gradients
  each sample produces alone (batch of one), divided by the batch size, within the
  elementwise bound of summing the same B x T terms in another order
  (`distshare.numerics.rounding.reorder_bound`, from the measured per-sample magnitudes).

Controls, the same measurements on the same weights with a hypernetwork (FiLM) that rescales
each output row of W_Q, W_K, W_V by 1 + tanh(H c), c read from the input:

- per-sample FiLM, c = the sample's mean token embedding: every sample has its own
  effective W_Q (as with hypernetworks, dynamic weights, per-request adapters). The
  served-by-the-stored-matrix test fails; the gradient identity still holds (samples do not
  interact), which is why it alone cannot tell shared from per-sample weights.
- per-batch FiLM, c = the batch's mean: one effective weight set per batch, fed by every
  sample. Both tests fail: a sample's gradient depends on its batch mates.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from distshare.demos.common import config, data, finding_title, pyplot, save, seeded
from distshare.demos.finding import Control, Finding, verdict
from distshare.models import build_model
from distshare.numerics.diff import diff
from distshare.numerics.rounding import bounds, excess, gamma_for
from distshare.report import decade_ticks
from distshare.training import loss_sum

NAME = "qkv-shared"
QUESTION = (
    "If there are more than 1 sample, does it mean for each sample, there is a different weight matrix for Q, K and V?"
)
CLAIM = (
    "No: every sample's queries, keys and values are its tokens times the one stored W_Q, W_K, W_V (within "
    "rounding), and the batch gradient of those tensors is the normalized sum of the per-sample gradients."
)
BY_CONSTRUCTION = (
    "An nn.Module holds one tensor per parameter whatever the batch: a forward at batch 1 or 40 reads the same "
    "W_Q, W_K, W_V storages and the parameter count does not grow with the batch. That is how PyTorch builds "
    "modules, so it is stated, not measured; the experiment measures what the batch's forward and backward do "
    "with those tensors."
)
BATCH = 8  # samples in the batch
PROBE = 3  # the sample the mutants single out
MUTANTS = {
    "own-weight": f"sample {PROBE} is served by 1.001 x W_Q in layer 0 (a per-sample weight slipped into the batch)",
    "scaled-grad": "the batch loss is divided by B / 1.0001 instead of B (a normalizer off by 1e-4)",
    "skipped-sample": f"sample {PROBE}'s loss is left out of the batch loss (a sample masked out of the gradient)",
}


def projections(model: nn.Module) -> dict[str, nn.Linear]:
    """Every W_Q, W_K, W_V of the model, by module name."""
    return {n: m for n, m in model.named_modules() if n.rsplit(".", 1)[-1] in ("W_Q", "W_K", "W_V")}


def _short(name: str) -> str:
    """'layers.0.attn.W_Q' -> 'L0 W_Q' (figure labels)."""
    parts = name.split(".")
    return f"L{parts[-3]} {parts[-1]}"


class FiLM(nn.Module):
    """The counterfactual: W_Q, W_K, W_V rescaled row by row by a hypernetwork reading the input.

    The effective matrix for sample b is diag(1 + tanh(H c_b)) W, W the stored one, with c_b
    the sample's mean token embedding, or (`per_batch`) the batch's mean: then every sample of
    a batch shares one effective weight set, made from all of them.
    """

    def __init__(self, model: nn.Module, per_batch: bool, seed: int) -> None:
        super().__init__()
        self.model, self.per_batch = copy.deepcopy(model), per_batch
        d = self.model.embed.embedding_dim
        sites = projections(self.model)
        with seeded(seed):
            self.hyper = nn.ModuleDict({n.replace(".", "_"): nn.Linear(d, m.out_features) for n, m in sites.items()})
        self.scales: dict[str, Tensor] = {}
        for n, m in sites.items():
            m.register_forward_hook(lambda mod, args, out, n=n: out * self.scales[n][:, None, :])

    def forward(self, input_ids: Tensor, pad_mask: Tensor) -> Tensor:
        real = pad_mask[..., None]
        c = self.model.embed(input_ids).masked_fill(~real, 0.0).sum(1) / real.sum(1).clamp(min=1)
        if self.per_batch:
            c = c.mean(0, keepdim=True).expand_as(c)
        self.scales = {n: 1 + torch.tanh(self.hyper[n.replace(".", "_")](c)) for n in projections(self.model)}
        return self.model(input_ids, pad_mask)


def measure(model: nn.Module, ids: Tensor, mask: Tensor, labels: Tensor, mutant: str | None = None) -> dict[str, Any]:
    """The two tests on one model and batch: which matrix served each sample, and whose gradient it got."""
    sites = projections(model)
    hooks = []
    if mutant == "own-weight":
        first = sites[next(iter(sites))]
        hooks.append(first.register_forward_hook(lambda mod, args, out: _own_weight(out)))
    seen: dict[str, tuple[Tensor, Tensor]] = {}
    for n, m in sites.items():  # registered after any other hook: sees the output the model goes on with
        hooks.append(m.register_forward_hook(lambda mod, args, out, n=n: seen.__setitem__(n, (args[0], out))))
    weight = 1.0 + 1e-4 if mutant == "scaled-grad" else 1.0
    keep = torch.arange(ids.shape[0]) != PROBE if mutant == "skipped-sample" else slice(None)
    model.zero_grad(set_to_none=True)
    logits = model(ids, mask)
    (loss_sum(logits[keep], labels[keep]) / ids.shape[0] * weight).backward()
    for h in hooks:
        h.remove()
    batch_grads = {n: m.weight.grad.detach().clone() for n, m in sites.items()}

    # Served by the stored matrix: out_b = X_b W^T to within gamma_d |X_b| |W|^T (float64 reference).
    ratio_by_sample = torch.zeros(ids.shape[0], dtype=torch.float64)
    for n, (x, out) in seen.items():
        w = sites[n].weight.detach().double()
        x = x.detach().double()
        err = (out.detach().double() - x @ w.T).abs()
        bound = gamma_for(out.dtype, w.shape[1]) * (x.abs() @ w.abs().T)
        ratio_by_sample = torch.maximum(ratio_by_sample, (err / bound).flatten(1).max(1).values)

    # One gradient: each sample alone (a batch of one), summed and normalized like the batch loss.
    per_sample: dict[str, list[Tensor]] = {n: [] for n in sites}
    for i in range(ids.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_sum(model(ids[i : i + 1], mask[i : i + 1]), labels[i : i + 1]).backward()
        for n, m in sites.items():
            per_sample[n].append(m.weight.grad.detach().clone())
    model.zero_grad(set_to_none=True)
    summed = {n: torch.stack(g).sum(0) / ids.shape[0] for n, g in per_sample.items()}
    abs_sum = {n: torch.stack(g).abs().sum(0) / ids.shape[0] for n, g in per_sample.items()}
    # The batch gradient sums B samples x T positions per weight element, in another order.
    limit = bounds(abs_sum, summed, ids.shape[0] * ids.shape[1])
    by_matrix = {_short(n): excess({n: batch_grads[n]}, {n: summed[n]}, {n: limit[n]}) for n in sites}
    served = float(ratio_by_sample.max())
    grad = max(by_matrix.values())
    return {
        "served_by_stored_weight": {
            "max_error_over_bound": served,
            "by_sample": [float(r) for r in ratio_by_sample],
        },
        "grad_vs_sum_of_per_sample": {
            "max_error_over_bound": grad,
            "by_matrix": by_matrix,
            "diff": diff(batch_grads, summed).to_dict(),
        },
        "holds": served <= 1.0 and grad <= 1.0,
    }


def _own_weight(out: Tensor) -> Tensor:
    """Mutant: sample PROBE's output as if its W were 1.001 W."""
    scale = torch.ones(out.shape[0], 1, 1, dtype=out.dtype)
    scale[PROBE] = 1.001
    return out * scale


def run(out_dir: Path, seed: int = 0, mutant: str | None = None) -> Finding:
    cfg = config(["data.num_samples=40"], seed)
    info, table = data(cfg)
    model = build_model(cfg.model, info, seed=cfg.seed)
    batch = table.select(list(range(BATCH)))
    ids, mask, labels = batch.inputs["input_ids"], batch.inputs["pad_mask"], batch.labels

    shared = measure(model, ids, mask, labels, mutant)
    per_sample = measure(FiLM(model, per_batch=False, seed=seed), ids, mask, labels)
    per_batch = measure(FiLM(model, per_batch=True, seed=seed), ids, mask, labels)
    holds = shared.pop("holds")
    controls = [
        Control(
            "per-sample FiLM",
            "each sample's W_Q, W_K, W_V rescaled by a hypernetwork reading that sample (its own weights)",
            verdict(per_sample.pop("holds")),
            per_sample,
        ),
        Control(
            "per-batch FiLM",
            "W_Q, W_K, W_V rescaled by a hypernetwork reading the batch mean (one weight set per batch)",
            verdict(per_batch.pop("holds")),
            per_batch,
        ),
    ]
    numbers = {
        "batch_size": BATCH,
        "positions": int(ids.shape[1]),
        "matrices": len(projections(model)),
        "dtype": cfg.model.dtype,
        **shared,
    }
    figure = _figure(out_dir, shared, per_sample, per_batch, holds)
    headline = (
        f"each sample served by the stored W_Q/W_K/W_V: {shared['served_by_stored_weight']['max_error_over_bound']:.2g}"
        f" of the rounding bound; batch grad = mean of per-sample grads: "
        f"{shared['grad_vs_sum_of_per_sample']['max_error_over_bound']:.2g} of bound; per-sample FiLM served "
        f"{per_sample['served_by_stored_weight']['max_error_over_bound']:.1e} x bound; per-batch FiLM grad "
        f"{per_batch['grad_vs_sum_of_per_sample']['max_error_over_bound']:.1e} x bound"
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


def _figure(out_dir: Path, shared: dict, per_sample: dict, per_batch: dict, holds: bool) -> str:
    return save(figure(shared, per_sample, per_batch, holds), out_dir, NAME)


def figure(shared: dict, per_sample: dict, per_batch: dict, holds: bool) -> Any:
    """Left: which matrix served each sample; right: whose gradient reached each W. Both in units of
    their rounding bound, log scale (decades only: the values span 1e-2 to 1e6)."""
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.8), layout="constrained")
    series = (
        ("the model (shared)", shared, "o-"),
        ("per-sample FiLM", per_sample, "s--"),
        ("per-batch FiLM", per_batch, "^:"),
    )
    for label, n, style in series:
        left.plot(n["served_by_stored_weight"]["by_sample"], style, label=label)
    served = shared["served_by_stored_weight"]["max_error_over_bound"]
    left.set(
        xlabel="sample in the batch",
        ylabel="max |out - X W^T| / rounding bound",
        title=f"Which matrix served each sample?\nthe model: at most {served:.2g} x the bound",
    )
    left.xaxis.set_major_locator(plt.MaxNLocator(integer=True))
    names = list(shared["grad_vs_sum_of_per_sample"]["by_matrix"])
    for label, n, style in series:
        right.plot(names, list(n["grad_vs_sum_of_per_sample"]["by_matrix"].values()), style, label=label)
    grad = shared["grad_vs_sum_of_per_sample"]["max_error_over_bound"]
    right.set(
        xlabel="weight matrix (layer, projection)",
        ylabel="max |batch grad - mean of per-sample| / bound",
        title=f"Whose gradient reaches the weights?\nthe model: at most {grad:.2g} x the bound",
    )
    for ax in (left, right):
        ax.axhline(1.0, color="k", lw=1, ls="--", label="rounding bound")
        ax.set_yscale("log")
        decade_ticks(ax)
        ax.legend(loc="center right")
    film = max(
        per_sample["served_by_stored_weight"]["max_error_over_bound"],
        per_batch["grad_vs_sum_of_per_sample"]["max_error_over_bound"],
    )
    fig.suptitle(
        finding_title(
            "One W_Q, W_K, W_V serves every sample, and their gradient is the batch's",
            holds,
            f"the model within {max(served, grad):.2g} x the bound; the FiLM controls off by up to {film:.1e} x",
        )
    )
    return fig
