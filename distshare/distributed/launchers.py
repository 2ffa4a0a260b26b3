"""The one place that reads launcher environments: who started this process, and how.

    torchrun                RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, TORCHELASTIC_RESTART_COUNT
    accelerate launch       the same (it starts torchrun's agent), plus its settings as ACCELERATE_*
    Ray                     RAY_ADDRESS: the cluster to join (Ray Train hands workers their place itself)
    spawned ranks           nothing: `distshare.distributed.spawn` passes rank and rendezvous explicitly

Every other module asks here instead of reading `os.environ`, so a launcher's conventions
are written down once.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def launched() -> bool:
    """True inside torchrun / accelerate launch (they set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_by_accelerate() -> bool:
    """True inside `accelerate launch` (it exports its settings as ACCELERATE_* variables)."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ


@dataclass(frozen=True)
class LaunchedPlace:
    """This process's place as the launcher wrote it into the environment."""

    rank: int
    world_size: int
    local_rank: int


def launched_place() -> LaunchedPlace | None:
    """Rank, world size and local rank from the launcher's environment; None when not launched."""
    if not launched():
        return None
    rank = int(os.environ["RANK"])
    return LaunchedPlace(rank, int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", rank)))


def is_launched_main() -> bool:
    """Rank 0 of a launched run, or a process no launcher started: the one that speaks."""
    return not launched() or os.environ.get("RANK", "0") == "0"


def elastic_restart() -> int | None:
    """torchrun's count of restarts of this worker group (accelerate launch runs torchrun's
    agent, so it has one too); None when no elastic agent started this process."""
    text = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if text is None:
        return None
    try:
        return max(0, int(text))
    except ValueError:
        return 0


def restart_count() -> int:
    """How often the launcher restarted this worker (0: the first attempt, or no launcher)."""
    return elastic_restart() or 0


def launcher_environment() -> dict[str, str]:
    """The variables a launcher sets that say where this process is (for bug reports)."""
    keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RESTART_COUNT")
    return {k: os.environ[k] for k in keys if k in os.environ}


def ray_address(cli_address: str | None) -> str | None:
    """The Ray cluster to join: --ray-address, else RAY_ADDRESS, else None (start a local Ray)."""
    return cli_address or os.environ.get("RAY_ADDRESS") or None
