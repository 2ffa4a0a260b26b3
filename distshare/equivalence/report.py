"""Figures and report.md of `distshare equivalence`, rendered from its result (the JSON).

The heatmap puts the grid on one page: world size down, accumulation steps across, one
panel per precision, stacked (the figure is as wide as the k columns, for a README's 800 px).
A cell's colour is the partition's worst normwise parameter difference from one big batch in
units of u (log scale, one colour bar for every panel); its text is the verdict's own numbers
(that difference, the largest ULP distance, the gradient's observed/bound ratio) and the
verdict, black or white by contrast with the cell. A bitwise-equal cell is grey and says
"bitwise", a non-finite one is red and says "NON-FINITE", a failed one has a red frame and says
why. The title counts the splits that pass, and says FAILED when one does not.

The loss figure shows the curves (which overlap) and, below them, how far each
partition's loss is from the reference's, with a row for "0" (equal) and one for "NaN/inf"
so that no point disappears from the log axis. The loss is a float64 sum over ranks and
micro-batches in an order of its own, so it can differ in its last bits where the
parameters do not; the figure says so where it happens.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

from distshare.report import MAX_WIDTH_IN, markdown_table, pyplot, save_figure

BITWISE_COLOUR = "#d9d9d9"  # neutral grey: no difference at all, not a small one
NONFINITE_COLOUR = "#b2182b"  # red: a NaN or infinity, a failure whatever else holds
EQUAL_PARAMS_COLOUR = "#ffffff"  # parameters equal (0 u) but not bitwise overall (gradient, buffers)
FAIL_EDGE = "#e31a1c"
CMAP = "viridis"


def _pyplot() -> Any:
    return pyplot()


def _float(value: Any) -> float:
    """A number of the result; the written JSON carries non-finite ones as strings ("nan", "inf")."""
    return math.nan if value is None else float(value)


def _g(value: float, spec: str = ".2g") -> str:
    """`format`, with NaN and infinities spelled as the JSON spells them, and 10..99999 unrounded."""
    if not math.isfinite(value):
        return str(value)
    return f"{value:.0f}" if 10 <= abs(value) < 1e5 else format(value, spec)


def _times(value: float) -> str:
    """A ratio: "0.034x", "inf x"."""
    return f"{_g(value)}x" if math.isfinite(value) else f"{value} x"


def cell_value(p: dict[str, Any]) -> float:
    """What a heatmap cell's colour shows: the worst-step normwise parameter difference, in u."""
    return _float(p["norm_rel_diff"]) / _float(p["unit_roundoff"])


def is_nonfinite(p: dict[str, Any]) -> bool:
    """A NaN or infinity in the partition's run, its parameter difference, or a NaN gradient ratio.

    An infinite gradient ratio alone is not one: it is a difference where the bound is exactly
    zero (an element that must agree exactly, does not), a failure of its own.
    """
    return (
        bool(p.get("nonfinite"))
        or not math.isfinite(_float(p["norm_rel_diff"]))
        or math.isnan(_float(p["grad_excess"]))
    )


def failure_reasons(p: dict[str, Any], sync: str | None = None) -> list[str]:
    """Why the verdict of a partition is FAIL, in a few words each; [] when it passes.

    The conditions of `distshare.equivalence.grid.compare` (and, with `sync="exact"`, the
    command's: exact mode promises bits), read from the partition's own fields.
    """
    reasons = []
    if is_nonfinite(p):
        reasons.append("non-finite")
    if sync == "exact" and not (p["bitwise_equal"] and p.get("grad_bitwise_equal", p["bitwise_equal"])):
        reasons.append("not bitwise (exact)")
    if _float(p["grad_excess"]) > 1:  # infinite where the bound is exactly 0 and the element differs
        reasons.append("grad over bound")
    envelope = _float(p.get("envelope_excess", 0.0))
    if not envelope <= 1:
        reasons.append(f"params {_times(envelope)} envelope")
    if not p.get("accounting_ok", True):
        reasons.append("accounting")
    if not p.get("state_ints_equal", True):
        reasons.append("int buffers differ")
    if not p["within_rounding"] and not reasons:
        reasons.append("see report.md")
    return reasons


