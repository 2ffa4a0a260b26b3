"""Claim 2: a conv kernel is shared across positions (the seed's "good old image classification").

- Equivariance: shifting the input shifts the feature map. For a conv layer,
  conv(shift(x)) and shift(conv(x)) agree away from the borders to rounding, checked
  elementwise against the dot-product error bound 2 gamma_n (|W| * |x| + |b|), n the kernel's
  inputs plus the bias: a bound computed from eps and the actual magnitudes, not a chosen
  tolerance.
- Parameter count of the conv layer vs a locally-connected layer (a kernel per position,
  built with `unfold`) vs a dense layer, for the same input and output shapes.
- Pooling: the trained SmallCNN (two stride-2 max poolings) keeps its class prediction when
  the pattern moves by one pixel.

Control: the locally-connected layer, the same computation without sharing: it loses
equivariance by orders of magnitude beyond the bound.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distshare.data.shapes import PATTERN_NAMES, PATTERN_SIZE, render
from distshare.demos.common import CNN, pyplot, save, seeded, trained
from distshare.demos.finding import Control, Finding, verdict
from distshare.numerics.rounding import gamma_for

NAME = "conv-shared"
QUESTION = "Just like our good old image classification"  # the seed's Qn 2, verbatim
CLAIM = (
    "The same kernel is applied at every position: shifting the input shifts the feature map, "
    "with far fewer parameters than a layer that has its own weights per position."
)
CONTROL = "a locally-connected layer: the same kernel shape, but its own weights at every position"
SIZE = 16  # image side for the equivariance test
CHANNELS = 8  # output channels of the tested layer
KERNEL = 3
SHIFTS = ((1, 0), (0, 1), (2, 3), (-1, 2), (-3, -2))  # (rows, cols), rolled into the image


class LocallyConnected(nn.Module):
    """A conv without sharing: position l has its own [C_out, C_in * k * k] kernel and bias."""

    def __init__(self, c_in: int, c_out: int, kernel: int, size: int) -> None:
        super().__init__()
        self.kernel, self.size = kernel, size
        fan_in = c_in * kernel * kernel
        bound = 1 / fan_in**0.5  # nn.Conv2d's default init range, per position
        self.weight = nn.Parameter(torch.empty(size * size, c_out, fan_in).uniform_(-bound, bound))
        self.bias = nn.Parameter(torch.empty(size * size, c_out).uniform_(-bound, bound))

    def forward(self, x: Tensor, absolute: bool = False) -> Tensor:
        w, b = (self.weight.abs(), self.bias.abs()) if absolute else (self.weight, self.bias)
        cols = F.unfold(x, self.kernel, padding=self.kernel // 2)  # [B, C_in*k*k, L]
        out = torch.einsum("bkl,lok->bol", cols, w) + b.T[None]
        return out.reshape(x.shape[0], -1, self.size, self.size)


def _conv(conv: nn.Conv2d, x: Tensor, absolute: bool = False) -> Tensor:
    w, b = (conv.weight.abs(), conv.bias.abs()) if absolute else (conv.weight, conv.bias)
    return F.conv2d(x, w, b, padding=conv.padding)


def equivariance(layer: object, x: Tensor) -> dict[str, float]:
    """Worst |layer(shift x) - shift(layer x)| over the interior, and its ratio to the bound.

    Rolling wraps pixels around the image; the region at least |shift| + k//2 pixels from
    every border never sees them (nor the zero padding), so there the exact results agree.
    """
    n_terms = x.shape[1] * KERNEL * KERNEL + 1
    g = gamma_for(x.dtype, n_terms)
    f = layer if not isinstance(layer, nn.Conv2d) else (lambda t, absolute=False: _conv(layer, t, absolute))
    worst_err, worst_ratio = 0.0, 0.0
    with torch.no_grad():
        base = f(x)
        for dy, dx in SHIFTS:
            xs = torch.roll(x, (dy, dx), dims=(2, 3))
            a, b = f(xs), torch.roll(base, (dy, dx), dims=(2, 3))
            # Each computed value is within gamma_n (|W| * |x| + |b|) of the exact one.
            bound = 2 * g * f(xs.abs(), absolute=True)
            m = KERNEL // 2 + max(abs(dy), abs(dx))
            inner = (slice(None), slice(None), slice(m, SIZE - m), slice(m, SIZE - m))
            err = (a - b).abs()[inner]
            worst_err = max(worst_err, float(err.max()))
            worst_ratio = max(worst_ratio, float((err / bound[inner]).max()))
    return {"max_abs_error": worst_err, "max_error_over_bound": worst_ratio}


def _pooling(seed: int) -> dict[str, float | int]:
    """Trained SmallCNN: does its prediction survive moving the pattern by one pixel?"""
    t = trained(CNN, seed)
    size = t.info.image_shape[1]
    gen = torch.Generator().manual_seed(seed + 1)
    pairs, labels = [], []
    for _ in range(200):
        pattern = int(torch.randint(len(PATTERN_NAMES), (1,), generator=gen))
        r, c = (int(v) for v in torch.randint(1, size - PATTERN_SIZE, (2,), generator=gen))
        dy, dx = ((0, 1), (1, 0), (0, -1), (-1, 0))[int(torch.randint(4, (1,), generator=gen))]
        pairs.append((render(pattern, r, c, size), render(pattern, r + dy, c + dx, size)))
        labels.append(pattern)
    x = torch.from_numpy(np.stack([p[0] for p in pairs]))
    xs = torch.from_numpy(np.stack([p[1] for p in pairs]))
    y = torch.tensor(labels)
    t.model.eval()
    with torch.no_grad():
        pred, pred_s = t.model(x).argmax(1), t.model(xs).argmax(1)
    return {
        "images": len(labels),
        "accuracy": float((pred == y).float().mean()),
        "accuracy_shifted_1px": float((pred_s == y).float().mean()),
        "prediction_unchanged": float((pred == pred_s).float().mean()),
    }


def run(out_dir: Path, seed: int = 0) -> Finding:
    with seeded(seed):
        conv = nn.Conv2d(1, CHANNELS, KERNEL, padding=KERNEL // 2)
        local = LocallyConnected(1, CHANNELS, KERNEL, SIZE)
        dense = nn.Linear(SIZE * SIZE, CHANNELS * SIZE * SIZE)
        gen = torch.Generator().manual_seed(seed)
        corners = torch.randint(0, SIZE - PATTERN_SIZE + 1, (len(PATTERN_NAMES), 2), generator=gen).tolist()
        # One image per pattern, each at a random position.
        x = torch.from_numpy(np.stack([render(p, r, c, SIZE) for p, (r, c) in enumerate(corners)]))
        x = x + 0.05 * torch.randn(x.shape, generator=gen)  # noise: every pixel nonzero, like the data set
    counts = {
        "conv": sum(p.numel() for p in conv.parameters()),
        "locally_connected": sum(p.numel() for p in local.parameters()),
        "dense": sum(p.numel() for p in dense.parameters()),
    }
    conv_eq = equivariance(conv, x)
    local_eq = equivariance(local, x)
    pooling = _pooling(seed)
    fewer = counts["conv"] < counts["locally_connected"] < counts["dense"]
    holds = conv_eq["max_error_over_bound"] <= 1.0 and fewer
    control = local_eq["max_error_over_bound"] <= 1.0
    numbers = {
        "image": f"{x.shape[0]} x 1 x {SIZE} x {SIZE}",
        "output_channels": CHANNELS,
        "kernel": KERNEL,
        "shifts": [list(s) for s in SHIFTS],
        "params": counts,
        "conv_equivariance": conv_eq,
        "control_equivariance": local_eq,
        "pooling": pooling,
    }
    figure = _figure(out_dir, conv, local, x, counts)
    headline = (
        f"shift error {conv_eq['max_abs_error']:.1e} ({conv_eq['max_error_over_bound']:.2f} of bound); params conv "
        f"{counts['conv']} / local {counts['locally_connected']} / dense {counts['dense']}; "
        f"1px shift keeps {pooling['prediction_unchanged']:.0%} of predictions; "
        f"locally-connected error {local_eq['max_error_over_bound']:.1e} x bound"
    )
    return Finding(
        NAME,
        QUESTION,
        CLAIM,
        verdict(holds),
        [Control("locally connected", CONTROL, verdict(control))],
        numbers,
        figure,
        headline,
    )


def _figure(out_dir: Path, conv: nn.Conv2d, local: LocallyConnected, x: Tensor, counts: dict[str, int]) -> str:
    plt = pyplot()
    dy, dx = SHIFTS[2]
    xs = torch.roll(x[:1], (dy, dx), dims=(2, 3))
    with torch.no_grad():
        c_err = (_conv(conv, xs) - torch.roll(_conv(conv, x[:1]), (dy, dx), dims=(2, 3)))[0, 0].abs()
        l_err = (local(xs) - torch.roll(local(x[:1]), (dy, dx), dims=(2, 3)))[0, 0].abs()
    fig, ax = plt.subplots(1, 5, figsize=(15, 3.2))
    ax[0].imshow(x[0, 0], cmap="gray")
    ax[0].set_title("input")
    ax[1].imshow(xs[0, 0], cmap="gray")
    ax[1].set_title(f"input shifted by {dy},{dx}")
    vmax = float(l_err.max())
    for a, err, title in ((ax[2], c_err, "conv"), (ax[3], l_err, "locally connected")):
        im = a.imshow(err, cmap="magma", vmin=0, vmax=vmax)
        a.set_title(f"{title}: |f(shift x) - shift f(x)|\nmax {float(err.max()):.1e}", fontsize=8)
    fig.colorbar(im, ax=ax[3])
    for a in ax[:4]:
        a.axis("off")
    ax[4].bar(list(counts), list(counts.values()), color=["tab:green", "tab:orange", "tab:red"])
    ax[4].set(yscale="log", title="parameters, same input/output")
    ax[4].tick_params(axis="x", labelsize=7)
    return save(fig, out_dir, NAME)
