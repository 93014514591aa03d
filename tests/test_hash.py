"""The probe hash against a plain-integer transcription of the spec's formulas."""
import torch

from sadam import probe_signs
from sadam._hash import probe_bits


def spec_hash(e: int, seed: int, r: int, j: int) -> int:
    """Spec section 2, written with Python's unbounded ints and explicit mod 2**32."""
    M = 2 ** 32
    key = seed ^ ((0x9E3779B9 * (r + 1)) % M) ^ ((0x85EBCA6B * (j + 1)) % M)
    x = (e % M) ^ key
    x = x ^ (((e >> 32) * 0xC2B2AE35) % M)
    x ^= x >> 16
    x = (x * 0x85EBCA6B) % M
    x ^= x >> 13
    x = (x * 0xC2B2AE35) % M
    x ^= x >> 16
    return x


def spec_signs(e, k, seed, r, j):
    x = spec_hash(e, seed, r, j)
    return [1.0 if (x >> i) & 1 else -1.0 for i in range(k)]


def test_hash_matches_integer_transcription():
    for seed, r, j in [(0, 0, 0), (1234567, 3, 17), (2 ** 32 - 1, 1000, 5)]:
        bits = probe_bits(300, tensor_id=j, epoch=r, seed=seed)
        expected = [spec_hash(e, seed, r, j) for e in range(300)]
        assert bits.tolist() == expected


def test_indices_above_two_to_the_32():
    offset = 2 ** 32 - 5  # the slice straddles 2**32, exercising hi32(e)
    bits = probe_bits(64, tensor_id=2, epoch=7, seed=99, offset=offset)
    assert bits.tolist() == [spec_hash(offset + i, 99, 7, 2) for i in range(64)]
    far = 3 * 2 ** 40 + 12345
    bits = probe_bits(8, tensor_id=0, epoch=0, seed=1, offset=far)
    assert bits.tolist() == [spec_hash(far + i, 1, 0, 0) for i in range(8)]


def test_signs_are_the_bits_of_the_hash():
    k = 32
    signs = probe_signs(50, k, tensor_id=3, epoch=2, seed=11)
    assert signs.shape == (k, 50)
    for e in (0, 1, 17, 49):
        assert signs[:, e].tolist() == spec_signs(e, k, 11, 2, 3)


def test_slices_with_offsets_equal_the_whole_tensor():
    """A shard starting at element `offset` sees exactly the directions of the full tensor."""
    whole = probe_signs(1000, 8, tensor_id=1, epoch=0, seed=5)
    cuts = [0, 1, 333, 334, 999, 1000]
    pieces = [probe_signs(b - a, 8, tensor_id=1, epoch=0, seed=5, offset=a)
              for a, b in zip(cuts, cuts[1:])]
    assert torch.equal(torch.cat(pieces, dim=1), whole)


def test_signs_are_balanced_and_independent_across_probes():
    """Closed-form sanity: each sign is +-1 with probability 1/2, distinct probes uncorrelated."""
    s = probe_signs(200_000, 16, tensor_id=0, epoch=0, seed=0, dtype=torch.float64)
    n = s.shape[1]
    assert s.mean(1).abs().max() < 5 / n ** 0.5  # 5 standard errors
    corr = (s @ s.T) / n
    off_diagonal = corr - torch.eye(16, dtype=torch.float64)
    assert off_diagonal.abs().max() < 5 / n ** 0.5


def test_epoch_tensor_id_and_seed_change_the_directions():
    base = probe_signs(256, 8, tensor_id=0, epoch=0, seed=0)
    for kwargs in (dict(tensor_id=1, epoch=0, seed=0), dict(tensor_id=0, epoch=1, seed=0),
                   dict(tensor_id=0, epoch=0, seed=1)):
        other = probe_signs(256, 8, **kwargs)
        assert (other != base).float().mean() > 0.4
