"""The dsh128 lane sums as one fused Triton kernel for CUDA tensors.

Imported only by `distshare.checksum._triton_lanes`, and only when a CUDA tensor is
fingerprinted: CPU installs have no triton. The math is exactly `checksum._mix` over 64-bit
words (int64 arithmetic wraps mod 2^64 in both, and `>>` plus a mask is the logical shift in
both), so the digests equal those of the plain torch ops; `checksum` checks that before using it.
The plain torch ops make one pass over memory per operation (about ten, on int64
temporaries); the kernel reads each word once.

One launch per tensor: a fixed grid of programs (a few per SM) strides over the whole
blocks; the last program also takes the partial block and the zero-padded tail word (read
byte by byte). Each program adds its two lane sums into the int64[2] output with
`tl.atomic_add`: integer addition is associative and commutative, so the result does not
depend on the order the programs finish in. The position term (i + 1) * K of a block is
(lane + 1) * K, computed once per program, plus block * (BLOCK * K), one scalar product.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distshare.checksum import LANES, _signed, _words

BLOCK = 2048  # 64-bit words per block: 16 KB read per program per loop step
NUM_WARPS = 4  # 16 words per thread per step (measured on an H100: 8 warps with this BLOCK was 1.5x slower)
PROGRAMS_PER_SM = 4
_sm_count: dict[int, int] = {}

# The lane constants as compile-time globals, not launch arguments: fewer arguments to bind
# per launch (host time is most of a small tensor's cost). STEP = BLOCK * K mod 2^64.
(_k0, _a0, _b0, _s01, _s02, _s03), (_k1, _a1, _b1, _s11, _s12, _s13) = LANES
_BLOCK = tl.constexpr(BLOCK)
K0, A0, B0 = tl.constexpr(_signed(_k0)), tl.constexpr(_signed(_a0)), tl.constexpr(_signed(_b0))
K1, A1, B1 = tl.constexpr(_signed(_k1)), tl.constexpr(_signed(_a1)), tl.constexpr(_signed(_b1))
STEP0, STEP1 = tl.constexpr(_signed(_k0 * BLOCK % (1 << 64))), tl.constexpr(_signed(_k1 * BLOCK % (1 << 64)))
S01, S02, S03 = tl.constexpr(_s01), tl.constexpr(_s02), tl.constexpr(_s03)
S11, S12, S13 = tl.constexpr(_s11), tl.constexpr(_s12), tl.constexpr(_s13)

N01, N02, N03 = (tl.constexpr((1 << (64 - v)) - 1) for v in (_s01, _s02, _s03))
N11, N12, N13 = (tl.constexpr((1 << (64 - v)) - 1) for v in (_s11, _s12, _s13))


@triton.jit
def _mix(
    x,
    m1,
    m2,
    S1: tl.constexpr,
    S2: tl.constexpr,
    S3: tl.constexpr,
    N1: tl.constexpr,
    N2: tl.constexpr,
    N3: tl.constexpr,
):
    # x = w + (i + 1) * K already; `& N` (N = 2^(64-s) - 1) after the arithmetic >> makes a logical shift.
    x = x ^ ((x >> S1) & N1)
    x = x * m1
    x = x ^ ((x >> S2) & N2)
    x = x * m2
    return x ^ ((x >> S3) & N3)


@triton.jit
def _lanes_kernel(words_ptr, tail_ptr, out_ptr, n_words, n_tail):
    pid = tl.program_id(0)
    nprog = tl.num_programs(0)
    lane = tl.arange(0, _BLOCK).to(tl.int64)
    c0 = (lane + 1) * K0  # (i + 1) * K for block 0; block b adds b * STEP, STEP = BLOCK * K mod 2^64
    c1 = (lane + 1) * K1
    acc0 = tl.zeros([_BLOCK], dtype=tl.int64)
    acc1 = tl.zeros([_BLOCK], dtype=tl.int64)
    n_full = n_words // _BLOCK
    for blk in range(pid, n_full, nprog):  # whole blocks: no masks
        b = tl.cast(blk, tl.int64)
        w = tl.load(words_ptr + b * _BLOCK + lane)
        acc0 += _mix(w + (c0 + b * STEP0), A0, B0, S01, S02, S03, N01, N02, N03)
        acc1 += _mix(w + (c1 + b * STEP1), A1, B1, S11, S12, S13, N11, N12, N13)
    s0 = tl.sum(acc0, axis=0)
    s1 = tl.sum(acc1, axis=0)
    if pid == nprog - 1:
        # The partial block of whole words ...
        b = tl.cast(n_full, tl.int64)  # tl.cast: n_words may arrive as a constexpr (triton specializes 1)
        inside = b * _BLOCK + lane < n_words
        w = tl.load(words_ptr + b * _BLOCK + lane, mask=inside, other=0)
        s0 += tl.sum(tl.where(inside, _mix(w + (c0 + b * STEP0), A0, B0, S01, S02, S03, N01, N02, N03), 0), axis=0)
        s1 += tl.sum(tl.where(inside, _mix(w + (c1 + b * STEP1), A1, B1, S11, S12, S13, N11, N12, N13), 0), axis=0)
        # ... and the 0-7 bytes after them as one little-endian word, zero-padded, at index n_words.
        byte = tl.arange(0, 8)
        tb = tl.load(tail_ptr + byte, mask=byte < n_tail, other=0).to(tl.int64)
        tw = tl.sum(tb << (8 * byte).to(tl.int64), axis=0)  # disjoint bits: the sum is an or
        idx = tl.cast(n_words, tl.int64) + 1
        has_tail = n_tail > 0
        s0 += tl.where(has_tail, _mix(tw + idx * K0, A0, B0, S01, S02, S03, N01, N02, N03), 0)
        s1 += tl.where(has_tail, _mix(tw + idx * K1, A1, B1, S11, S12, S13, N11, N12, N13), 0)
    tl.atomic_add(out_ptr, s0)
    tl.atomic_add(out_ptr + 1, s1)


def _max_programs(device: torch.device) -> int:
    if device.type != "cuda":  # TRITON_INTERPRET=1 on CPU tensors: any grid gives the same sums
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _sm_count:
        _sm_count[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _sm_count[index] * PROGRAMS_PER_SM


def dsh128_lanes_triton(t: torch.Tensor, programs: int | None = None, out: torch.Tensor | None = None) -> torch.Tensor:
    """int64[2] lane sums of a contiguous CUDA tensor, equal to `dsh128_lanes_torch`.

    `programs` caps the grid (default: a few per SM); any value gives the same sums.
    `out`: int64[2] zeros (contiguous, on the tensor's device) to add the sums into and return.
    """
    _, body, tail = _words(t)
    if out is None:
        out = torch.zeros(2, dtype=torch.int64, device=t.device)
    n, n_tail = body.numel(), tail.numel()
    if n == 0 and n_tail == 0:
        return out
    grid = max(1, min(triton.cdiv(n, BLOCK), programs or _max_programs(t.device)))
    _lanes_kernel[(grid,)](body, tail, out, n, n_tail, num_warps=NUM_WARPS)  # empty body/tail: never read
    return out
