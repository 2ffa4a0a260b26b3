"""Every figure distshare saves reads at the size a README shows it, and says what was found.

The figures are drawn from small hand-built inputs (the numbers each plot function receives),
without training. What is checked is what can be checked on the matplotlib Figure:

- a title, and one that follows the measured verdict: a failed check makes it say so;
- every axis labelled (a label, or tick labels that are words; an image without ticks is exempt);
- a labelled colour bar for every scalar image (an RGB image names weight sets, it measures nothing);
- no text under `MIN_FONT_PT`, and a figure at most `MAX_WIDTH_IN` wide (a README shows ~800 px);
- whole-number step ticks; a value of exactly 0 drawn, not dropped (a log axis has no 0).

What each test guards against is the figure of before it: 5 to 7 pt text on 11 to 17 inch
figures, `verify`'s loss curves that overlap and prove nothing, steps labelled 0.5, a log axis
with a tick at every minor decade, zero-height bars nobody can see, attention maps without
their numbers, and titles that ask a question instead of stating the answer.
"""

from __future__ import annotations

import math
import re
from typing import Any

import matplotlib
import pytest

matplotlib.use("Agg")

import torch  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.image import AxesImage  # noqa: E402
from matplotlib.text import Text  # noqa: E402

from distshare.demos import (  # noqa: E402
    accumulation,
    context,
    conv_shared,
    fixed_after_training,
    heads_kernels,
    one_weight_set,
    qkv_shared,
)
from distshare.equivalence.report import heatmap_figure, loss_figure, text_colour  # noqa: E402
from distshare.report import MAX_WIDTH_IN, MIN_FONT_PT, ZERO_LABEL, losses_figure, verify_figure  # noqa: E402

# ---------------------------------------------------------------------------------------
# What every figure must satisfy.


def _texts(fig: Figure) -> list[Text]:
    fig.canvas.draw()  # tick labels exist once drawn
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _axtitle(ax: Any) -> str:
    return " ".join(t for loc in ("left", "center", "right") if (t := ax.get_title(loc)))


def _title(fig: Figure) -> str:
    return fig.get_suptitle() or " ".join(_axtitle(ax) for ax in fig.axes)


def _is_colorbar(ax: Any) -> bool:
    return ax.get_label() == "<colorbar>"


def _words(labels: list[Text]) -> bool:
    """Tick labels that name things ("L0 W_Q", "cat"), not numbers: the axis labels itself."""
    return any(re.search(r"[A-Za-z_]{2,}", t.get_text()) for t in labels if t.get_visible())


def _axis_labelled(ax: Any, which: str) -> bool:
    axis = ax.xaxis if which == "x" else ax.yaxis
    ticks = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
    return bool(axis.get_label_text().strip()) or _words(ticks) or not ticks


def _colorbars(fig: Figure) -> list[Any]:
    return [ax._colorbar for ax in fig.get_children() if hasattr(ax, "_colorbar")] + [
        ax._colorbar for sub in fig.subfigs for ax in sub.axes if hasattr(ax, "_colorbar")
    ]


def assert_readable(fig: Figure, finding: str | None = None) -> None:
    """The rules of every figure (see the module docstring); `finding`: a word the title must hold."""
    texts = _texts(fig)
    small = sorted({(t.get_fontsize(), t.get_text()[:30]) for t in texts if t.get_fontsize() < MIN_FONT_PT})
    assert not small, f"text under {MIN_FONT_PT} pt: {small[:5]}"
    assert fig.get_figwidth() <= MAX_WIDTH_IN + 1e-9, f"{fig.get_figwidth()} in wide"
    title = _title(fig)
    assert title.strip(), "no title"
    if finding is not None:
        assert finding in title, (finding, title)
    bars = _colorbars(fig)
    for cb in bars:
        assert (cb.ax.get_ylabel() or cb.ax.get_xlabel()).strip(), "a colour bar without a label"
    for ax in fig.axes:
        if _is_colorbar(ax) or not ax.axison or not ax.has_data():
            continue
        assert _axis_labelled(ax, "x") and _axis_labelled(ax, "y"), f"unlabelled axis: {_axtitle(ax)!r}"
        for im in ax.get_images():
            if isinstance(im, AxesImage) and im.get_array().ndim == 2:  # a scalar image: a colour scale
                cmap, (lo, hi) = im.get_cmap().name, im.get_clim()
                assert any(cb.cmap.name == cmap and (cb.norm.vmin, cb.norm.vmax) == (lo, hi) for cb in bars), (
                    f"no colour bar for the image in {_axtitle(ax)!r}"
                )
        if "step" in ax.get_xlabel() or ax.get_xlabel().endswith("batch"):
            lo, hi = ax.get_xlim()
            ticks = [x for x in ax.get_xticks() if lo <= x <= hi]
            assert all(float(x).is_integer() for x in ticks), f"steps {ticks}"


