"""Claim 7: several heads, several kernels: several parallel views of the same input.

After training, on every sentence of the grammar, the tiny transformer's heads attend
differently: the mean pairwise Jensen-Shannon divergence between heads' attention rows is
reported per layer, and the heads are counted as distinct views when their maps differ by
more than rounding. Likewise the trained CNN's first-layer filters respond to different
patterns: mean pairwise 1 - |cosine| between their activation maps over the images, and the
number of filters whose maps differ by more than the dot-product rounding bound.

Control: the same trained weights with every head (every filter) replaced by a copy of the
first: the count of views collapses to one, which is what one head / one filter gives.
"""

from __future__ import annotations

import copy
import itertools
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distshare.demos.common import CNN, TRANSFORMER, pyplot, save, trained
from distshare.demos.context import grammar, sentence_ids
from distshare.demos.finding import Control, Finding, verdict
from distshare.numerics.rounding import gamma_for, reorder_norm_bound

NAME = "heads-kernels"
QUESTION = (
    "Kernels and Multihead Can you explain the connection of image filters and kernels and transformers multi "
    "head, are they related"
)
CLAIM = (
    "Different heads attend differently and different conv filters respond to different patterns: several "
    "parallel views of the same input, each with its own shared weights."
)
CONTROL = "the same trained models with every head (every filter) a copy of the first: one view"
IMAGES = 200  # images whose activation maps compare the filters


def _views(maps: Tensor, tol: float) -> int:
    """Distinct views among maps [V, ...]: groups whose members differ by at most `tol`."""
    reps: list[Tensor] = []
    for m in maps:
        if not any(float((m - r).abs().max()) <= tol for r in reps):
            reps.append(m)
    return len(reps)


def _js(p: Tensor, q: Tensor) -> float:
    """Mean Jensen-Shannon divergence (nats) between attention rows p and q [..., T]."""
    mid = (p + q) / 2

    def kl(a: Tensor, b: Tensor) -> Tensor:
        return torch.where(a > 0, a * (a.clamp_min(1e-30).log() - b.clamp_min(1e-30).log()), 0.0).sum(-1)

    return float(((kl(p, mid) + kl(q, mid)) / 2).mean())


def _tie_heads(model: nn.Module) -> nn.Module:
    """Every head of every layer gets head 0's slice of W_Q, W_K, W_V."""
    tied = copy.deepcopy(model)
    with torch.no_grad():
        for layer in tied.layers:
            attn = layer.attn
            d = attn.d_head
            for w in (attn.W_Q.weight, attn.W_K.weight, attn.W_V.weight):
                for h in range(1, attn.n_heads):
                    w[h * d : (h + 1) * d] = w[:d]
    return tied


def heads(model: nn.Module, ids: Tensor) -> dict:
    model.eval()
    with torch.no_grad():
        _, maps = model.encode(ids)
    d_head = model.layers[0].attn.d_head
    tol = reorder_norm_bound(maps[0].dtype, d_head)
    out = []
    for layer, m in enumerate(maps):  # m: [B, H, T, T]
        per_head = m.transpose(0, 1)  # [H, B, T, T]
        pairs = list(itertools.combinations(range(m.shape[1]), 2))
        out.append(
            {
                "layer": layer,
                "heads": m.shape[1],
                "distinct_views": _views(per_head, tol),
                "mean_pairwise_js_divergence": sum(_js(per_head[a], per_head[b]) for a, b in pairs) / len(pairs),
            }
        )
    return {"tolerance": tol, "layers": out}


def filters(conv: nn.Conv2d, images: Tensor) -> dict:
    with torch.no_grad():
        acts = F.conv2d(images, conv.weight, conv.bias, padding=conv.padding)  # [N, C, H, W]
        magnitude = F.conv2d(images.abs(), conv.weight.abs(), conv.bias.abs(), padding=conv.padding)
    n_terms = conv.in_channels * conv.kernel_size[0] * conv.kernel_size[1] + 1
    tol = 2 * gamma_for(acts.dtype, n_terms) * float(magnitude.max())
    per_filter = acts.transpose(0, 1).flatten(1)  # [C, N*H*W]
    unit = F.normalize(per_filter.double(), dim=1)
    cos = (unit @ unit.T).abs()
    c = per_filter.shape[0]
    off = cos[~torch.eye(c, dtype=torch.bool)]
    return {
        "filters": c,
        "tolerance": tol,
        "distinct_views": _views(per_filter, tol),
        "mean_pairwise_1_minus_abs_cosine": float((1 - off).mean()),
    }


