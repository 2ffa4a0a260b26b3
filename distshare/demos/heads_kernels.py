"""Claim 7: several heads, several kernels: several parallel views of the same input.

Heads. The tiny transformer is trained to tag every word's role (subject, verb, object,
modifier) in sentences of 3 to 5 words ("big cat eat small mouse"): a noun's role depends on
whether the verb comes before it, so attention has several jobs. Two heads are different
views when their attention rows differ (mean Jensen-Shannon divergence over every real query
of the 512 training sentences) by more than any two heads of 16 untrained models do (other
random initializations, same sentences): the bar is measured, per layer. The claim needs every
pair of heads in every layer over that bar.

Filters. The small CNN is trained on shapes; two first-layer filters are different views when
their response maps over the 512 images differ by more than the dot-product rounding bound
(`distshare.numerics.rounding`). Random initialization alone already makes 8 filters 8 views
(the untrained model passes this half, measured and reported): what decides it is that the
filters start different, which the second control tests.

Controls, the same measurements:

- untrained: both models at their initialization (the weights training starts from). Its heads
  barely attend (near-uniform rows) and differ no more than random heads do.
- started as copies: the same training, but every head starts as a copy of head 0 (its rows of
  W_Q, W_K, W_V and its columns of W_O) and every first-layer filter as a copy of filter 0 (the
  second conv reading each the same way). Copies get the same gradient, so nothing breaks the
  symmetry: they stay one view.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distshare.data.shapes import PATTERN_NAMES
from distshare.demos.common import CNN, TRANSFORMER, Trained, finding_title, pyplot, save, trained
from distshare.demos.context import initial, sentence_ids, trained_from
from distshare.demos.finding import Control, Finding, verdict
from distshare.models import build_model
from distshare.numerics.rounding import gamma_for

NAME = "heads-kernels"
QUESTION = (
    "Kernels and Multihead Can you explain the connection of image filters and kernels and transformers multi "
    "head, are they related"
)
CLAIM = (
    "Different heads attend differently and different conv filters respond differently: after training, every "
    "pair of heads in every layer differs by more than any two heads of untrained models do, and every pair of "
    "first-layer filters responds differently to the images (several parallel views, each with its own weights)."
)
BY_CONSTRUCTION = (
    "Random initialization, not training, makes the filters distinct: the untrained CNN's 8 filters are already 8 "
    "views (reported in the untrained control's numbers), so that half of the claim is not what the untrained "
    "control tests. Heads or filters that start as exact copies receive the same gradient and stay copies (the "
    "symmetry of gradient descent): the 'started as copies' control measures that this holds in the training "
    "loop, which is why models start from random weights."
)
# Role tagging of 3-to-5-word sentences: attention must find the verb relative to each noun.
HEADS = (*TRANSFORMER, "data.variable_length=true", "data.task=roles")
REFERENCE = 16  # untrained models whose most different pair of heads sets the bar, per layer
SENTENCE = "big cat eat small mouse"  # the sentence the figure shows the heads on
MUTANTS = {
    "untrained": "the claim is judged on both models before training (the weights training starts from)",
    "one head": "every head of the trained transformer answers with head 0's W_Q, W_K, W_V",
    "one filter": "every first-layer filter of the trained CNN is a copy of filter 0",
}


# ------------------------------------------------------------------------------------ views


def views(distinct: Tensor) -> int:
    """The largest set of views that differ pairwise, given `distinct` [V, V] (True: a different pair)."""
    n = distinct.shape[0]
    for size in range(n, 1, -1):
        for group in itertools.combinations(range(n), size):
            if all(bool(distinct[a, b]) for a, b in itertools.combinations(group, 2)):
                return size
    return 1


def js_between_heads(model: nn.Module, ids: Tensor, mask: Tensor) -> list[Tensor]:
    """Per layer, [H, H]: mean Jensen-Shannon divergence (nats) between heads' attention rows, over real queries."""
    model.eval()
    with torch.no_grad():
        _, maps = model.encode(ids, mask)
    out = []
    for m in maps:
        rows = m.double().transpose(0, 1)[:, mask]  # [H, real queries, T]
        p, q = rows[:, None], rows[None, :]
        mid = (p + q) / 2

        def kl(a: Tensor, b: Tensor) -> Tensor:
            return torch.where(a > 0, a * (a.clamp_min(1e-300).log() - b.clamp_min(1e-300).log()), 0.0).sum(-1)

        out.append(((kl(p, mid) + kl(q, mid)) / 2).mean(-1))
    return out


