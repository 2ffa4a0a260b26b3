"""The schema of a run: dataclasses, loaded from YAML, overridden with dotted `--set a.b=v`.

Dataclasses are the schema so that a typo in a YAML file or an override is caught by name
(`unknown key 'plan.wold_size'`) instead of being silently ignored. Every problem becomes a
`ConfigError` that names the field and what was expected; the CLI turns it into one line
and exit code 2.

The global batch plan `G = W x k x b` is stated by any two of (G, k, b) plus the world
size W; the third is derived by `PlanConfig.resolve`. Keeping the two *given* numbers (and
not the derived one) lets `--nproc` change W and re-derive, e.g. G=32, k=2 gives b=16 on one
rank and b=8 on two.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

import torch
import yaml

from distshare.errors import ConfigError, UsageError

MODELS = ("transformer", "cnn")
DATASETS = ("svo", "shapes", "digits", "pydoc", "file")
ENGINES = ("auto", "local", "torch", "accelerate", "ray")
DEVICES = ("cpu", "cuda")
SYNC_MODES = ("ddp", "allreduce", "exact")
PARALLEL = ("ddp", "fsdp", "hsdp")  # data-parallel layouts: replicas | shards | shards replicated in groups
BUFFER_CHECKS = ("compare", "separate", "ignore")  # distshare.integrity.replicas.BUFFER_MODES
CHECK_MODES = ("full", "rolling")  # distshare.training.replica_check
DTYPES = {"float32": torch.float32, "float64": torch.float64}  # model.dtype: the name and the torch dtype
NORMS = ("none", "batch", "group")
OPTIMIZERS = ("sgd", "adam", "adamw")
SVO_TASKS = ("subject", "roles")
# Bounds on numbers a type accepts but a run cannot use; past them the failure would come
# late, inside the ranks, as an overflow or an allocation error (or a generator running for
# hours) instead of one line naming the field.
SEED_LIMIT = 2**64  # torch and numpy generators take seeds in [0, 2**64)
MAX_SAMPLES = 10_000_000  # generated data sets live in memory, built in every process
MAX_ELEMENTS = 2**31  # parameters of a model, pixels of a generated image set (8 GiB of float32)
MAX_TIMEOUT_S = 7 * 24 * 3600.0  # a week; timedelta and gloo's millisecond timeouts overflow far above


@dataclass
class ModelConfig:
    """Which network, and its sizes. Transformer fields are ignored by the CNN and vice versa."""

    name: str = "transformer"  # transformer | cnn
    dtype: str = "float32"  # float32 | float64: parameters, activations and gradients
    d_model: int = 32  # transformer: width of every token representation
    n_heads: int = 4  # transformer: heads per attention layer; d_model must divide by it
    n_layers: int = 2  # transformer: attention + feed-forward blocks
    d_ff: int = 64  # transformer: hidden width of the feed-forward block
    positional: bool = True  # transformer: add sinusoidal positions; off = a bag of tokens
    conv_channels: int = 8  # cnn: filters in the first conv; the second has twice as many
    kernel_size: int = 3  # cnn: side of every (square) kernel, odd
    norm: str = "none"  # cnn: none | batch | group (normalization after each conv)


@dataclass
class DataConfig:
    """Which data set, generated offline from `seed` or read from a local file."""

    name: str = "svo"  # svo | shapes | digits | pydoc | file
    num_samples: int = 512  # generated sets: how many samples (digits/pydoc: at most this many)
    seed: int = 0  # generated sets: the generator's seed, independent of the run seed
    task: str = "subject"  # svo: subject (who acts, one label) | roles (a label per token)
    variable_length: bool = False  # svo: optional adjectives make sentences of 3 to 5 words
    image_size: int = 12  # shapes: side of the square image in pixels
    path: str | None = None  # file: a local .csv / .json / .jsonl / .parquet file
    text_field: str = "text"  # file: column with whitespace-separated text
    label_field: str = "label"  # file: column with the class label (int or string)


@dataclass
class PlanConfig:
    """The global batch plan: G = world_size x accum_steps x micro_batch. Give two of G, k, b."""

    world_size: int = 1  # W: ranks taking part; --nproc and launchers set it
    global_batch: int | None = 32  # G: samples consumed by one optimizer step, all ranks together
    accum_steps: int | None = 1  # k: micro-batches each rank runs before gradients are synced
    micro_batch: int | None = None  # b: samples in one forward/backward on one rank
    seed: int = 0  # shuffles the sample order of every epoch; same order for every W and k
    drop_last: bool = True  # drop the last incomplete global batch of an epoch (logged)

    def resolve(self, world_size: int | None = None) -> ResolvedPlan:
        """Derive the missing one of (G, k, b) for `world_size` (default: the configured W)."""
        w = self.world_size if world_size is None else world_size
        _positive("plan.world_size", w)
        g, k, b = self.global_batch, self.accum_steps, self.micro_batch
        for name, value in (("global_batch", g), ("accum_steps", k), ("micro_batch", b)):
            if value is not None:
                _positive(f"plan.{name}", value)
        given = sum(v is not None for v in (g, k, b))
        if given < 2:
            raise ConfigError("plan", "give two of global_batch, accum_steps, micro_batch (G = W x k x b)")
        if g is None:
            g = w * k * b
        elif b is None:
            b = _quotient(g, w, k, "accum_steps")
        elif k is None:
            k = _quotient(g, w, b, "micro_batch")
        elif g != w * k * b:
            raise ConfigError(
                "plan",
                f"inconsistent: global_batch {g} != world_size {w} x accum_steps {k} x micro_batch {b} = {w * k * b}",
            )
        return ResolvedPlan(global_batch=g, world_size=w, accum_steps=k, micro_batch=b)


@dataclass(frozen=True)
class ResolvedPlan:
    """All four numbers of a plan, consistent by construction."""

    global_batch: int
    world_size: int
    accum_steps: int
    micro_batch: int


@dataclass
class OptimConfig:
    """The optimizer. Its state (momenta, Adam moments) is part of the replicated state too."""

    name: str = "adamw"  # sgd | adam | adamw
    lr: float = 1e-3  # learning rate
    momentum: float = 0.0  # sgd only
    weight_decay: float = 0.0  # decoupled for adamw, L2 for sgd/adam


@dataclass
class CheckpointConfig:
    """Checkpoints during training and where a run resumes from (distshare.integrity.resume)."""

    dir: str | None = None  # write checkpoints to DIR/step-NNNNNN (steps done); None = no checkpoints
    every: int = 10  # checkpoint every N steps (and always after the last); 0 = only after the last
    keep: int = 3  # keep the newest K checkpoints, delete older ones
    resume: str | None = None  # a checkpoint directory to continue from, or auto: `dir` if it holds one


@dataclass
class RunConfig:
    """One run: model, data, plan, optimizer and how the step is synchronized."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    plan: PlanConfig = field(default_factory=PlanConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    steps: int = 30  # optimizer steps (global batches) to run
    seed: int = 0  # parameter initialization; identical on every rank
    # ddp (DistributedDataParallel + no_sync) | allreduce (explicit all_reduce)
    # | exact (per-sample gradients summed in integers: bitwise the same for every split)
    sync: str = "ddp"
    # ddp: every rank holds a replica | fsdp: each tensor sharded over all ranks (FSDP2 fully_shard)
    # | hsdp: sharded within a group, the groups replicated (mesh hsdp_replicas x W / hsdp_replicas)
    parallel: str = "ddp"
    hsdp_replicas: int = 2  # hsdp: replicate groups R on the mesh R x (W / R); W must divide by R
    # auto: the launcher's (torchrun, accelerate launch) when launched, else torch for W > 1, else local.
    # local: one process | torch: spawned gloo ranks or torchrun's | accelerate | ray (Ray Train)
    engine: str = "auto"
    device: str = "cpu"  # cpu (gloo) | cuda (nccl, one GPU per rank), under every engine and launcher
    check_every: int = 10  # compare replica fingerprints every N steps (verify: 1); 0 = only at the end
    # compare | separate (buffers compared and reported, not a failure: BatchNorm under DDP) | ignore
    check_buffers: str = "compare"
    # full: each check digests every byte of the state | rolling: each check digests one slice
    # (all of it within check_slices checks), compared check_batch checks at a time in the
    # background; full at the ends
    check_mode: str = "full"
    check_slices: int = 0  # rolling: slices of the state (0: as many as keep each <= 32 MiB and <= 32 tensors)
    # rolling: checks whose 16-byte digests one background gather compares; a difference is
    # reported within (slices + check_batch) x check_every steps (distshare.integrity.rolling)
    check_batch: int = 16
    timeout_s: float = 120.0  # bound on every collective and on waiting for ranks, seconds
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)  # checkpoints and resume

    def validate(self) -> RunConfig:
        """Check every field that a type alone cannot; raise `ConfigError` naming the first bad one."""
        _choice("model.name", self.model.name, MODELS)
        _choice("model.dtype", self.model.dtype, tuple(DTYPES))
        _choice("model.norm", self.model.norm, NORMS)
        _choice("data.name", self.data.name, DATASETS)
        _choice("data.task", self.data.task, SVO_TASKS)
        _choice("optim.name", self.optim.name, OPTIMIZERS)
        _choice("sync", self.sync, SYNC_MODES)
        _choice("check_buffers", self.check_buffers, BUFFER_CHECKS)
        _choice("check_mode", self.check_mode, CHECK_MODES)
        if self.check_slices < 0:
            raise ConfigError("check_slices", f"expected 0 (auto) or a positive integer, got {self.check_slices}")
        if self.check_batch < 1:
            raise ConfigError("check_batch", f"expected a positive number of checks per gather, got {self.check_batch}")
        _check_parallel(self)
        if self.sync == "exact" and self.model.name == "cnn" and self.model.norm == "batch":
            raise ConfigError(
                "model.norm",
                "batch norm in training mode depends on how the global batch is split, so sync=exact "
                "cannot make partitions agree; use model.norm=group (or none), or another sync",
            )
        _choice("engine", self.engine, ENGINES)
        _choice("device", self.device, DEVICES)
        for name in ("d_model", "n_heads", "n_layers", "d_ff", "conv_channels", "kernel_size"):
            _positive(f"model.{name}", getattr(self.model, name))
        if self.model.d_model % self.model.n_heads:
            raise ConfigError(
                "model.d_model",
                f"{self.model.d_model} must be divisible by model.n_heads={self.model.n_heads}",
            )
        if self.model.kernel_size % 2 == 0:
            raise ConfigError("model.kernel_size", f"expected an odd size, got {self.model.kernel_size}")
        if self.model.norm == "group" and self.model.conv_channels % 2:
            raise ConfigError("model.conv_channels", "group norm uses 2 groups: expected an even number")
        _positive("data.num_samples", self.data.num_samples)
        _positive("data.image_size", self.data.image_size)
        if self.data.image_size < 4:
            raise ConfigError("data.image_size", f"expected at least 4 pixels, got {self.data.image_size}")
        if self.data.name == "file":
            if not self.data.path:
                raise ConfigError("data.path", "data.name is 'file': give the path of a csv/json/parquet file")
            if not Path(self.data.path).is_file():
                what = "not a regular file" if Path(self.data.path).exists() else "no such file"
                raise ConfigError("data.path", f"{what}: {self.data.path}")
        # `not x > 0` (rather than `x <= 0`) also refuses NaN; infinities are refused too:
        # torch's optimizers and timeouts would otherwise fail later, inside the ranks.
        if not 0 < self.optim.lr < math.inf:
            raise ConfigError("optim.lr", f"expected a positive number, got {self.optim.lr}")
        for name in ("momentum", "weight_decay"):
            value = getattr(self.optim, name)
            if not 0 <= value < math.inf:
                raise ConfigError(f"optim.{name}", f"expected 0 or a positive number, got {value}")
        _positive("steps", self.steps)
        if self.check_every < 0:
            raise ConfigError("check_every", f"expected 0 or a positive integer, got {self.check_every}")
        if not 0 < self.timeout_s < math.inf:
            raise ConfigError("timeout_s", f"expected a positive number of seconds, got {self.timeout_s}")
        self.plan.resolve()
        _check_checkpoint(self.checkpoint)
        _check_ranges(self)
        return self


