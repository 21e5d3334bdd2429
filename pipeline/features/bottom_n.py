"""Per group, the n entries with the smallest keys offered so far: exact, streaming, O(groups x n).

The one selection behind the feature statistics: the top-N rows of a latent are its n smallest
keys -activation; a uniform sample of n firings of a histogram bin is its n smallest random keys
(bottom-k sampling: with i.i.d. uniform keys the n smallest are a uniform n-subset, and the n
smallest of a union of bins are among the union of each bin's n smallest, so bins merge
exactly).

Amortized: an offered entry is kept if its key beats its group's bar (the n-th smallest key at
the last compaction, +inf while the group holds fewer), which after the first batches almost
none does; kept entries wait in a list, and once they outnumber the groups' n slots one sort by
(group, key) keeps each group's n smallest and lowers the bars. Ties go to the entry offered
first. Groups that are a function of the entry (a histogram bin of its value) may be redrawn
between offers: `regroup` recomputes every entry's group at each compaction, and whoever redraws
them resets the bars of the groups concerned to +inf (always safe: a bar only saves work).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

_MIN_PENDING = 1 << 16  # entries waiting before a compaction, at least


class BottomN:
    def __init__(self, groups: int, n: int, device: torch.device | str = "cpu",
                 regroup: Callable[[Tensor, Tensor], Tensor] | None = None):
        self.n, self.groups, self.regroup = n, groups, regroup
        self.bar = torch.full((groups,), float("inf"), device=device)
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        self._kept = (empty, torch.zeros(0, device=device), empty, torch.zeros(0, device=device))  # sorted by (group, key)
        self._pending: list[tuple[Tensor, Tensor, Tensor, Tensor]] = []
        self._pending_rows = 0

    def offer(self, groups: Tensor, keys: Tensor, rows: Tensor, values: Tensor) -> None:
        """Entries (group, key, row, value), 1-D each; each group keeps its n smallest keys."""
        if self.n == 0 or groups.numel() == 0:
            return
        passes = keys < self.bar[groups]
        if not bool(passes.any()):
            return
        self._pending.append((groups[passes], keys[passes].float(), rows[passes], values[passes].float()))
        self._pending_rows += self._pending[-1][0].numel()
        if self._pending_rows > max(self.groups * self.n, _MIN_PENDING):
            self._compact()

    def _compact(self) -> None:
        if not self._pending:
            return
        group, key, row, value = (torch.cat(parts) for parts in zip(self._kept, *self._pending))
        self._pending, self._pending_rows = [], 0
        if self.regroup is not None:
            group = self.regroup(group, value)
        order = torch.argsort(_sort_key(group, key), stable=True)  # kept entries come first: they win ties
        group, key, row, value = group[order], key[order], row[order], value[order]
        rank = torch.arange(group.numel(), device=group.device) - torch.searchsorted(group, group)
        keep = rank < self.n
        self._kept = group, key, row, value = group[keep], key[keep], row[keep], value[keep]
        full = rank[keep] == self.n - 1
        self.bar[group[full]] = key[full]

    def entries(self, group: int) -> tuple[Tensor, Tensor, Tensor]:
        """(keys, rows, values) of one group's entries, smallest key first."""
        self._compact()
        groups, key, row, value = self._kept
        start, stop = (int(i) for i in torch.searchsorted(groups, torch.tensor([group, group + 1], device=groups.device)))
        return key[start:stop], row[start:stop], value[start:stop]


def _sort_key(group: Tensor, key: Tensor) -> Tensor:
    """int64 ordered by (group, key): the float32 key's bits made order-preserving as unsigned."""
    bits = key.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    negative = bits >= 0x80000000
    bits = torch.where(negative, bits ^ 0xFFFFFFFF, bits | 0x80000000)
    return group * (1 << 32) + bits
