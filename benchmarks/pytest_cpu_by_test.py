"""Where the suite's CPU goes, test by test and module by module: a pytest plugin, and its table.

    PYTHONPATH=benchmarks python -m pytest -q -p pytest_cpu_by_test   # writes cpu-by-test.json
    python benchmarks/pytest_cpu_by_test.py cpu-by-test.json          # the modules, largest first

For each test (its setup, call and teardown, so a module's shared world or run counts in the
test that first needs it) the plugin records wall time, the machine's busy CPU (`/proc/stat`,
as `bench_cpu_use.py` reads it: every process, Ray's raylet and actors and the ranks forked
by the forkserver included), and the pytest process's own CPU and its reaped children's.
Busy CPU is the machine's, so run it serially (no `-n`) on an otherwise idle machine.
`CPU_BY_TEST_OUT` names the file (default `cpu-by-test.json` here).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest

# benchmarks/ is on the path both ways this runs: as the script's own folder, or by PYTHONPATH.
from bench_cpu_use import cpu_seconds  # the same /proc/stat reading

_rows: list[dict] = []


def _own_cpu() -> tuple[float, float]:
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime, kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    start, (me0, kids0), (busy0, _) = time.perf_counter(), _own_cpu(), cpu_seconds()
    yield
    (me1, kids1), (busy1, _) = _own_cpu(), cpu_seconds()
    _rows.append(
        {
            "test": item.nodeid,
            "wall_s": round(time.perf_counter() - start, 3),
            "busy_cpu_s": round(busy1 - busy0, 2),
            "pytest_cpu_s": round(me1 - me0, 3),
            "children_cpu_s": round(kids1 - kids0, 3),
        }
    )


def pytest_sessionfinish(session: pytest.Session) -> None:
    Path(os.environ.get("CPU_BY_TEST_OUT", "cpu-by-test.json")).write_text(json.dumps(_rows, indent=1))


def by_module(rows: list[dict]) -> list[dict]:
    modules: dict[str, dict] = defaultdict(lambda: {"tests": 0, "wall_s": 0.0, "busy_cpu_s": 0.0})
    for row in rows:
        m = modules[row["test"].split("::")[0]]
        m["tests"] += 1
        m["wall_s"] += row["wall_s"]
        m["busy_cpu_s"] += row["busy_cpu_s"]
    return sorted(({"module": k, **v} for k, v in modules.items()), key=lambda m: -m["busy_cpu_s"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("rows", type=Path, help="the JSON the plugin wrote")
    ap.add_argument("--top", type=int, default=20, help="modules to show (default 20)")
    args = ap.parse_args()
    try:
        rows = json.loads(args.rows.read_text())
    except (OSError, ValueError) as exc:
        print(f"pytest_cpu_by_test: error: cannot read {args.rows}: {exc}", file=sys.stderr)
        sys.exit(2)
    total_busy = sum(r["busy_cpu_s"] for r in rows)
    print(f"{len(rows)} tests, {sum(r['wall_s'] for r in rows):.0f} s wall, {total_busy:.0f} s busy CPU")
    print("| module | tests | wall | busy CPU | share of busy |\n|---|---|---|---|---|")
    for m in by_module(rows)[: args.top]:
        share = m["busy_cpu_s"] / total_busy if total_busy else 0.0
        print(f"| `{m['module']}` | {m['tests']} | {m['wall_s']:.0f} s | {m['busy_cpu_s']:.0f} s | {share:.0%} |")


if __name__ == "__main__":
    main()
