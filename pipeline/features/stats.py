"""Per-latent statistics of one streaming pass over store rows, in O(d_sae x N) memory.

For each latent: firings, sum and max of its activation, an activation histogram, its top-N
rows, and a uniform sample of N of its firings from each of a few activation quantile intervals
(the "interval" examples of Anthropic's dashboards).

Histogram: `bins` equal bins over [0, scale), scale a power of two above the latent's max
(None of it is known before the pass). When a batch passes the scale, it doubles as often as
needed and bins merge (bin b becomes b >> shift): counts stay exact, and so do the samples,
which are kept per bin (bottom_n.py) and merge with their bins (each sample's bin is
recomputed from its value at the selection's next compaction). The bin edges b * scale / bins
are exact in float for power-of-two `bins`. After the pass, quantile intervals are runs of bins
holding about 1/intervals of the latent's firings each (a bin is never split), and each
interval's sample is the N smallest keys of its bins' samples.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from pipeline.features.bottom_n import BottomN
from pipeline.sae.metrics import DENSE_FREQUENCY
from pipeline.sae.model import SAEOutput


def firings(out: SAEOutput) -> tuple[Tensor, Tensor, Tensor]:
    """(row in batch, latent, activation) of every non-zero latent activation of a batch."""
    if out.feature_acts is None:  # the sparse TopK path
        fired = out.top_values != 0
        rows = torch.arange(out.top_values.shape[0], device=fired.device)[:, None].expand_as(fired)
        return rows[fired], out.top_indices[fired], out.top_values[fired].float()
    rows, latents = out.feature_acts.nonzero(as_tuple=True)
    return rows, latents, out.feature_acts[rows, latents].float()


@dataclass
class Interval:
    low: float  # activation range [low, high)
    high: float
    count: int  # firings in it
    rows: list[int]  # the sampled rows, highest activation first
    values: list[float]


class LatentStats:
    def __init__(self, d_sae: int, *, top_n: int, sample_n: int, bins: int, intervals: int, seed: int,
                 device: torch.device | str = "cpu"):
        self.d_sae, self.bins, self.intervals = d_sae, bins, intervals
        self.rows = 0  # rows seen
        self.count = torch.zeros(d_sae, dtype=torch.int64, device=device)
        self.sum = torch.zeros(d_sae, dtype=torch.float64, device=device)
        self.max = torch.zeros(d_sae, device=device)
        self.scale = torch.zeros(d_sae, dtype=torch.float64, device=device)  # 0: never fired
        self.histogram = torch.zeros(d_sae, bins, dtype=torch.int64, device=device)
        self.top = BottomN(d_sae, top_n, device)  # key: -activation
        self.samples = BottomN(d_sae * bins, sample_n, device, regroup=self._current_group)  # group: latent * bins + bin; key: uniform
        self._generator = torch.Generator(device).manual_seed(seed)

    @torch.no_grad()
    def update(self, rows: Tensor, latents: Tensor, values: Tensor, batch_rows: int) -> None:
        """One batch: the firings (store row, latent, activation > 0) of `batch_rows` rows."""
        self.rows += batch_rows
        self.count += torch.bincount(latents, minlength=self.d_sae)
        self.sum += torch.bincount(latents, weights=values.double(), minlength=self.d_sae)
        batch_max = torch.zeros_like(self.max).scatter_reduce(0, latents, values, "amax")
        self.max = torch.maximum(self.max, batch_max)
        self._grow(batch_max)
        bins = self.bin_of(latents, values)
        groups = latents * self.bins + bins
        self.histogram.view(-1).index_add_(0, groups, torch.ones_like(groups))
        self.top.offer(latents, -values, rows, values)
        keys = torch.rand(values.shape, generator=self._generator, device=values.device)
        self.samples.offer(groups, keys, rows, values)

    def bin_of(self, latents: Tensor, values: Tensor) -> Tensor:
        return (values.double() * self.bins / self.scale[latents]).long().clamp_(max=self.bins - 1)

    def _current_group(self, group: Tensor, value: Tensor) -> Tensor:
        latent = group // self.bins
        return latent * self.bins + self.bin_of(latent, value)

    def _grow(self, batch_max: Tensor) -> None:
        """Raise the scale of every latent whose batch max reaches it, merging its bins."""
        grows = batch_max.double() >= self.scale
        grows &= batch_max > 0
        if not bool(grows.any()):
            return
        latents = grows.nonzero().flatten()
        scale = torch.exp2(torch.floor(torch.log2(batch_max[latents].double())) + 1)
        had = self.scale[latents] > 0
        shift = torch.zeros_like(latents)
        shift[had] = torch.log2(scale[had] / self.scale[latents][had]).round().long()
        self.scale[latents] = scale
        old = self.histogram[latents]
        merged = torch.arange(self.bins, device=old.device)[None, :] >> shift[:, None]
        self.histogram[latents] = torch.zeros_like(old).scatter_add_(1, merged, old)
        self.samples.bar.view(self.d_sae, self.bins)[latents[had & (shift > 0)]] = float("inf")  # their bins merged

    # --- results --------------------------------------------------------------------------
    def frequency(self) -> Tensor:
        return self.count.double().cpu() / max(self.rows, 1)

    def summary(self) -> dict[str, float | int]:
        """L0 and dead/dense latents over the rows seen, as evaluate defines them."""
        frequency = self.frequency()
        return {"l0": float(frequency.sum()), "dead_latents": int((frequency == 0).sum()),
                "dense_latents": int((frequency > DENSE_FREQUENCY).sum()), "rows": self.rows}

    def mean_activation(self) -> Tensor:
        """(d_sae,) mean activation over the rows where the latent fires (NaN where it never does)."""
        return (self.sum / self.count).cpu()

    def top_rows(self, latent: int) -> tuple[list[int], list[float]]:
        """(rows, activations) of the latent's top rows, highest first."""
        _, rows, values = self.top.entries(latent)
        return rows.tolist(), values.tolist()

    def bin_width(self, latent: int) -> float:
        return float(self.scale[latent]) / self.bins

    def quantile_intervals(self, latent: int) -> list[Interval]:
        """Runs of bins with about 1/intervals of the firings each, with their samples."""
        counts = self.histogram[latent].cpu()
        total = int(counts.sum())
        if total == 0:
            return []
        cumulative = counts.cumsum(0)
        used = int(counts.nonzero().max()) + 1
        targets = torch.arange(1, self.intervals, dtype=torch.float64) * total / self.intervals
        cuts = (torch.searchsorted(cumulative.double(), targets) + 1).tolist()
        edges = sorted({0, used, *(cut for cut in cuts if 0 < cut < used)})
        width = self.bin_width(latent)
        intervals = []
        for start, stop in zip(edges, edges[1:]):
            count = int(counts[start:stop].sum())
            if count == 0:
                continue
            entries = [self.samples.entries(latent * self.bins + b) for b in range(start, stop)]
            keys, rows, values = (torch.cat(parts) for parts in zip(*entries))
            chosen = torch.argsort(keys, stable=True)[: self.samples.n]
            rows, values = rows[chosen], values[chosen]
            order = torch.argsort(values, descending=True, stable=True)
            intervals.append(Interval(start * width, stop * width, count, rows[order].tolist(), values[order].tolist()))
        return intervals
