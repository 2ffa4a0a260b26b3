"""Parity across engines: the same config, seed and plan through every launcher, side by side.

Every engine runs the same step on the same global batches, so the goal is one final
fingerprint for all of them. Each engine is run the way a user runs it — a real
`distshare train` under its real launcher (torchrun, accelerate launch, a Ray driver) —
and writes its final parameters; this module lines them up against the spawned torch ranks
and against one process taking every global batch whole.

Where two runs differ the cause is named in the table: the single-process reference sums a
global batch in one matrix product while W ranks sum their micro-batches and then each
other (a different order of the same additions).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import yaml
from safetensors.torch import load_file

from distshare.config import RunConfig, dump_config
from distshare.engines.torchrun import torchrun_command
from distshare.errors import DistshareError
from distshare.extras import install_hint
from distshare.numerics.diff import diff

# The runs of the table, in order: (engine, launcher), named as `--engine` and result.json's
# `engine` and `launcher` name them. The first is the baseline; the last, one process taking
# each global batch whole (engine local, no launcher), is the reference.
RUNS: tuple[tuple[str, str | None], ...] = (
    ("torch", "spawn"),
    ("torch", "torchrun"),
    ("accelerate", "accelerate"),
    ("ray", "ray"),
    ("local", None),
)

# accelerate's config for several CPU processes (configs/accelerate/cpu.yaml, without the
# comments): a MULTI_GPU config with use_cpu, since `accelerate launch --cpu` is one process.
ACCELERATE_CPU_CONFIG = {
    "compute_environment": "LOCAL_MACHINE",
    "distributed_type": "MULTI_GPU",
    "use_cpu": True,
    "num_machines": 1,
    "machine_rank": 0,
    "rdzv_backend": "static",
    "same_network": True,
    "mixed_precision": "no",
    "gpu_ids": "all",
}


@dataclass
class EngineRun:
    """One engine's run: how it was started, its fingerprint, its final parameters."""

    engine: str
    launcher: str | None
    command: list[str]
    world_size: int
    ok: bool = False
    skipped: str = ""  # why the engine did not run (package missing)
    error: str = ""
    exit_code: int | None = None  # the command's, once it ended (None: it did not start or timed out)
    fingerprint: str = ""
    seconds: float = 0.0
    params: dict[str, Any] = field(default_factory=dict, repr=False)

    @property
    def name(self) -> str:
        """How the table names the run: the engine, and its launcher where one engine has several."""
        return run_name(self.engine, self.launcher)

    @property
    def is_reference(self) -> bool:
        return self.launcher is None

    def to_dict(self) -> dict[str, Any]:
        return {
            "engine": self.engine,
            "launcher": self.launcher,
            "name": self.name,
            "command": " ".join(self.command),
            "world_size": self.world_size,
            "ok": self.ok,
            "skipped": self.skipped,
            "error": self.error,
            "exit_code": self.exit_code,
            "final_fingerprint": self.fingerprint,
            "seconds": round(self.seconds, 2),
        }


def run_name(engine: str, launcher: str | None) -> str:
    """"torch (spawn)", "torch (torchrun)", "accelerate", "ray", "local (1 process)"."""
    if launcher is None:
        return f"{engine} (1 process)"
    return engine if launcher == engine else f"{engine} ({launcher})"


