"""Processes and process groups: who is in the run, how ranks start, how gradients are shared.

    world.py      this process's place (rank, world size, device) and the process group
    launchers.py  the one place that reads launcher environments (torchrun, accelerate, Ray)
    spawn.py      simulated ranks: N local processes joined by a real gloo group
    sync.py       gradient synchronization: ddp | allreduce | exact
    watchdog.py   naming the rank that went silent when a collective times out
"""
