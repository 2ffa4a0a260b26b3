"""How long simulated ranks take to start: forked from a preloaded server against spawned afresh.

    python benchmarks/bench_spawn.py                     # 2 ranks, 10 worlds a process, 5 repeats
    python benchmarks/bench_spawn.py --nproc 3 --worlds 20 --json --out bench-spawn.json

`run_distributed` (what `--nproc N`, the demos, the selftest and a user's tests start ranks
with) forks its ranks from multiprocessing's forkserver, which imports torch and distshare once
(`distshare.distributed.spawn.PRELOAD`); `DISTSHARE_START_METHOD=spawn` starts each rank as a
fresh interpreter that imports them itself. Each repeat runs, for each method in turn (the
order rotated every repeat), a fresh Python process that starts `--worlds` worlds one after
another, each an all-reduce of one tensor, and stamps each world from the call to its return.
So the first world carries the server's start (its imports), and the total is what a process
that starts that many worlds pays: a test session, a selftest, `demo all`. The ratio is the
median over repeats of (forkserver total / spawn total) of the same repeat.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

METHODS = ("spawn", "forkserver")


def _all_reduce(world) -> float:
    import torch
    import torch.distributed as dist

    t = torch.ones(1)
    dist.all_reduce(t)
    return float(t)


def child(nproc: int, worlds: int) -> list[float]:
    """In a fresh process: the wall seconds of each of `worlds` worlds, call to return."""
    from distshare.distributed.spawn import run_distributed

    seconds = []
    for _ in range(worlds):
        start = time.perf_counter()
        got = run_distributed(_all_reduce, nproc, timeout_s=60)
        seconds.append(time.perf_counter() - start)
        if got != [float(nproc)] * nproc:  # every rank took part in the all-reduce
            raise SystemExit(f"bench_spawn: wrong all-reduce result {got}")
    return seconds


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--worlds", type=int, default=10, help="worlds started one after another per process")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.nproc < 1 or args.worlds < 1 or args.repeats < 1:
        ap.error("--nproc, --worlds and --repeats must be positive")
    if args.child:
        print(json.dumps(child(args.nproc, args.worlds)))
        return 0

    runs: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    for r in range(args.repeats):
        order = METHODS[r % 2 :] + METHODS[: r % 2]
        for method in order:
            env = dict(os.environ, DISTSHARE_START_METHOD=method)
            sizes = ["--nproc", str(args.nproc), "--worlds", str(args.worlds)]
            cmd = [sys.executable, __file__, "--child", method, *sizes]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
            if proc.returncode != 0:
                print(f"bench_spawn: the {method} run failed: {proc.stderr.strip().splitlines()[-1:]}", file=sys.stderr)
                return 1
            runs[method].append(json.loads(proc.stdout.strip().splitlines()[-1]))
            if not args.json:
                print(f"repeat {r + 1}/{args.repeats} {method}: {sum(runs[method][-1]):.2f} s", file=sys.stderr)

    def summary(method: str) -> dict[str, float]:
        rows = runs[method]
        return {
            "first_world_s": statistics.median(row[0] for row in rows),
            "later_world_s": statistics.median(s for row in rows for s in row[1:]) if args.worlds > 1 else float("nan"),
            "total_s": statistics.median(sum(row) for row in rows),
        }

    ratios = [sum(f) / sum(s) for f, s in zip(runs["forkserver"], runs["spawn"], strict=True)]
    result = {
        "nproc": args.nproc,
        "worlds": args.worlds,
        "repeats": args.repeats,
        "cpus": os.cpu_count(),
        **{m: summary(m) for m in METHODS},
        "total_ratio": statistics.median(ratios),
        "total_ratios": ratios,
        "runs": runs,
    }
    if args.out:
        args.out.write_text(json.dumps(result, indent=1) + "\n")
    if args.json:
        print(json.dumps(result))
        return 0
    print(f"{args.worlds} worlds of {args.nproc} ranks, one after another in one process (medians of {args.repeats}):")
    for m in METHODS:
        s = result[m]
        first, later, total = s["first_world_s"], s["later_world_s"], s["total_s"]
        print(f"  {m:10s}  first {first:.2f} s, each later {later:.2f} s, total {total:.2f} s")
    each = ", ".join(f"{x:.3f}" for x in ratios)
    print(f"  total, forkserver / spawn: {result['total_ratio']:.3f} (each repeat: {each})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
