"""Optional dependencies: what the core install leaves out, and the one line that adds it.

    pip install distshare                   # the core: verify, train on spawned ranks or torchrun
    pip install 'distshare[ray]'            # + Ray Train: --engine ray
    pip install 'distshare[accelerate]'     # + Hugging Face accelerate: --engine accelerate
    pip install 'distshare[digits]'         # + scikit-learn: the digits data set
    pip install 'distshare[lightning]'      # + Lightning: DistshareLightningCallback

The core carries what every run needs: torch, the data layer (HF `datasets`, with the
pyarrow and pandas it requires), the checks and the reports (matplotlib draws `loss.png`).
An engine or feature whose package is missing is refused before anything starts, in one
line that names the `pip install` that fixes it (`require`); the CLI prints it and exits 2.
"""

from __future__ import annotations

import importlib.util

from distshare.errors import UsageError

# extra -> (the module to find, what needs it)
EXTRAS: dict[str, tuple[str, str]] = {
    "ray": ("ray", "Ray Train"),
    "accelerate": ("accelerate", "Hugging Face accelerate"),
    "digits": ("sklearn", "scikit-learn"),
    "lightning": ("lightning", "Lightning"),
}


def installed(extra: str) -> bool:
    """Is the extra's package importable here? (Looked up, not imported: Ray takes a second.)"""
    try:  # None also for a module made unimportable by `sys.modules[name] = None`
        return importlib.util.find_spec(EXTRAS[extra][0]) is not None
    except (ImportError, ValueError):  # a broken install, or an import hook that refuses it
        return False


def install_hint(extra: str) -> str:
    return f"pip install 'distshare[{extra}]'"


def require(extra: str, who: str) -> None:
    """Refuse `who` (e.g. "--engine ray") in one line if the extra's package is missing."""
    if not installed(extra):
        raise UsageError(f"{who} needs {EXTRAS[extra][1]}, an optional extra: {install_hint(extra)}")
