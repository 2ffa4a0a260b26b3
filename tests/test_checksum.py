"""Claim: a fingerprint changes when any single bit of a tensor changes, in any dtype, with
either algorithm; it covers dtype and shape; digests of different algorithms are never
compared; and a state fingerprint covers parameters, buffers, optimizer state and gradients."""

from __future__ import annotations

import os
import subprocess
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from torch import nn

from distshare.integrity import dsh128
from distshare.integrity import fingerprint as checksum
from distshare.integrity.fingerprint import (
    ALGORITHMS,
    LANES,
    MixedAlgorithms,
    check_comparable,
    combined_fingerprint,
    dsh128_lanes_torch,
    fingerprint,
    fingerprint_many,
    fingerprint_state,
    state_digest,
)
from distshare.integrity.replicas import compare_digests

# A few tensors of every width: 8, 4, 2, 1 bytes per element. dsh128 reads 64-bit words, so
# byte counts that are not a multiple of 8 (float32 x5 = 20 bytes, bfloat16 x3 = 6 and x7 = 14,
# uint8 x11) also exercise the zero-padded tail word, alone or after whole words.
TENSORS = {
    "float64": torch.tensor([1.5, -0.0, 3e-300], dtype=torch.float64),
    "float32": torch.tensor([0.1, -2.0, 0.0, 7e-39, 1e30], dtype=torch.float32),
    "bfloat16": torch.tensor([1.0, -3.5, 0.015625], dtype=torch.bfloat16),
    "bfloat16x7": torch.tensor([1.0, -3.5, 0.015625, 0.0, -0.0, 1e30, 7.0], dtype=torch.bfloat16),
    "int64": torch.tensor([0, -(2**62)], dtype=torch.int64),
    "uint8x11": torch.arange(11, dtype=torch.uint8) * 23,
}


def _flips(t: torch.Tensor):
    """Every copy of `t` with exactly one bit flipped, each bit position once."""
    raw = t.contiguous().view(torch.uint8).reshape(-1)
    for byte in range(raw.numel()):
        for bit in range(8):
            flipped = raw.clone()
            flipped[byte] ^= 1 << bit
            yield flipped.view(t.dtype).reshape(t.shape)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
@pytest.mark.parametrize("dtype", sorted(TENSORS))
def test_every_single_bit_flip_changes_the_digest(algorithm, dtype):
    t = TENSORS[dtype]
    digests = [fingerprint(t, algorithm)] + [fingerprint(f, algorithm) for f in _flips(t)]
    n_bits = t.numel() * t.element_size() * 8
    assert len(digests) == n_bits + 1
    assert len(set(digests)) == len(digests)  # all distinct: from the original and from each other


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_swapped_elements_change_the_digest(algorithm):
    t = torch.arange(64, dtype=torch.float32)
    base = fingerprint(t, algorithm)
    for i, j in ((0, 1), (5, 40), (62, 63), (0, 63)):
        s = t.clone()
        s[[i, j]] = s[[j, i]]
        assert fingerprint(s, algorithm) != base
    w = torch.tensor([1, 2, 3, 4], dtype=torch.int32)  # whole 32-bit words swapped
    assert fingerprint(w.flip(0), algorithm) != fingerprint(w, algorithm)
    # The two 32-bit halves of one 64-bit word swapped, and whole 64-bit words swapped.
    assert fingerprint(w[[1, 0, 2, 3]], algorithm) != fingerprint(w, algorithm)
    assert fingerprint(w[[2, 3, 0, 1]], algorithm) != fingerprint(w, algorithm)
    q = torch.tensor([5, -7, 2**40, 0], dtype=torch.int64)
    assert fingerprint(q[[1, 0, 2, 3]], algorithm) != fingerprint(q, algorithm)
    assert fingerprint(q[[0, 1, 3, 2]], algorithm) != fingerprint(q, algorithm)


