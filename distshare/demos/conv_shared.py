"""Claim 2: a conv kernel is shared across positions (the seed's "good old image classification").

Equivariance, measured: shifting the input shifts the feature map. For a conv layer,
conv(shift(x)) and shift(conv(x)) agree in the interior (at least |shift| + k//2 pixels from
every border: there the roll's wrap-around and the zero padding are never read), checked
elementwise against the dot-product error bound 2 gamma_n (|W| * |x| + |b|), n the kernel's
inputs plus the bias: a bound from eps and the actual magnitudes, not a chosen tolerance.
Five shifts, five noisy pattern images, eight output channels.

Control, a fair counterfactual: a locally-connected layer (`unfold`), the same computation
with its own kernel at every position. It fails the same test by orders of magnitude.

The parameter counts (conv vs locally-connected vs dense, same input and output shapes) are
arithmetic, not measurement: they are stated in `by_construction` and drawn beside it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from distshare.data.shapes import PATTERN_NAMES, PATTERN_SIZE, render
from distshare.demos.common import finding_title, pyplot, save, seeded
from distshare.demos.finding import Control, Finding, verdict
from distshare.numerics.rounding import gamma_for

NAME = "conv-shared"
QUESTION = "Just like our good old image classification"  # the seed's Qn 2, verbatim
CLAIM = (
    "The same kernel is applied at every position: shifting the input shifts the conv's feature map, "
    "to within rounding, wherever the shifted pixels are all inside the image."
)
CONTROL = "a locally-connected layer: the same kernel shape, but its own weights at every position"
SIZE = 16  # image side for the equivariance test
CHANNELS = 8  # output channels of the tested layer
KERNEL = 3
SHIFTS = ((1, 0), (0, 1), (2, 3), (-1, 2), (-3, -2))  # (rows, cols), rolled into the image
SHOWN = (2, 3)  # the shift the figure draws
MUTANTS = {
    "off-by-one": "the feature map is shifted one column further than the input (a wrong shift)",
    "one-position": f"position ({SIZE // 2}, {SIZE // 2}) uses a kernel 1.001 times the shared one",
}


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


def equivariance(layer: object, x: Tensor, off_by: int = 0) -> dict[str, Any]:
    """Worst |layer(shift x) - shift(layer x)| over the interior, and its ratio to the bound, per shift.

    Rolling wraps pixels around the image; the region at least |shift| + k//2 pixels from
    every border never sees them (nor the zero padding), so there the exact results agree.
    `off_by` (a mutant) shifts the output one column more than the input.
    """
    f = _as_function(layer)
    g = gamma_for(x.dtype, x.shape[1] * KERNEL * KERNEL + 1)  # the kernel's inputs plus the bias
    by_shift: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        base = f(x)
        for dy, dx in SHIFTS:
            xs = torch.roll(x, (dy, dx), dims=(2, 3))
            a, b = f(xs), torch.roll(base, (dy, dx + off_by), dims=(2, 3))
            # Each computed value is within gamma_n (|W| * |x| + |b|) of the exact one.
            bound = 2 * g * f(xs.abs(), absolute=True)
            inner = interior(dy, dx)
            err = (a - b).abs()[..., inner, inner]
            by_shift[f"{dy},{dx}"] = {
                "interior": f"{inner.start}..{inner.stop - 1}",
                "max_abs_error": float(err.max()),
                "max_error_over_bound": float((err / bound[..., inner, inner]).max()),
            }
    return {
        "max_abs_error": max(v["max_abs_error"] for v in by_shift.values()),
        "max_error_over_bound": max(v["max_error_over_bound"] for v in by_shift.values()),
        "by_shift": by_shift,
    }


def interior(dy: int, dx: int) -> slice:
    """Rows (and columns) at least |shift| + k//2 from every border: what a shift by (dy, dx) is measured on."""
    m = KERNEL // 2 + max(abs(dy), abs(dx))
    return slice(m, SIZE - m)


def _as_function(layer: object) -> Any:
    """The layer as f(x, absolute=False); `absolute` runs it with |W| and |b| (for the bound)."""
    if isinstance(layer, nn.Conv2d):
        return lambda t, absolute=False: _conv(layer, t, absolute)
    return layer


