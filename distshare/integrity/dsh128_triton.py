"""The dsh128 lane sums as fused Triton kernels for CUDA tensors.

Imported only by `distshare.integrity.fingerprint._load_triton`, and only when a CUDA tensor is
fingerprinted: CPU installs have no triton. The math is exactly `dsh128._mix` over 64-bit
words (int64 arithmetic wraps mod 2^64 in both, and `>>` plus a mask is the logical shift in
both), so the digests equal those of the plain torch ops; `checksum` checks that before using it.
The plain torch ops make one pass over memory per operation (about ten, on int64
temporaries); the kernel reads each word once.

Two kernels: `dsh128_lanes_triton` (`fingerprint`), one launch per tensor, and
`dsh128_lanes_many_triton` (`fingerprint_many`), one launch for a list of tensors from a table
of their addresses (below). Per tensor: a fixed grid of programs (a few per SM) strides over
the whole blocks; the last program also takes the partial block and the zero-padded tail word
(read byte by byte). Each program adds its two lane sums into the int64[2] output with
`tl.atomic_add`: integer addition is associative and commutative, so the result does not
depend on the order the programs finish in. The position term (i + 1) * K of a block is
(lane + 1) * K, computed once per program, plus block * (BLOCK * K), one scalar product.
"""

from __future__ import annotations

import array

import torch
import triton
import triton.language as tl

from distshare.integrity.dsh128 import LANES, signed, words

BLOCK = 2048  # 64-bit words per block: 16 KB read per program per loop step
NUM_WARPS = 4  # 16 words per thread per step (measured on an H100: 8 warps with this BLOCK was 1.5x slower)
PROGRAMS_PER_SM = 4
_sm_count: dict[int, int] = {}

# The lane constants as compile-time globals, not launch arguments: fewer arguments to bind
# per launch (host time is most of a small tensor's cost). STEP = BLOCK * K mod 2^64.
(_k0, _a0, _b0, _s01, _s02, _s03), (_k1, _a1, _b1, _s11, _s12, _s13) = LANES
_BLOCK = tl.constexpr(BLOCK)
K0, A0, B0 = tl.constexpr(signed(_k0)), tl.constexpr(signed(_a0)), tl.constexpr(signed(_b0))
K1, A1, B1 = tl.constexpr(signed(_k1)), tl.constexpr(signed(_a1)), tl.constexpr(signed(_b1))
STEP0, STEP1 = tl.constexpr(signed(_k0 * BLOCK % (1 << 64))), tl.constexpr(signed(_k1 * BLOCK % (1 << 64)))
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
    _, body, tail = words(t)
    if out is None:
        out = torch.zeros(2, dtype=torch.int64, device=t.device)
    n, n_tail = body.numel(), tail.numel()
    if n == 0 and n_tail == 0:
        return out
    grid = max(1, min(triton.cdiv(n, BLOCK), programs or _max_programs(t.device)))
    _lanes_kernel[(grid,)](body, tail, out, n, n_tail, num_warps=NUM_WARPS)  # empty body/tail: never read
    return out


# ---- Many tensors in one launch -------------------------------------------------------------
#
# The host time of a launch (about 50 µs: Triton's launch, `_words`, the zeroed output) is the
# cost of a small tensor, so a state of ~120 tensors paid ~6 ms for ~0.1 ms of reading. Here one
# launch covers a list of tensors. The host writes one int64 table (a few numbers per tensor)
# and the zeroed output into one pinned buffer and copies it to the device in one transfer:
#
#   first[0..n]           the tensor's first block in a global numbering of all blocks (first[n] = total)
#   rec[4 t .. 4 t + 3]   the tensor's data address, whole words, tail bytes (0-7), output row
#
# A tensor of W words and a tail has cdiv(W + (tail > 0), BLOCK) blocks; empty tensors are left
# out (their lanes are 0). The grid is a few programs per SM; program p takes the contiguous run
# of global blocks [p N / P, (p + 1) N / P), finds the tensor its run starts in by a binary search
# over `first`, and walks forward tensor by tensor. Per tensor it adds the same terms as the
# per-tensor kernel (positions restart at 0 in each tensor: block b of a tensor adds b * STEP to
# the position vector) and atomically adds its two sums into out[row]: integer addition is
# associative and commutative, so neither the split nor the order changes the sums.
# Addresses come from the table, so Triton cannot see their alignment as it does for pointer
# arguments: ALIGN16 asserts 16-byte aligned addresses (128-bit loads); the host launches the
# tensors that are 8- but not 16-byte aligned with ALIGN16 = False.


