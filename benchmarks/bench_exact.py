"""Exact mode against normal mode: step time side by side, and distance from a float64 reference.

    python benchmarks/bench_exact.py                       # both demo models, 2 ranks, about 1 minute
    python benchmarks/bench_exact.py --nproc 1 --json --out bench-exact.json
    python benchmarks/bench_exact.py --models gpt2          # transformers' GPT-2 (tiny config), one process

GPT-2 (issue 16: exact mode for users' models). transformers' GPT2LMHeadModel from a tiny
config (2 layers, width 32, 2 heads, vocabulary 64, no dropout), G = 32 right-padded
sequences of 16 tokens with their attention mask, k = 2, SGD, one process and one thread
(`--threads`). A user's plain loop in two modes, in a rotated order every repeat, each timed
in total over `--steps` steps (after `--warmup` untimed ones): normal (summed next-token
loss / global token count, backward per micro-batch) and exact (`distshare.exact.
ExactGradients`: start_step, accumulate per micro-batch, synchronize). The ratio is the
median over repeats of total(exact) / total(normal). Peak RSS (`ru_maxrss`, the process's
high-water mark) is read after the first repeat's normal steps, before any exact step, and
at the end.

Time. Both modes run on the same spawned gloo ranks (one `run_distributed` call: one process
group, one thread setting), on the shipped configs (`configs/train/<model>.yaml`, G = 32,
k = 2), interleaved in a rotated order every repeat so that drift of the machine hits both.
A run's time per step is its total time from the end of the `--warmup`-th step to the end of
the last, over the steps between (`on_step` timestamps on rank 0; setup is never counted), on
the wall clock and in the process's CPU time. The ratio is the median over repeats of
exact / normal of the same repeat; normal mode is `sync=ddp`, the shipped default.

Precision. One process, float32, at the same parameters: the step-0 gradient of normal mode
(one forward and backward over the global batch) and of exact mode, each against the
float64 gradient; then the parameters after `--precision-steps` steps of each against a
float64 training of the same global batches.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch
from cuda_world import cuda_world, settle  # noqa: E402  (beside this file: the script's own directory)

from distshare.config import RunConfig, load_config
from distshare.distributed.spawn import run_distributed
from distshare.distributed.world import World
from distshare.numerics.diff import diff
from distshare.training import build_run, train, train_step

CONFIGS = Path(__file__).resolve().parent.parent / "configs" / "train"
MODES = ("ddp", "exact")
GOAL = 1.5  # issue 19's goal on the demo models: exact mode's step at most 1.5x normal mode's
GPT2_GOAL = 3.0  # and on transformers' GPT-2


def _config(model: str, *overrides: str) -> RunConfig:
    return load_config(CONFIGS / f"{model}.yaml", list(overrides))


def _time_rank(world: World, cfg: RunConfig, repeats: int, warmup: int) -> dict[str, list[float]]:
    """Each mode's time per step in each repeat (total over the timed steps / their number), in a
    rotated order; rank 0's wall clock, and its process CPU time under "<mode> cpu"; on a GPU
    also each run's peak of allocated device memory under "<mode> peak MB"."""
    per_step: dict[str, list[float]] = {k: [] for m in MODES for k in (m, f"{m} cpu", f"{m} peak MB")}
    cuda = world.device.type == "cuda"

    def stamp(stamps: list[tuple[float, float]]) -> None:
        settle(world)
        stamps.append((time.perf_counter(), time.process_time()))

    for r in range(repeats):
        for mode in MODES[r % 2 :] + MODES[: r % 2]:
            stamps: list[tuple[float, float]] = []
            run_cfg = dataclasses.replace(
                cfg,
                sync=mode,
                device=world.device.type,
                plan=dataclasses.replace(cfg.plan, world_size=world.world_size),
            )
            if cuda:
                torch.cuda.reset_peak_memory_stats(world.device)
            train(run_cfg, world, None, progress=False, on_step=lambda run, step, stamps=stamps: stamp(stamps))
            if cuda:
                per_step[f"{mode} peak MB"].append(torch.cuda.max_memory_allocated(world.device) / 2**20)
            timed = len(stamps) - 1 - warmup  # from the end of the last warm-up step to the end of the last
            per_step[mode].append((stamps[-1][0] - stamps[warmup][0]) / timed)
            per_step[f"{mode} cpu"].append((stamps[-1][1] - stamps[warmup][1]) / timed)
    return per_step


