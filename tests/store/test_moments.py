"""Streaming float64 moments, a split's moments from the recorded snapshot, and row sampling."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from store.reader import StoreReader
from pipeline.sae.geometry import principal_components
from store.moments import RunningMoments, norm_scale_factor
from store.sampling import sample_rows
from store.split import heldout_chunk_indices
from store.split_moments import store_moments
from tests.store_fixtures import make_store


def test_running_moments_merge_equals_one_pass_numpy():
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((1000, 5)) * [1, 2, 3, 4, 5] + 100).astype(np.float32)
    whole = RunningMoments(5)
    whole.update(torch.from_numpy(x))
    parts = [RunningMoments(5) for _ in range(3)]
    for part, rows in zip(parts, np.array_split(x[:700], 3)):
        for piece in np.array_split(rows, 4):
            part.update(piece)
    tail = RunningMoments(5)
    tail.update(x[700:])
    merged = parts[0].merge(parts[1]).merge(parts[2]).merge(tail)
    x64 = x.astype(np.float64)
    for moments in (whole, merged):
        assert moments.count == 1000
        np.testing.assert_allclose(moments.mean.numpy(), x64.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(moments.covariance().numpy(), np.cov(x64, rowvar=False), rtol=1e-9)
        np.testing.assert_allclose(moments.covariance(ddof=0).numpy(), np.cov(x64, rowvar=False, ddof=0), rtol=1e-9)
        assert moments.mean_norm == pytest.approx(np.linalg.norm(x64, axis=1).mean(), rel=1e-12)


def test_running_moments_state_round_trip_is_json_able():
    moments = RunningMoments(3)
    moments.update(torch.randn(10, 3))
    state = moments.state_dict()
    json.dumps({k: v for k, v in state.items() if not isinstance(v, np.ndarray)})
    restored = RunningMoments.from_state(state)
    restored.update(torch.ones(2, 3))
    moments.update(torch.ones(2, 3))
    assert torch.equal(restored.mean, moments.mean)
    assert torch.equal(restored.covariance(), moments.covariance())
    no_cov = RunningMoments(3, track_covariance=False)
    no_cov.update(torch.ones(4, 3))
    assert RunningMoments.from_state(no_cov.state_dict()).mean_norm == pytest.approx(3**0.5)


def test_norm_scale_factor():
    assert norm_scale_factor(2.0, 16) == pytest.approx(2.0)
    with pytest.raises(ValueError):
        norm_scale_factor(0.0, 16)


# --- statistics over a store -----------------------------------------------------------------
HOOK = "blocks.1.hook_resid_post"
CHUNK = 64


def _store_rows(n: int = 1000, d: int = 6, seed: int = 4) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (rng.standard_normal((n, d)) @ rng.standard_normal((d, d)) + 3).astype(np.float32)


def _training(data: np.ndarray, heldout_chunks: int, n_chunks: int) -> np.ndarray:
    """The training split's rows, from the split's definition (held-out chunks are spread)."""
    held = set(heldout_chunk_indices(n_chunks, heldout_chunks))
    keep = np.array([row // CHUNK not in held for row in range(len(data))])
    return data[keep].astype(np.float64)


def test_running_moments_subtract_inverts_merge():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((500, 4)) * 10 + 50
    whole, part = RunningMoments(4), RunningMoments(4)
    whole.update(x)
    part.update(x[400:])
    rest = whole.subtract(part)
    assert rest.count == 400
    np.testing.assert_allclose(rest.mean.numpy(), x[:400].mean(axis=0), rtol=1e-12)
    np.testing.assert_allclose(rest.covariance().numpy(), np.cov(x[:400], rowvar=False), rtol=1e-8)
    assert rest.mean_norm == pytest.approx(np.linalg.norm(x[:400], axis=1).mean(), rel=1e-12)


@pytest.mark.parametrize("recorded_chunks", [None, 16, 10, 0])  # none / all / fewer than training / empty
def test_store_moments_equal_a_pass_over_the_training_chunks(tmp_path, recorded_chunks):
    data = _store_rows()  # 16 chunks, the last short
    path = make_store(tmp_path / "s.zarr", {HOOK: data}, CHUNK, store_dtype="float32", recorded_stats_chunks=recorded_chunks)
    train = _training(data, 2, 16)
    moments = store_moments(StoreReader(path), HOOK, heldout_chunks=2)
    assert moments.count == train.shape[0]
    np.testing.assert_allclose(moments.mean.numpy(), train.mean(axis=0), rtol=1e-10)
    np.testing.assert_allclose(moments.covariance().numpy(), np.cov(train, rowvar=False), rtol=1e-8, atol=1e-10)
    assert moments.mean_norm == pytest.approx(np.linalg.norm(train, axis=1).mean(), rel=1e-10)


def test_store_moments_use_the_recorded_snapshot_and_reject_a_torn_one(tmp_path):
    data = _store_rows()
    path = make_store(tmp_path / "s.zarr", {HOOK: data}, CHUNK, store_dtype="float32", recorded_stats_chunks=16)
    # Change a training chunk behind the snapshot's back: only a fresh pass sees the change (with
    # verified reads off: verified, the changed chunk stops the pass).
    (path / "acts" / HOOK / "c" / "0" / "0").write_bytes(np.zeros((CHUNK, 6), "<f4").tobytes())
    reader = StoreReader(path, verify=False)
    recorded = store_moments(reader, HOOK, heldout_chunks=1)
    fresh = store_moments(reader, HOOK, heldout_chunks=1, use_recorded=False)
    np.testing.assert_allclose(recorded.mean.numpy(), _training(data, 1, 16).mean(axis=0), rtol=1e-10)
    assert not torch.allclose(recorded.mean, fresh.mean)
    # A snapshot whose bytes no longer match the manifest's checksums is not trusted.
    (path / "stats" / HOOK / "mean" / "c" / "0").write_bytes(np.ones(6, "<f8").tobytes())
    assert torch.allclose(store_moments(StoreReader(path, verify=False), HOOK, heldout_chunks=1).mean, fresh.mean, rtol=1e-12)


def test_norm_scale_and_principal_components_of_the_training_split(tmp_path):
    data = _store_rows()
    path = make_store(tmp_path / "s.zarr", {HOOK: data}, CHUNK, store_dtype="float32", recorded_stats_chunks=16)
    moments = store_moments(StoreReader(path), HOOK)
    train = _training(data, 1, 16)
    scale = norm_scale_factor(moments.mean_norm, 6)
    assert np.linalg.norm(train * scale, axis=1).mean() == pytest.approx(6**0.5, rel=1e-10)
    components, ratio = principal_components(moments.covariance(), k=2)
    centered = torch.from_numpy(train - train.mean(axis=0))
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)
    assert torch.allclose(ratio, (s**2 / (s**2).sum())[:2], atol=1e-9)
    assert torch.allclose((components * vh[:2]).sum(dim=1).abs(), torch.ones(2, dtype=torch.float64), atol=1e-8)


def test_sample_rows_draws_distinct_training_rows_from_many_chunks(tmp_path):
    n = 40 * CHUNK + 10
    ids = np.repeat(np.arange(n, dtype=np.float32)[:, None], 3, axis=1)
    path = make_store(tmp_path / "ids.zarr", {HOOK: ids}, CHUNK, store_dtype="float32")
    reader = StoreReader(path)
    sample = sample_rows(reader, HOOK, 300, seed=1, heldout_chunks=2)
    picked = sample[:, 0].long().tolist()
    assert len(picked) == 300 == len(set(picked))
    held_chunks = heldout_chunk_indices(41, 2)
    assert not {p // CHUNK for p in picked} & set(held_chunks)
    assert len({p // CHUNK for p in picked}) >= 15  # 4x oversampled: 5 chunks' worth from ~20
    assert torch.equal(sample, sample_rows(reader, HOOK, 300, seed=1, heldout_chunks=2))
    assert not torch.equal(sample, sample_rows(reader, HOOK, 300, seed=2, heldout_chunks=2))
    held = sample_rows(reader, HOOK, 10_000, split="heldout", heldout_chunks=2)
    expected = [row for c in held_chunks for row in range(c * CHUNK, min((c + 1) * CHUNK, n))]
    assert held[:, 0].long().tolist() == expected  # whole split, store order
