"""dsh128, the device digest's specification: a position-keyed sum of mixed 64-bit words.

The bytes of a tensor are read as 64-bit words w_i (little-endian, the last partial word
zero-padded); each word and its index go through a bijection of Z/2^64,

    f_lane(i, w) = mix_lane(w + (i + 1) * K_lane)      (mix: odd multiplies, xor-shifts)

and each of two lanes is the sum of f over all words, mod 2^64. The torch ops here are the
reference: the fused Triton kernel (`distshare.integrity.dsh128_triton`) computes the same
sums and is checked against them before it is used. `distshare.integrity.fingerprint` turns
the two sums (with dtype, shape and byte count) into the digest.
"""

from __future__ import annotations

import torch


def signed(u: int) -> int:
    """A 64-bit unsigned constant as the int64 torch arithmetic uses (same bits)."""
    return u - (1 << 64) if u >= 1 << 63 else u


# Per lane: position key K (odd), multipliers M1, M2 (odd: multiplying by them is a bijection
# mod 2^64) and xor-shift amounts. Constants from splitmix64 / Stafford's mix13 and xxHash.
LANES = (
    (0x9E3779B97F4A7C15, 0xBF58476D1CE4E5B9, 0x94D049BB133111EB, 30, 27, 31),
    (0xC2B2AE3D27D4EB4F, 0xFF51AFD7ED558CCD, 0xC4CEB9FE1A85EC53, 33, 33, 33),
)
_CHUNK_WORDS = 1 << 22  # 64-bit words per torch-op pass: bounds the int64 temporaries at 32 MB each
WORD_BYTES = 8


def _logical_shift_right(x: torch.Tensor, s: int) -> torch.Tensor:
    # torch's >> on int64 is arithmetic (copies the sign bit); masking the copied bits makes
    # it the logical shift that the xor-shift bijection needs.
    return (x >> s) & ((1 << (64 - s)) - 1)


def _mix(words: torch.Tensor, start: int, lane: tuple[int, ...]) -> torch.Tensor:
    """f_lane(i, w) for 64-bit words w (int64, any bits) at indices start, start + 1, ..."""
    k, m1, m2, s1, s2, s3 = lane
    idx = torch.arange(start + 1, start + 1 + words.numel(), dtype=torch.int64, device=words.device)
    x = words + idx * signed(k)
    x = x ^ _logical_shift_right(x, s1)
    x = x * signed(m1)
    x = x ^ _logical_shift_right(x, s2)
    x = x * signed(m2)
    return x ^ _logical_shift_right(x, s3)


def words(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The bytes of a contiguous tensor: (all bytes as uint8, the whole 64-bit words as int64,
    the 0-7 bytes after the last whole word as uint8). The tail is one more word, zero-padded
    to 8 bytes (the byte count is in the header, so padding is unambiguous)."""
    raw = t.reshape(-1).view(torch.uint8)
    if raw.storage_offset() % WORD_BYTES or raw.data_ptr() % WORD_BYTES:
        raw = raw.clone()  # a view starting mid-word (e.g. bf16[1:], float32[1:]) cannot be read as int64 in place
    whole = raw.numel() // WORD_BYTES * WORD_BYTES
    return raw, raw[:whole].view(torch.int64), raw[whole:]


def _tail_word(tail: torch.Tensor) -> torch.Tensor:
    """The 0-7 trailing bytes as one zero-padded little-endian int64 word: int64[1]."""
    padded = torch.zeros(WORD_BYTES, dtype=torch.uint8, device=tail.device)
    padded[: tail.numel()] = tail
    return padded.view(torch.int64)


def dsh128_lanes_torch(t: torch.Tensor) -> torch.Tensor:
    """The two lane sums of `dsh128` with plain torch ops, on the tensor's device: int64[2]."""
    _, body, tail = words(t.detach().contiguous())
    acc = torch.zeros(2, dtype=torch.int64, device=t.device)
    parts = [body] + ([_tail_word(tail)] if tail.numel() else [])
    start = 0
    for part in parts:
        for lo in range(0, part.numel(), _CHUNK_WORDS):
            w = part[lo : lo + _CHUNK_WORDS]
            for j, lane in enumerate(LANES):
                acc[j] += _mix(w, start + lo, lane).sum()  # int64 sums wrap: arithmetic mod 2^64
        start += part.numel()
    return acc