def timing(model: str, nproc: int, steps: int, repeats: int, warmup: int, gpu: World | None = None) -> dict[str, Any]:
    cfg = _config(model, f"steps={steps}")
    if gpu is not None:
        nproc = 1
        per_rank = [_time_rank(gpu, cfg, repeats, warmup)]
    elif nproc == 1:
        torch.set_num_threads(1)  # as each of 2 spawned ranks on 2 cores, and the GPT-2 row
        per_rank = [_time_rank(World(), cfg, repeats, warmup)]
    else:
        per_rank = run_distributed(_time_rank, nproc, cfg, repeats, warmup, timeout_s=600, deadline_s=None)
    med = per_rank[0]
    ratios = [e / n for e, n in zip(med["exact"], med["ddp"], strict=True)]
    cpu_ratios = [e / n for e, n in zip(med["exact cpu"], med["ddp cpu"], strict=True)]
    plan = cfg.plan.resolve(nproc)
    return {
        "model": model,
        "device": str(gpu.device) if gpu is not None else "cpu",
        "world_size": nproc,
        "plan": dataclasses.asdict(plan),
        "parameters": None,
        "normal_step_ms": 1e3 * statistics.median(med["ddp"]),
        "exact_step_ms": 1e3 * statistics.median(med["exact"]),
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "cpu_ratio": statistics.median(cpu_ratios),
        **_peaks(med["ddp peak MB"], med["exact peak MB"]),
        "goal": GOAL,
    }


def _peaks(normal: list[float], exact: list[float]) -> dict[str, float]:
    """The highest peak of allocated GPU memory over each mode's runs (none off a GPU)."""
    return {f"{name}_peak_cuda_mb": max(mb) for name, mb in (("normal", normal), ("exact", exact)) if mb}


GPT2_VOCAB, GPT2_LENGTH, GPT2_BATCH, GPT2_ACCUM = 64, 16, 32, 2


