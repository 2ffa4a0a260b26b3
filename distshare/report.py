"""Run directories: `result.json` (the source of truth), `report.md` and PNG plots from it.

Files are written atomically (temporary file, then rename), and `result.json` last, so a
run directory that holds a `result.json` is complete: an interrupted run never looks done.
Until then the directory also holds an `INCOMPLETE` marker, so a run that failed (a rank
went silent, a bad input found late, a crash) is plainly marked as such, not just missing
a file; when the command saw why it failed, the marker says why (`mark_failed`).

A run restarted by its launcher (torchrun `--max-restarts`) starts the command again in a new
process: with a checkpoint directory, that directory remembers the run directory
(`remember_run_dir`), so the restarted attempt continues the first attempt's run directory
(`run_dir_to_continue`) instead of leaving it behind as an orphan that looks failed.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from distshare.errors import UsageError

RESULT = "result.json"  # the source of truth, written last
INCOMPLETE = "INCOMPLETE"  # present from the start of a run until result.json is written
RUN_DIR_LINK = ".distshare-run-dir"  # in a checkpoint directory: the run directory writing into it


def _read_umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it: set straight back, once, at import
    os.umask(mask)
    return mask


_UMASK = _read_umask()


def usable_dir(path: Path, flag: str) -> Path:
    """Make the directory now: a path that cannot hold the output is refused in one line here,
    not by an OSError on rank 0 at the first write, after minutes of training."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{flag} {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"{flag} {path}: cannot create the directory ({exc.strerror or exc})") from None
    except ValueError:  # a NUL byte: no such path can exist
        raise UsageError(f"{flag} {path}: not a usable path (it holds a NUL character)") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{flag} {path}: directory is not writable")
    return path


def run_dir(out: str | Path | None, command: str, attempt: str = "") -> Path:
    """The run directory: `--out DIR`, or `runs/<command>-<timestamp>`; must be writable.

    `attempt` names a launcher's restart ("restart 1"): the marker then says the directory
    holds a continued run, not a fresh one.
    """
    path = usable_dir(Path(out) if out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}", "--out")
    for stale in (RESULT, "report.md"):  # a rerun into the same directory must not look complete before it is
        (path / stale).unlink(missing_ok=True)
    started = f"distshare {command} started {time.strftime('%Y-%m-%d %H:%M:%S')}"
    write_atomic(
        path / INCOMPLETE,
        f"{started}{f' ({attempt})' if attempt else ''} and has not "
        f"finished: {RESULT} is written last, when it does, and this file is removed\n",
    )
    return path


def mark_failed(path: Path, reason: str) -> None:
    """Say in `INCOMPLETE` why the run ended without a result: the first line is the reason
    (`hang: ...`, `interrupted: ...`, `error: ...`), then what the marker said before."""
    marker = path / INCOMPLETE
    before = marker.read_text() if marker.is_file() else ""
    write_atomic(marker, f"{reason.rstrip()}\n\n{before}")


def remember_run_dir(checkpoint_dir: Path, path: Path) -> None:
    """Write into the checkpoint directory which run directory this run reports into."""
    write_atomic(Path(checkpoint_dir) / RUN_DIR_LINK, str(Path(path).resolve()) + "\n")


