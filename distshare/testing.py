"""Helpers for users' own tests: run a function on N simulated CPU ranks (real gloo groups).

from distshare.testing import run_distributed

def check(world):                       # module-level: ranks are fresh processes
    model = build_my_model()
    ...train a few steps under DDP...
    distshare.assert_replicas_in_sync(model, optimizer)

def test_my_ddp_loop():
    run_distributed(check, world_size=2, timeout_s=60)
"""

from distshare.dist.spawn import run_distributed
from distshare.dist.world import World

__all__ = ["World", "run_distributed"]
