"""A seeded pseudo-random permutation of [0, n) evaluated pointwise, in O(1) memory.

The loader deals an epoch's slices to groups by this permutation: group g takes the slices at
positions [g * K, (g + 1) * K) of it, so computing one group costs O(K) whatever the store's
size (a materialized permutation of a billion-row store's slices would take gigabytes).

A balanced Feistel network over the smallest 2^(2h) >= n values is a bijection of that domain;
values that land at or above n are mapped again until they fall inside ("cycle walking"), which
keeps a bijection of [0, n) and needs fewer than 4 rounds of walking on average.
"""

from __future__ import annotations

import numpy as np

_ROUNDS = 4
_M1 = np.uint64(0xBF58476D1CE4E5B9)  # splitmix64's mixing constants
_M2 = np.uint64(0x94D049BB133111EB)


def _mix(values: np.ndarray, key: np.uint64) -> np.ndarray:
    z = values ^ key
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    return z ^ (z >> np.uint64(31))


class Permutation:
    """permutation(positions) -> the values at those positions of a permutation of [0, n)."""

    def __init__(self, n: int, seed: list[int]):
        self.n = n
        bits = max(1, (max(n, 2) - 1).bit_length())
        self.half = (bits + 1) // 2
        self.mask = np.uint64((1 << self.half) - 1)
        self.keys = [np.uint64(k) for k in np.random.default_rng(seed).integers(0, 2**63, size=_ROUNDS)]

    def _feistel(self, x: np.ndarray) -> np.ndarray:
        left, right = x >> np.uint64(self.half), x & self.mask
        for key in self.keys:
            left, right = right, left ^ (_mix(right, key) & self.mask)
        return (left << np.uint64(self.half)) | right

    def __call__(self, positions: np.ndarray) -> np.ndarray:
        x = self._feistel(np.asarray(positions, dtype=np.uint64))
        outside = np.flatnonzero(x >= self.n)  # each walk step maps only the values still outside
        while len(outside):
            values = self._feistel(x[outside])
            x[outside] = values
            outside = outside[values >= self.n]
        return x.astype(np.int64)