def run_parity(
    cfg: RunConfig,
    out_dir: Path,
    ray_address: str | None = None,
    progress: bool = True,
    runs: tuple[tuple[str, str | None], ...] = RUNS,
) -> dict[str, Any]:
    """Run `cfg` under every (engine, launcher); the parity table as a dict (rows in `runs` order)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    world_size = cfg.plan.world_size
    config_path = out_dir / "parity-config.yaml"
    dump_config(replace(cfg, engine="auto"), config_path, world_size)
    done: list[EngineRun] = []
    for engine, launcher in runs:
        run = _run_engine(engine, launcher, config_path, cfg, out_dir / (launcher or engine), ray_address)
        if progress:
            state = run.skipped or (f"{run.seconds:.1f} s" if run.ok else f"FAILED: {run.error}")
            print(f"parity: {run.name:<18} {state}", file=sys.stderr, flush=True)
        done.append(run)
    return _table(cfg, done)


def _run_engine(
    engine: str, launcher: str | None, config_path: Path, cfg: RunConfig, out: Path, ray_address: str | None
) -> EngineRun:
    w = cfg.plan.world_size
    train = ["-m", "distshare", "train", "--config", str(config_path), "--no-progress", "--json"]
    files = ["--out", str(out), "--save-params", str(out / "params.safetensors")]
    py = [sys.executable]
    if launcher == "spawn":
        cmd = py + train + ["--engine", "torch", "--nproc", str(w)]
    elif launcher == "torchrun":
        cmd = torchrun_command(w, train[2:]) + ["--engine", "torch"]  # what `--engine torchrun` runs
    elif engine == "accelerate":
        if not _installed("accelerate"):
            return EngineRun(engine, launcher, [], w, skipped=f"accelerate not installed: {install_hint('accelerate')}")
        acc_config = out.parent / "accelerate-cpu.yaml"
        acc_config.write_text(yaml.safe_dump({**ACCELERATE_CPU_CONFIG, "num_processes": w}))
        cmd = py + ["-m", "accelerate.commands.launch", "--config_file", str(acc_config)]
        cmd += ["--num_processes", str(w), "--main_process_port", str(_free_port())] + train
        cmd += ["--engine", "accelerate"]
    elif engine == "ray":
        if not _installed("ray"):
            return EngineRun(engine, launcher, [], w, skipped=f"ray not installed: {install_hint('ray')}")
        cmd = py + train + ["--engine", "ray", "--nproc", str(w)]
        if ray_address:
            cmd += ["--ray-address", ray_address]
    else:  # the single-process large-batch reference: W = 1, k = 1, b = G
        cmd = py + train + ["--engine", "local", "--nproc", "1"]
        cmd += ["--set", "plan.accum_steps=1", "--set", "plan.micro_batch=null"]
        w = 1
    run = EngineRun(engine, launcher, cmd + files, w)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("RANK", None)
    env.pop("WORLD_SIZE", None)
    start = time.perf_counter()
    try:
        proc = subprocess.run(
            run.command, capture_output=True, text=True, env=env, timeout=max(120.0, 4 * cfg.timeout_s)
        )
    except subprocess.TimeoutExpired:
        run.error = "timed out"
        return run
    run.seconds = time.perf_counter() - start
    run.exit_code = proc.returncode
    # What the engine's command printed, kept beside its run directory's files: its `--json`
    # line is the answer a user of that engine reads, and a failure's account is in stderr.
    out.mkdir(parents=True, exist_ok=True)
    (out / "stdout.txt").write_text(proc.stdout or "")
    (out / "stderr.txt").write_text(proc.stderr or "")
    result_file = out / "result.json"
    if proc.returncode not in (0, 1) or not result_file.is_file():
        lines = [ln for ln in (proc.stderr or proc.stdout).splitlines() if ln.strip()]
        run.error = f"exit {proc.returncode}: {lines[-1] if lines else 'no output'}"
        return run
    result = json.loads(result_file.read_text())
    run.ok = bool(result["ok"])
    run.fingerprint = result["final_fingerprint"]
    run.params = load_file(str(out / "params.safetensors"))
    return run


def _table(cfg: RunConfig, runs: list[EngineRun]) -> dict[str, Any]:
    ran = [r for r in runs if r.params]
    baseline = next((r for r in ran if not r.is_reference), None)
    reference = next((r for r in ran if r.is_reference), None)
    rows = []
    for run in runs:
        row = run.to_dict()
        if run.params and baseline is not None:
            row["vs_torch"] = diff(run.params, baseline.params).to_dict()
        if run.params and reference is not None:
            row["vs_reference"] = diff(run.params, reference.params).to_dict()
        row["why"] = _why(cfg, run, baseline, row)
        rows.append(row)
    distributed = [r for r in rows if r["launcher"] is not None and not r["skipped"]]
    all_ran = all(r["ok"] for r in rows if not r["skipped"])
    engines_bitwise = all_ran and all(r.get("vs_torch", {}).get("bitwise_equal") for r in distributed)
    return {
        "world_size": cfg.plan.world_size,
        "dtype": cfg.model.dtype,
        "all_ran": all_ran,
        "engines_bitwise_equal": engines_bitwise,
        "max_abs_diff_vs_reference": max(
            (r.get("vs_reference", {}).get("max_abs_diff", 0.0) for r in rows), default=0.0
        ),
        "rows": rows,
    }


def _why(cfg: RunConfig, run: EngineRun, baseline: EngineRun | None, row: dict[str, Any]) -> str:
    if run.skipped or not run.params:
        return ""
    if cfg.sync == "exact" and row.get("vs_torch", {}).get("bitwise_equal"):
        if run is baseline:
            return "baseline"
        return "exact mode: per-sample gradients added in integers, in any order"
    if run.is_reference:
        if row.get("vs_torch", {}).get("bitwise_equal"):
            return "same sums in the same order"
        return "one process sums each global batch in one matrix product; ranks sum micro-batches, then each other"
    if row.get("vs_torch", {}).get("bitwise_equal"):
        return "the same step, the same reduction order" if run is not baseline else "baseline"
    if run.engine == "accelerate":
        return "accelerate's loss / k: no float s with fl(1/k) x s == 1 for this k (see engines/accelerate.py)"
    return "differs from the torch engine: see the numbers"


def render_rows(table: dict[str, Any]) -> list[tuple[str, ...]]:
    """The parity table's rows for a terminal or Markdown table."""
    out = []
    for r in table["rows"]:
        if r["skipped"]:
            out.append((r["name"], str(r["world_size"]), "-", r["skipped"], "", "", ""))
            continue
        if not r["ok"] and not r.get("final_fingerprint"):
            out.append((r["name"], str(r["world_size"]), "FAIL", r["error"], "", "", ""))
            continue
        out.append(
            (
                r["name"],
                str(r["world_size"]),
                "ok" if r["ok"] else "FAIL",
                r["final_fingerprint"],
                _cell(r.get("vs_torch")),
                _cell(r.get("vs_reference")),
                r["why"],
            )
        )
    return out


PARITY_HEADER = ("engine (launcher)", "W", "run", "final fingerprint", "vs torch", "vs 1 process", "why")


def _cell(d: dict[str, Any] | None) -> str:
    if d is None:
        return ""
    if d["bitwise_equal"]:
        return "bitwise"
    return f"max abs {d['max_abs_diff']:.1e}, {d['max_ulp']} ULP"


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def require_all_ran(table: dict[str, Any]) -> None:
    """A parity run in which an engine failed to run proves nothing: say which and why."""
    failed = [r for r in table["rows"] if not r["skipped"] and not r.get("final_fingerprint")]
    if failed:
        raise DistshareError("; ".join(f"engine {r['name']} did not run: {r['error']}" for r in failed))