@triton.jit
def _lanes_many_kernel(tab_ptr, out_ptr, n_tensors, n_blocks, ALIGN16: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    nprog = tl.num_programs(0).to(tl.int64)
    total = tl.cast(n_blocks, tl.int64)
    n = tl.cast(n_tensors, tl.int64)
    start = pid * total // nprog
    end = (pid + 1) * total // nprog
    first_ptr = tab_ptr
    rec_ptr = tab_ptr + n + 1
    # The tensor the run starts in: the last t with first[t] <= start (first is strictly increasing).
    lo = pid * 0
    hi = n
    while hi - lo > 1:
        mid = (lo + hi) // 2
        inside = tl.load(first_ptr + mid) <= start
        lo = tl.where(inside, mid, lo)
        hi = tl.where(inside, hi, mid)
    lane = tl.arange(0, _BLOCK).to(tl.int64)
    c0 = (lane + 1) * K0
    c1 = (lane + 1) * K1
    t = lo
    g = start
    while g < end:
        first = tl.load(first_ptr + t)
        stop = tl.minimum(end, tl.load(first_ptr + t + 1))
        addr = tl.load(rec_ptr + 4 * t)
        n_words = tl.load(rec_ptr + 4 * t + 1)
        n_tail = tl.load(rec_ptr + 4 * t + 2)
        row = tl.load(rec_ptr + 4 * t + 3)
        words_ptr = addr.to(tl.pointer_type(tl.int64))
        if ALIGN16:
            words_ptr = tl.multiple_of(words_ptr, 16)
        b_lo = g - first  # this run's blocks of tensor t: [b_lo, b_hi)
        b_hi = stop - first
        n_full = n_words // _BLOCK
        acc0 = tl.zeros([_BLOCK], dtype=tl.int64)
        acc1 = tl.zeros([_BLOCK], dtype=tl.int64)
        for blk in range(b_lo, tl.minimum(b_hi, n_full)):  # whole blocks: no masks
            b = tl.cast(blk, tl.int64)  # the interpreter's range yields Python ints: make them wrap
            w = tl.load(words_ptr + b * _BLOCK + lane)
            acc0 += _mix(w + (c0 + b * STEP0), A0, B0, S01, S02, S03, N01, N02, N03)
            acc1 += _mix(w + (c1 + b * STEP1), A1, B1, S11, S12, S13, N11, N12, N13)
        s0 = tl.sum(acc0, axis=0)
        s1 = tl.sum(acc1, axis=0)
        if b_hi > n_full:  # the tensor's last block: the partial block of whole words and the tail
            b = n_full
            inside = b * _BLOCK + lane < n_words
            w = tl.load(words_ptr + b * _BLOCK + lane, mask=inside, other=0)
            s0 += tl.sum(tl.where(inside, _mix(w + (c0 + b * STEP0), A0, B0, S01, S02, S03, N01, N02, N03), 0), axis=0)
            s1 += tl.sum(tl.where(inside, _mix(w + (c1 + b * STEP1), A1, B1, S11, S12, S13, N11, N12, N13), 0), axis=0)
            byte = tl.arange(0, 8)
            tail_ptr = (addr + n_words * 8).to(tl.pointer_type(tl.uint8))
            tb = tl.load(tail_ptr + byte, mask=byte < n_tail, other=0).to(tl.int64)
            tw = tl.sum(tb << (8 * byte).to(tl.int64), axis=0)
            idx = n_words + 1
            has_tail = n_tail > 0
            s0 += tl.where(has_tail, _mix(tw + idx * K0, A0, B0, S01, S02, S03, N01, N02, N03), 0)
            s1 += tl.where(has_tail, _mix(tw + idx * K1, A1, B1, S11, S12, S13, N11, N12, N13), 0)
        tl.atomic_add(out_ptr + 2 * row, s0)
        tl.atomic_add(out_ptr + 2 * row + 1, s1)
        g = stop
        t += 1


def _blocks(n_words: int, n_tail: int) -> int:
    return -(-(n_words + (n_tail > 0)) // BLOCK)


def dsh128_lanes_many_triton(tensors: list[torch.Tensor], programs: int | None = None) -> torch.Tensor:
    """int64[len(tensors), 2]: row i holds the lane sums of tensors[i], equal to `dsh128_lanes_torch`.

    The tensors share one device (CUDA; CPU under TRITON_INTERPRET=1). One launch for the
    16-byte aligned ones, one more if some are only 8-byte aligned; a tensor whose data starts
    mid-word (a view such as bf16[1:]) goes through `dsh128_lanes_triton`, which copies it.
    `programs` caps the grid (default: a few per SM); any value gives the same sums.
    The host work is a few attribute reads per tensor and one transfer (the table and the
    zeroed output together): about 1-2 µs a tensor plus the launch.
    """
    n = len(tensors)
    if n == 0:
        raise ValueError("dsh128_lanes_many_triton: no tensors")
    device = tensors[0].device
    keep = []  # copies made contiguous: alive until after the launches (their addresses are in the table)
    records: tuple[list[int], list[int]] = ([], [])  # (16-byte aligned, only 8-byte aligned)
    firsts: tuple[list[int], list[int]] = ([0], [0])
    mid_word = []
    for i, t in enumerate(tensors):
        if t.device != device:
            raise ValueError(f"dsh128_lanes_many_triton: tensors on {device} and {t.device}")
        if not t.is_contiguous():
            t = t.detach().contiguous()
            keep.append(t)
        n_bytes = t.nbytes
        if n_bytes == 0:
            continue  # lanes 0: the row stays zero
        addr = t.data_ptr()
        if addr % 8:
            mid_word.append((i, t))
            continue
        g = 1 if addr % 16 else 0
        n_words, n_tail = divmod(n_bytes, 8)
        records[g].extend((addr, n_words, n_tail, i))
        firsts[g].append(firsts[g][-1] + _blocks(n_words, n_tail))
    # One host buffer, one copy: [first | records] of each group, then the zeroed output.
    host = array.array("q", firsts[0])
    for part in (records[0], firsts[1], records[1]):
        host.extend(part)
    n_table = len(host)
    host.frombytes(bytes(16 * n))
    buf = torch.frombuffer(host, dtype=torch.int64)
    if device.type == "cuda":
        buf = buf.pin_memory().to(device, non_blocking=True)
    out = buf[n_table:].view(n, 2)
    cap = programs or _max_programs(device)
    offset = 0
    for g in (0, 1):
        n_group, n_blocks = len(records[g]) // 4, firsts[g][-1]
        if n_group:
            grid = max(1, min(n_blocks, cap))
            _lanes_many_kernel[(grid,)](buf[offset:], out, n_group, n_blocks, ALIGN16=g == 0, num_warps=NUM_WARPS)
        offset += len(firsts[g]) + len(records[g])
    for i, t in mid_word:
        dsh128_lanes_triton(t, programs, out=out[i])
    del keep  # launched: on CUDA the stream orders any reuse of their memory after the kernels
    return out
