"""The train/held-out split: held-out chunks spread over the store, no document in both splits."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from store.format import StoreError
from store.loader import ActivationLoader
from store.reader import StoreReader
from store.split import RowMap, heldout_chunk_indices
from store.split_moments import store_moments
from tests.store_fixtures import make_store

HOOK = "blocks.0.hook_resid_post"
CHUNK = 64


def test_heldout_chunks_are_spread_and_deterministic():
    for n_chunks, held in [(20, 1), (20, 3), (64, 4), (1000, 7)]:
        chunks = heldout_chunk_indices(n_chunks, held)
        assert chunks == heldout_chunk_indices(n_chunks, held)  # the same store holds out the same chunks
        assert len(set(chunks)) == held and chunks == sorted(chunks)
        bounds = np.linspace(0, n_chunks, held + 1)
        assert all(lo <= c < hi for c, lo, hi in zip(chunks, bounds[:-1], np.ceil(bounds[1:])))  # one per stratum
    assert heldout_chunk_indices(64, 4) != list(range(60, 64))  # not the tail


@pytest.fixture
def doc_store(tmp_path):
    """30 chunks of documents that cross chunk boundaries, one of them longer than two chunks."""
    rng = np.random.default_rng(2)
    n = 30 * CHUNK - 17
    lengths = rng.integers(5, 90, size=n)
    lengths[3] = 3 * CHUNK  # spans whole chunks
    docs = np.repeat(np.arange(n), lengths)[:n]
    rows = (rng.standard_normal((n, 5)) * 3 + np.arange(n)[:, None] / n).astype(np.float32)
    rows[:, 0] = np.arange(n)
    path = make_store(tmp_path / "docs.zarr", {HOOK: rows}, CHUNK, store_dtype="float32", docs=docs, recorded_stats_chunks=30)
    return path, docs, rows


@pytest.mark.parametrize("held", [1, 3, 6])
def test_no_document_is_in_both_splits(doc_store, held):
    path, docs, _ = doc_store
    reader = StoreReader(path)
    train = [int(i) for b in ActivationLoader(reader, HOOK, batch_size=100, heldout_chunks=held, max_rows=3000) for i in b[HOOK][:, 0]]
    heldout = [int(i) for b in ActivationLoader(reader, HOOK, batch_size=100, split="heldout", heldout_chunks=held) for i in b[HOOK][:, 0]]
    assert heldout and not set(docs[train]) & set(docs[heldout])
    assert not {i // CHUNK for i in train} & set(reader.split_chunks("heldout", held))
    # the held-out rows are the held-out chunks minus exactly the documents training chunks hold
    train_docs = set(docs[[i for c in reader.split_chunks("train", held) for i in range(*reader.chunk_bounds(c))]])
    expected = [i for c in reader.split_chunks("heldout", held) for i in range(*reader.chunk_bounds(c)) if docs[i] not in train_docs]
    assert heldout == expected
    assert RowMap(reader.split_ranges("heldout", held)).store_rows(np.arange(len(heldout))).tolist() == heldout


def test_a_heldout_split_without_a_document_of_its_own_is_refused(tmp_path):
    path = make_store(tmp_path / "one.zarr", {HOOK: np.zeros((4 * CHUNK, 2), np.float32)}, CHUNK, docs=np.zeros(4 * CHUNK))
    with pytest.raises(StoreError, match="hold no document of their own.*raise loader.heldout_chunks"):
        ActivationLoader(path, HOOK, batch_size=8, split="heldout", heldout_chunks=1)


@pytest.mark.parametrize("held", [1, 4])
def test_training_statistics_equal_a_direct_pass_over_the_training_rows(doc_store, held):
    path, _, rows = doc_store
    reader = StoreReader(path)
    train_rows = np.concatenate([np.arange(r.start, r.stop) for r in reader.split_ranges("train", held)])
    x = rows[train_rows].astype(np.float64)
    for use_recorded in (True, False):
        moments = store_moments(reader, HOOK, heldout_chunks=held, use_recorded=use_recorded)
        assert moments.count == len(train_rows)
        np.testing.assert_allclose(moments.mean.numpy(), x.mean(0), rtol=1e-10)
        np.testing.assert_allclose(moments.covariance().numpy(), np.cov(x, rowvar=False), rtol=1e-8)
        assert moments.mean_norm == pytest.approx(np.linalg.norm(x, axis=1).mean(), rel=1e-10)
    assert not torch.allclose(moments.mean, torch.from_numpy(rows[: len(train_rows)].astype(np.float64).mean(0)))