@pytest.fixture(autouse=True)
def _close():
    yield
    import matplotlib.pyplot as plt

    plt.close("all")


# ---------------------------------------------------------------------------------------
# distshare train and verify (distshare/report.py).


def _steps(n: int = 6, zero_at: tuple[int, ...] = (2,), nan_at: tuple[int, ...] = ()) -> list[dict[str, Any]]:
    """What `PartitionResult.steps` holds per step, float32-sized differences."""
    rows = []
    for s in range(n):
        params = 0.0 if s in zero_at else math.nan if s in nan_at else 1e-8 * (s + 1)
        rows.append(
            {
                "step": s,
                "norm_rel_diff": params,
                "envelope_norm_rel": 4e-5,
                "grad_excess": 0.0 if s in zero_at else 0.03,
                "loss_diff": 0.0 if s in zero_at else 6e-8,
            }
        )
    return rows


LOSSES = {
    "2 ranks": [1.97, 1.87, 1.81, 1.83, 1.84, 1.73],
    "1 process, one big batch": [1.97, 1.87, 1.81, 1.83, 1.84, 1.73],
}


def test_train_loss_figure_has_whole_steps_and_a_title_from_its_numbers():
    # Before: a 3-step run labelled steps 0.5 and 1.5; the title was "distshare train", nothing found.
    fig = losses_figure({"W=2": [1.97, 1.87, 1.81]}, "distshare train")
    assert_readable(fig, finding="1.97 -> 1.81 in 3 steps")


def test_train_loss_figure_names_a_nan_loss():
    fig = losses_figure({"W=2": [1.97, math.nan, math.nan]}, "distshare train")
    assert "loss nan at step 1" in _title(fig)


def test_verify_figure_draws_the_difference_on_a_log_scale_with_zeros_on_their_own_row():
    # Before: two loss curves that overlap completely, and nothing else.
    fig = verify_figure(_steps(), LOSSES, dict.fromkeys(range(6), True), [], 2)
    assert_readable(fig, finding="verify OK")
    assert "6/6 replica checks bit-identical" in _title(fig)
    diff = fig.axes[1]
    assert diff.get_yscale() == "log"
    labels = [t.get_text() for t in diff.get_yticklabels()]
    assert ZERO_LABEL in labels
    zero = diff.get_yticks()[labels.index(ZERO_LABEL)]
    params = next(line for line in diff.get_lines() if "parameters" in line.get_label())
    assert params.get_ydata()[2] == zero  # the bitwise step is drawn, on its row, not dropped
    assert all(math.isfinite(y) and y > 0 for y in params.get_ydata())


def test_verify_figure_marks_every_replica_check_and_says_failed():
    checks = {s: s != 3 for s in range(0, 6, 1)}
    fig = verify_figure(_steps(nan_at=(4,)), LOSSES, checks, ["replicas identical", "equals one big batch"], 2)
    assert_readable(fig, finding="verify FAILED: replicas identical, equals one big batch")
    strip = fig.axes[3]
    marked = {int(x): line.get_label() for line in strip.get_lines() for x in line.get_xdata()}
    assert marked == {
        0: "bit-identical",
        1: "bit-identical",
        2: "bit-identical",
        3: "DIFFER",
        4: "bit-identical",
        5: "bit-identical",
    }
    assert "first difference at step 3" in _axtitle(strip)
    # The NaN step: the line breaks there and an x marks it on the NaN/inf row.
    diff = fig.axes[1]
    assert "NaN/inf" in [t.get_text() for t in diff.get_yticklabels()]
    assert "parameters NaN/inf from step 4" in _title(fig)


