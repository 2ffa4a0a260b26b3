"""Figures and report.md of `distshare equivalence`, rendered from its result (the JSON).

The heatmap puts the grid on one page: world size down, accumulation steps across, the
largest ULP distance of any parameter at any step in each cell (log colour), with the
gradient's observed/bound ratio beneath. The loss figure shows the curves (which overlap)
and, beside them, how far each partition's loss is from the reference's.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from distshare.report import markdown_table


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_heatmap(path: Path, partitions: list[dict[str, Any]]) -> Path:
    """W x k -> worst normwise parameter difference in units of u (log colour), one panel per dtype.

    In units of the unit roundoff u, float32 and float64 read on one scale. Max ULP is written
    in each cell too, but it is dominated by parameters near zero (a tiny absolute change is
    many ULPs there), so it is not what the colour shows.
    """
    plt = _pyplot()
    from matplotlib.colors import LogNorm

    dtypes = list(dict.fromkeys(p["dtype"] for p in partitions))
    ws = sorted({p["world_size"] for p in partitions})
    ks = sorted({p["accum_steps"] for p in partitions})
    fig, axes = plt.subplots(
        1, len(dtypes), figsize=(1.5 + 1.5 * len(ks) * len(dtypes), 1.2 + 0.9 * len(ws)), dpi=100, squeeze=False
    )
    for ax, dtype in zip(axes[0], dtypes, strict=True):
        cells = {(p["world_size"], p["accum_steps"]): p for p in partitions if p["dtype"] == dtype}
        u = next(iter(cells.values()))["unit_roundoff"]
        grid = [[max(0.1, cells[(w, k)]["norm_rel_diff"] / u) if (w, k) in cells else math.nan for k in ks] for w in ws]
        top = max((v for row in grid for v in row if not math.isnan(v)), default=1)
        im = ax.imshow(grid, cmap="viridis", norm=LogNorm(vmin=0.1, vmax=max(top, 10)), aspect="auto")
        for i, w in enumerate(ws):
            for j, k in enumerate(ks):
                p = cells.get((w, k))
                if p is None:
                    continue
                if p["bitwise_equal"]:
                    text = "bitwise"
                else:
                    text = f"{p['norm_rel_diff'] / u:.2g} u\n{p['max_ulp']} ULP\ngrad {p['grad_excess']:.2g}x bound"
                if not p["within_rounding"]:
                    text += "\nFAIL"
                ax.text(j, i, text, ha="center", va="center", fontsize=7, color="w")
        ax.set_xticks(range(len(ks)), [str(k) for k in ks])
        ax.set_yticks(range(len(ws)), [str(w) for w in ws])
        ax.set_xlabel("accumulation steps k")
        ax.set_ylabel("world size W")
        ax.set_title(f"{dtype}: params ||a-b||/||b|| in u = {u:.1e}, worst step", fontsize=9)
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_loss_curves(path: Path, partitions: list[dict[str, Any]], reference: dict[str, list[float]]) -> Path:
    """Left: loss curves (reference bold). Right: |loss - reference loss| per step, log scale,
    one colour per precision (the partitions of one precision bunch together)."""
    plt = _pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6), dpi=100)
    colours = {d: f"C{i}" for i, d in enumerate(reference)}
    for dtype, ys in reference.items():
        left.plot(range(len(ys)), ys, color=colours[dtype], linewidth=3, alpha=0.4, label=f"{dtype} W=1 k=1")
    drawn: set[str] = set()
    for p in partitions:
        c = colours.get(p["dtype"], "k")
        left.plot(range(len(p["losses"])), p["losses"], color=c, linewidth=0.6)
        diffs = [s["loss_diff"] if s["loss_diff"] else math.nan for s in p["steps"]]
        if any(not math.isnan(d) for d in diffs):
            label = None if p["dtype"] in drawn else f"{p['dtype']}, every W x k"
            drawn.add(p["dtype"])
            right.plot(range(len(diffs)), diffs, color=c, marker=".", linewidth=0.6, alpha=0.7, label=label)
    left.set_xlabel("step")
    left.set_ylabel("global mean loss")
    left.set_title("every partition (they overlap); bold: the reference", fontsize=9)
    left.legend(fontsize=7)
    right.set_xlabel("step")
    right.set_ylabel("|loss - reference loss|")
    right.set_title("distance from the reference (bitwise-equal points not drawn)", fontsize=9)
    if drawn:
        right.set_yscale("log")
        right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _num(value: Any, spec: str) -> str:
    """A number formatted; a non-finite one arrives as a string from the JSON ("inf")."""
    return value if isinstance(value, str) else format(value, spec)


def table_rows(partitions: list[dict[str, Any]]) -> list[tuple[str, str, str]]:
    """The terminal table: one row per partition."""
    rows = []
    for p in partitions:
        name = f"{p['dtype']} W={p['world_size']} k={p['accum_steps']} b={p['micro_batch']}"
        if p["bitwise_equal"]:
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