def _gpt2_setup() -> tuple[torch.nn.Module, list[tuple[torch.Tensor, torch.Tensor]], int]:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(
        n_layer=2, n_embd=32, n_head=2, vocab_size=GPT2_VOCAB, n_positions=GPT2_LENGTH,
        attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, bos_token_id=0, eos_token_id=0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(2, GPT2_VOCAB, (GPT2_BATCH, GPT2_LENGTH), generator=gen)
    lengths = torch.randint(GPT2_LENGTH // 2, GPT2_LENGTH + 1, (GPT2_BATCH,), generator=gen)
    mask = (torch.arange(GPT2_LENGTH) < lengths.unsqueeze(1)).long()
    b = GPT2_BATCH // GPT2_ACCUM
    micro = [(ids[i : i + b] * mask[i : i + b], mask[i : i + b]) for i in range(0, GPT2_BATCH, b)]
    return model, micro, int(mask[:, 1:].sum())


def _gpt2_losses(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    """Each sequence's summed next-token loss (padding labels -100): what exact mode differentiates."""
    ids, mask = batch
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    labels = ids[:, 1:].masked_fill(mask[:, 1:] == 0, -100)
    per_token = torch.nn.functional.cross_entropy(
        logits.reshape(-1, GPT2_VOCAB), labels.reshape(-1), reduction="none", ignore_index=-100
    )
    return per_token.view(labels.shape).sum(dim=1)


def gpt2_timing(steps: int, repeats: int, warmup: int, threads: int, gpu: World | None = None) -> dict[str, Any]:
    """A user's loop on tiny GPT-2, normal and exact, side by side in this process (on the GPU
    of `gpu`, a world of one rank, when given)."""
    import resource

    from distshare.exact import ExactGradients

    torch.set_num_threads(threads)
    world = gpu or World()
    model, micro, tokens = _gpt2_setup()
    model.to(world.device)
    micro = [(ids.to(world.device), mask.to(world.device)) for ids, mask in micro]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    exact = ExactGradients(model)

    def normal_step() -> None:
        for batch in micro:
            (_gpt2_losses(model, batch).sum() / tokens).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def exact_step() -> None:
        exact.start_step(global_items=tokens, global_samples=GPT2_BATCH)
        for batch in micro:
            exact.accumulate(batch, _gpt2_losses)
        exact.synchronize()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    runs = {"normal": normal_step, "exact": exact_step}
    totals: dict[str, list[float]] = {m: [] for m in runs}
    peaks: dict[str, list[float]] = {m: [] for m in runs}
    rss_normal = 0.0
    for r in range(repeats):
        for mode in list(runs)[r % 2 :] + list(runs)[: r % 2]:
            for _ in range(warmup):
                runs[mode]()
            settle(world)
            if world.device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(world.device)
            start = time.perf_counter()
            for _ in range(steps):
                runs[mode]()
            settle(world)
            totals[mode].append(time.perf_counter() - start)
            if world.device.type == "cuda":
                peaks[mode].append(torch.cuda.max_memory_allocated(world.device) / 2**20)
            if r == 0 and mode == "normal":
                rss_normal = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    ratios = [e / n for e, n in zip(totals["exact"], totals["normal"], strict=True)]
    return {
        "model": "gpt2",
        "device": str(world.device),
        "world_size": 1,
        "threads": threads,
        "method": exact.method,
        "parameters": sum(p.numel() for p in model.parameters()),
        "normal_step_ms": 1e3 * statistics.median(totals["normal"]) / steps,
        "exact_step_ms": 1e3 * statistics.median(totals["exact"]) / steps,
        "ratio": statistics.median(ratios),
        "ratios": ratios,
        "peak_rss_mb_after_normal": rss_normal,
        "peak_rss_mb_at_end": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        **_peaks(peaks["normal"], peaks["exact"]),
        "goal": GPT2_GOAL,
    }


def precision(model: str, steps: int) -> dict[str, Any]:
    """float32 normal and exact against float64, at the same parameters and after training."""
    base = _config(model, f"steps={steps}", "check_every=0", "plan.accum_steps=1", "plan.micro_batch=null")
    runs = {}
    for name, dtype, sync in (
        ("float64", "float64", "ddp"),
        ("normal", "float32", "ddp"),
        ("exact", "float32", "exact"),
    ):
        cfg = dataclasses.replace(base, sync=sync, model=dataclasses.replace(base.model, dtype=dtype))
        runs[name] = cfg
    # Step-0 gradients at the same (float32-representable) parameters.
    built = {n: build_run(c, World()) for n, c in runs.items()}
    ref32 = {k: v.to(torch.float64) for k, v in built["normal"].model.state_dict().items()}
    built["float64"].model.load_state_dict(ref32)
    grads = {}
    for name, run in built.items():
        train_step(run, 0)
        grads[name] = {n: p.grad.detach().to(torch.float64).clone() for n, p in run.model.named_parameters()}
    out: dict[str, Any] = {
        "model": model,
        "steps": steps,
        "parameters": sum(g.numel() for g in grads["float64"].values()),
    }
    for name in ("normal", "exact"):
        out[f"grad_{name}_vs_float64"] = _brief(diff(grads[name], grads["float64"]))
    finals = {}
    for name, cfg in runs.items():
        res = train(cfg, World(), None, progress=False, keep_state=True)
        finals[name] = {k: v.to(torch.float64) for k, v in (res.state or {}).items()}
    for name in ("normal", "exact"):
        out[f"params_{name}_vs_float64"] = _brief(diff(finals[name], finals["float64"]))
    return out


def _brief(d: Any) -> dict[str, float]:
    return {"max_abs": d.max_abs_diff, "norm_rel": d.norm_rel_diff}


# ---------------------------------------------------------------- memory against the batch

# bench_check_cost.py's 12.6M-parameter transformer (d_model 512, 4 layers, d_ff 2048).
MEMORY_MODEL = ["model.d_model=512", "model.n_heads=8", "model.n_layers=4", "model.d_ff=2048"]
MEMORY_CAP_GB = 16  # address space per child (the machine has 24 GiB)
MEMORY_TIMEOUT_S = 3600  # per child: three steps of the 12.6M model


def _memory_child(mode: str, samples: int) -> None:
    """One process: 3 steps of `mode` at a global batch of `samples`; prints RSS (MB) before and at
    peak, and the time of steps 2 and 3 per step (the first, with its allocations, and the setup
    before it are not counted)."""
    import resource

    torch.set_num_threads(1)
    # A cap on the address space: a run that would need more fails here with a MemoryError
    # instead of taking the machine down (the per-sample buffer grows with the batch).
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_CAP_GB << 30, resource.RLIM_INFINITY))
    cfg = load_config(
        CONFIGS / "transformer.yaml",
        [*MEMORY_MODEL, f"sync={mode}", f"plan.global_batch={samples}", "plan.accum_steps=1"]
        + ["plan.micro_batch=null", f"data.num_samples={3 * samples}", "steps=3", "check_every=0"],
    )
    before = _rss_now_mb()
    ends: list[float] = []
    try:
        train(cfg, World(), None, progress=False, on_step=lambda run, step: ends.append(time.perf_counter()))
    except (MemoryError, RuntimeError) as exc:  # torch's CPU allocator raises RuntimeError
        if "memory" not in str(exc).lower() and not isinstance(exc, MemoryError):
            raise
        print(json.dumps({"mode": mode, "samples": samples, "rss_before_mb": before, "failed": "out of memory"}))
        return
    seconds = (ends[-1] - ends[0]) / (len(ends) - 1)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    row = {"mode": mode, "samples": samples, "rss_before_mb": before, "peak_rss_mb": peak, "step_s": seconds}
    print(json.dumps(row))


def _rss_now_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20


def memory(samples: list[int]) -> list[dict[str, Any]]:
    """Peak RSS of normal and exact mode at each global batch, each in a fresh process (one rank)."""
    import subprocess

    rows = []
    for n in samples:
        for mode in MODES:
            try:
                out = subprocess.run(
                    [sys.executable, __file__, "--memory-child", mode, str(n)],
                    capture_output=True,
                    text=True,
                    timeout=MEMORY_TIMEOUT_S,
                )
            except subprocess.TimeoutExpired:
                rows.append({"mode": mode, "samples": n, "failed": f"no result within {MEMORY_TIMEOUT_S} s"})
                continue
            if out.returncode != 0:  # e.g. killed by the kernel for memory
                rows.append({"mode": mode, "samples": n, "failed": f"exit {out.returncode}: {out.stderr[-200:]}"})
                continue
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="transformer,cnn,gpt2")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--precision-steps", type=int, default=30)
    p.add_argument("--threads", type=int, default=1, help="torch threads for the GPT-2 row")
    p.add_argument("--memory", default="", help="global batches for the peak-memory rows, e.g. 32,128,512")
    p.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one rank on this GPU (nccl)")
    p.add_argument("--json", action="store_true")
    p.add_argument("--out", help="write the results as JSON to this file")
    args = p.parse_args(argv)
    if args.memory_child:
        _memory_child(args.memory_child[0], int(args.memory_child[1]))
        return 0
    if args.memory:
        sizes = args.memory.split(",")
        if not all(n.isdigit() and int(n) > 0 for n in sizes):
            print(f"bench_exact: --memory takes positive global batches (32,128); got {args.memory!r}", file=sys.stderr)
            return 2
        rows = memory([int(n) for n in sizes])
        for r in rows:
            what = (
                f"failed: {r['failed']} (address space capped at {MEMORY_CAP_GB} GB)"
                if "failed" in r
                else f"peak RSS {r['peak_rss_mb']:7.0f} MB (before training {r['rss_before_mb']:.0f} MB), "
                f"{r['step_s']:.2f} s/step"
            )
            print(f"12.6M model, {r['mode']:5s} G={r['samples']:4d}: {what}")
        if args.out:
            Path(args.out).write_text(json.dumps({"memory": rows}, indent=1) + "\n")
        return 0
    if args.nproc < 1 or args.steps <= args.warmup + 2 or args.repeats < 1 or args.precision_steps < 0:
        print(
            "bench_exact: need --nproc >= 1, --steps > --warmup + 2, --repeats >= 1, --precision-steps >= 0",
            file=sys.stderr,
        )
        return 2
    models = [m for m in args.models.split(",") if m]
    results: dict[str, Any] = {"timing": [], "precision": [], "torch": torch.__version__}
    gpu = cuda_world("bench_exact") if args.device == "cuda" else None
    for m in models:
        if m == "gpt2":
            t = gpt2_timing(args.steps, args.repeats, args.warmup, args.threads, gpu)
        else:
            t = timing(m, args.nproc, args.steps, args.repeats, args.warmup, gpu)
        results["timing"].append(t)
        if not args.json:
            cpu = f", CPU {t['cpu_ratio']:.2f}" if "cpu_ratio" in t else ""
            peak = (
                f"; peak GPU memory normal {t['normal_peak_cuda_mb']:.0f} MB, exact {t['exact_peak_cuda_mb']:.0f} MB"
                if "exact_peak_cuda_mb" in t
                else ""
            )
            print(
                f"{m:12s} {t['device']} W={t['world_size']}  normal {t['normal_step_ms']:7.2f} ms  "
                f"exact {t['exact_step_ms']:7.2f} ms"
                f"  ratio {t['ratio']:.2f}{cpu} (goal <= {t['goal']:g}; per repeat "
                f"{', '.join(f'{r:.2f}' for r in t['ratios'])}){peak}"
            )
            if m == "gpt2":
                print(
                    f"{'':12s} {t['threads']} thread(s), method {t['method']}; peak RSS "
                    f"{t['peak_rss_mb_after_normal']:.0f} MB after normal steps, "
                    f"{t['peak_rss_mb_at_end']:.0f} MB at the end"
                )
    # GPT-2: bitwise equality is tested, not benchmarked; --precision-steps 0 skips this part.
    for m in (m for m in models if m != "gpt2" and args.precision_steps > 0):
        pr = precision(m, args.precision_steps)
        results["precision"].append(pr)
        if not args.json:
            for what in ("grad", "params"):
                row = "  ".join(
                    f"{name} {pr[f'{what}_{name}_vs_float64']['norm_rel']:.2e} "
                    f"(max abs {pr[f'{what}_{name}_vs_float64']['max_abs']:.1e})"
                    for name in ("normal", "exact")
                )
                label = "step-0 gradient" if what == "grad" else f"params after {pr['steps']} steps"
                print(f"{m:12s} float32 vs float64, {label:22s} norm rel: {row}")
    if args.json:
        print(json.dumps(results, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