def test_verify_figure_when_everything_is_bitwise():
    # Exact mode: every difference is 0; the figure still draws every step (on the 0 row).
    fig = verify_figure(_steps(zero_at=tuple(range(6))), LOSSES, {5: True}, [], 2)
    assert_readable(fig, finding="parameters bitwise equal to one process at every step")
    params = next(line for line in fig.axes[1].get_lines() if "parameters" in line.get_label())
    assert len(params.get_ydata()) == 6 and all(math.isfinite(y) for y in params.get_ydata())


# ---------------------------------------------------------------------------------------
# distshare equivalence (distshare/equivalence/report.py).


def _partition(w: int, k: int, dtype: str, in_u: float, ok: bool = True, bitwise: bool = False) -> dict[str, Any]:
    u = 2.0**-53 if dtype == "float64" else 2.0**-24
    return {
        "world_size": w,
        "accum_steps": k,
        "micro_batch": 32 // (w * k),
        "dtype": dtype,
        "unit_roundoff": u,
        "bitwise_equal": bitwise,
        "norm_rel_diff": 0.0 if bitwise else in_u * u,
        "max_ulp": 0 if bitwise else 30000,
        "grad_bitwise_equal": bitwise,
        "grad_excess": 0.0 if bitwise else (0.03 if ok else 2.0),
        "envelope_excess": 0.1,
        "within_rounding": ok,
        "nonfinite": "",
        "losses": [1.6, 1.5, 1.4],
        "steps": [{"step": s, "loss_diff": 0.0 if bitwise else 1e-7} for s in range(3)],
    }


def _grid(fail: bool = False) -> list[dict[str, Any]]:
    """The default grid's shape: W in 1,2,4 x k in 1,2,4,8, float64 and float32, differences up to 10 u."""
    return [
        _partition(w, k, d, in_u=0.1 * (i + 1), bitwise=(w, k) == (1, 1), ok=not (fail and (w, k) == (4, 8)))
        for d in ("float64", "float32")
        for i, (w, k) in enumerate((w, k) for w in (1, 2, 4) for k in (1, 2, 4, 8))
    ]


