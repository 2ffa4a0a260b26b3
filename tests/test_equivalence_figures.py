"""The figures of `distshare equivalence` agree with the numbers of its verdict.

Rendered from small hand-built partitions (what result.json holds), without running a grid:
a bitwise cell, cells with a difference, a failed cell and a NaN cell. What each test
guards against is the figure of before this file: a bitwise cell painted in the colour of
0.1 u, an unlabelled colour bar, a NaN cell painted like a small difference (and an infinite
one crashing the log colour scale), and a loss figure that dropped every zero from its log
axis and showed exact mode's last-bit loss differences without saying what they are.
"""

from __future__ import annotations

import math
from typing import Any

import matplotlib
import pytest

matplotlib.use("Agg")

from matplotlib.figure import Figure  # noqa: E402

from distshare.equivalence.report import (  # noqa: E402
    cell_text,
    plot_heatmap,
    plot_loss_curves,
    render,
    table_rows,
)

U64 = 2.0**-53
REF_LOSSES = [1.6372773580620030, 1.5420078829697879, 1.4677263110011750]


def partition(
    w: int,
    k: int,
    *,
    in_u: float = 1.0,
    bitwise: bool = False,
    max_ulp: int = 1000,
    grad_excess: float = 0.05,
    envelope_excess: float = 0.2,
    nonfinite: str = "",
    ok: bool = True,
    loss_diffs: tuple[Any, ...] = (0.0, 1e-16, 2e-16),
) -> dict[str, Any]:
    """One partition as `PartitionResult.to_dict()` writes it (float64, 3 steps, G=32)."""
    norm_rel = 0.0 if bitwise else in_u * U64
    return {
        "world_size": w,
        "accum_steps": k,
        "micro_batch": 32 // (w * k),
        "dtype": "float64",
        "unit_roundoff": U64,
        "bitwise_equal": bitwise,
        "max_abs_diff": 0.0 if bitwise else norm_rel * 10,
        "max_rel_diff": 0.0 if bitwise else norm_rel * 100,
        "norm_rel_diff": norm_rel,
        "max_ulp": 0 if bitwise else max_ulp,
        "grad_bitwise_equal": bitwise,
        "grad_max_abs_diff": 0.0 if bitwise else 1e-16,
        "grad_excess": 0.0 if bitwise else grad_excess,
        "grad_bound_norm_rel": 6e-14,
        "grad_norm_rel_diff": 0.0 if bitwise else 3e-16,
        "envelope_excess": 0.0 if bitwise else envelope_excess,
        "state_ints_equal": True,
        "accounting_ok": True,
        "accounting": "every sample of every global batch used exactly once",
        "nonfinite": nonfinite,
        "within_rounding": ok,
        "losses": [
            r + (d if isinstance(d, float) and math.isfinite(d) else 0.0)
            for r, d in zip(REF_LOSSES, loss_diffs, strict=True)
        ],
        "max_loss_diff": max((d for d in loss_diffs if isinstance(d, float)), default=0.0),
        "steps": [{"step": s, "loss_diff": d} for s, d in enumerate(loss_diffs)],
    }


def nan_partition(w: int, k: int, value: Any = math.nan) -> dict[str, Any]:
    """A partition whose run produced a NaN: the grid reports it (NaN difference, FAIL)."""
    p = partition(w, k, nonfinite="gradient at step 1: 3 non-finite value(s), first fc.weight[0, 2]", ok=False)
    p.update(norm_rel_diff=value, grad_excess=value, max_abs_diff=value)
    p["steps"][1]["loss_diff"] = value
    p["steps"][2]["loss_diff"] = value
    return p


def grid() -> list[dict[str, Any]]:
    """W in 1,2 x k in 1,2: bitwise, 0.1 u (the smallest colour of the old scale), 1.5 u, NaN."""
    return [
        partition(1, 1, bitwise=True, loss_diffs=(0.0, 0.0, 0.0)),
        partition(1, 2, in_u=0.1, max_ulp=12, grad_excess=0.03),
        partition(2, 1, in_u=1.5, max_ulp=276708, grad_excess=0.034),
        nan_partition(2, 2),
    ]