def _check_parallel(cfg: RunConfig) -> None:
    """The layout: a sync that fits it, and (hsdp) a mesh the world size fills."""
    _choice("parallel", cfg.parallel, PARALLEL)
    if cfg.parallel == "ddp":
        return
    if cfg.sync == "allreduce":
        raise ConfigError(
            "sync",
            f"allreduce all-reduces whole replicated gradients; under parallel {cfg.parallel} FSDP2 reduce-scatters "
            "each shard itself: use sync ddp (the layout's own SUM reduction) or parallel ddp",
        )
    if cfg.sync == "exact":
        raise ConfigError(
            "sync",
            f"exact mode needs per-sample gradients, and none of its methods runs on parallel {cfg.parallel}'s "
            "DTensor shards (vmap: 'Cannot flatten unevenly sharded tensor'; hooks: the parameters FSDP2 swaps in "
            "never reach the loss; expanded: ExpandedWeight cannot wrap a DTensor): use parallel ddp for sync exact",
        )
    hsdp_mesh(cfg, cfg.plan.world_size)


def hsdp_mesh(cfg: RunConfig, world_size: int) -> tuple[int, int]:
    """(replicate, shard) sizes of the device mesh for `world_size` ranks: (1, W) for fsdp."""
    if cfg.parallel != "hsdp" or world_size == 1:  # one process holds everything: nothing to shard
        return 1, world_size
    r = cfg.hsdp_replicas
    if r < 1 or world_size % r:
        raise ConfigError(
            "hsdp_replicas",
            f"the hsdp mesh is replicas x shards = {world_size} ranks: {r} does not divide {world_size} "
            f"(give one of {', '.join(str(d) for d in range(1, world_size + 1) if world_size % d == 0)})",
        )
    return r, world_size // r


