"""The benchmarks' `--device cuda`: one rank on this process's GPU, in a real nccl process group.

nccl refuses two ranks on one GPU, so on a one-GPU machine the CUDA rows measure W = 1, in the
benchmark's own process. The group is still a real nccl group of one: the replica check's
gather and exact mode's all-reduce go through it as they would across GPUs.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from distshare.distributed.world import World, init_world


def cuda_world(script: str, timeout_s: float = 600.0) -> World:
    """This process as rank 0 of 1 on cuda:0 (nccl); exits with one line when there is no GPU."""
    if not torch.cuda.is_available():
        print(f"{script}: --device cuda: torch sees no CUDA GPU here", file=sys.stderr)
        raise SystemExit(2)
    rendezvous = Path(tempfile.mkdtemp(prefix="distshare-rdzv-"), "rendezvous").as_uri()
    return init_world(0, 1, rendezvous, timeout_s, device=torch.device("cuda"))


def settle(world: World) -> None:
    """Wait for the GPU before a host clock is read: kernels run behind the Python that queues them."""
    if world.device.type == "cuda":
        torch.cuda.synchronize(world.device)
