"""The one place that reads launcher environments: who started this process, and how.

    torchrun                RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, TORCHELASTIC_RESTART_COUNT
    accelerate launch       the same (it starts torchrun's agent), plus its settings as ACCELERATE_*;
                            its single-process launcher (`--cpu`, or no --multi_gpu without a GPU)
                            sets no RANK or WORLD_SIZE, and MASTER_ADDR/PORT only when asked for more
    Ray                     RAY_ADDRESS: the cluster to join (Ray Train hands workers their place itself)
    spawned ranks           nothing: `distshare.distributed.spawn` passes rank and rendezvous explicitly

Every other module asks here instead of reading `os.environ`, so a launcher's conventions
are written down once.
"""

from __future__ import annotations

import os
import shlex
from dataclasses import dataclass

from distshare.config import SHIPPED_CONFIGS
from distshare.errors import UsageError

# What an MPI launcher (accelerate's simple launcher with --mpirun_hostfile) tells each process
# about its world instead of WORLD_SIZE: such a process is one of several, not a lone one.
MPI_WORLD_SIZE = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")


def launched() -> bool:
    """True inside torchrun / accelerate launch (they set RANK and WORLD_SIZE)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def launched_by_accelerate() -> bool:
    """True inside `accelerate launch` (it exports its settings as ACCELERATE_* variables)."""
    return "ACCELERATE_MIXED_PRECISION" in os.environ


def accelerate_started_one_of_several() -> bool:
    """True inside `accelerate launch` when it was asked for several processes but started one.

    `accelerate launch --cpu --num_processes 2` (and `--num_processes 2` without --multi_gpu
    on a machine with no GPU) runs accelerate's *single-process* launcher: it starts the
    script once, with no RANK or WORLD_SIZE, so the run trains on 1 rank and exits 0. That
    launcher exports MASTER_ADDR and MASTER_PORT only when --num_processes (or
    --num_machines) is above 1, which is the one trace the request leaves in the process.
    (A shell that exported MASTER_ADDR/PORT itself looks the same: the refusal says so.)
    """
    if not launched_by_accelerate() or launched() or any(k in os.environ for k in MPI_WORLD_SIZE):
        return False
    return "MASTER_ADDR" in os.environ and "MASTER_PORT" in os.environ


def accelerate_command(command: str, nproc: int, device: str = "cpu") -> str:
    """The `accelerate launch` line that runs `distshare COMMAND` on `nproc` processes: the
    shipped config (cpu.yaml: MULTI_GPU with use_cpu, which is how accelerate starts several
    CPU processes on gloo; multi_gpu.yaml for CUDA), as an absolute path that works anywhere."""
    config = SHIPPED_CONFIGS / "accelerate" / ("multi_gpu.yaml" if device == "cuda" else "cpu.yaml")
    return (
        f"accelerate launch --config_file {shlex.quote(str(config))} --num_processes {nproc} "
        f"-m distshare {command} --engine accelerate"
    )


def launched_world_size(requested: int | None, command: str = "train") -> int | None:
    """The run's world size: the launcher's when launched, else `requested` (--nproc), else None.

    Under a launcher the processes exist before distshare reads its flags, so a --nproc that
    disagrees cannot be honoured; taking the launcher's count silently would train another
    world than the one asked for. Refused in one line that puts the count on the launcher.
    """
    place = launched_place()
    if place is None:
        return requested
    if requested is not None and requested != place.world_size:
        if launched_by_accelerate():
            fix = accelerate_command(command, requested)
            who = "accelerate launch"
        else:
            fix = f"torchrun --standalone --nproc_per_node {requested} -m distshare {command}"
            who = "torchrun"
        raise UsageError(
            f"--nproc {requested} disagrees with {who}, which started {place.world_size} processes: "
            f"give the count to the launcher, without --nproc: {fix}"
        )
    return place.world_size


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