def _check_checkpoint(ck: CheckpointConfig) -> None:
    """The checkpoint section: counts in range, and `resume: auto` only with a `dir` to look in."""
    if ck.every < 0:
        raise ConfigError("checkpoint.every", f"expected 0 or a positive integer, got {ck.every}")
    _positive("checkpoint.keep", ck.keep)
    for name in ("dir", "resume"):
        value = getattr(ck, name)
        if value is not None and not value.strip():
            raise ConfigError(f"checkpoint.{name}", "expected a directory, got an empty string")
    if ck.resume == "auto" and ck.dir is None:
        raise ConfigError("checkpoint.resume", "auto resumes from checkpoint.dir: give checkpoint.dir too")


def _check_ranges(cfg: RunConfig) -> None:
    """Numbers of the right type but beyond what a run can use (see the bounds above)."""
    for name, value in (("seed", cfg.seed), ("data.seed", cfg.data.seed), ("plan.seed", cfg.plan.seed)):
        if not 0 <= value < SEED_LIMIT:
            raise ConfigError(name, f"expected an integer from 0 to 2**64 - 1, got {value}")
    if cfg.data.num_samples > MAX_SAMPLES:
        raise ConfigError("data.num_samples", f"expected at most {MAX_SAMPLES:,}, got {cfg.data.num_samples:,}")
    if cfg.data.name == "shapes" and cfg.data.num_samples * cfg.data.image_size**2 > MAX_ELEMENTS:
        raise ConfigError(
            "data.image_size",
            f"{cfg.data.num_samples:,} images of {cfg.data.image_size}x{cfg.data.image_size} pixels are more "
            f"than {MAX_ELEMENTS:,} pixels in memory",
        )
    m = cfg.model
    if m.name == "transformer":  # blocks, plus the embedding of a vocabulary of at most 2**16 words
        params, field_name = (
            m.n_layers * (4 * m.d_model**2 + 2 * m.d_model * m.d_ff) + 2**16 * m.d_model,
            "model.d_model",
        )
    else:  # two convolutions, and a head over the feature map of (image / 4)^2 cells, <= 16 classes
        c, k = m.conv_channels, m.kernel_size
        params, field_name = (
            c * k * k * (3 + 2 * c) + 2 * c * (cfg.data.image_size // 4) ** 2 * 16,
            "model.conv_channels",
        )
    if params > MAX_ELEMENTS:
        raise ConfigError(
            field_name, f"the model would hold about {_approx(params)} parameters, more than {MAX_ELEMENTS:,}"
        )
    if cfg.timeout_s > MAX_TIMEOUT_S:
        raise ConfigError("timeout_s", f"expected at most {MAX_TIMEOUT_S:.0f} seconds (a week), got {cfg.timeout_s:g}")


def _approx(n: int) -> str:
    """A huge count in three digits (a float cannot hold every integer YAML can write)."""
    return f"{n:.3g}" if n < 10**300 else f"1e{len(str(n)) - 1}"


def _quotient(g: int, w: int, other: int, other_name: str) -> int:
    """G / (W x other), refusing a remainder: no rank may get a different share."""
    if g % (w * other):
        fix = nearest_global_batch(g, [w * other])
        raise ConfigError(
            "plan.global_batch",
            f"{g} is not divisible by world_size x {other_name} = {w} x {other} = {w * other}; "
            f"the nearest that is: --set plan.global_batch={fix}",
        )
    return g // (w * other)


def nearest_global_batch(g: int, divisors: Iterable[int]) -> int:
    """The global batch nearest `g` that every one of `divisors` divides (the smaller on a
    tie): a multiple of their least common multiple, never 0. For one plan the divisor is
    W x k; for a grid of partitions, every W x k of the grid (W in 1,2,3,4 x k in 1,2,4,8: 96)."""
    step = math.lcm(*divisors)
    below = g - g % step
    above = below + step
    return above if below == 0 or above - g < g - below else below


def _positive(name: str, value: int) -> None:
    if value <= 0:
        raise ConfigError(name, f"expected a positive integer, got {value}")


def _choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ConfigError(name, f"unknown value {value!r}; expected one of {', '.join(allowed)}")


# ---------------------------------------------------------------------------------------
# Loading: YAML -> dict -> dataclasses, with every key and type checked by name.


# The run configs shipped with the package, so that `--config transformer` works wherever
# distshare is installed. The repository's top-level `configs/` is a link to this folder:
# one copy of every file, edited in either place. (A path, not importlib.resources: the
# files are read with open(), and distshare is never imported from a zip.)
SHIPPED_CONFIGS = Path(__file__).resolve().parent / "configs"


def shipped_configs() -> dict[str, Path]:
    """Every run config shipped with distshare, by name: `--config cnn`, `--config transformer`."""
    return {p.stem: p for p in sorted((SHIPPED_CONFIGS / "train").glob("*.yaml"))}


def config_path(text: str | Path) -> Path:
    """The file `--config TEXT` means: a file that exists as given (a user's path always
    wins), else the shipped config named TEXT (`transformer`, `cnn.yaml`); else a
    UsageError that says why and names the shipped configs."""
    p = Path(text)
    if p.is_file():
        return p
    text = str(text)
    bare = text not in ("", ".", "..") and os.sep not in text and not (os.altsep and os.altsep in text)
    name = text.removesuffix(".yaml").removesuffix(".yml")
    shipped = shipped_configs()
    if bare and name in shipped:
        return shipped[name]
    names = ", ".join(shipped) or "none"
    if p.is_dir() or p.exists():
        what = "that is a directory" if p.is_dir() else "not a regular file"
        raise UsageError(f"config file not found: {p} ({what}); shipped configs by name: {names}")
    if not bare and p.stem in shipped:  # a checkout's path, used outside the checkout
        raise UsageError(
            f"config file not found: {p} (relative to {Path.cwd()}); the same config ships with distshare: "
            f"--config {p.stem}"
        )
    close = difflib.get_close_matches(name, list(shipped), n=1)
    hint = f"; did you mean --config {close[0]}?" if bare and close else ""
    raise UsageError(f"config file not found: {p} (give a path, or a shipped config by name: {names}){hint}")


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML config (a path or a shipped name; or the defaults), apply `key=value`
    overrides, validate."""
    raw: dict[str, Any] = {}
    if path is not None:
        p = config_path(path)
        try:
            text = p.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            reason = exc.strerror if isinstance(exc, OSError) else "not UTF-8 text"
            raise UsageError(f"config file {p} cannot be read ({reason})") from None
        try:
            loaded = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            raise UsageError(f"config file {p} is not valid YAML{where}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise UsageError(f"config file {p}: expected a mapping of fields at the top level")
        raw = loaded
    for item in overrides or []:
        apply_override(raw, item)
    return from_dict(RunConfig, raw).validate()


def apply_override(raw: dict[str, Any], item: str) -> None:
    """Set a dotted key in the raw mapping; the value is read as YAML (`4`, `true`, `null`)."""
    key, sep, text = item.partition("=")
    if not sep or not key.strip():
        raise UsageError(f"--set expects key=value (for example plan.world_size=4), got {item!r}")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    parts = key.strip().split(".")
    node = raw
    for i, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(".".join(parts[: i + 1]), "is a value, not a section")
        node = child
    node[parts[-1]] = value


def from_dict(cls: type, raw: Any, prefix: str = "") -> Any:
    """Build dataclass `cls` from a mapping, refusing unknown keys and wrong types by name."""
    where = prefix.rstrip(".") or "config"
    if not isinstance(raw, dict):
        raise ConfigError(where, f"expected a mapping of fields, got {_kind(raw)}")
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}
    for key in raw:
        if key not in known:
            raise ConfigError(f"{prefix}{key}", f"unknown key; known keys: {', '.join(sorted(known))}")
    values = {}
    for key, value in raw.items():
        hint = hints[key]
        if dataclasses.is_dataclass(hint):
            values[key] = from_dict(hint, value, f"{prefix}{key}.")
        else:
            values[key] = _coerce(f"{prefix}{key}", value, hint)
    return cls(**values)


def _coerce(name: str, value: Any, hint: Any) -> Any:
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(name, f"expected {_type_name(hint)}, got null")
    for t in options:
        if t is bool and isinstance(value, bool):
            return value
        if t is int and isinstance(value, int) and not isinstance(value, bool):
            return value
        if t is float and isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if t is str and isinstance(value, str):
            return value
    raise ConfigError(name, f"expected {_type_name(hint)}, got {_kind(value)} {value!r}")


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (Union, types.UnionType)


def _type_name(hint: Any) -> str:
    if _is_union(hint):
        return " or ".join(_type_name(t) for t in typing.get_args(hint))
    return {int: "an integer", float: "a number", bool: "true or false", str: "a string"}.get(
        hint, "null" if hint is type(None) else str(hint)
    )


def _kind(value: Any) -> str:
    return {
        dict: "a mapping",
        list: "a list",
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
    }.get(type(value), type(value).__name__)


def to_dict(cfg: RunConfig, world_size: int | None = None) -> dict[str, Any]:
    """The resolved config as plain data: what every run directory records as `config.yaml`."""
    data = dataclasses.asdict(cfg)
    plan = cfg.plan.resolve(world_size)
    data["plan"].update(dataclasses.asdict(plan))
    return data


def dump_config(cfg: RunConfig, path: Path, world_size: int | None = None) -> None:
    """Write the resolved config so that `load_config(path)` reproduces the run."""
    path.write_text(yaml.safe_dump(to_dict(cfg, world_size), sort_keys=False))
