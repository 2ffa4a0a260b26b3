"""Claim: a fingerprint changes when any single bit of a tensor changes, in any dtype, with
either algorithm; it covers dtype and shape; digests of different algorithms are never
compared; and a state fingerprint covers parameters, buffers, optimizer state and gradients."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from distshare import checksum
from distshare.checksum import (
    ALGORITHMS,
    MixedAlgorithms,
    check_comparable,
    combined_fingerprint,
    dsh128_lanes_torch,
    fingerprint,
    fingerprint_many,
    fingerprint_state,
    state_digest,
)
from distshare.replicas import compare_digests

# A few tensors of every width: 8, 4, 2 bytes per element (bfloat16 with an odd element
# count also exercises the zero-padded tail word), and an integer dtype.
TENSORS = {
    "float64": torch.tensor([1.5, -0.0, 3e-300], dtype=torch.float64),
    "float32": torch.tensor([0.1, -2.0, 0.0, 7e-39, 1e30], dtype=torch.float32),
    "bfloat16": torch.tensor([1.0, -3.5, 0.015625], dtype=torch.bfloat16),
    "int64": torch.tensor([0, -(2**62)], dtype=torch.int64),
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
    odd = torch.arange(9, dtype=torch.bfloat16)[1:]  # a view that starts in the middle of a 32-bit word
    assert fingerprint(odd, algorithm) == fingerprint(odd.clone(), algorithm)
    # The same bytes and shape but a zero byte more (padding) are different state.
    assert fingerprint(torch.zeros(3, dtype=torch.uint8), algorithm) != fingerprint(
        torch.zeros(4, dtype=torch.uint8), algorithm
    )


def test_dsh128_does_not_depend_on_how_the_words_are_split(monkeypatch):
    # The sum is over words, so chunking (and the kernel's blocks) cannot change it.
    t = torch.randn(10_001)
    whole = dsh128_lanes_torch(t)
    monkeypatch.setattr(checksum, "_CHUNK_WORDS", 97)
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
    for n in (0, 1, 3, 8191, 8192, 8193, 1_000_003):
        t = (torch.randn(n) * 100).to(dtype)
        assert fingerprint(t.cuda()) == fingerprint(t, "dsh128")
        assert fingerprint(t.cuda()).startswith("dsh128:")


@cuda
def test_triton_kernel_agrees_with_torch_ops_on_device():
    pytest.importorskip("triton")
    from distshare._dsh128_triton import dsh128_lanes_triton

    t = torch.randn(3_000_017, device="cuda")
    assert torch.equal(dsh128_lanes_triton(t), dsh128_lanes_torch(t))
    assert checksum._triton_lanes() is not None  # and the self-check let it be used
