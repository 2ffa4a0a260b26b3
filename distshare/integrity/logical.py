"""Logical digests: the digest of a whole tensor, computed from its shards without gathering it.

FSDP2 and HSDP hold one parameter set, but no rank holds a whole tensor: each holds a shard
(a `DTensor`'s local piece). "The same init under DDP, FSDP at 2 and 4 shards, HSDP and one
process" is checkable only with a digest that every layout computes alike. `lsh128` is one:
a sum of per-unit hashes, each keyed by the unit's position in the *logical* tensor,

    lsh128(T) = xxh3_128(dtype | logical shape | bytes | S_lo | S_hi),   S = sum over units (mod 2^64 per lane)

- a tensor of 2 or more dimensions: the units are its rows along dim 0, T[i]; unit i adds the
  two 64-bit halves of xxh3_128(bytes of T[i], seed=i). FSDP2 and HSDP cut tensors between
  rows (`Shard(0)`), so every unit lies whole on one rank, and rows hash at xxh3's speed.
- a tensor of 0 or 1 dimension (biases, norms, step counts): the units are its elements;
  element i adds mix_lane(bits(T[i]) + (i + 1) * K_lane) per lane, the mix of `dsh128`
  (`distshare.integrity.dsh128.LANES`: an odd multiply-xorshift bijection) on the element's
  raw bits zero-extended to 64. A 1-D tensor is cut between elements, and a float32 cut need
  not fall on an 8-byte word, so the unit is the element, never a word.

A sum over units keyed by their logical index composes over any partition into whole units:
each rank sums its own shard's units at their logical indices (from the shard's offset), and
the sums of the ranks holding one copy of the tensor add up to the sum over the whole tensor.
One all-gather of two int64 per tensor per rank, never the tensor. A flipped bit changes its
unit's hash; a swap of two units changes their keys. Like every distshare digest it detects
accidents, not an adversary.

Layouts: a plain tensor is its own logical tensor (a DDP replica, one process: no collective).
A `DTensor` contributes its local box at its global offset; along a `Replicate` mesh dimension
every coordinate holds a full copy, so the sums are taken per *replica group* (the ranks
sharing the coordinates of the replicated dimensions) and each rank gets its own group's
digest: under HSDP, replica groups that started from different weights (allenai/OLMo-core#319)
get different digests. Refused, because their local pieces are not whole units: `Partial`
placements (pending reductions), strided shards (`_StridedShard`) and a tensor of 2 or more
dimensions cut along another dimension than 0 (tensor parallelism; gather it first).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch
import torch.distributed as dist
import xxhash

from distshare.integrity.dsh128 import LANES, signed

LOGICAL_ALGORITHM = "lsh128"
_UNSIGNED = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}


def is_dtensor(t: object) -> bool:
    """True for a `torch.distributed.tensor.DTensor` (an FSDP2 / HSDP parameter or its state)."""
    return hasattr(t, "device_mesh") and hasattr(t, "placements") and hasattr(t, "to_local")


def is_sharded_model(model: torch.nn.Module) -> bool:
    """Does the model hold its parameters as shards (FSDP2 `fully_shard`, HSDP `DTensor`s)?"""
    return any(is_dtensor(p) for p in model.parameters())


def _host_bytes(t: torch.Tensor) -> np.ndarray:
    """The tensor's raw bytes on the host, row-major, as uint8 (any dtype, bfloat16 included)."""
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()  # a shard's bytes travel to its own host, never to another rank
    return t.contiguous().reshape(-1).view(torch.uint8).numpy()


