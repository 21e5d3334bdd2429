"""How well shuffled batches mix a document-ordered store (rows carry their id and document)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from store.format import StoreError
from store.loader import ActivationLoader
from store.reader import StoreReader
from store.shuffled_copy import shuffle_store
from tests.store_fixtures import make_store

HOOK = "blocks.0.hook_resid_post"
CHUNK, N_CHUNKS, BATCH, BUFFER, HELDOUT, EPOCHS = 256, 64, 128, 8, 2, 20


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """64 chunks of documents ~40 rows long (geometric lengths), in store order as generate
    writes them; column 0 is the row id, column 1 a value drawn per document."""
    rng = np.random.default_rng(0)
    n = CHUNK * N_CHUNKS
    docs = np.repeat(np.arange(n), rng.geometric(1 / 40, size=n))[:n]
    values = rng.standard_normal(n)[docs]
    rows = np.stack([np.arange(n), values], axis=1).astype(np.float32)
    return make_store(tmp_path_factory.mktemp("mix") / "mix.zarr", {HOOK: rows}, CHUNK, store_dtype="float32", docs=docs), docs


def _mixing(path: Path, docs: np.ndarray, train_ids: np.ndarray | None = None, **settings) -> dict:
    """train_ids: the source row ids the training split holds (a shuffled copy's, in its order)."""
    train = np.concatenate([np.arange(r.start, r.stop) for r in StoreReader(path).split_ranges("train", HELDOUT)])
    train = np.sort(train if train_ids is None else train_ids)
    loader = ActivationLoader(path, HOOK, batch_size=BATCH, shuffle_buffer_chunks=BUFFER, heldout_chunks=HELDOUT,
                              max_rows=EPOCHS * len(train), **settings)
    batches = [batch[HOOK].numpy() for batch in loader]
    ids = np.concatenate([b[:, 0] for b in batches]).astype(np.int64)
    full = [b for b in batches if len(b) == BATCH]
    rng = np.random.default_rng(1)
    iid = np.mean([len(np.unique(docs[rng.choice(train, BATCH, replace=False)])) for _ in range(500)])

    def consecutive_correlation(column: int) -> float:
        means = np.array([b[:, column].mean() for b in full])
        return float(np.corrcoef(means[:-1], means[1:])[0, 1])

    return {
        "slice_rows": loader.slice_rows,
        "epochs_exact": all(np.array_equal(np.sort(ids[e * len(train) : (e + 1) * len(train)]), train) for e in range(EPOCHS)),
        "docs_ratio": np.mean([len(np.unique(docs[b[:, 0].astype(np.int64)])) for b in full]) / iid,
        "position_corr": consecutive_correlation(0),  # batches from the same regions of the corpus
        "document_corr": consecutive_correlation(1),  # batches sharing documents
    }


def test_batches_mix_like_an_iid_sample(corpus):
    mixing = _mixing(*corpus)  # the default: single-row slices
    assert mixing["epochs_exact"]  # every training row exactly once per epoch
    assert mixing["docs_ratio"] >= 0.8, mixing
    assert abs(mixing["position_corr"]) <= 0.05 and abs(mixing["document_corr"]) <= 0.05, mixing


def test_whole_chunk_reads_mix_only_a_few_regions(corpus):
    """slice_rows=chunk_rows reads whole chunks, as the loader once did: far from iid (the
    measure above can fail)."""
    mixing = _mixing(*corpus, slice_rows=CHUNK)
    assert mixing["epochs_exact"]
    assert mixing["docs_ratio"] < 0.5 and mixing["position_corr"] > 0.3, mixing


def test_a_shuffled_copy_read_whole_chunk_by_chunk_mixes_like_an_iid_sample(corpus, tmp_path):
    """`saeflow shuffle` once, then whole-chunk reads (the loader's default on a copy): the same
    goals as the global shuffle's, with sequential reads. Seed 0, the config's default, as above;
    at this size a correlation's standard error is about 0.02 (seeds 0-2 and 5-10: -0.061..0.012)."""
    path, docs = corpus
    copy = tmp_path / "copy.zarr"
    shuffle_store(path, copy, heldout_chunks=HELDOUT, seed=0)
    reader = StoreReader(copy)
    train = np.concatenate([np.arange(r.start, r.stop) for r in reader.split_ranges("train", HELDOUT)])
    stored_ids = reader.read_rows(HOOK, 0, reader.n_rows)[:, 0].astype(np.int64)[train]  # the source rows they hold
    mixing = _mixing(copy, docs, train_ids=stored_ids)
    assert mixing["slice_rows"] == CHUNK and mixing["epochs_exact"]
    assert mixing["docs_ratio"] >= 0.8, mixing
    assert abs(mixing["position_corr"]) <= 0.05 and abs(mixing["document_corr"]) <= 0.05, mixing


def test_resume_is_exact_with_slices_and_old_cursors_are_refused(corpus):
    path, _ = corpus
    settings = dict(batch_size=BATCH, shuffle_buffer_chunks=2, heldout_chunks=HELDOUT, slice_rows=3, max_rows=40 * BATCH, seed=4)
    whole = [b[HOOK] for b in ActivationLoader(path, HOOK, **settings)]
    first = ActivationLoader(path, HOOK, **settings)
    head = [b[HOOK] for _, b in zip(range(17), first)]
    saved = json.loads(json.dumps(first.state_dict()))
    tail = [b[HOOK] for b in ActivationLoader(path, HOOK, **settings, cursor=saved)]
    assert all(torch.equal(a, b) for a, b in zip(head + tail, whole, strict=True))
    old = {k: v for k, v in saved.items() if k not in ("plan", "slice_rows")}  # a cursor saved before slices
    with pytest.raises(StoreError, match="saved by an older saeflow .* start a fresh run"):
        ActivationLoader(path, HOOK, **settings, cursor=old)
    with pytest.raises(StoreError, match="slice_rows=3 but this loader has slice_rows=1"):
        ActivationLoader(path, HOOK, **{**settings, "slice_rows": 1}, cursor=saved)