def heads(model: nn.Module, ids: Tensor, mask: Tensor, bar: list[float]) -> dict:
    """Distinct views per layer: heads whose every pair differs by more than the measured bar."""
    layers = []
    for layer, (js, b) in enumerate(zip(js_between_heads(model, ids, mask), bar, strict=True)):
        n = js.shape[0]
        pairs = js[torch.triu_indices(n, n, 1).unbind()]
        layers.append(
            {
                "layer": layer,
                "heads": n,
                "distinct_views": views(js > b),
                "bar_js": b,
                "smallest_pair_js": float(pairs.min()),
                "mean_pair_js": float(pairs.mean()),
                "pair_js": [[round(float(x), 6) for x in row] for row in js],
            }
        )
    return {"layers": layers, "holds": all(x["distinct_views"] == x["heads"] > 1 for x in layers)}


def reference_bar(t: Trained, ids: Tensor, mask: Tensor) -> tuple[list[float], list[int]]:
    """Per layer, the largest JS between two heads of any of `REFERENCE` untrained models (other seeds)."""
    seeds = [t.cfg.seed + 1 + k for k in range(REFERENCE)]  # never the run's own initialization
    per_model = [js_between_heads(build_model(t.cfg.model, t.info, seed=s), ids, mask) for s in seeds]
    return [max(float(js[layer].max()) for js in per_model) for layer in range(len(per_model[0]))], seeds


def filters(conv: nn.Conv2d, images: Tensor, labels: Tensor) -> dict:
    """Distinct views among first-layer filters: response maps that differ by more than rounding."""
    with torch.no_grad():
        acts = F.conv2d(images, conv.weight, conv.bias, padding=conv.padding)  # [N, C, H, W]
        magnitude = F.conv2d(images.abs(), conv.weight.abs(), conv.bias.abs(), padding=conv.padding)
    # Two filters computing the same function differ only by the rounding of their dot products:
    # at most 2 gamma_n |x| |w| per element, n = taps + bias.
    n_terms = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 1
    tol = 2 * gamma_for(acts.dtype, n_terms) * float(magnitude.max())
    per_filter = acts.transpose(0, 1).flatten(1)  # [C, N*H*W]
    gap = (per_filter[:, None] - per_filter[None, :]).abs().amax(-1)  # [C, C] max abs difference
    unit = F.normalize(per_filter.double(), dim=1)
    c = per_filter.shape[0]
    off = ~torch.eye(c, dtype=torch.bool)
    peak = acts.relu().amax((2, 3))  # [N, C] each filter's strongest response per image
    profile = torch.stack([peak[labels == k].mean(0) for k in range(len(PATTERN_NAMES))], 1)  # [C, patterns]
    return {
        "filters": c,
        "tolerance": tol,
        "distinct_views": views(gap > tol),
        "smallest_pair_max_abs_diff": float(gap[off].min()),
        "mean_pair_1_minus_abs_cosine": float((1 - (unit @ unit.T).abs()[off]).mean()),
        "mean_peak_response_by_pattern": [[round(float(x), 4) for x in row] for row in profile],
        "holds": views(gap > tol) == c > 1,
    }


# ----------------------------------------------------------------- counterfactual starts and mutants


def heads_as_copies(model: nn.Module) -> None:
    """Every head of every layer becomes head 0: its rows of W_Q, W_K, W_V and its columns of W_O."""
    for layer in model.layers:
        attn, d = layer.attn, layer.attn.d_head
        for h in range(1, attn.n_heads):
            for w in (attn.W_Q.weight, attn.W_K.weight, attn.W_V.weight):
                w[h * d : (h + 1) * d] = w[:d]
            attn.W_O.weight[:, h * d : (h + 1) * d] = attn.W_O.weight[:, :d]


def filters_as_copies(model: nn.Module) -> None:
    """Every first-layer filter becomes filter 0, and the second conv reads each of them the same way."""
    first, second = model.features[0], model.features[4]
    first.weight.copy_(first.weight[:1].expand_as(first.weight).clone())
    first.bias.copy_(first.bias[:1].expand_as(first.bias).clone())
    second.weight.copy_(second.weight[:, :1].expand_as(second.weight).clone())


def _one_head(model: nn.Module) -> nn.Module:
    """The mutant: every head answers with head 0's W_Q, W_K, W_V (W_O untouched)."""
    tied = copy.deepcopy(model)
    with torch.no_grad():
        for layer in tied.layers:
            attn, d = layer.attn, layer.attn.d_head
            for h in range(1, attn.n_heads):
                for w in (attn.W_Q.weight, attn.W_K.weight, attn.W_V.weight):
                    w[h * d : (h + 1) * d] = w[:d]
    return tied


