"""Who am I in the run: rank, world size, device; and how the process group was made.

One training code path serves every launcher. The world is found from the environment the
way nanoGPT does it (`distshare.distributed.launchers` reads it): a launcher (torchrun,
accelerate launch) says where to meet; otherwise we are a single process, unless a spawner
hands us a rendezvous explicitly.
"""

from __future__ import annotations

import gc
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from distshare.distributed import launchers, watchdog


@dataclass(frozen=True)
class World:
    """This process's place in the run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (single process)

    @property
    def is_main(self) -> bool:
        """Rank 0 speaks: progress bar, logs, files."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    @property
    def collective_device(self) -> torch.device:
        """Where a collective's tensors must live: nccl moves only GPU tensors, gloo CPU ones."""
        return self.device if self.backend == "nccl" else torch.device("cpu")


def default_backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


def init_world(
    rank: int | None = None,
    world_size: int | None = None,
    init_method: str | None = None,
    timeout_s: float = 120.0,
    device: torch.device | None = None,
) -> World:
    """Join (or create) the default process group, or return the single-process world.

    With no arguments, reads the launcher's environment; a spawner passes rank, size and an
    `init_method` (a file:// rendezvous). The timeout bounds every later collective too,
    so a silent rank makes the others fail instead of waiting forever, and they name it
    (`distshare.distributed.watchdog`).
    """
    place = launchers.launched_place() if rank is None else None
    if place is not None:
        rank, world_size = place.rank, place.world_size
        init_method = init_method or "env://"
    if rank is None or world_size is None:
        return World(device=device or torch.device("cpu"))
    local_rank = place.local_rank if place is not None else rank
    if device is None:
        device = torch.device("cpu")
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)  # one GPU per rank, as nccl requires
    if device.type == "cuda":
        torch.cuda.set_device(device)
    backend = default_backend(device)
    if not dist.is_initialized():
        store = _per_attempt_store(init_method, timeout_s)
        dist.init_process_group(
            backend,
            init_method=None if store is not None else init_method,
            store=store,
            rank=rank,
            world_size=world_size,
            timeout=timedelta(seconds=timeout_s),
        )
    # When a collective times out, the survivors find out which rank went silent.
    watchdog.watch(rank, world_size, timeout_s)
    return World(rank=rank, world_size=world_size, local_rank=local_rank, device=device, backend=backend)


def _per_attempt_store(init_method: str | None, timeout_s: float) -> dist.Store | None:
    """Under torchrun, the launcher's store with a prefix per restart; None elsewhere.

    torchrun shares one TCP store across restarts of its workers, and the process group's
    keys (gloo's peer addresses) carry no attempt number: a restarted rank can read a dead
    peer's address from the last attempt and fail ("Connection refused") or wait. Measured
    here: 2 of 3 restarts under `torchrun --max-restarts 1` failed so, none with the prefix.
    """
    restart = launchers.elastic_restart()
    if init_method != "env://" or restart is None:
        return None
    store, _, _ = next(dist.rendezvous("env://", timeout=timedelta(seconds=timeout_s)))
    return dist.PrefixStore(f"distshare/attempt-{restart}", store)


def close_world(world: World) -> None:
    """Destroy the process group, after collecting what still refers to it.

    A DDP reducer or a pending work object that outlives the group is destroyed only at
    interpreter exit, where gloo aborts the process ("terminate called without an active
    exception"); collecting garbage first releases them while the group still exists.
    """
    if world.distributed and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()