@pytest.fixture
def figures(monkeypatch) -> list[Figure]:
    """Every figure the report saves, kept for inspection (the files are still written)."""
    saved: list[Figure] = []
    savefig = Figure.savefig

    def keep(self: Figure, *args: Any, **kwargs: Any) -> None:
        saved.append(self)
        savefig(self, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return saved


def _cell_texts(fig: Figure) -> list[str]:
    return [t.get_text() for ax in fig.axes for t in ax.texts]


def _cell_colour(fig: Figure, row: int, col: int) -> tuple[float, ...]:
    """The RGBA colour of a heatmap cell, as painted."""
    image = fig.axes[0].images[0]
    return tuple(round(float(c), 3) for c in image.to_rgba(image.get_array())[row][col])


# ---------------------------------------------------------------------------------------
# The cell text: the verdict's numbers, and the words that matter.


def test_a_bitwise_cell_says_bitwise_and_ok():
    # Before: no cell_text (the text was built inline, and a NaN cell read "nan u ... FAIL").
    assert cell_text(partition(1, 2, bitwise=True)) == "bitwise\nok"


def test_a_cell_prints_the_numbers_of_its_verdict():
    p = partition(2, 1, in_u=1.5, max_ulp=276708, grad_excess=0.034)
    assert cell_text(p).split("\n") == ["1.5 u", "276708 ULP", "grad 0.034x bound", "ok"]


@pytest.mark.parametrize("value", [math.nan, math.inf, "nan", "inf"])
def test_a_non_finite_cell_says_non_finite_and_fail(value):
    # The result.json strings ("nan", "inf") read as well as floats.
    text = cell_text(nan_partition(2, 2, value))
    lines = text.split("\n")
    assert lines[0] == "NON-FINITE" and lines[-1].startswith("FAIL")
    assert f"{float(value)} u" in lines and f"grad {float(value)} x bound" in lines


def test_a_failed_cell_says_why():
    p = partition(4, 8, in_u=30, grad_excess=2.5, envelope_excess=3.0, ok=False)
    assert cell_text(p).split("\n") == [
        "30 u",
        "1000 ULP",
        "grad 2.5x bound",
        "FAIL: grad over bound",
        "params 3x envelope",
    ]


def test_exact_mode_fails_a_cell_that_is_only_within_rounding():
    p = partition(2, 2, in_u=0.5)
    assert cell_text(p).endswith("ok")
    assert cell_text(p, sync="exact").endswith("FAIL: not bitwise (exact)")


# ---------------------------------------------------------------------------------------
# The heatmap as rendered.


def test_the_heatmap_renders_bitwise_small_and_nan_cells(tmp_path, figures):
    # Before: an infinite difference made LogNorm raise "Invalid vmin or vmax", a "nan"
    # string from result.json a TypeError.
    for name, cells in (("nan", grid()), ("inf", [*grid()[:3], nan_partition(2, 2, math.inf)])):
        path = plot_heatmap(tmp_path / f"{name}.png", cells)
        assert path.stat().st_size > 10_000
    plot_heatmap(tmp_path / "strings.png", [*grid()[:3], nan_partition(2, 2, "nan")])
    assert (tmp_path / "strings.png").stat().st_size > 10_000


def test_a_bitwise_cell_is_not_painted_like_a_small_difference(tmp_path, figures):
    # Before: both were clamped to 0.1 u and painted the same dark colour.
    plot_heatmap(tmp_path / "heatmap.png", grid())
    fig = figures[-1]
    bitwise, small, nan = _cell_colour(fig, 0, 0), _cell_colour(fig, 0, 1), _cell_colour(fig, 1, 1)
    assert len({bitwise, small, nan}) == 3
    texts = _cell_texts(fig)
    assert any(t.startswith("bitwise") for t in texts)
    assert "0.1 u\n12 ULP\ngrad 0.03x bound\nok" in texts
    assert any(t.startswith("NON-FINITE") and t.endswith("FAIL") for t in texts)


def test_every_colour_bar_says_what_it_shows_and_its_unit(tmp_path, figures):
    # Before: the colour bar had no label.
    plot_heatmap(tmp_path / "heatmap.png", grid())
    labels = [ax.get_ylabel() for ax in figures[-1].axes if ax.get_label() == "<colorbar>"]
    assert labels and all("units of u" in label and "||a - b|| / ||b||" in label for label in labels)


# ---------------------------------------------------------------------------------------
# The loss figure.


def _right(fig: Figure):
    return fig.axes[1]


def test_the_loss_figure_draws_zero_differences_on_a_row_of_their_own(tmp_path, figures):
    # Before: a zero difference became NaN (dropped from the log axis), so the bitwise
    # partition and step 0 of every partition were not drawn at all.
    parts = [partition(1, 1, bitwise=True, loss_diffs=(0.0, 0.0, 0.0)), partition(2, 1)]
    plot_loss_curves(tmp_path / "loss.png", parts, {"float64": REF_LOSSES})
    assert (tmp_path / "loss.png").stat().st_size > 10_000
    right = _right(figures[-1])
    for line in right.get_lines():
        assert all(math.isfinite(y) for y in line.get_ydata()), line
    assert "0 (equal)" in [t.get_text() for t in right.get_yticklabels()]


def test_the_loss_figure_says_why_a_bitwise_partition_has_a_loss_difference(tmp_path, figures):
    # Exact mode: parameters bitwise equal, losses 1-2 ULP apart (2.2e-16, 4.4e-16 at 1.5).
    # Before: drawn as a difference of 3-4e-16 with nothing on the figure to say what it is.
    parts = [
        partition(1, 2, bitwise=True, loss_diffs=(0.0, 0.0, 0.0)),
        partition(2, 1, bitwise=True, loss_diffs=(0.0, 2.220446049250313e-16, 4.440892098500626e-16)),
        partition(2, 2, bitwise=True, loss_diffs=(0.0, 2.220446049250313e-16, 4.440892098500626e-16)),
    ]
    plot_loss_curves(tmp_path / "loss.png", parts, {"float64": REF_LOSSES}, sync="exact")
    words = " ".join(t.get_text() for t in figures[-1].texts).replace("\n", " ")
    assert "bitwise equal" in words and "float64" in words and "not a parameter difference" in words
    assert "float64 W=2 (every k)" in words and "2 ULP" in words


def test_the_loss_figure_marks_a_nan_loss_difference(tmp_path, figures):
    # Before: a NaN difference was silently not drawn (and a "nan" string from result.json
    # was plotted as a category).
    for value in (math.nan, "nan"):
        parts = [partition(1, 2), nan_partition(2, 2, value)]
        plot_loss_curves(tmp_path / "loss.png", parts, {"float64": REF_LOSSES})
        assert (tmp_path / "loss.png").stat().st_size > 10_000
        assert "NaN/inf" in [t.get_text() for t in _right(figures[-1]).get_yticklabels()]


# ---------------------------------------------------------------------------------------
# The text report of the same partitions.


def test_the_table_and_report_say_non_finite(tmp_path):
    # Before: the terminal row printed "params max abs nan, ..." and never said where.
    rows = table_rows(grid())
    assert rows[3][1] == "FAIL" and rows[3][2].startswith("NON-FINITE: gradient at step 1")
    result = {
        "ok": False,
        "global_batch": 32,
        "steps": 3,
        "n_terms": 160,
        "sync": "ddp",
        "partitions": [*grid()[:3], nan_partition(2, 2, "nan")],
    }
    assert "**FAIL**" in render(result, rows)