def run_dir_to_continue(checkpoint_dir: Path) -> Path | None:
    """The run directory an earlier attempt of this run left unfinished (it still holds
    `INCOMPLETE`), as its checkpoint directory remembers it; None if there is none."""
    link = Path(checkpoint_dir) / RUN_DIR_LINK
    if not link.is_file():
        return None
    path = Path(link.read_text().strip())
    return path if (path / INCOMPLETE).is_file() else None


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` whole or not at all (a temporary file, then a rename).

    `mkstemp` creates its file readable by its owner only (0600), and the rename keeps that
    mode: the file is given the mode any other file of this process gets (0666 less the umask,
    0644 usually), or result.json and report.md would be the only private files of a run.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_result(path: Path, result: dict[str, Any]) -> None:
    """Write `result.json`, the last file of a run: from here on the directory is complete."""
    write_atomic(path / RESULT, json.dumps(result, indent=2, sort_keys=False) + "\n")
    (path / INCOMPLETE).unlink(missing_ok=True)


def markdown_table(rows: list[tuple[str, ...]], header: tuple[str, ...]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# Figures: one look for every PNG distshare writes. A README shows a figure about 800 px wide;
# at DPI a figure at most MAX_WIDTH_IN wide is shown at >= 80 % of its saved size there, so
# text of MIN_FONT_PT (12.5 px saved) stays >= 10 px on the page.
DPI = 100  # pixels per inch of every saved PNG
MAX_WIDTH_IN = 10.0  # inches: a wider figure is shrunk by a README until its text is unreadable
MIN_FONT_PT = 9.0  # points at the saved size: the smallest text on any figure
STYLE = {
    "font.size": 10,
    "axes.titlesize": 10,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 9,
    "legend.title_fontsize": 9,
    "figure.titlesize": 12,
    "figure.dpi": DPI,
    "savefig.dpi": DPI,
}
ZERO_LABEL = "0 (bitwise)"  # the row of a log axis where exact zeros are drawn (a log axis has no 0)
NONFINITE_LABEL = "NaN/inf"  # the row above the data where NaN and infinities are drawn


def pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (no display needed), with distshare's STYLE."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update(STYLE)
    return plt


def save_figure(fig: Any, path: Path) -> Path:
    """Write `fig` as a PNG at DPI and close it."""
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    return path


def integer_steps(*axes: Any) -> None:
    """Whole-number ticks on the x axes: steps are counted, there is no step 0.5."""
    from matplotlib.ticker import MaxNLocator

    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def decade_ticks(ax: Any, most: int = 6) -> None:
    """A log y axis labelled at whole decades only, at most `most` of them, 1 (10^0) always among them."""
    from matplotlib.ticker import FixedLocator, LogFormatterSciNotation, NullLocator

    low, high = ax.get_ylim()
    lo, hi = math.floor(math.log10(low)), math.ceil(math.log10(high))
    every = max(1, math.ceil((hi - lo + 1) / most))
    ax.yaxis.set_major_locator(FixedLocator([10.0**e for e in range(lo, hi + 1) if e % every == 0]))
    ax.yaxis.set_major_formatter(LogFormatterSciNotation())
    ax.yaxis.set_minor_locator(NullLocator())
    ax.set_ylim(low, high)


class LogRows:
    """A log y axis that still shows every value: exact zeros on a row of their own below the
    data ("0 (bitwise)"), NaN and infinities on a row above it ("NaN/inf"). `y(v)` is where
    `v` is drawn; `finish(ax)` sets the scale, the ticks and the limits."""

    def __init__(self, values: list[float], zero_label: str = ZERO_LABEL) -> None:
        finite = [v for v in values if math.isfinite(v)]
        positive = [v for v in finite if v > 0]
        self.zero_label = zero_label
        self.any_zero = any(v == 0 for v in finite)
        self.any_bad = len(finite) < len(values)
        self.log = bool(positive)
        if positive:
            self.low = math.floor(math.log10(min(positive)))
            self.high = max(self.low + 1, math.ceil(math.log10(max(positive))))
            self.zero, self.bad = 10.0 ** (self.low - 1), 10.0 ** (self.high + 1)
        else:  # nothing but zeros (and NaN): no log axis to draw, two rows
            self.low = self.high = 0
            self.zero, self.bad = 0.0, 1.0

    def y(self, v: float) -> float:
        return self.zero if v == 0 else v if math.isfinite(v) else self.bad

    def plot(self, ax: Any, xs: list[int], values: list[float], fmt: str, **kwargs: Any) -> None:
        """`ax.plot` of `values` on these rows; the line breaks at a NaN/inf, which a red x marks."""
        ax.plot(xs, [self.y(v) if math.isfinite(v) else math.nan for v in values], fmt, **kwargs)
        bad = [x for x, v in zip(xs, values, strict=True) if not math.isfinite(v)]
        if bad:
            ax.plot(bad, [self.bad] * len(bad), "x", color="tab:red", ms=9, mew=2)

    def finish(self, ax: Any) -> None:
        if not self.log:
            ticks, labels = [self.zero], [self.zero_label]
            if self.any_bad:
                ticks, labels = [*ticks, self.bad], [*labels, NONFINITE_LABEL]
            ax.set_yticks(ticks, labels)
            ax.set_ylim(-0.5, max(ticks) + 0.5)
            return
        ax.set_yscale("log")
        every = max(1, (self.high - self.low + 1) // 5)  # at most about 6 labelled decades
        decades = list(range(self.low, self.high + 1, every))
        ticks, labels = [10.0**e for e in decades], [f"1e{e}" for e in decades]
        low, high = 10.0**self.low, 10.0**self.high
        if self.any_zero:
            ticks, labels, low = [self.zero, *ticks], [self.zero_label, *labels], self.zero
            ax.axhline(self.zero * 10**0.5, color="0.75", lw=0.8, ls=":")  # where the axis breaks
        if self.any_bad:
            ticks, labels, high = [*ticks, self.bad], [*labels, NONFINITE_LABEL], self.bad
            ax.axhline(self.bad / 10**0.5, color="0.75", lw=0.8, ls=":")
        ax.minorticks_off()
        ax.set_yticks(ticks, labels)
        ax.set_ylim(low / 10**0.4, high * 10**0.4)


def _loss_finding(ys: list[float]) -> str:
    """What a loss curve did, in numbers: "loss 1.97 -> 1.26 in 30 steps"."""
    bad = next((i for i, y in enumerate(ys) if not math.isfinite(y)), None)
    if not ys:
        return "no steps"
    if bad is not None:
        return f"loss {ys[bad]} at step {bad}"
    return f"loss {ys[0]:.3g} -> {ys[-1]:.3g} in {len(ys)} steps"


def plot_losses(path: Path, curves: dict[str, list[float]], title: str) -> Path:
    """Loss curves on one axis; the title says what the first curve did, from its numbers."""
    return save_figure(losses_figure(curves, title), path)


def losses_figure(curves: dict[str, list[float]], title: str) -> Any:
    """The figure `plot_losses` saves."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.8), layout="constrained")
    styles = ["-", "--", ":", "-."]
    for i, (label, ys) in enumerate(curves.items()):
        ax.plot(range(len(ys)), ys, styles[i % len(styles)], label=label, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("global mean loss")
    first = next(iter(curves.values()), [])
    ax.set_title(f"{title}: {_loss_finding([float(y) for y in first])}")
    integer_steps(ax)
    ax.legend()
    return fig


def replica_checks(metrics_file: Path) -> dict[int, bool]:
    """The steps whose replicas were compared, and whether they were bit-identical, from the
    run's `metrics.jsonl` (a checked row holds `replicas_in_sync`); {} without the file."""
    checks: dict[int, bool] = {}
    if not metrics_file.is_file():
        return checks
    for line in metrics_file.read_text().splitlines():
        row = json.loads(line) if line.strip() else {}
        if "replicas_in_sync" in row:
            # Rolling checks are judged later, a batch at a time: the row lists the steps whose
            # states it covered, and the first that differed (the ones before it agreed).
            steps = row.get("checked_steps", [row.get("checked_step", row["step"])])
            first = row.get("first_differing_step")
            for s in steps:
                checks[int(s)] = bool(row["replicas_in_sync"]) or (first is not None and s < first)
    return checks


def verify_figure(
    steps: list[dict[str, Any]],
    losses: dict[str, list[float]],
    checks: dict[int, bool],
    failed: list[str],
    world_size: int,
) -> Any:
    """`distshare verify`'s loss.png: what proves the run, step by step.

    `steps` are the judged partition's per-step comparisons with one process (`PartitionResult.steps`),
    `losses` the two loss curves (distributed first), `checks` the replica checks by step
    (`replica_checks`), `failed` the names of the checks that failed (the title says FAILED then).
    Top: the two loss curves (they overlap: that alone proves little). Then, log scale, the
    parameters' normwise difference from one process beside the rounding envelope, and the loss's
    relative difference; the gradient's difference over its rounding bound; the replica checks.
    Zeros are drawn on a row of their own ("0 (bitwise)"), NaN/inf on one above.
    """
    plt = pyplot()
    fig, (lax, dax, gax, cax) = plt.subplots(
        4, 1, figsize=(8, 9.5), sharex=True, height_ratios=(1.3, 2.6, 1.7, 0.55), layout="constrained"
    )
    n = max([len(steps), *(len(ys) for ys in losses.values())])
    xs = [int(s.get("step", i)) for i, s in enumerate(steps)]
    names = list(losses)

    for (label, ys), style in zip(losses.items(), ("-", "--"), strict=False):
        lax.plot(range(len(ys)), [float(y) for y in ys], style, lw=1.8, label=label)
    lax.set_ylabel("loss")
    lax.legend(loc="upper right")
    lax.set_title("the loss curves (they overlap: the panels below measure how closely)", loc="left")

    def num(s: dict[str, Any], key: str) -> float:
        v = s.get(key)
        return math.nan if v is None else float(v)

    params = [num(s, "norm_rel_diff") for s in steps]
    envelope = [num(s, "envelope_norm_rel") for s in steps]
    ref = losses[names[-1]] if names else []
    loss_rel = [
        num(s, "loss_diff") / abs(float(ref[x])) if x < len(ref) and float(ref[x]) != 0 else num(s, "loss_diff")
        for x, s in zip(xs, steps, strict=True)
    ]
    rows = LogRows([*params, *[e for e in envelope if e > 0], *loss_rel])
    rows.plot(dax, xs, envelope, "--", color="0.45", lw=1.5, label="rounding envelope (allowed)")
    rows.plot(dax, xs, params, "o-", color="C0", ms=5, label="parameters ||a - b|| / ||b||")
    rows.plot(dax, xs, loss_rel, "s", color="C1", mfc="none", ms=6, label="loss |a - b| / |b|")
    rows.finish(dax)
    dax.set_ylabel(f"{world_size} ranks vs 1 process\n(relative difference)")
    worst_env = max((p / e for p, e in zip(params, envelope, strict=True) if e > 0 and math.isfinite(p)), default=0.0)
    if params and all(p == 0 for p in params):
        params_finding = "parameters bitwise equal to one process at every step"
    elif any(not math.isfinite(p) for p in params):
        first_bad = next(x for x, p in zip(xs, params, strict=True) if not math.isfinite(p))
        params_finding = f"parameters NaN/inf from step {first_bad}"
    else:
        params_finding = f"parameters at most {worst_env:.2g} x the rounding envelope"
    dax.set_title(params_finding, loc="left")
    dax.legend(loc="best")

    grad = [num(s, "grad_excess") for s in steps]
    grows = LogRows([*grad, 1.0])
    grows.plot(gax, xs, grad, "o-", color="C2", ms=5, label="gradient: |a - b| / rounding bound")
    gax.axhline(1.0, color="k", lw=1, ls="--", label="bound (above it: not rounding)")
    grows.finish(gax)
    gax.set_ylabel("gradient difference\n/ its bound")
    finite_grad = [g for g in grad if math.isfinite(g)]
    worst_grad = max(finite_grad, default=0.0)
    if len(finite_grad) < len(grad):
        grad_finding = "gradient NaN/inf"
    elif worst_grad == 0:
        grad_finding = "gradient bitwise equal at every step"
    else:
        grad_finding = f"gradient at most {worst_grad:.2g} x its rounding bound (same parameters, every step)"
    gax.set_title(grad_finding, loc="left")
    gax.legend(loc="best")

    good = sorted(s for s, ok in checks.items() if ok)
    bad = sorted(s for s, ok in checks.items() if not ok)
    if good:
        cax.plot(good, [0] * len(good), "o", color="tab:green", ms=7, label="bit-identical")
    if bad:
        cax.plot(bad, [0] * len(bad), "X", color="tab:red", ms=10, label="DIFFER")
    for s in bad:
        for ax in (lax, dax, gax):
            ax.axvline(s, color="tab:red", lw=1, alpha=0.5)
    cax.set_yticks([])
    cax.set_ylim(-1, 1)
    cax.set_ylabel("replicas")
    cax.set_xlabel("step")
    cax.set_xlim(-0.7, max(n, 1) - 0.3)
    replicas = f"replica checks: {len(good)}/{len(checks)} bit-identical across {world_size} ranks"
    if bad:
        replicas += f", first difference at step {bad[0]}"
    cax.set_title(replicas, loc="left")
    if checks:
        cax.legend(loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)
    integer_steps(cax)

    if failed:
        head = f"verify FAILED: {', '.join(failed)}"
    else:
        head = f"verify OK: {world_size} ranks train like one process on the whole batch"
    fig.suptitle(f"{head}\n{len(good)}/{len(checks)} replica checks bit-identical; {params_finding}")
    return fig


def plot_verify(
    path: Path,
    steps: list[dict[str, Any]],
    losses: dict[str, list[float]],
    checks: dict[int, bool],
    failed: list[str],
    world_size: int,
) -> Path:
    """Write `verify_figure` to `path`."""
    return save_figure(verify_figure(steps, losses, checks, failed, world_size), path)
