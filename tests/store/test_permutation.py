"""The seeded permutation that deals an epoch's slices to groups (store/permutation.py)."""

from __future__ import annotations

import numpy as np
import pytest

from store.permutation import Permutation


@pytest.mark.parametrize("n", [1, 2, 5, 1000, 1025, 70_000])  # 1025, 70_000: most values walk
def test_it_is_a_bijection_equal_to_walking_each_value_on_its_own(n: int):
    permutation = Permutation(n, [7, 0, 3])
    values = permutation(np.arange(n))
    assert np.array_equal(np.sort(values), np.arange(n))
    some = np.random.default_rng(n).integers(0, n, 50)
    for position, value in zip(some, permutation(some)):  # the definition: walk until inside [0, n)
        x = permutation._feistel(np.array([position], dtype=np.uint64))
        while x[0] >= n:
            x = permutation._feistel(x)
        assert int(x[0]) == value


def test_seeds_give_other_permutations():
    positions = np.arange(1000)
    assert not np.array_equal(Permutation(1000, [0, 0, 0])(positions), Permutation(1000, [0, 0, 1])(positions))
