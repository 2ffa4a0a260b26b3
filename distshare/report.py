"""Run directories: `result.json` (the source of truth), `report.md` and PNG plots from it.

Files are written atomically (temporary file, then rename), and `result.json` last, so a
run directory that holds a `result.json` is complete: an interrupted run never looks done.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from distshare.errors import UsageError


def run_dir(out: str | None, command: str) -> Path:
    """The run directory: `--out DIR`, or `runs/<command>-<timestamp>`; must be writable."""
    path = Path(out) if out else Path("runs") / f"{command}-{time.strftime('%Y%m%d-%H%M%S')}"
    if path.exists() and not path.is_dir():
        raise UsageError(f"--out {path}: exists and is not a directory")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UsageError(f"--out {path}: cannot create the directory ({exc.strerror})") from None
    if not os.access(path, os.W_OK):
        raise UsageError(f"--out {path}: directory is not writable")
    stale = path / "result.json"
    if stale.exists():
        stale.unlink()  # a rerun into the same directory must not look complete before it is
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
    write_atomic(path / "result.json", json.dumps(result, indent=2, sort_keys=False) + "\n")


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