def _contrast(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    from distshare.equivalence.report import _luminance

    la, lb = sorted((_luminance(a), _luminance(b)), reverse=True)
    return (la + 0.05) / (lb + 0.05)


def test_the_heatmap_of_the_default_grid_is_readable_at_readme_width():
    # Before: 7-pt cell text on a figure 14.8 in wide (1950 px), shrunk to 800 px in the README.
    fig = heatmap_figure(_grid())
    assert_readable(fig, finding="All 24 splits W x k train like one big batch")


def test_the_heatmap_title_says_failed_when_a_split_fails():
    fig = heatmap_figure(_grid(fail=True))
    assert_readable(fig, finding="FAILED: 2 of 24 splits")


def test_every_heatmap_cell_text_contrasts_with_its_cell():
    # Before: white on yellow-green (a luminance threshold of 0.5 on unlinearised RGB).
    from matplotlib.colors import to_rgba

    fig = heatmap_figure(_grid())
    fig.canvas.draw()
    for ax in fig.axes:
        if _is_colorbar(ax) or not ax.get_images():
            continue
        image = ax.get_images()[0].get_array()
        for t in ax.texts:
            x, y = t.get_position()
            cell = tuple(float(c) for c in image[round(y)][round(x)])
            assert _contrast(to_rgba(t.get_color()), cell) >= 4.5, (t.get_text(), cell, t.get_color())


@pytest.mark.parametrize("rgba", [(0.99, 0.91, 0.14, 1.0), (0.48, 0.82, 0.32, 1.0), (0.27, 0.0, 0.33, 1.0)])
def test_text_colour_is_black_on_yellow_and_white_on_purple(rgba):
    expected = "white" if rgba[0] < 0.3 else "black"
    assert text_colour(rgba) == expected


def test_the_equivalence_loss_figure_is_readable_and_says_what_it_found():
    parts = _grid()
    fig = loss_figure(parts, {"float64": [1.6, 1.5, 1.4], "float32": [1.6, 1.5, 1.4]})
    assert_readable(fig, finding="stays within 1e-07 of one big batch")
    parts[3]["steps"][1]["loss_diff"] = math.nan
    assert "FAILED" in _title(loss_figure(parts, {"float64": [1.6, 1.5, 1.4], "float32": [1.6, 1.5, 1.4]}))


# ---------------------------------------------------------------------------------------
# The demos (distshare/demos/*.py), each from the numbers its run measures.


def _qkv(scale: float) -> dict[str, Any]:
    return {
        "served_by_stored_weight": {"max_error_over_bound": 0.07 * scale, "by_sample": [0.07 * scale] * 8},
        "grad_vs_sum_of_per_sample": {
            "max_error_over_bound": 0.6 * scale,
            "by_matrix": {f"L{layer} {m}": 0.5 * scale for layer in (0, 1) for m in ("W_Q", "W_K", "W_V")},
        },
    }


@pytest.mark.parametrize("holds", [True, False])
def test_qkv_shared_figure(holds):
    # Before: a tick at every decade and every minor one from 1e-2 to 1e6, 7-pt matrix names.
    fig = qkv_shared.figure(_qkv(1), _qkv(3e6), _qkv(4e6), holds)
    assert_readable(fig)
    assert _title(fig).startswith("FAILS") != holds
    for ax in fig.axes:
        fig.canvas.draw()
        lo, hi = ax.get_ylim()
        assert len([y for y in ax.get_yticks() if lo <= y <= hi]) <= 6
        assert not ax.yaxis.get_minorticklocs().size


def _served(changed: int, drift: float) -> dict[str, Any]:
    groups = ["L0 W_Q", "L0 W_K", "L0 W_V", "other"]
    return {
        "changed_elements": dict.fromkeys(groups, changed),
        "elements": dict.fromkeys(groups, 1024),
        "relative_change": [drift * (b + 1) for b in range(10)],
        "relative_change_of": "layers.0.attn.W_Q.weight",
        "params_changed": 0,
        "buffers_changed": 0,
    }


def test_fixed_after_training_draws_its_zero_bars():
    # Before: a bar of height 0 was not drawn at all, and x labels ran into each other on a 15 in figure.
    runs = {how: _served(0, 0.0) for how in fixed_after_training.SERVING}
    bn = {"eval": _served(0, 0.0), "train mode": {**_served(0, 0.0), "buffers_changed": 6}}
    fig = fixed_after_training.figure_of(runs, _served(1024, 0.02), bn, True)
    assert_readable(fig, finding="using the model changes no weight")
    bars = next(ax for ax in fig.axes if "buffers" in ax.get_title())
    zero_bars = [p for p in bars.patches if p.get_height() == 0]
    assert len(zero_bars) == 3
    strokes = [line for line in bars.get_lines() if set(line.get_ydata()) == {0} and line.get_linewidth() >= 3]
    for p in zero_bars:  # each drawn as a visible stroke across the bar's width
        assert any(min(s.get_xdata()) <= p.get_x() + p.get_width() / 2 <= max(s.get_xdata()) for s in strokes)
    assert "FAILS" in _title(fixed_after_training.figure_of(runs, _served(1024, 0.02), bn, False))


def _example(sentence: str, subject: str) -> dict[str, Any]:
    names = ["cat", "mouse", "dog", "bird", "fish", "fox"]
    return {
        "sentence": sentence,
        "verb_answer": {n: 0.9 if n == subject else 0.02 for n in names},
        "verb_attention": [[0.97, 0.02, 0.01], [0.47, 0.18, 0.35]],
    }


def _accuracy(verb: float) -> dict[str, Any]:
    return {
        "verb_readout_accuracy": verb,
        "sentence_accuracy": 1.0,
        "sentences": 46,
        "verb_readout_right": round(46 * verb),
    }


def test_context_figure_shows_its_numbers_and_colour_bar():
    # Before: the attention heatmap printed none of its numbers.
    examples = {
        key: {"sentences": [_example("cat eat fish", "cat"), _example("fish eat cat", "fish")]}
        for key in ("trained", "attention on itself only")
    }
    claim = {**_accuracy(1.0), "trained_on": 0, "pairs": 23}
    fig = context.figure_of(claim, _accuracy(0.2), _accuracy(0.13), _accuracy(0.83), examples, None, True)
    assert_readable(fig, finding="46/46")
    heat = next(ax for ax in fig.axes if ax.get_images() and not _is_colorbar(ax))
    assert sorted(t.get_text() for t in heat.texts) == sorted(["0.97", "0.02", "0.01", "0.47", "0.18", "0.35"] * 2)


def _views(heads: list[int], filters: int) -> dict[str, Any]:
    return {
        "heads": {
            "layers": [
                {"layer": i, "heads": 4, "distinct_views": h, "smallest_pair_js": 0.14, "bar_js": 0.023}
                for i, h in enumerate(heads)
            ]
        },
        "filters": {
            "distinct_views": filters,
            "filters": 8,
            "smallest_pair_max_abs_diff": 0.66,
            "tolerance": 5e-6,
            "mean_peak_response_by_pattern": [[0.5 + 0.1 * i + j for j in range(5)] for i in range(8)],
        },
    }


def test_heads_kernels_figure_labels_rows_and_has_colour_bars():
    # Before: 5-pt word labels at README width, no row labels.
    g = torch.Generator().manual_seed(0)
    attention = [torch.softmax(torch.randn(4, 5, 5, generator=g), -1) for _ in range(2)]
    kernels = torch.randn(8, 3, 3, generator=g)
    words = heads_kernels.SENTENCE.split()
    fig = heads_kernels.figure_of(
        words, attention, kernels, _views([4, 4], 8), _views([2, 1], 8), _views([1, 1], 1), None, True
    )
    assert_readable(fig, finding="distinct heads L0 4/4, L1 4/4, filters 8/8")
    ylabels = [ax.get_ylabel() for ax in fig.axes]
    assert any("layer 0" in y for y in ylabels) and any("layer 1" in y for y in ylabels)
    assert len(_colorbars(fig)) == 3  # attention, kernel weights, filter responses


def test_accumulation_figure_draws_the_bitwise_split_on_the_zero_row():
    row = {"grad_bitwise_equal": False, "grad_norm_rel_diff": 1.3e-7, "within_rounding": True, "grad_excess": 0.02}
    rows = {
        "1 x 1 x 40": {**row, "grad_bitwise_equal": True, "grad_norm_rel_diff": 0.0, "grad_excess": 0.0},
        "2 x 5 x 4": row,
        "control: mean / k\n1 x 5 x 8": {
            **row,
            "grad_norm_rel_diff": 1.8e-2,
            "within_rounding": False,
            "grad_excess": 2789,
        },
    }
    fig = accumulation.figure_of(rows, 4e-5, True)
    assert_readable(fig, finding="within 0.02 x")
    ax = fig.axes[0]
    assert ZERO_LABEL in [t.get_text() for t in ax.get_yticklabels()]


def test_conv_shared_figure():
    image = torch.rand(16, 16)
    err = torch.full((16, 16), math.nan)
    err[4:12, 4:12] = 0.0
    local = err.clone()
    local[4:12, 4:12] = 1.0
    eq = {"by_shift": {"2,3": {"max_abs_error": 0.0, "max_error_over_bound": 0.0}}, "max_error_over_bound": 0.0}
    bad = {"by_shift": {"2,3": {"max_abs_error": 1.9, "max_error_over_bound": 9e6}}, "max_error_over_bound": 1e7}
    counts = {"conv": 80, "locally_connected": 20480, "dense": 526336}
    fig = conv_shared.figure_of(image, {"conv": err, "locally connected": local}, counts, eq, bad, True)
    assert_readable(fig, finding="shift the input, the output shifts")


def test_one_weight_set_figure():
    def trail(tag: str) -> list[str]:
        return [f"xxh:{tag}{s:02x}a0b1c2" for s in range(4)]

    numbers = {
        "ddp_vs_one_process_final": {"max_abs_diff": 8.8e-7, "norm_rel_diff": 3.5e-8},
        "ddp_steps_all_ranks_agree": 4,
        "ddp_steps_bitwise_equal_to_one_process": 0,
        "exact_steps_ranks_agree_with_one_process": 4,
        "chain_links": 4,
    }
    trails = {"ddp": [trail("d1")] * 2, "exact": [trail("e1")] * 2, "no sync": [trail("c1"), trail("c2")]}
    fig = one_weight_set.figure_of(
        "xxh:1d77aa00", {"trail": trail("a1")}, {"trail": trail("e1")}, trails, trail("f1"), numbers, True
    )
    assert_readable(fig, finding="ddp ranks agree at 4/4 steps")