def passes(p: dict[str, Any], sync: str | None = None) -> bool:
    """The partition's verdict (`within_rounding`; in exact mode also bitwise), NaN failing."""
    return bool(p["within_rounding"]) and not failure_reasons(p, sync)


def cell_text(p: dict[str, Any], sync: str | None = None) -> str:
    """The text of a partition's heatmap cell: the numbers of its verdict, then the verdict.

    "bitwise" for a bitwise-equal partition; "NON-FINITE" first for a NaN or infinity; else
    the worst-step normwise parameter difference in u (the colour), the largest ULP distance
    of any parameter and the gradient's observed/bound ratio (<= 1 is rounding). The last
    line is "ok" or "FAIL" with the reasons.
    """
    if p["bitwise_equal"] and not is_nonfinite(p):
        lines = ["bitwise"]
    else:
        lines = ["NON-FINITE"] if is_nonfinite(p) else []
        lines += [
            f"{_g(cell_value(p))} u",
            f"{p['max_ulp']} ULP",
            f"grad {_times(_float(p['grad_excess']))} bound",
        ]
    reasons = failure_reasons(p, sync)
    others = [r for r in reasons if r != "non-finite"]  # "NON-FINITE" already heads the cell
    if not reasons:
        lines.append("ok")
    else:
        lines.append("FAIL" + (": " + "\n".join(others) if others else ""))
    return "\n".join(lines)


def _luminance(rgba: tuple[float, ...]) -> float:
    """Relative luminance (WCAG 2): what decides whether black or white text reads on a colour."""

    def linear(c: float) -> float:
        return c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4

    r, g, b = (linear(c) for c in rgba[:3])
    return 0.2126 * r + 0.7152 * g + 0.0722 * b


def text_colour(rgba: tuple[float, ...]) -> str:
    """Black or white, whichever contrasts more with the cell's colour (WCAG contrast ratio)."""
    lum = _luminance(rgba)
    return "black" if (lum + 0.05) / 0.05 >= 1.05 / (lum + 0.05) else "white"


def heatmap_title(partitions: list[dict[str, Any]], sync: str | None = None) -> str:
    """The heatmap's finding, from the verdicts: how many splits pass, how many are bitwise, the worst."""
    n_ok = sum(passes(p, sync) for p in partitions)
    n_bit = sum(bool(p["bitwise_equal"]) for p in partitions)
    finite = [v for p in partitions if math.isfinite(v := cell_value(p))]
    worst = f"; worst parameter difference {_g(max(finite))} u" if finite and max(finite) > 0 else ""
    if n_ok == len(partitions):
        head = f"All {len(partitions)} splits W x k train like one big batch"
    else:
        head = f"FAILED: {len(partitions) - n_ok} of {len(partitions)} splits do not train like one big batch"
    return f"{head}\n{n_ok}/{len(partitions)} ok, {n_bit} bitwise equal{worst}"


