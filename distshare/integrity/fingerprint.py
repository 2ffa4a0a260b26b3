"""Fingerprints: a 128-bit digest of a tensor's dtype, shape and raw bytes.

Two replicas hold "the same parameters" only if every bit agrees, so a fingerprint hashes
the raw bytes (not a rounded value, not a float sum, which cancels). The dtype and shape go
into the digest too: a float32 and a float64 zero, or a [2, 3] and a [3, 2] tensor with the
same bytes, are different state. Every digest names its algorithm (`xxh3_128:...`,
`dsh128:...`), and `check_comparable` refuses to compare digests of different algorithms:
two algorithms' digests of the same tensor differ, which must never read as "replicas differ".

Two algorithms, one per place a tensor lives, and one for tensors no rank holds whole:

- `xxh3_128` (CPU tensors): xxHash's XXH3 over `dtype|shape|` and the bytes, a fast
  non-cryptographic hash (benchmarks/bench_checksum.py compares it with SHA-256).
- `dsh128` (CUDA tensors): computed where the tensor is, so the tensor never travels to the
  host; only two 64-bit lane sums do. The spec, with the plain torch ops that are its
  reference, is `distshare.integrity.dsh128`; the fused Triton kernel beside it
  (`distshare.integrity.dsh128_triton`) is used on CUDA when triton imports and agrees with
  the torch ops on a self-check, so every path gives the same digest and the CPU tests are
  the specification of all of them. The header (dtype, shape, byte count) and the two lane
  sums are finally hashed with xxh3-128 on the host: 16 bytes, not the tensor.

- `lsh128` (logical tensors): an element-keyed sum that composes over shards, so an FSDP2 /
  HSDP model's tensors get the digest of the whole tensor without gathering it
  (`distshare.integrity.logical`); the default for sharded models, and available for any
  tensor (`algorithm="lsh128"`) so a DDP replica or one process can be compared with them.

None is cryptographic: they detect accidents (drift, corruption, a missed all-reduce),
not an adversary. What "the training state" is (which tensors, under which names) is
`distshare.integrity.state`; `fingerprint_state` digests it.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Iterable, Mapping

import torch
import xxhash
from torch import nn

from distshare.integrity.dsh128 import LANES, WORD_BYTES, dsh128_lanes_torch  # noqa: F401 - the spec, re-exported
from distshare.integrity.logical import LOGICAL_ALGORITHM, is_dtensor, logical_fingerprints
from distshare.integrity.state import named_state_tensors, unwrap

ALGORITHM = "xxh3_128"  # the CPU algorithm, and the one combined digests use
DEVICE_ALGORITHM = "dsh128"
ALGORITHMS = (ALGORITHM, DEVICE_ALGORITHM, LOGICAL_ALGORITHM)


_triton_state: dict[str, object] = {}


def _load_triton() -> None:
    """Fill `_triton_state`: the fused CUDA kernels ("fn" per tensor, "many" for a list of
    tensors in one launch) if triton is there and they agree with the torch ops; else None.

    Imported lazily, never at module import: CPU installs have no triton. The first use
    checks both kernels against `dsh128_lanes_torch` on a few odd-sized tensors, so a kernel
    that disagrees is never used (a warning says so) and digests stay comparable. The
    multi-tensor kernel is checked on its own: if only it disagrees, the per-tensor one is used.
    """
    fn = many = None
    if os.environ.get("DISTSHARE_NO_TRITON") != "1":
        try:
            from distshare.integrity.dsh128_triton import dsh128_lanes_many_triton, dsh128_lanes_triton

            gen = torch.Generator(device="cuda").manual_seed(0)
            # Odd byte counts (a zero-padded tail word), sizes around and across blocks, and a
            # grid of 3 programs that must loop over many blocks.
            probes = []
            for n, dtype, programs in (
                (1, torch.float32, None),
                (3, torch.bfloat16, None),
                (1025, torch.float32, None),
                (70001, torch.float32, None),
                (70001, torch.bfloat16, 3),
            ):
                probe = torch.randn(n, device="cuda", generator=gen).to(dtype)
                if not torch.equal(dsh128_lanes_triton(probe, programs), dsh128_lanes_torch(probe)):
                    raise RuntimeError(f"triton kernel disagrees with the torch ops on {n} {dtype}")
                probes.append(probe)
            fn = dsh128_lanes_triton
            # The multi-tensor kernel: the same probes plus an empty tensor, views 8 but not 16
            # bytes aligned, one starting mid-word, a block's worth of bytes plus a tail, on
            # grids of 1, 3 and the default (programs crossing tensor boundaries).
            big = torch.randn(2 * 4096 + 7, device="cuda", generator=gen)
            probes += [torch.zeros(0, device="cuda"), big[2:], big[1:], big[:4099].to(torch.bfloat16)[4:]]
            want = torch.stack([dsh128_lanes_torch(p) for p in probes])
            try:
                for programs in (None, 1, 3):
                    if not torch.equal(dsh128_lanes_many_triton(probes, programs), want):
                        raise RuntimeError(f"multi-tensor triton kernel disagrees with the torch ops ({programs=})")
                many = dsh128_lanes_many_triton
            except Exception as exc:  # noqa: BLE001 - the per-tensor kernel stays usable
                warnings.warn(f"distshare: dsh128 multi-tensor kernel not used ({exc})", stacklevel=4)
        except ImportError:
            fn = None
        except Exception as exc:  # noqa: BLE001 - any failure means: use the torch ops
            warnings.warn(f"distshare: dsh128 triton kernel not used ({exc})", stacklevel=4)
            fn = None
    _triton_state["fn"] = fn
    _triton_state["many"] = many if fn is not None else None


def _triton_lanes():
    """The fused per-tensor CUDA kernel if usable (see `_load_triton`), else None."""
    if "fn" not in _triton_state:
        _load_triton()
    return _triton_state["fn"]


def _triton_lanes_many():
    """The multi-tensor CUDA kernel (one launch for a list of tensors) if usable, else None."""
    if "many" not in _triton_state:
        _load_triton()
    return _triton_state["many"]


def dsh128_lanes(t: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
    """The two lane sums on the tensor's device: the fused kernel on CUDA when usable.

    `out`: int64[2] zeros on the tensor's device to add the sums into, and return (one
    allocation for many tensors instead of one each: `fingerprint_many`).
    """
    if t.device.type == "cuda":
        fn = _triton_lanes()
        if fn is not None:
            return fn(t.detach().contiguous(), out=out)
    lanes = dsh128_lanes_torch(t)
    if out is None:
        return lanes
    return out.add_(lanes)


def _header(t: torch.Tensor) -> bytes:
    return f"{t.dtype}|{tuple(t.shape)}|".encode()


def _finish_dsh128(t: torch.Tensor, lanes: list[int]) -> str:
    h = xxhash.xxh3_128()
    h.update(_header(t))
    h.update(f"{t.numel() * t.element_size()}|".encode())
    for v in lanes:
        h.update((v & ((1 << 64) - 1)).to_bytes(8, "little"))
    return f"{DEVICE_ALGORITHM}:{h.hexdigest()}"


def _xxh3(t: torch.Tensor) -> str:
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    t = t.contiguous()
    h = xxhash.xxh3_128()
    h.update(_header(t))
    if t.numel():
        # A uint8 view reads the raw bytes of any dtype (bfloat16 included) without a copy.
        h.update(t.reshape(-1).view(torch.uint8).numpy().data)
    return f"{ALGORITHM}:{h.hexdigest()}"


def default_algorithm(tensor: torch.Tensor) -> str:
    """xxh3_128 for host tensors, dsh128 for device tensors (no copy to the host), lsh128 for shards."""
    if is_dtensor(tensor):
        return LOGICAL_ALGORITHM
    return ALGORITHM if tensor.device.type == "cpu" else DEVICE_ALGORITHM


def fingerprint(tensor: torch.Tensor, algorithm: str | None = None) -> str:
    """Digest of one tensor over dtype, shape and bytes: `<algorithm>:<32 hex digits>`."""
    algorithm = algorithm or default_algorithm(tensor)
    if algorithm == LOGICAL_ALGORITHM or is_dtensor(tensor):  # a DTensor: a collective (see logical.py)
        return logical_fingerprints({"t": tensor})["t"]
    if algorithm == ALGORITHM:
        return _xxh3(tensor)
    if algorithm == DEVICE_ALGORITHM:
        return _finish_dsh128(tensor, dsh128_lanes(tensor).tolist())
    raise ValueError(f"unknown fingerprint algorithm {algorithm!r} (known: {', '.join(ALGORITHMS)})")


def algorithm_of(digest: str) -> str:
    """The algorithm a digest names (`xxh3_128:...` -> `xxh3_128`)."""
    algorithm, sep, _ = digest.partition(":")
    if not sep or algorithm not in ALGORITHMS:
        raise ValueError(f"not a distshare digest: {digest!r}")
    return algorithm


class MixedAlgorithms(ValueError):
    """Digests of different algorithms: comparing them would say nothing about the tensors."""


def check_comparable(digests: Iterable[str | None]) -> None:
    """Raise `MixedAlgorithms` unless every (non-missing) digest names the same algorithm."""
    seen = {d.partition(":")[0] for d in digests if d is not None}
    if len(seen) > 1:
        raise MixedAlgorithms(f"cannot compare digests of different algorithms: {', '.join(sorted(seen))}")


def _device_lanes(tensors: list[torch.Tensor], device: torch.device) -> torch.Tensor:
    """int64[len(tensors), 2] lane sums of tensors on one device, left on the device.

    CUDA with triton: one launch of the multi-tensor kernel for them all (the host time of a
    launch, tens of microseconds, was most of a small tensor's cost); else the per-tensor
    kernel or the torch ops, each adding into its row of one zeroed int64[n, 2].
    """
    if device.type == "cuda":
        many = _triton_lanes_many()
        if many is not None:
            return many(tensors)
    lanes = torch.zeros(len(tensors), 2, dtype=torch.int64, device=device)
    for row, t in zip(lanes, tensors, strict=True):
        dsh128_lanes(t, out=row)  # asynchronous on CUDA
    return lanes


def fingerprint_many(tensors: Mapping[str, torch.Tensor], algorithm: str | None = None) -> dict[str, str]:
    """Digests of many tensors; device digests are computed first and fetched in one transfer.

    The device tensors' lane sums are launched first (one launch per device on CUDA, see
    `_device_lanes`), the host digests are computed while the device works, and each device's
    int64[n, 2] of lane sums comes to the host in one copy at the end.
    """
    if algorithm == LOGICAL_ALGORITHM or any(is_dtensor(t) for t in tensors.values()):
        # Logical digests for all: a sharded state is compared as logical tensors, its plain
        # tensors (buffers, step counts) included, so every entry has one algorithm.
        if algorithm not in (None, LOGICAL_ALGORITHM):
            raise ValueError(f"sharded tensors have logical digests only ({LOGICAL_ALGORITHM}), not {algorithm}")
        return logical_fingerprints(tensors)
    algos = {name: algorithm or default_algorithm(t) for name, t in tensors.items()}
    rows: dict[torch.device, list[tuple[str, torch.Tensor]]] = {}
    for name, t in tensors.items():
        if algos[name] == DEVICE_ALGORITHM:
            rows.setdefault(t.device, []).append((name, t))
    lanes = {device: _device_lanes([t for _, t in items], device) for device, items in rows.items()}
    out: dict[str, str] = {}
    for name, t in tensors.items():
        if algos[name] != DEVICE_ALGORITHM:
            out[name] = fingerprint(t, algos[name])
    for device, items in rows.items():
        for (name, t), values in zip(items, lanes[device].cpu().tolist(), strict=True):
            out[name] = _finish_dsh128(t, values)
    return {name: out[name] for name in tensors}


def fingerprint_state(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    grads: bool = False,
    algorithm: str | None = None,
) -> dict[str, str]:
    """Per-tensor fingerprints of the whole training state (see `named_state_tensors`).

    On a sharded (FSDP2 / HSDP) model: the `lsh128` digests of the logical tensors, computed
    from this rank's shards and one all-gather of two integers per tensor (a collective: every
    rank calls it). They equal `fingerprint_state(model, optimizer, algorithm="lsh128")` of the
    same state in a DDP replica or one process.
    """
    return fingerprint_many(dict(named_state_tensors(model, optimizer, grads, shards=False)), algorithm)


def state_digest(
    model: nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    grads: bool = False,
    algorithm: str | None = None,
) -> str:
    """One digest for the whole training state (parameters, buffers, optimizer state).

    A checkpoint's manifest records it as `state_digest` (computed on the host, `xxh3_128`):
    `state_digest(model, optimizer, algorithm="xxh3_128")` equals it for the saved state,
    wherever the model lives (a GPU model's default digest is `dsh128`, another algorithm).
    """
    return combined_fingerprint(fingerprint_state(model, optimizer, grads, algorithm))


def fingerprint_grads(model: nn.Module) -> dict[str, str]:
    """Fingerprints of the gradients alone (`grad/<name>`), e.g. before and after a sync."""
    return fingerprint_many({f"grad/{n}": p.grad for n, p in unwrap(model).named_parameters() if p.grad is not None})


def combined_fingerprint(digests: Mapping[str, str]) -> str:
    """One digest for a whole state: order-independent over names, sensitive to every entry."""
    h = xxhash.xxh3_128()
    for name in sorted(digests):
        h.update(f"{name}={digests[name]}\n".encode())
    return f"{ALGORITHM}:{h.hexdigest()}"