def _perturbed_at_one_position(conv: nn.Conv2d) -> Any:
    """Mutant: the conv, except that position (SIZE/2, SIZE/2) uses a kernel 1.001 times the shared one."""
    mask = torch.zeros(SIZE, SIZE)
    mask[SIZE // 2, SIZE // 2] = 1.0

    def f(t: Tensor, absolute: bool = False) -> Tensor:
        w = conv.weight.abs() if absolute else conv.weight
        extra = F.conv2d(t, 1e-3 * w, padding=conv.padding)  # (1.001 W) x = W x + 1e-3 W x
        return _conv(conv, t, absolute) + mask * extra

    return f


def run(out_dir: Path, seed: int = 0, mutant: str | None = None) -> Finding:
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
    tested = _perturbed_at_one_position(conv) if mutant == "one-position" else conv
    conv_eq = equivariance(tested, x, off_by=1 if mutant == "off-by-one" else 0)
    local_eq = equivariance(local, x)
    holds = conv_eq["max_error_over_bound"] <= 1.0
    numbers = {
        "image": f"{x.shape[0]} x 1 x {SIZE} x {SIZE}",
        "output_channels": CHANNELS,
        "kernel": KERNEL,
        "shifts": [list(s) for s in SHIFTS],
        "params": counts,
        "conv_equivariance": conv_eq,
    }
    control = Control(
        "locally connected", CONTROL, verdict(local_eq["max_error_over_bound"] <= 1.0), {"equivariance": local_eq}
    )
    figure = _figure(out_dir, _as_function(tested), local, x, counts, conv_eq, local_eq, holds)
    headline = (
        f"interior shift error {conv_eq['max_abs_error']:.1e} ({conv_eq['max_error_over_bound']:.2g} of the bound); "
        f"locally connected {local_eq['max_abs_error']:.1e} ({local_eq['max_error_over_bound']:.1e} x bound); "
        f"params conv {counts['conv']} / local {counts['locally_connected']} / dense {counts['dense']}"
    )
    by_construction = (
        f"A Conv2d holds one kernel and bias ({counts['conv']} parameters here) whatever the image size; a "
        f"locally-connected layer holds one per position, {SIZE}x{SIZE} = {SIZE * SIZE} times as many "
        f"({counts['locally_connected']}); a dense layer between the same shapes {counts['dense']}. "
        "Counted, not measured."
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
        by_construction=by_construction,
        mutant=mutant,
    )


def _error_map(f: Any, x: Tensor) -> Tensor:
    """|f(shift x) - shift f(x)| for the shown shift, max over images and channels; NaN outside the interior."""
    dy, dx = SHOWN
    with torch.no_grad():
        err = (f(torch.roll(x, SHOWN, dims=(2, 3))) - torch.roll(f(x), SHOWN, dims=(2, 3))).abs().amax((0, 1))
    shown = torch.full_like(err, float("nan"))
    inner = interior(dy, dx)
    shown[inner, inner] = err[inner, inner]
    return shown


def _figure(
    out_dir: Path,
    conv: Any,
    local: LocallyConnected,
    x: Tensor,
    counts: dict[str, int],
    conv_eq: dict,
    local_eq: dict,
    holds: bool,
) -> str:
    maps = {"conv": _error_map(conv, x), "locally connected": _error_map(local, x)}
    return save(figure_of(x[0, 0], maps, counts, conv_eq, local_eq, holds), out_dir, NAME)


def figure_of(
    image: Tensor, maps: dict[str, Tensor], counts: dict[str, int], conv_eq: dict, local_eq: dict, holds: bool
) -> Any:
    """Top: one input and its shift. Middle: |f(shift x) - shift f(x)| of the conv and of the
    locally connected layer (one colour scale; grey: the border, not measured). Right: parameters."""
    plt = pyplot()
    from matplotlib.patches import Rectangle

    dy, dx = SHOWN
    key = f"{dy},{dx}"
    inner = interior(dy, dx)
    fig, ax = plt.subplot_mosaic(
        [["input", "shifted", "params"], ["conv", "locally connected", "params"]],
        figsize=(10, 8.4),
        width_ratios=(1, 1, 0.9),
        layout="constrained",
    )
    pixels = None
    for name, shown, title in (
        ("input", image, "an input image"),
        ("shifted", torch.roll(image, SHOWN, dims=(0, 1)), f"shifted by {key} (rolled)"),
    ):
        pixels = ax[name].imshow(shown.numpy(), cmap="gray")
        ax[name].set_title(title)
        ax[name].set_xlabel("column")
        ax[name].set_ylabel("row")
    fig.colorbar(pixels, ax=[ax["input"], ax["shifted"]], label="pixel value", shrink=0.9)
    vmax = float(maps["locally connected"].nan_to_num(0).max())
    cmap = plt.get_cmap("magma").with_extremes(bad="lightgrey")
    im = None
    for (title, err), eq in zip(maps.items(), (conv_eq, local_eq), strict=True):
        a = ax[title]
        im = a.imshow(err.numpy(), cmap=cmap, vmin=0, vmax=vmax)
        side = inner.stop - inner.start
        a.add_patch(Rectangle((inner.start - 0.5, inner.start - 0.5), side, side, fill=False, ec="tab:cyan", lw=1.5))
        m = eq["by_shift"][key]
        a.set_title(f"{title}: interior max\n{m['max_abs_error']:.1e} = {m['max_error_over_bound']:.2g} x bound")
        a.set_xlabel("column (grey: border, not measured)")
        a.set_ylabel("row")
    fig.colorbar(im, ax=[ax["conv"], ax["locally connected"]], label="|f(shift x) - shift f(x)|", shrink=0.9)
    bars = ax["params"].bar(list(counts), list(counts.values()), color=["tab:green", "tab:orange", "tab:red"])
    ax["params"].bar_label(bars, [str(v) for v in counts.values()])
    ax["params"].set_xticks(range(len(counts)), [n.replace("_", "\n") for n in counts])
    ax["params"].set(yscale="log", xlabel="layer", ylabel="parameters")
    ax["params"].set_title("parameters, for the same\ninput and output shapes")
    fig.suptitle(
        finding_title(
            "A convolution applies one kernel everywhere: shift the input, the output shifts",
            holds,
            f"conv: worst of {len(SHIFTS)} shifts {conv_eq['max_error_over_bound']:.2g} x the rounding bound; "
            f"locally connected {local_eq['max_error_over_bound']:.1e} x",
        )
    )
    return fig