def heatmap_figure(partitions: list[dict[str, Any]], sync: str | None = None) -> Any:
    """The heatmap as a matplotlib Figure (what `plot_heatmap` saves); see the module docstring."""
    plt = _pyplot()
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import LogNorm, to_rgba
    from matplotlib.patches import Patch, Rectangle

    dtypes = list(dict.fromkeys(p["dtype"] for p in partitions))
    ws = sorted({p["world_size"] for p in partitions})
    ks = sorted({p["accum_steps"] for p in partitions})
    # One colour scale for every panel: in units of u, float32 and float64 read alike.
    shown = [
        v
        for p in partitions
        if not p["bitwise_equal"] and not is_nonfinite(p) and math.isfinite(v := cell_value(p)) and v > 0
    ]
    norm = LogNorm(vmin=min([0.1, *shown]), vmax=max([10.0, *shown]))
    cmap = plt.get_cmap(CMAP)
    # One panel per precision, stacked: the figure is as wide as the k columns (readable at a
    # README's 800 px), and as tall as it needs.
    width = min(MAX_WIDTH_IN, 2.6 + 1.75 * len(ks))
    fig, axes = plt.subplots(
        len(dtypes),
        1,
        figsize=(width, 2.2 + (0.6 + 1.05 * len(ws)) * len(dtypes)),
        squeeze=False,
        layout="constrained",
    )
    kinds: set[str] = set()
    for ax, dtype in zip(axes[:, 0], dtypes, strict=True):
        cells = {(p["world_size"], p["accum_steps"]): p for p in partitions if p["dtype"] == dtype}
        u = _float(next(iter(cells.values()))["unit_roundoff"])
        image = [[(1.0, 1.0, 1.0, 0.0)] * len(ks) for _ in ws]  # transparent: not in the grid
        for i, w in enumerate(ws):
            for j, k in enumerate(ks):
                p = cells.get((w, k))
                if p is None:
                    ax.text(j, i, "not run", ha="center", va="center", fontsize=9, color="0.35")
                    continue
                if is_nonfinite(p):
                    colour, kind = to_rgba(NONFINITE_COLOUR), "nonfinite"
                elif p["bitwise_equal"]:
                    colour, kind = to_rgba(BITWISE_COLOUR), "bitwise"
                elif cell_value(p) == 0:
                    colour, kind = to_rgba(EQUAL_PARAMS_COLOUR), "equal"
                else:
                    colour, kind = cmap(norm(cell_value(p))), "diff"
                kinds.add(kind)
                image[i][j] = colour
                ok = passes(p, sync)
                if not ok:
                    kinds.add("fail")
                    ax.add_patch(Rectangle((j - 0.47, i - 0.47), 0.94, 0.94, fill=False, ec=FAIL_EDGE, lw=2.5))
                text = cell_text(p, sync)
                if (w, k) == (1, 1) and p["bitwise_equal"]:
                    text = text.replace("bitwise", "bitwise\n(the reference's\nown split)", 1)
                ax.text(
                    j,
                    i,
                    text,
                    ha="center",
                    va="center",
                    fontsize=9,
                    color=text_colour(colour),
                    fontweight="normal" if ok else "bold",
                )
        ax.imshow(image, aspect="auto")
        # White lines between cells, so that a run of equal (grey) cells still reads as a grid.
        ax.set_xticks([j + 0.5 for j in range(len(ks) - 1)], minor=True)
        ax.set_yticks([i + 0.5 for i in range(len(ws) - 1)], minor=True)
        ax.grid(which="minor", color="white", linewidth=2)
        ax.tick_params(which="minor", length=0)
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_yticks(range(len(ws)), [str(w) for w in ws])
        ax.set_xlabel("accumulation steps k (micro-batches per rank)")
        ax.set_ylabel("world size W (ranks)")
        n_ok = sum(passes(p, sync) for p in cells.values())
        n_bit = sum(bool(p["bitwise_equal"]) for p in cells.values())
        ax.set_title(f"{dtype} (u = {u:.1e}): {n_ok}/{len(cells)} ok, {n_bit} bitwise")
    if "diff" in kinds:  # a colour bar only where some cell has a colour from it
        bar = fig.colorbar(ScalarMappable(norm=norm, cmap=cmap), ax=list(axes[:, 0]), shrink=0.85, pad=0.02)
        bar.set_label("params ||a - b|| / ||b||, worst step, in units of u (log)")
    legend = {
        "bitwise": Patch(fc=BITWISE_COLOUR, ec="0.6", label="bitwise equal (params, gradients, buffers)"),
        "equal": Patch(fc=EQUAL_PARAMS_COLOUR, ec="0.6", label="params equal, gradient or buffers not"),
        "nonfinite": Patch(fc=NONFINITE_COLOUR, label="NaN or infinity: FAIL"),
        "fail": Patch(fill=False, ec=FAIL_EDGE, lw=2.5, label="verdict FAIL"),
    }
    handles = [patch for kind, patch in legend.items() if kind in kinds]
    bound = (
        "exact mode: every cell must be bitwise" if sync == "exact" else "a gradient within 1x its bound is rounding"
    )
    caption = (
        "Each partition against one process on the whole batch (W=1, k=1). A cell: parameter difference in u "
        "(its colour), largest ULP distance of any parameter, gradient difference / its rounding bound, "
        f"verdict; {bound}."
    )
    # The caption is the legend's title: the layout engine places both below the panels.
    fig.legend(
        handles=handles,
        loc="outside lower center",
        ncol=max(1, min(2, len(handles))),
        frameon=False,
        title=textwrap.fill(caption, int(width * 13)),
    )
    fig.suptitle(heatmap_title(partitions, sync))
    return fig