def _one_filter(conv: nn.Conv2d) -> nn.Conv2d:
    """The mutant: every first-layer filter is a copy of filter 0."""
    tied = copy.deepcopy(conv)
    with torch.no_grad():
        tied.weight[:] = tied.weight[:1]
        tied.bias[:] = tied.bias[:1]
    return tied


# ------------------------------------------------------------------------------------ the run


def run(out_dir: Path, seed: int = 0, mutant: str | None = None) -> Finding:
    tr, cnn = trained(HEADS, seed), trained(CNN, seed)
    tr_copies, cnn_copies = trained_from(HEADS, seed, heads_as_copies), trained_from(CNN, seed, filters_as_copies)
    ids, mask = tr.table.inputs["input_ids"], tr.table.inputs["pad_mask"]
    images, labels = cnn.table.inputs["image"], cnn.table.labels
    bar, reference_seeds = reference_bar(tr, ids, mask)

    transformer, conv = tr.model, cnn.model.features[0]
    if mutant == "untrained":
        transformer, conv = initial(tr), initial(cnn).features[0]
    elif mutant == "one head":
        transformer = _one_head(transformer)
    elif mutant == "one filter":
        conv = _one_filter(conv)

    def measure(model: nn.Module, first: nn.Conv2d) -> tuple[bool, dict]:
        h, f = heads(model, ids, mask, bar), filters(first, images, labels)
        return h.pop("holds") and f.pop("holds"), {"heads": h, "filters": f}

    holds, claim = measure(transformer, conv)
    untrained_holds, untrained = measure(initial(tr), initial(cnn).features[0])
    copies_holds, copies = measure(tr_copies.model, cnn_copies.model.features[0])
    controls = [
        Control(
            "untrained",
            "both models at their initialization, the weights training starts from",
            verdict(untrained_holds),
            untrained,
        ),
        Control(
            "started as copies",
            "the same training with every head starting as a copy of head 0 and every first-layer filter as a "
            "copy of filter 0",
            verdict(copies_holds),
            copies,
        ),
    ]
    numbers = {
        "sentences": int(ids.shape[0]),
        "images": int(images.shape[0]),
        "reference_untrained_seeds": reference_seeds,
        "final_train_loss": {"transformer": tr.result.losses[-1], "cnn": cnn.result.losses[-1]},
        **claim,
    }
    figure = _figure(out_dir, transformer, tr, conv, claim, untrained, copies, mutant, holds)
    per_layer = ", ".join(
        f"L{x['layer']} {x['distinct_views']}/{x['heads']} (smallest pair {x['smallest_pair_js']:.3f} > "
        f"bar {x['bar_js']:.3f} nats)"
        if x["distinct_views"] == x["heads"]
        else f"L{x['layer']} {x['distinct_views']}/{x['heads']} (smallest pair {x['smallest_pair_js']:.3f}, "
        f"bar {x['bar_js']:.3f} nats)"
        for x in claim["heads"]["layers"]
    )
    headline = (
        f"distinct heads: {per_layer}; filters {claim['filters']['distinct_views']}/{claim['filters']['filters']}; "
        f"untrained heads {[x['distinct_views'] for x in untrained['heads']['layers']]}; started as copies: heads "
        f"{[x['distinct_views'] for x in copies['heads']['layers']]}, filters {copies['filters']['distinct_views']}"
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


def _figure(
    out_dir: Path,
    model: nn.Module,
    tr: Trained,
    conv: nn.Conv2d,
    claim: dict,
    untrained: dict,
    copies: dict,
    mutant: str | None,
    holds: bool,
) -> str:
    with torch.no_grad():
        _, maps = model.encode(sentence_ids(SENTENCE, tr.info))
    attention = [m[0] for m in maps]  # per layer: heads x query x key, on SENTENCE
    kernels = conv.weight.detach()[:, 0]
    return save(figure_of(SENTENCE.split(), attention, kernels, claim, untrained, copies, mutant, holds), out_dir, NAME)


def figure_of(
    words: list[str],
    attention: list[Tensor],
    kernels: Tensor,
    claim: dict,
    untrained: dict,
    copies: dict,
    mutant: str | None,
    holds: bool,
) -> Any:
    """The heads' attention on one sentence (a row of panels per layer), the first-layer kernels,
    what each filter responds to, and the count of distinct views against the controls."""
    plt = pyplot()
    layers = claim["heads"]["layers"]
    n_layers, n_heads, n_filters = len(attention), attention[0].shape[0], kernels.shape[0]
    cols = 2 * max(n_heads, n_filters // 2)  # heads 2 columns wide, kernels 1; a last narrow one for colour bars
    mosaic = [[f"h{layer}{c // (cols // n_heads)}" for c in range(cols)] + ["attn_bar"] for layer in range(n_layers)]
    mosaic.append([f"k{c // (cols // n_filters)}" for c in range(cols)] + ["kernel_bar"])
    fig = plt.figure(figsize=(10, 2.9 * n_layers + 7.6), layout="constrained")
    # Two subfigures, laid out apart: the bottom row's colour bar does not shift the panels above.
    top, bottom = fig.subfigures(2, 1, height_ratios=(3 * n_layers + 1.3, 3.9))
    ax = top.subplot_mosaic(mosaic, height_ratios=[3] * n_layers + [1.3], width_ratios=[1] * cols + [0.15])
    ax.update(bottom.subplot_mosaic([["profile", "views"]]))
    image = None
    for layer in range(n_layers):
        for hd in range(n_heads):
            a = ax[f"h{layer}{hd}"]
            image = a.imshow(attention[layer][hd], cmap="viridis", vmin=0, vmax=1)
            a.set_xticks(range(len(words)), words, rotation=45, ha="right", rotation_mode="anchor")
            a.set_yticks(range(len(words)), words if hd == 0 else [])
            a.set_title(f"layer {layer}, head {hd}")
        ax[f"h{layer}0"].set_ylabel(f"layer {layer}\nquery (row)", fontweight="bold")
    fig.colorbar(image, cax=ax["attn_bar"], label=f'attention weight, key (column) on "{" ".join(words)}"')

    lim = float(kernels.abs().max())
    kernel_image = None
    for i in range(n_filters):
        a = ax[f"k{i}"]
        kernel_image = a.imshow(kernels[i], cmap="RdBu_r", vmin=-lim, vmax=lim)
        a.set_title(f"filter {i}")
        a.set_xticks([])
        a.set_yticks([])
    ax["k0"].set_ylabel("conv 1\nkernels", fontweight="bold")
    fig.colorbar(kernel_image, cax=ax["kernel_bar"], label="weight")

    f = claim["filters"]
    profile = ax["profile"]
    resp = profile.imshow(torch.tensor(f["mean_peak_response_by_pattern"]), cmap="magma", aspect="auto")
    profile.set_xticks(range(len(PATTERN_NAMES)), PATTERN_NAMES, rotation=30, ha="right", rotation_mode="anchor")
    profile.set_yticks(range(n_filters), [f"filter {i}" for i in range(n_filters)])
    profile.set_xlabel("shape in the image")
    profile.set_title(f"what each filter responds to:\n{f['distinct_views']}/{f['filters']} distinct filters")
    fig.colorbar(resp, ax=profile, label="mean peak response (ReLU)")

    bars = ax["views"]
    groups = [f"heads L{x['layer']}\nmin {x['smallest_pair_js']:.3f}\nbar {x['bar_js']:.3f}" for x in layers] + [
        f"filters\nmin {f['smallest_pair_max_abs_diff']:.2g}\nbar {f['tolerance']:.1g}"
    ]
    series = (
        ("trained (the claim)" + (f", mutant: {mutant}" if mutant else ""), claim, "tab:blue"),
        ("untrained (control)", untrained, "tab:red"),
        ("started as copies (control)", copies, "tab:orange"),
    )
    width = 0.8 / len(series)
    for s, (label, d, colour) in enumerate(series):
        counts = [x["distinct_views"] for x in d["heads"]["layers"]] + [d["filters"]["distinct_views"]]
        xs = [g + (s - 1) * width for g in range(len(groups))]
        bars.bar(xs, counts, width=width, color=colour, label=label)
        for xpos, count in zip(xs, counts, strict=True):
            bars.text(xpos, count + 0.1, str(count), ha="center")
    bars.set_xticks(range(len(groups)), groups)
    bars.set_ylabel("distinct views")
    bars.set_xlabel("smallest pair's difference vs the bar (heads: JS nats)")
    bars.set_ylim(0, max(n_heads, n_filters) + 3.5)
    bars.yaxis.set_major_locator(plt.MaxNLocator(integer=True))
    bars.legend(loc="upper left")
    bars.set_title("distinct views: trained vs the controls")
    heads_found = ", ".join(f"L{x['layer']} {x['distinct_views']}/{x['heads']}" for x in layers)
    fig.suptitle(
        finding_title(
            "Several heads, several filters: several views of the same input",
            holds,
            f"trained: distinct heads {heads_found}, filters {f['distinct_views']}/{f['filters']}; "
            f"started as copies: heads {[x['distinct_views'] for x in copies['heads']['layers']]}, "
            f"filters {copies['filters']['distinct_views']}",
        )
    )
    return fig
