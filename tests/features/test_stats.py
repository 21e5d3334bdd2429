"""The streaming selections and histograms behind `saeflow features`, against plain numpy over
all the data at once (fast: no store, no model)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.features import bottom_n
from pipeline.features.bottom_n import BottomN
from pipeline.features.stats import LatentStats


@pytest.mark.parametrize("pending", [16, bottom_n._MIN_PENDING])  # compacting mid-stream, and only at the end
def test_bottom_n_keeps_each_groups_smallest_keys_over_many_offers(monkeypatch, pending):
    monkeypatch.setattr(bottom_n, "_MIN_PENDING", pending)
    rng = np.random.default_rng(0)
    groups, n = 7, 4
    group = rng.integers(0, groups, 3000)
    keys = rng.random(3000).astype(np.float32)
    keys[::50] = keys[1]  # ties too
    selection = BottomN(groups, n)
    for part in np.array_split(np.arange(3000), 23):  # uneven batches, some groups absent from some
        selection.offer(torch.from_numpy(group[part]), torch.from_numpy(keys[part]),
                        torch.from_numpy(part).long(), torch.from_numpy(keys[part] * 2))
    for g in range(groups):
        kept_keys, rows, values = selection.entries(g)
        members = np.flatnonzero(group == g)
        expected = members[np.argsort(keys[members], kind="stable")[:n]]  # ties: the row offered first
        assert rows.tolist() == expected.tolist()
        assert kept_keys.tolist() == keys[expected].tolist() and values.tolist() == (keys[expected] * 2).tolist()


def test_histograms_and_samples_survive_the_scale_doubling():
    """Activations that grow batch after batch make every latent's scale double several times:
    the merged histogram must equal one computed at the final scale, the top rows must be the
    global top, and every sample must lie in the bin it is filed under."""
    rng = np.random.default_rng(1)
    d_sae, bins, batches, rows_per = 3, 8, 6, 200
    stats = LatentStats(d_sae, top_n=5, sample_n=3, bins=bins, intervals=3, seed=0)
    all_rows, all_latents, all_values = [], [], []
    for b in range(batches):
        latents = rng.integers(0, d_sae, rows_per)
        values = (rng.random(rows_per) * 2.0 ** b + 1e-3).astype(np.float32)  # the max doubles each batch
        rows = np.arange(rows_per) + b * rows_per
        stats.update(torch.from_numpy(rows), torch.from_numpy(latents), torch.from_numpy(values), rows_per)
        all_rows.append(rows), all_latents.append(latents), all_values.append(values)
    rows, latents, values = map(np.concatenate, (all_rows, all_latents, all_values))
    for j in range(d_sae):
        mine = values[latents == j]
        scale = float(stats.scale[j])
        assert mine.max() < scale <= 2 * mine.max() and np.log2(scale) == round(np.log2(scale))
        counts, _ = np.histogram(mine.astype(np.float64), bins=bins, range=(0, scale))
        assert stats.histogram[j].tolist() == counts.tolist()
        top_rows, top_values = stats.top_rows(j)
        order = np.argsort(-mine, kind="stable")[:5]
        assert top_rows == rows[latents == j][order].tolist() and top_values == mine[order].tolist()
        intervals = stats.quantile_intervals(j)
        assert sum(interval.count for interval in intervals) == len(mine) == int(stats.count[j])
        for interval in intervals:
            inside = (mine >= interval.low) & (mine < interval.high)
            assert interval.count == int(inside.sum())
            assert len(interval.rows) == min(3, interval.count) == len(set(interval.rows))
            for row, value in zip(interval.rows, interval.values):
                assert interval.low <= value < interval.high
                assert values[rows == row][0] == value and latents[rows == row][0] == j
    assert stats.mean_activation()[0].item() == pytest.approx(values[latents == 0].astype(np.float64).mean(), rel=1e-12)