def plot_heatmap(path: Path, partitions: list[dict[str, Any]], sync: str | None = None) -> Path:
    """W x k -> worst normwise parameter difference in units of u (log colour), one panel per dtype.

    In units of the unit roundoff u, float32 and float64 read on one scale. Max ULP is written
    in each cell too, but it is dominated by parameters near zero (a tiny absolute change is
    many ULPs there), so it is not what the colour shows. `sync="exact"` judges as exact mode
    does: a cell that is not bitwise fails.
    """
    return save_figure(heatmap_figure(partitions, sync), path)


def _which(partitions: list[dict[str, Any]], named: list[dict[str, Any]]) -> str:
    """The named partitions, compact: "float64 W=2 (every k), W=4 k=1,2"."""
    groups = []
    for dtype in dict.fromkeys(p["dtype"] for p in named):
        parts = []
        for w in sorted({p["world_size"] for p in named if p["dtype"] == dtype}):
            ks = sorted(p["accum_steps"] for p in named if p["dtype"] == dtype and p["world_size"] == w)
            every = sorted(p["accum_steps"] for p in partitions if p["dtype"] == dtype and p["world_size"] == w)
            parts.append(f"W={w} (every k)" if ks == every and len(ks) > 1 else f"W={w} k={','.join(map(str, ks))}")
        groups.append(f"{dtype} " + ", ".join(parts))
    return "; ".join(groups)


def loss_note(partitions: list[dict[str, Any]], reference: dict[str, list[float]]) -> str:
    """Why a partition whose parameters are bitwise equal still has a loss difference ("" if none has).

    The loss of a step is the ranks' summed losses added up (an all-reduce of float64 sums)
    and divided by the global count; the reference adds the same per-sample losses as one
    sum. Another order of float64 additions rounds differently in the last bits, while the
    gradient (what training uses) is bitwise equal. The note names those partitions and
    gives the largest such difference, also in ULPs of the reference loss.
    """
    worst_abs, worst_ulp, named = 0.0, 0.0, []
    for p in partitions:
        if not p["bitwise_equal"]:
            continue
        ref = reference.get(p["dtype"], [])
        diffs = [(s.get("step", i), _float(s["loss_diff"])) for i, s in enumerate(p["steps"])]
        nonzero = [(s, d) for s, d in diffs if math.isfinite(d) and d > 0]
        if not nonzero:
            continue
        named.append(p)
        for s, d in nonzero:
            worst_abs = max(worst_abs, d)
            if s < len(ref) and math.isfinite(_float(ref[s])) and ref[s] != 0:
                worst_ulp = max(worst_ulp, d / math.ulp(_float(ref[s])))
    if not named:
        return ""
    ulps = f" = {worst_ulp:.0f} ULP of the float64 loss" if worst_ulp else ""
    return (
        f"Parameters and gradients bitwise equal to the reference at every step, loss not (dashed, hollow): "
        f"{_which(partitions, named)}; up to {worst_abs:.2g}{ulps}. That is not a parameter difference: the "
        "loss is the ranks' loss sums added up in float64 (an all-reduce), in another order than the "
        "reference's one sum over the whole batch, and float64 addition in another order rounds differently."
    )


def loss_title(series: list[tuple[dict[str, Any], list[float]]], sync: str | None = None) -> str:
    """The loss figure's finding, from the differences: NaN/inf, the largest, or none at all."""
    mode = f" (sync={sync})" if sync else ""
    bad = [p for p, diffs in series if any(not math.isfinite(d) for d in diffs)]
    finite = [d for _, diffs in series for d in diffs if math.isfinite(d)]
    if bad:
        return f"FAILED: the loss of {len(bad)} of {len(series)} splits is NaN or infinite{mode}"
    if not finite or max(finite) == 0:
        return f"The loss of all {len(series)} splits equals one big batch's, bit for bit{mode}"
    return f"The loss of {len(series)} splits stays within {max(finite):.2g} of one big batch's{mode}"


