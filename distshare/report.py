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