@pytest.mark.parametrize("algorithm", ALGORITHMS)
def test_digest_covers_dtype_shape_and_names_its_algorithm(algorithm):
    t = torch.arange(6, dtype=torch.float32)
    d = fingerprint(t, algorithm)
    assert d == fingerprint(t.clone(), algorithm)
    assert d.startswith(f"{algorithm}:") and len(d.split(":")[1]) == 32  # 128 bits
    assert d != fingerprint(t.reshape(2, 3), algorithm)
    assert d != fingerprint(t.view(torch.int32), algorithm)  # same bytes, other dtype
    assert fingerprint(torch.zeros(0), algorithm) != fingerprint(torch.zeros(0, 3), algorithm)
    assert fingerprint(t[::2], algorithm) == fingerprint(t[::2].contiguous(), algorithm)
    # Views that start in the middle of a 64-bit word (dsh128 copies them first).
    for view in (
        torch.arange(9, dtype=torch.bfloat16)[1:],
        torch.arange(9, dtype=torch.float32)[1:],
        torch.arange(21, dtype=torch.uint8)[3:],
        torch.arange(40, dtype=torch.bfloat16).reshape(4, 10)[1:, 3:],  # also not contiguous
    ):
        assert fingerprint(view, algorithm) == fingerprint(view.clone(), algorithm)
        assert fingerprint(view, algorithm) == fingerprint(view.contiguous().clone(), algorithm)
    # The same bytes and shape but a zero byte more (padding) are different state.
    assert fingerprint(torch.zeros(3, dtype=torch.uint8), algorithm) != fingerprint(
        torch.zeros(4, dtype=torch.uint8), algorithm
    )


def _reference_lanes(data: bytes) -> list[int]:
    """dsh128's lane sums from its definition, in Python integers: 64-bit little-endian words
    (the last one zero-padded), f_lane(i, w) = mix(w + (i + 1) * K) summed mod 2^64."""
    mask = (1 << 64) - 1
    data = data + bytes(-len(data) % 8)
    words = [int.from_bytes(data[i : i + 8], "little") for i in range(0, len(data), 8)]
    sums = []
    for k, m1, m2, s1, s2, s3 in LANES:
        total = 0
        for i, w in enumerate(words):
            x = (w + (i + 1) * k) & mask
            x ^= x >> s1
            x = (x * m1) & mask
            x ^= x >> s2
            x = (x * m2) & mask
            x ^= x >> s3
            total = (total + x) & mask
        sums.append(total)
    return sums


@pytest.mark.parametrize("name", sorted(TENSORS))
def test_dsh128_lanes_follow_the_definition(name):
    # The torch ops (the specification the kernel is checked against) against the definition
    # written out in Python integers: 64-bit words, zero-padded tail.
    for t in (TENSORS[name], TENSORS[name][1:], torch.zeros(0, dtype=TENSORS[name].dtype)):
        data = t.contiguous().view(torch.uint8).numpy().tobytes()
        lanes = [v & ((1 << 64) - 1) for v in dsh128_lanes_torch(t).tolist()]
        assert lanes == _reference_lanes(data)


def test_dsh128_does_not_depend_on_how_the_words_are_split(monkeypatch):
    # The sum is over words, so chunking (and the kernel's blocks) cannot change it.
    t = torch.randn(10_001)  # 5000 whole 64-bit words and a 4-byte tail
    whole = dsh128_lanes_torch(t)
    monkeypatch.setattr(dsh128, "_CHUNK_WORDS", 97)
    assert torch.equal(dsh128_lanes_torch(t), whole)


def test_digests_of_different_algorithms_are_never_compared():
    t = torch.ones(3)
    a, b = fingerprint(t, "xxh3_128"), fingerprint(t, "dsh128")
    assert a != b
    with pytest.raises(MixedAlgorithms):
        check_comparable([a, b])
    with pytest.raises(MixedAlgorithms):
        compare_digests([{"param/w": a}, {"param/w": b}])
    with pytest.raises(ValueError, match="unknown fingerprint algorithm"):
        fingerprint(t, "md5")


def test_state_covers_params_buffers_optimizer_and_grads():
    model = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    model(torch.randn(4, 3)).sum().backward()
    opt.step()
    names = set(fingerprint_state(model, opt, grads=True))
    for name in (
        "param/0.weight",
        "buffer/1.running_mean",
        "buffer/1.num_batches_tracked",
        "grad/0.weight",
        "optim/0.weight/exp_avg",
        "optim/0.weight/exp_avg_sq",
        "optim/0.weight/step",
        "optim/group0/lr",
    ):
        assert name in names
    before = state_digest(model, opt)
    assert before == combined_fingerprint(fingerprint_state(model, opt))

    seen = {before}
    for mutate in (
        lambda: model[1].running_mean.add_(1e-3),  # a buffer
        lambda: opt.state[model[0].weight]["exp_avg"].view(-1)[0].add_(1e-9),  # an Adam moment
        lambda: opt.param_groups[0].__setitem__("lr", 2e-3),  # a hyperparameter
    ):
        mutate()
        seen.add(state_digest(model, opt))
    assert len(seen) == 4  # each change gave a new digest


