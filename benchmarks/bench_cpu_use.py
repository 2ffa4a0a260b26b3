"""Where a command's time goes on the whole machine: wall time, CPU kept busy, cores left idle.

    python benchmarks/bench_cpu_use.py                                   # the full test suite, serially
    python benchmarks/bench_cpu_use.py --run serial="-m pytest -q" --run xdist2="-m pytest -q -n 2 --dist loadfile"
    python benchmarks/bench_cpu_use.py --run torch="-m distshare train --engine torch --nproc 2 --steps 4" \\
        --run ray="-m distshare train --engine ray --nproc 2 --steps 4" --json --out cpu-use.json

Each `--run NAME=ARGS` runs `python ARGS` (this interpreter, in this directory) and reads the
machine's CPU counters (`/proc/stat`) before and after it. Busy CPU is every core's time not
idle, counted on the whole machine: it includes a command's children and the processes they
start outside its process tree (Ray's raylet and workers), which a process's own rusage does
not. So the machine must be otherwise idle; the report shows the load average at each start.
The runs go one after another, in the order given, in one invocation (side by side).

What the split says: with `C` cores, a command that took `wall` seconds and kept `busy` core-
seconds busy cannot finish in less than `busy / C` on those cores, however it is parallelized,
unless it does less work. Idle core-seconds are what running more at once could fill.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path


def cpu_seconds() -> tuple[float, float]:
    """The machine's (busy, idle) CPU seconds since boot, every core summed (`/proc/stat`).
    Steal (time the hypervisor gave to other guests) is neither: no work of this machine's."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq = (fields + [0] * 7)[:7]
    hz = os.sysconf("SC_CLK_TCK")
    return (user + nice + system + irq + softirq) / hz, (idle + iowait) / hz


def measure(name: str, args: list[str], timeout_s: float) -> dict:
    load = os.getloadavg()[0]
    busy0, idle0 = cpu_seconds()
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=timeout_s)
    wall = time.perf_counter() - start
    busy1, idle1 = cpu_seconds()
    cores = os.cpu_count() or 1
    busy, idle = busy1 - busy0, idle1 - idle0
    tail = (proc.stdout.strip().splitlines() or [""])[-1]
    return {
        "name": name,
        "command": "python " + shlex.join(args),
        "exit_code": proc.returncode,
        "wall_s": round(wall, 1),
        "busy_cpu_s": round(busy, 1),
        "idle_core_s": round(idle, 1),
        "cores": cores,
        "utilization": round(busy / (cores * wall), 3) if wall > 0 else 0.0,
        "floor_s": round(busy / cores, 1),  # the least wall time these cores could do it in
        "load_at_start": round(load, 2),
        "last_line": tail[-200:],
    }


def parse_run(text: str) -> tuple[str, list[str]]:
    name, sep, rest = text.partition("=")
    if not sep or not name.strip() or not rest.strip():
        raise ValueError(f'--run {text!r}: expected NAME=ARGS, e.g. serial="-m pytest -q"')
    return name.strip(), shlex.split(rest)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", action="append", metavar="NAME=ARGS", help="python ARGS to measure (repeatable)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds one run may take")
    ap.add_argument("--json", action="store_true", help="print the results as one JSON object")
    ap.add_argument("--out", type=Path, help="also write the JSON here")
    args = ap.parse_args(argv)
    if not Path("/proc/stat").is_file():
        ap.error("needs Linux's /proc/stat (the whole machine's CPU counters)")
    try:
        runs = [parse_run(r) for r in (args.run or ["suite=-m pytest -q -p no:cacheprovider"])]
    except ValueError as exc:
        ap.error(str(exc))
    results = []
    for name, run_args in runs:
        print(f"bench_cpu_use: {name}: python {shlex.join(run_args)}", file=sys.stderr, flush=True)
        try:
            results.append(measure(name, run_args, args.timeout))
        except subprocess.TimeoutExpired:
            print(f"bench_cpu_use: {name} ran past --timeout {args.timeout:.0f} s", file=sys.stderr)
            return 1
    report = {"cores": os.cpu_count(), "runs": results}
    if args.out:
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{'run':<12} {'exit':>4} {'wall s':>8} {'busy CPU s':>10} {'idle core-s':>11} {'use':>6} {'floor s':>8}")
        for r in results:
            print(
                f"{r['name']:<12} {r['exit_code']:>4} {r['wall_s']:>8.1f} {r['busy_cpu_s']:>10.1f} "
                f"{r['idle_core_s']:>11.1f} {r['utilization']:>6.0%} {r['floor_s']:>8.1f}   {r['last_line'][:60]}"
            )
    return 0 if all(r["exit_code"] == 0 for r in results) else 1


if __name__ == "__main__":
    raise SystemExit(main())
