"""Run directories: `result.json` (the source of truth), `report.md` and PNG plots from it.

Files are written atomically (temporary file, then rename), and `result.json` last, so a
run directory that holds a `result.json` is complete: an interrupted run never looks done.
Until then the directory also holds an `INCOMPLETE` marker, so a run that failed (a rank
went silent, a bad input found late, a crash) is plainly marked as such, not just missing
a file.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from distshare.errors import UsageError

RESULT = "result.json"  # the source of truth, written last
INCOMPLETE = "INCOMPLETE"  # present from the start of a run until result.json is written


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


def run_dir(out: str | None, command: str) -> Path:
    """The run directory: `--out DIR`, or `runs/<command>-<timestamp>`; must be writable."""
    path = usable_dir(Path(out) if out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}", "--out")
    for stale in (RESULT, "report.md"):  # a rerun into the same directory must not look complete before it is
        (path / stale).unlink(missing_ok=True)
    write_atomic(
        path / INCOMPLETE,
        f"distshare {command} started {time.strftime('%Y-%m-%d %H:%M:%S')} and has not "
        f"finished: {RESULT} is written last, when it does, and this file is removed\n",
    )
    return path


def write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
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


def plot_losses(path: Path, curves: dict[str, list[float]], title: str) -> Path:
    """Loss curves on one axis (matplotlib, Agg: no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    styles = ["-", "--", ":", "-."]
    for i, (label, ys) in enumerate(curves.items()):
        ax.plot(range(len(ys)), ys, styles[i % len(styles)], label=label, linewidth=1.5)
    ax.set_xlabel("step")
    ax.set_ylabel("global mean loss")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path