def test_fingerprint_many_matches_one_by_one():
    tensors = {"a": torch.randn(5), "b": torch.arange(3)}
    for algorithm in ALGORITHMS:
        assert fingerprint_many(tensors, algorithm) == {k: fingerprint(v, algorithm) for k, v in tensors.items()}


cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8])
def test_device_digest_equals_the_cpu_specification(dtype):
    # Computed on the GPU (fused kernel if triton is there), it must equal the torch ops on the CPU.
    # Sizes around the kernel's block of 2048 64-bit words (16 KB) and odd byte counts.
    for n in (0, 1, 3, 7, 2047, 2048, 2049, 4097, 8191, 8192, 8193, 16_385, 1_000_003):
        t = (torch.randn(n) * 100).to(dtype)
        assert fingerprint(t.cuda()) == fingerprint(t, "dsh128")
        assert fingerprint(t.cuda()).startswith("dsh128:")
        if n > 1:  # a view starting mid-word, on the device
            assert fingerprint(t.cuda()[1:]) == fingerprint(t[1:], "dsh128")


@cuda
def test_triton_kernel_agrees_with_torch_ops_on_device():
    pytest.importorskip("triton")
    from distshare.integrity.dsh128_triton import BLOCK, dsh128_lanes_triton

    t = torch.randn(3_000_017, device="cuda")
    assert torch.equal(dsh128_lanes_triton(t), dsh128_lanes_torch(t))
    for programs in (1, 3, 1000):  # any grid gives the same sums (programs loop over blocks)
        assert torch.equal(dsh128_lanes_triton(t, programs), dsh128_lanes_torch(t))
    for n_bytes in (1, 7, 8, 9, 8 * BLOCK - 1, 8 * BLOCK, 8 * BLOCK + 5, 24 * BLOCK + 13):
        u = torch.randint(0, 256, (n_bytes,), dtype=torch.uint8, device="cuda")
        assert torch.equal(dsh128_lanes_triton(u), dsh128_lanes_torch(u))
    assert checksum._triton_lanes() is not None  # and the self-check let it be used


@cuda
def test_fingerprint_many_on_device_matches_one_by_one_and_the_cpu():
    gen = torch.Generator().manual_seed(3)
    cpu = {
        "a": torch.randn(5, generator=gen),
        "b": torch.arange(3),
        "c": torch.randn(10_007, generator=gen).to(torch.bfloat16),
        "d": torch.zeros(0),
        "e": torch.randn(4097, generator=gen).double()[1:],
    }
    on_device = {k: v.cuda() for k, v in cpu.items()}
    many = fingerprint_many({**on_device, "host": cpu["a"]})
    assert list(many) == [*on_device, "host"]  # the input's order
    assert many["host"] == fingerprint(cpu["a"])
    for k, v in on_device.items():
        assert many[k] == fingerprint(v) == fingerprint(cpu[k], "dsh128")


def _mixed_tensors(device: str = "cpu", block: int = 2048) -> list[torch.Tensor]:
    """A state's worth of awkward tensors for the multi-tensor kernel: every width (8, 4, 2, 1
    bytes), sizes around and across the kernel's block of `block` 64-bit words, empty ones,
    odd byte counts (a tail word), and views at offsets of 0, 1 and 2 elements on the device
    (16-byte aligned, 8-byte aligned, or starting mid-word), plus one non-contiguous view."""
    gen = torch.Generator().manual_seed(5)
    out = []
    for dtype in (torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.uint8):
        size = torch.empty(0, dtype=dtype).element_size()
        for n_words in (0, 1, 7, block - 1, block, block + 1, 3 * block + 5):
            for extra in (0, 1, 3):  # elements beyond whole words: odd byte counts
                if dtype == torch.int64 and extra:
                    continue
                n = n_words * 8 // size + extra
                if dtype == torch.int64:
                    base = torch.randint(-(2**62), 2**62, (n + 2,), generator=gen, dtype=dtype)
                elif dtype == torch.uint8:
                    base = torch.randint(0, 256, (n + 2,), generator=gen, dtype=dtype)
                else:
                    base = (torch.randn(n + 2, generator=gen) * 100).to(dtype)
                base = base.to(device)
                out += [base[:n], base[1 : n + 1], base[2 : n + 2]]
    out.append(torch.randn(30, 40, generator=gen).to(device)[:, 3:])
    return out