def _element_lanes(t: torch.Tensor, first: int) -> np.ndarray:
    """uint64[2]: the dsh128 mix of each element's bits at logical indices first, first + 1, ...

    numpy's uint64 arithmetic is the arithmetic the spec needs: it wraps mod 2^64 and its `>>`
    is logical; and it is cheap on the small tensors (biases, norms, step counts) that take
    this path.
    """
    size = t.element_size()
    if size not in _UNSIGNED:
        raise ValueError(f"lsh128: elements of {size} bytes ({t.dtype}) are not supported")
    words = _host_bytes(t).view(_UNSIGNED[size]).astype(np.uint64)  # zero-extended raw bits
    index = np.arange(first + 1, first + 1 + words.size, dtype=np.uint64)
    out = np.zeros(2, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for j, (k, m1, m2, s1, s2, s3) in enumerate(LANES):
            x = words + index * np.uint64(k)
            x ^= x >> np.uint64(s1)
            x *= np.uint64(m1)
            x ^= x >> np.uint64(s2)
            x *= np.uint64(m2)
            x ^= x >> np.uint64(s3)
            out[j] = x.sum(dtype=np.uint64)
    return out


def _row_lanes(t: torch.Tensor, first_row: int) -> np.ndarray:
    """uint64[2]: the sums of xxh3_128(row bytes, seed=row index) over the rows of `t`, whose
    first row is row `first_row` of the logical tensor (each 64-bit half summed mod 2^64)."""
    n = t.shape[0]
    if t.numel() == 0:  # an empty shard (FSDP2 gives the last ranks none when rows run out)
        return np.zeros(2, dtype=np.uint64)
    data = memoryview(_host_bytes(t))
    width = len(data) // n
    hash_row = xxhash.xxh3_128_digest
    digests = b"".join([hash_row(data[i * width : (i + 1) * width], first_row + i) for i in range(n)])
    return np.frombuffer(digests, dtype=np.uint64).reshape(n, 2).sum(axis=0, dtype=np.uint64)


def _unit_lanes(t: torch.Tensor, ndim: int, first: int) -> np.ndarray:
    """uint64[2]: the lane sums of a piece of a logical tensor of `ndim` dimensions, made of whole
    units (rows for ndim >= 2, elements otherwise) starting at unit `first`."""
    return _row_lanes(t, first) if ndim >= 2 else _element_lanes(t, first)


def _header(dtype: torch.dtype, shape: tuple[int, ...], numel: int, element_size: int) -> bytes:
    return f"{dtype}|{shape}|{numel * element_size}|".encode()


def _finish(header: bytes, lanes: list[int]) -> str:
    h = xxhash.xxh3_128()
    h.update(header)
    for v in lanes:
        h.update((v & ((1 << 64) - 1)).to_bytes(8, "little"))
    return f"{LOGICAL_ALGORITHM}:{h.hexdigest()}"


def _plain_lanes(t: torch.Tensor) -> np.ndarray:
    return _unit_lanes(t, t.dim(), 0)


def _shard_lanes(t) -> np.ndarray:
    """This rank's contribution to a DTensor's lane sums: its local box at its global offset."""
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    for p in t.placements:
        if type(p) not in (Shard, Replicate):  # Partial: a pending reduction; _StridedShard: not a box
            raise ValueError(f"lsh128: placement {p} is not a box of the logical tensor; gather it first")
    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(tuple(t.shape), t.device_mesh, t.placements)
    if t.dim() >= 2 and tuple(shape[1:]) != tuple(t.shape[1:]):
        raise ValueError(
            f"lsh128: a {t.dim()}-D tensor cut along another dimension than 0 ({t.placements}); gather it first"
        )
    if tuple(local.shape) != tuple(shape):  # e.g. a padded local tensor
        local = local[tuple(slice(0, n) for n in shape)]
    return _unit_lanes(local, t.dim(), offset[0] if t.dim() else 0)


def _replica_key(t, coordinate: tuple[int, ...]) -> tuple[int, ...]:
    """The coordinates on the mesh dimensions this DTensor is replicated along: its replica group."""
    from torch.distributed.tensor import Replicate

    return tuple(c for c, p in zip(coordinate, t.placements, strict=True) if isinstance(p, Replicate))


def logical_fingerprints(
    tensors: Mapping[str, torch.Tensor], all_groups: bool = False
) -> dict[str, str] | tuple[dict[str, str], dict[str, dict[tuple[int, ...], str]]]:
    """lsh128 digests of the logical tensors behind `tensors` (plain tensors or DTensors).

    With DTensors among them this is a collective over the default process group: every rank
    calls it with the same names in the same order. Each rank gets the digests of its own
    replica group. `all_groups=True` also returns, per DTensor name, every replica group's
    digest (keyed by the group's coordinates on the replicated mesh dimensions).
    """
    out: dict[str, str] = {}
    sharded = {name: t for name, t in tensors.items() if is_dtensor(t)}
    for name, t in tensors.items():
        if name not in sharded:
            header = _header(t.dtype, tuple(t.shape), t.numel(), t.element_size())
            out[name] = _finish(header, [int(v) for v in _plain_lanes(t)])
    groups: dict[str, dict[tuple[int, ...], str]] = {}
    if sharded:
        groups = _sharded_digests(sharded)
        for name, t in sharded.items():
            coordinate = t.device_mesh.get_coordinate()
            out[name] = groups[name][_replica_key(t, tuple(coordinate))]
    ordered = {name: out[name] for name in tensors}
    return (ordered, groups) if all_groups else ordered


def _sharded_digests(sharded: Mapping[str, torch.Tensor]) -> dict[str, dict[tuple[int, ...], str]]:
    """Per DTensor, per replica group: the digest from the sums of that group's shards (one all-gather)."""
    names = list(sharded)
    mine = torch.from_numpy(np.stack([_shard_lanes(sharded[n]) for n in names]).view(np.int64))  # [n, 2]
    # The names travel as a digest of their own in the same payload: ranks that disagree on
    # which tensors they hold must not add up each other's rows.
    tag = xxhash.xxh3_64("\n".join(names).encode()).intdigest()
    payload = torch.cat([torch.tensor([signed(tag), len(names)], dtype=torch.int64), mine.reshape(-1)])
    world = dist.get_world_size()
    device = _collective_device()
    gathered = [torch.empty_like(payload, device=device) for _ in range(world)]
    dist.all_gather(gathered, payload.to(device))
    rows = [g.cpu() for g in gathered]
    for rank, row in enumerate(rows):
        if int(row[0]) != signed(tag) or int(row[1]) != len(names):
            raise RuntimeError(
                f"lsh128: rank {rank} holds other sharded tensors than this rank: digests not comparable"
            )
    out: dict[str, dict[tuple[int, ...], str]] = {}
    for j, name in enumerate(names):
        t = sharded[name]
        mesh = t.device_mesh
        if mesh.mesh.numel() != world:
            raise ValueError(f"lsh128: {name}'s device mesh covers {mesh.mesh.numel()} of {world} ranks")
        sums: dict[tuple[int, ...], torch.Tensor] = {}
        for coordinate in _coordinates(mesh.mesh):
            rank = int(mesh.mesh[coordinate])
            key = _replica_key(t, coordinate)
            lanes = rows[rank][2 + 2 * j : 4 + 2 * j]
            sums[key] = sums[key] + lanes if key in sums else lanes.clone()
        header = _header(t.dtype, tuple(t.shape), t.numel(), t.element_size())
        out[name] = {key: _finish(header, lanes.tolist()) for key, lanes in sorted(sums.items())}
    return out


def _coordinates(mesh: torch.Tensor) -> list[tuple[int, ...]]:
    return [
        tuple(int(i) for i in idx)
        for idx in torch.cartesian_prod(*(torch.arange(n) for n in mesh.shape)).reshape(-1, mesh.dim())
    ]


def _collective_device() -> torch.device:
    """Where the default group's collectives run: CUDA for nccl, the host for gloo."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")