def loss_figure(partitions: list[dict[str, Any]], reference: dict[str, list[float]], sync: str | None = None) -> Any:
    """The loss figure as a matplotlib Figure (what `plot_loss_curves` saves)."""
    plt = _pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, (left, right) = plt.subplots(2, 1, figsize=(8, 8.2), height_ratios=(1, 2))
    colours = {d: f"C{i}" for i, d in enumerate(reference)}
    for p in partitions:
        colours.setdefault(p["dtype"], f"C{len(colours)}")
    for dtype, ys in reference.items():
        left.plot(
            range(len(ys)), [_float(y) for y in ys], color=colours[dtype], lw=3, alpha=0.4, label=f"{dtype} W=1 k=1"
        )
    for p in partitions:
        left.plot(range(len(p["losses"])), [_float(y) for y in p["losses"]], color=colours[p["dtype"]], lw=0.6)
    left.set_xlabel("step")
    left.set_ylabel("global mean loss")
    left.set_title("every partition (thin; they overlap); bold: the reference")
    left.legend()

    series = [(p, [_float(s["loss_diff"]) for s in p["steps"]]) for p in partitions]
    values = [d for _, ds in series for d in ds]
    positive = [d for d in values if math.isfinite(d) and d > 0]
    any_zero = any(d == 0 for d in values)
    any_bad = any(not math.isfinite(d) for d in values)
    # A log axis has no 0 and no NaN: both get a row of their own, below and above the data.
    if positive:
        low_decade = math.floor(math.log10(min(positive)))
        high_decade = math.ceil(math.log10(max(positive)))
        zero_y, bad_y = 10.0 ** (low_decade - 1), 10.0 ** (high_decade + 1)
        right.set_yscale("log")
    else:
        low_decade = high_decade = 0
        zero_y, bad_y = 0.0, 1.0
    drawn: set[tuple[str, bool]] = set()
    for p, diffs in series:
        # The line breaks at a NaN/inf (a slope up to that row would mean nothing); an x marks it.
        ys = [zero_y if d == 0 else math.nan if not math.isfinite(d) else d for d in diffs]
        bitwise = bool(p["bitwise_equal"])
        c = colours[p["dtype"]]
        right.plot(
            range(len(ys)),
            ys,
            color=c,
            ls="--" if bitwise else "-",
            lw=0.7,
            alpha=0.7,
            marker="o",
            ms=4,
            mfc="none" if bitwise else c,
        )
        bad = [(i, bad_y) for i, d in enumerate(diffs) if not math.isfinite(d)]
        if bad:
            right.plot(*zip(*bad, strict=True), ls="none", marker="x", ms=9, mew=2, color=NONFINITE_COLOUR)
        drawn.add((p["dtype"], bitwise))
    handles = [
        Line2D(
            [],
            [],
            color=colours[d],
            ls="--" if b else "-",
            marker="o",
            mfc="none" if b else colours[d],
            label=f"{d}, params {'bitwise equal' if b else 'differ'}",
        )
        for d, b in sorted(drawn, key=lambda db: (list(colours).index(db[0]), db[1]))
    ]
    if any_bad:
        handles.append(Line2D([], [], ls="none", marker="x", mew=2, color=NONFINITE_COLOUR, label="NaN or inf: FAIL"))
    if handles:
        right.legend(handles=handles, loc="best")
    if positive:
        step = max(1, (high_decade - low_decade + 1) // 6)
        ticks = [10.0**e for e in range(low_decade, high_decade + 1, step)]
        labels = [f"1e{e}" for e in range(low_decade, high_decade + 1, step)]
        right.minorticks_off()
        low, high = zero_y, 10.0**high_decade
        if any_zero:
            ticks, labels = [zero_y, *ticks], ["0 (equal)", *labels]
            right.axhline(zero_y * 10**0.5, color="0.8", lw=0.8, ls=":")  # where the axis breaks
        if any_bad:
            ticks, labels = [*ticks, bad_y], [*labels, "NaN/inf"]
            high = bad_y
            right.axhline(bad_y / 10**0.5, color="0.8", lw=0.8, ls=":")
        right.set_yticks(ticks, labels)
        right.set_ylim(low / 10**0.4, high * 10**0.4)
    else:
        ticks, labels = [0.0], ["0 (equal)"]
        if any_bad:
            ticks, labels = [0.0, bad_y], ["0 (equal)", "NaN/inf"]
        right.set_yticks(ticks, labels)
        right.set_ylim(-0.3, max(ticks) + 0.3)
    for ax in (left, right):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    right.set_xlabel("step")
    right.set_ylabel("|loss - reference loss|")
    note = loss_note(partitions, reference)
    loss_rounding_only = all(
        p["bitwise_equal"] for p, diffs in series if any(d != 0 and not math.isnan(d) for d in diffs)
    )
    if not positive and not any_bad:
        title = "every partition's loss equals the reference's, bit for bit"
    elif note and loss_rounding_only:
        title = "parameters bitwise equal everywhere: only the loss's own rounding differs"
    else:
        title = "distance from the reference's loss (every point drawn; 0 on its own row)"
    right.set_title(title)
    notes = [
        "The loss of step s is taken at the parameters before update s (step 0: the same initial parameters "
        "everywhere); it is summed over micro-batches and ranks in an order of the partition's own, so it can "
        "differ in its last bits where the parameters do not."
    ]
    if note:
        notes.insert(0, note)
    text = "\n".join(textwrap.fill(n, 100) for n in notes)
    fig.text(0.01, 0.01, text, fontsize=9, color="0.15" if note else "0.35", va="bottom")
    fig.suptitle(loss_title(series, sync))
    lines = text.count("\n") + 1
    fig.tight_layout(rect=(0, (0.25 + 0.17 * lines) / fig.get_figheight(), 1, 1))
    return fig


def plot_loss_curves(
    path: Path, partitions: list[dict[str, Any]], reference: dict[str, list[float]], sync: str | None = None
) -> Path:
    """Left: loss curves (reference bold). Right: |loss - reference loss| per step, log scale,
    one colour per precision (the partitions of one precision bunch together), dashed and
    hollow where the partition's parameters are bitwise equal to the reference's; 0 and
    NaN/inf on rows of their own."""
    return save_figure(loss_figure(partitions, reference, sync), path)


def _num(value: Any, spec: str) -> str:
    """A number formatted; a non-finite one arrives as a string from the JSON ("inf")."""
    return value if isinstance(value, str) else format(value, spec)


def table_rows(partitions: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The terminal table: one row per partition."""
    rows = []
    for p in partitions:
        name = f"{p['dtype']} W={p['world_size']} k={p['accum_steps']} b={p['micro_batch']}"
        if p.get("nonfinite"):
            detail = f"NON-FINITE: {p['nonfinite']}"
        elif p["bitwise_equal"]:
            detail = "bitwise equal at every step"
        else:
            detail = (
                f"params max abs {p['max_abs_diff']:.1e}, norm rel {p['norm_rel_diff']:.1e}, {p['max_ulp']} ULP; "
                f"gradient {p['grad_norm_rel_diff']:.1e} vs bound {p['grad_bound_norm_rel']:.1e} "
                f"({p['grad_excess']:.2g} x elementwise)"
            )
        if not p["accounting_ok"]:
            detail += f"; accounting: {p['accounting']}"
        rows.append((name, "ok" if p["within_rounding"] else "FAIL", detail))
    return rows


def pitfall_rows(pitfalls: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    return [
        (f"pitfall {p['number']}", "caught" if p["detected"] else "MISSED", f"{p['name']}: {p['discrepancy']}")
        for p in pitfalls
    ]


def render(result: dict[str, Any], table: list[tuple[str, str, str]]) -> str:
    """report.md: what was run, the grid per dtype, why it is not bitwise, the pitfalls."""
    g = result
    lines = [
        "# distshare equivalence",
        "",
        f"Every split of a global batch of G={g['global_batch']} into W ranks x k micro-batches x b samples "
        f"trained {g['steps']} steps (same init, same global batches, sync `{result['sync']}`) and was compared "
        "with one process on the whole batch (W=1, k=1, b=G).",
        "",
        "![grid](heatmap.png)",
        "",
        "![loss](loss.png)",
        "",
    ]
    note = loss_note(g["partitions"], g.get("reference_losses", {}))
    if note:
        lines += [note, ""]
    for dtype in dict.fromkeys(p["dtype"] for p in g["partitions"]):
        rows = [
            (
                p["world_size"],
                p["accum_steps"],
                p["micro_batch"],
                "yes" if p["bitwise_equal"] else "no",
                _num(p["max_abs_diff"], ".2e"),
                _num(p["max_rel_diff"], ".2e"),
                _num(p["norm_rel_diff"], ".2e"),
                p["max_ulp"],
                _num(p["grad_norm_rel_diff"], ".2e"),
                _num(p["grad_bound_norm_rel"], ".2e"),
                _num(p["grad_excess"], ".3g"),
                _num(p["envelope_excess"], ".3g"),
                "ok" if p["accounting_ok"] else "FAIL",
                "**ok**" if p["within_rounding"] else "**FAIL**",
            )
            for p in g["partitions"]
            if p["dtype"] == dtype
        ]
        lines += [
            f"## {dtype}",
            "",
            markdown_table(
                rows,
                (
                    "W",
                    "k",
                    "b",
                    "bitwise",
                    "params max abs",
                    "max rel (elementwise)",
                    "norm rel",
                    "max ULP",
                    "grad norm rel",
                    "grad bound (norm rel)",
                    "grad obs/bound (elementwise)",
                    "params obs/envelope",
                    "accounting",
                    "verdict",
                ),
            ),
            "",
        ]
    lines += [
        "## Where the difference comes from",
        "",
        "The same terms summed in a different order. One process sums the gradient of all G samples "
        "(and of every position within them) in one matrix product; W ranks x k micro-batches sum slices, "
        "accumulate them in `.grad`, and all-reduce the ranks. Floating-point addition is not associative, "
        "so the orders can differ in the last bits, by at most 2 gamma(n-1) sum|x_i| (Higham, section 4.2), "
        f"n = {g['n_terms']} terms (G x uses of a weight per sample). sum|x_i| is measured: the sum of every "
        "sample's absolute gradient contribution, one backward per sample. The `grad obs/bound` column is the "
        "largest ratio of observed difference to that bound over every element and step, taken at the same "
        "parameters (the partition's); <= 1 is rounding. It is a model, not a theorem: cancellation between "
        "positions inside a sample is not measured, and n counts every position to make room for it.",
        "",
        "Parameters drift further apart step by step, because a different gradient gives slightly different "
        "weights, which give a different next gradient. `params obs/envelope` compares the observed normwise "
        "parameter difference with an envelope measured the same way: the reference retrained with each "
        "step's gradient pushed by its whole rounding bound (random signs), plus one rounding of every stored "
        "parameter per step. Also heuristic (a random-sign push, not a worst case); <= 1 is rounding. "
        "`max rel` is elementwise (dominated by parameters near zero, as are ULP counts); `norm rel` is "
        "||a - b|| / ||b|| over all parameters, the more meaningful number.",
        "",
    ]
    if any(p["dtype"] == "bf16-autocast" for p in g["partitions"]):
        lines += [
            "bf16-autocast: float32 parameters and gradients, matrix products in bfloat16. Each micro-batch's "
            "weight gradient leaves its matrix product rounded to bfloat16 once before it is accumulated in "
            "float32, so the bound adds 2 u_bf16 sum|x_i| (u_bf16 = 2^-8) to the float32 reordering term. "
            "The observed ratio is closer to 1 here than in float32/float64: the model is tighter, and it is "
            "still a model.",
            "",
        ]
    for dtype, notes in g.get("bound_notes", {}).items():
        lines += [
            f"Note ({dtype}): per-sample gradients unavailable, the bound uses |gradient|: {'; '.join(notes)}.",
            "",
        ]
    if result.get("pitfalls"):
        lines += [
            "## Pitfalls",
            "",
            markdown_table(
                [
                    (
                        p["number"],
                        p["name"],
                        p["discrepancy"],
                        p["detected_by"],
                        "yes" if p["detected"] else "**no**",
                        "yes" if p["distshare_avoids"] else "no",
                    )
                    for p in result["pitfalls"]
                ],
                ("#", "pitfall", "measured", "caught by", "caught", "distshare's step avoids it"),
            ),
            "",
        ]
        for p in result["pitfalls"]:
            lines += [f"### {p['number']}. {p['name']}", "", p["explanation"], "", f"Measured: {p['discrepancy']}.", ""]
    lines += [f"Verdict: **{'OK' if result['ok'] else 'FAILED'}**", ""]
    return "\n".join(lines)