def _tie_filters(conv: nn.Conv2d) -> nn.Conv2d:
    tied = copy.deepcopy(conv)
    with torch.no_grad():
        tied.weight[:] = tied.weight[:1]
        tied.bias[:] = tied.bias[:1]
    return tied


def run(out_dir: Path, seed: int = 0) -> Finding:
    tr = trained(TRANSFORMER, seed)
    cnn = trained(CNN, seed)
    ids, _ = grammar(tr.info)
    conv = cnn.model.features[0]
    images = cnn.table.inputs["image"][:IMAGES]
    h, f = heads(tr.model, ids), filters(conv, images)
    h_ctrl, f_ctrl = heads(_tie_heads(tr.model), ids), filters(_tie_filters(conv), images)

    def several(hd: dict, fd: dict) -> bool:
        return all(x["distinct_views"] == x["heads"] for x in hd["layers"]) and fd["distinct_views"] == fd["filters"]

    numbers = {"heads": h, "filters": f, "control_heads": h_ctrl, "control_filters": f_ctrl}
    figure = _figure(out_dir, tr.model, tr.info, conv, images[0])
    js = ", ".join(f"{x['mean_pairwise_js_divergence']:.3f}" for x in h["layers"])
    headline = (
        f"heads: {[x['distinct_views'] for x in h['layers']]} distinct views per layer (JS {js} nats); filters: "
        f"{f['distinct_views']}/{f['filters']} distinct; tied copies: "
        f"{[x['distinct_views'] for x in h_ctrl['layers']]} and {f_ctrl['distinct_views']}"
    )
    return Finding(
        NAME,
        QUESTION,
        CLAIM,
        verdict(several(h, f)),
        [Control("copied heads", CONTROL, verdict(several(h_ctrl, f_ctrl)))],
        numbers,
        figure,
        headline,
    )


def _figure(out_dir: Path, model: nn.Module, info: object, conv: nn.Conv2d, image: Tensor) -> str:
    plt = pyplot()
    sentence = "cat eat mouse"
    with torch.no_grad():
        _, maps = model.encode(sentence_ids(sentence, info))
        acts = F.conv2d(image[None], conv.weight, conv.bias, padding=conv.padding)[0]
    n_layers, n_heads = len(maps), maps[0].shape[1]
    cols = max(n_layers * n_heads, conv.out_channels)
    fig, ax = plt.subplots(3, cols, figsize=(1.6 * cols, 5.4))
    words = sentence.split()
    for layer, m in enumerate(maps):
        for hd in range(n_heads):
            a = ax[0, layer * n_heads + hd]
            a.imshow(m[0, hd], cmap="viridis", vmin=0, vmax=1)
            a.set_title(f"L{layer} head {hd}", fontsize=8)
            a.set_xticks(range(len(words)), words, fontsize=6)
            a.set_yticks(range(len(words)), words, fontsize=6)
    for i in range(conv.out_channels):
        ax[1, i].imshow(conv.weight[i, 0].detach(), cmap="RdBu")
        ax[1, i].set_title(f"filter {i}", fontsize=8)
        ax[2, i].imshow(acts[i], cmap="magma")
        ax[2, i].set_title(f"response {i}", fontsize=8)
    for a in ax.flat:
        if not a.images:
            a.axis("off")
        elif a not in ax[0]:
            a.set_xticks([])
            a.set_yticks([])
    fig.suptitle(f'attention per head on "{sentence}"; conv filters and their responses to one image', fontsize=9)
    return save(fig, out_dir, NAME)
