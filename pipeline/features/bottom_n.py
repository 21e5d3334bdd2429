"""Per group, the n entries with the smallest keys offered so far: exact, streaming, O(groups x n).

The one selection behind the feature statistics: the top-N rows of a latent are its n smallest
keys -activation; a uniform sample of n firings of a histogram bin is its n smallest random keys
(bottom-k sampling: with i.i.d. uniform keys the n smallest are a uniform n-subset, and the n
smallest of a union of bins are among the union of each bin's n smallest, so bins merge
exactly). Each group's slots stay sorted by key, so slot n - 1 is the bar a new entry must pass;
after the first batches almost nothing passes it and an offer costs one comparison per entry.
"""

from __future__ import annotations

import torch
from torch import Tensor


class BottomN:
    def __init__(self, groups: int, n: int, device: torch.device | str = "cpu"):
        self.n = n
        self.keys = torch.full((groups, n), float("inf"), device=device)
        self.rows = torch.full((groups, n), -1, dtype=torch.int64, device=device)
        self.values = torch.zeros((groups, n), device=device)

    def offer(self, groups: Tensor, keys: Tensor, rows: Tensor, values: Tensor) -> None:
        """Entries (group, key, row, value), 1-D each; each group keeps its n smallest keys (ties:
        the entry offered first)."""
        if self.n == 0 or groups.numel() == 0:
            return
        passes = keys < self.keys[groups, -1]
        if not bool(passes.any()):
            return
        groups, keys, rows, values = groups[passes], keys[passes], rows[passes], values[passes]
        order = torch.argsort(keys, stable=True)
        order = order[torch.argsort(groups[order], stable=True)]  # by group, then key
        groups, keys, rows, values = groups[order], keys[order], rows[order], values[order]
        rank = torch.arange(groups.numel(), device=groups.device) - torch.searchsorted(groups, groups)
        within = rank < self.n
        groups, keys, rows, values, rank = groups[within], keys[within], rows[within], values[within], rank[within]
        touched, slot = torch.unique_consecutive(groups, return_inverse=True)
        new = [torch.full((touched.numel(), self.n), fill, dtype=like.dtype, device=like.device)
               for fill, like in ((float("inf"), self.keys), (-1, self.rows), (0, self.values))]
        for table, entries in zip(new, (keys, rows, values)):
            table[slot, rank] = entries
        merged = [torch.cat([old[touched], fresh], dim=1) for old, fresh in zip((self.keys, self.rows, self.values), new)]
        best = torch.argsort(merged[0], dim=1, stable=True)[:, : self.n]  # stable: kept entries win ties
        for old, table in zip((self.keys, self.rows, self.values), merged):
            old[touched] = table.gather(1, best)

    def pop(self, groups: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(group, key, row, value) of the filled slots of `groups`, which are emptied."""
        keys, rows, values = self.keys[groups], self.rows[groups], self.values[groups]
        filled = torch.isfinite(keys)
        owner = groups[:, None].expand_as(keys)[filled]
        self.keys[groups] = float("inf")
        self.rows[groups] = -1
        self.values[groups] = 0
        return owner, keys[filled], rows[filled], values[filled]

    def entries(self, group: int) -> tuple[Tensor, Tensor, Tensor]:
        """(keys, rows, values) of one group's filled slots, smallest key first."""
        filled = torch.isfinite(self.keys[group])
        return self.keys[group][filled], self.rows[group][filled], self.values[group][filled]