_INTERPRETER_CHECK = """
import sys
import torch
from test_checksum import _mixed_tensors
from distshare.integrity.dsh128_triton import BLOCK, dsh128_lanes_many_triton, dsh128_lanes_triton
from distshare.integrity.fingerprint import dsh128_lanes_torch

tensors = _mixed_tensors("cpu", BLOCK)
want = torch.stack([dsh128_lanes_torch(t) for t in tensors])
assert torch.equal(torch.stack([dsh128_lanes_triton(t) for t in tensors]), want), "per-tensor kernel"
for programs in (None, 1, 3, 10_000):  # a run of blocks within one tensor, across many, one block each
    assert torch.equal(dsh128_lanes_many_triton(tensors, programs), want), f"multi-tensor kernel, {programs=}"
for few in ([tensors[0]], [tensors[1], tensors[0]], tensors[-4:]):  # only empty or mid-word ones, a few
    assert torch.equal(dsh128_lanes_many_triton(few), torch.stack([dsh128_lanes_torch(t) for t in few]))
print("interpreter: equal on", len(tensors), "tensors")
"""


def _interpreter_triton() -> str | None:
    """Where a triton for its interpreter is: '' if it imports here, a path for PYTHONPATH
    (DISTSHARE_TRITON_PATH, default /tmp/ds/tri) if that exists, else None."""
    if find_spec("triton") is not None:
        return ""
    path = os.environ.get("DISTSHARE_TRITON_PATH", "/tmp/ds/tri")
    return path if Path(path, "triton").is_dir() else None


@pytest.mark.skipif(torch.cuda.is_available(), reason="with a GPU the CUDA tests check the compiled kernels themselves")
def test_multi_tensor_kernel_equals_the_specification_in_the_triton_interpreter():
    # Triton's interpreter (TRITON_INTERPRET=1) runs the kernels on CPU tensors, whose data
    # pointers are host addresses: the multi-tensor kernel's table of addresses works as on a
    # GPU. A subprocess, because TRITON_INTERPRET is read when the kernels are defined.
    where = _interpreter_triton()
    if where is None:
        pytest.skip("no triton for its interpreter (set DISTSHARE_TRITON_PATH)")
    root = Path(__file__).resolve().parent.parent
    path = [str(root), str(root / "tests")] + ([where] if where else [])
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(path), "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(
        [sys.executable, "-c", _INTERPRETER_CHECK], env=env, capture_output=True, text=True, timeout=240
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-3000:]
    assert "interpreter: equal" in proc.stdout


@cuda
def test_multi_tensor_kernel_agrees_with_the_per_tensor_kernel_and_the_cpu():
    pytest.importorskip("triton")
    from distshare.integrity.dsh128_triton import BLOCK, dsh128_lanes_many_triton, dsh128_lanes_triton

    tensors = _mixed_tensors("cuda", BLOCK)
    want = torch.stack([dsh128_lanes_torch(t.cpu()) for t in tensors])
    assert torch.equal(torch.stack([dsh128_lanes_triton(t) for t in tensors]).cpu(), want)
    for programs in (None, 1, 3, 10_000):
        assert torch.equal(dsh128_lanes_many_triton(tensors, programs).cpu(), want)
    assert checksum._triton_lanes_many() is not None  # the self-check let it be used
    state = {f"t{i}": t for i, t in enumerate(tensors)}
    assert fingerprint_many(state) == {k: fingerprint(v.cpu(), "dsh128") for k, v in state.items()}


@cuda
def test_fingerprint_many_on_device_without_triton_matches_the_cpu(monkeypatch):
    # The fallback (torch ops per tensor, e.g. when triton is missing) gives the same digests.
    monkeypatch.setattr(checksum, "_triton_state", {"fn": None, "many": None})
    tensors = {f"t{i}": t for i, t in enumerate(_mixed_tensors("cuda")[::7])}
    assert fingerprint_many(tensors) == {k: fingerprint(v.cpu(), "dsh128") for k, v in tensors.items()}
