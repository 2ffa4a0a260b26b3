"""The dsh128 lane sums as one fused Triton kernel for CUDA tensors.

Imported only by `distshare.checksum._triton_lanes`, and only when a CUDA tensor is
fingerprinted: CPU installs have no triton. The math is exactly `checksum._mix` (int64
arithmetic wraps mod 2^64 in both, and `>>` plus a mask is the logical shift in both), so
the digests equal those of the plain torch ops; `checksum` checks that before using it.
The plain torch ops make one pass over memory per operation (about ten, on int64
temporaries twice the tensor's size); the kernel reads each word once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from distshare.checksum import LANES, _signed, _words

BLOCK = 8192  # words per program: 32 KB read per program


@triton.jit
def _mix(w, idx, k, m1, m2, s1: tl.constexpr, s2: tl.constexpr, s3: tl.constexpr, n1, n2, n3):
    x = w + idx * k
    x = x ^ ((x >> s1) & n1)
    x = x * m1
    x = x ^ ((x >> s2) & n2)
    x = x * m2
    return x ^ ((x >> s3) & n3)


@triton.jit
def _lanes_kernel(
    words_ptr,
    out_ptr,
    n_words,
    k0,
    a0,
    b0,
    k1,
    a1,
    b1,
    n01,
    n02,
    n03,
    n11,
    n12,
    n13,
    S01: tl.constexpr,
    S02: tl.constexpr,
    S03: tl.constexpr,
    S11: tl.constexpr,
    S12: tl.constexpr,
    S13: tl.constexpr,
    BLOCK: tl.constexpr,
):
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK).to(tl.int64)
    inside = offs < n_words
    w = tl.load(words_ptr + offs, mask=inside, other=0)
    w = w.to(tl.uint32, bitcast=True).to(tl.int64)  # zero-extend the word
    idx = offs + 1
    x0 = tl.where(inside, _mix(w, idx, k0, a0, b0, S01, S02, S03, n01, n02, n03), 0)
    x1 = tl.where(inside, _mix(w, idx, k1, a1, b1, S11, S12, S13, n11, n12, n13), 0)
    tl.store(out_ptr + pid * 2, tl.sum(x0, axis=0))
    tl.store(out_ptr + pid * 2 + 1, tl.sum(x1, axis=0))


def _mask(s: int) -> int:
    return (1 << (64 - s)) - 1


def dsh128_lanes_triton(t: torch.Tensor) -> torch.Tensor:
    """int64[2] lane sums of a contiguous CUDA tensor, equal to `dsh128_lanes_torch`."""
    from distshare.checksum import _mix as torch_mix

    body, tail = _words(t)
    acc = torch.zeros(2, dtype=torch.int64, device=t.device)
    n = body.numel()
    if n:
        blocks = triton.cdiv(n, BLOCK)
        partial = torch.empty(blocks * 2, dtype=torch.int64, device=t.device)
        (k0, a0, b0, s01, s02, s03), (k1, a1, b1, s11, s12, s13) = LANES
        _lanes_kernel[(blocks,)](
            body,
            partial,
            n,
            _signed(k0),
            _signed(a0),
            _signed(b0),
            _signed(k1),
            _signed(a1),
            _signed(b1),
            _mask(s01),
            _mask(s02),
            _mask(s03),
            _mask(s11),
            _mask(s12),
            _mask(s13),
            S01=s01,
            S02=s02,
            S03=s03,
            S11=s11,
            S12=s12,
            S13=s13,
            BLOCK=BLOCK,
            num_warps=8,
        )
        acc += partial.view(blocks, 2).sum(0)
    if tail is not None:  # at most one zero-padded word: the torch ops are fine
        w = tail.to(torch.int64) & 0xFFFFFFFF
        for j, lane in enumerate(LANES):
            acc[j] += torch_mix(w, n, lane).sum()
    return acc
