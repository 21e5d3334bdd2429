"""`saeflow shuffle`: the copy holds every training row once in a new order, its held-out chunks
as they were, each row with its own tokens/doc/pos; the split cannot be changed under it; a
killed copy resumes to the same bytes; bad input is refused with nothing overwritten."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from store.format import StoreError, read_manifest
from store.loader import ActivationLoader
from store.reader import StoreReader
from store.shuffled_copy import shuffle_store
from store.validate import compare_stores, validate_store
from store.writer import KILL_AT_ENV
from tests.store_fixtures import make_store
from tests.test_cli import REPO, one_error_line

HOOK, OUT_HOOK = "blocks.0.hook_resid_post", "blocks.1.hook_mlp_out"
CHUNK, N_CHUNKS, HELDOUT = 64, 12, 2


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """Documents of ~20 rows in store order; column 0 of both hooks is the row's index."""
    rng = np.random.default_rng(0)
    n = CHUNK * N_CHUNKS - 17  # a short last chunk
    docs = np.repeat(np.arange(n), rng.geometric(1 / 20, size=n))[:n]
    rows = np.stack([np.arange(n), rng.standard_normal(n)], axis=1).astype(np.float32)
    return make_store(tmp_path_factory.mktemp("src") / "src.zarr", {HOOK: rows, OUT_HOOK: -rows}, CHUNK,
                      store_dtype="float32", docs=docs)


@pytest.fixture(scope="module")
def copy(source, tmp_path_factory):
    out = tmp_path_factory.mktemp("copy") / "copy.zarr"
    shuffle_store(source, out, heldout_chunks=HELDOUT, seed=3, block_chunks=5)
    return out


def _ids(reader: StoreReader, chunks) -> np.ndarray:
    return np.concatenate([reader.read_chunk(HOOK, c)[:, 0] for c in chunks]).astype(np.int64)


def test_every_training_row_once_in_a_new_order_and_held_out_chunks_as_they_were(source, copy):
    src, out = StoreReader(source), StoreReader(copy)
    assert validate_store(copy) == []
    assert (out.n_rows, out.n_chunks) == (src.n_rows, src.n_chunks)
    train = src.split_chunks("train", HELDOUT)
    assert np.array_equal(np.sort(_ids(out, train)), _ids(src, train))  # the same rows, each once
    assert np.mean(_ids(out, train) == _ids(src, train)) < 0.05  # in another order
    for chunk in src.split_chunks("heldout", HELDOUT):
        for name in (HOOK, OUT_HOOK, "tokens", "doc", "pos"):
            assert np.array_equal(out.read_chunk(name, chunk), src.read_chunk(name, chunk)), (name, chunk)
    ids = _ids(out, range(out.n_chunks))  # every row brings its own provenance and its other hook
    for name in ("tokens", "doc", "pos"):
        stored = np.concatenate([out.read_chunk(name, c) for c in range(out.n_chunks)])
        source_values = np.concatenate([src.read_chunk(name, c) for c in range(src.n_chunks)])
        assert np.array_equal(stored, source_values[ids]), name
    assert np.array_equal(np.concatenate([out.read_chunk(OUT_HOOK, c) for c in range(out.n_chunks)])[:, 0], -ids)


def test_the_copy_keeps_its_sources_split_and_refuses_another(source, copy):
    src, out = StoreReader(source), StoreReader(copy)
    assert out.split_ranges("heldout", HELDOUT) == src.split_ranges("heldout", HELDOUT)
    heldout_docs = {int(d) for r in out.split_ranges("heldout", HELDOUT) for d in out.read_rows("doc", r.start, r.stop)}
    train_docs = {int(d) for c in out.split_chunks("train", HELDOUT) for d in out.read_chunk("doc", c)}
    assert heldout_docs and not heldout_docs & train_docs  # no document in both splits
    with pytest.raises(StoreError, match=f"shuffled with loader.heldout_chunks={HELDOUT}, not 1: set loader.heldout_chunks={HELDOUT}"):
        ActivationLoader(copy, HOOK, batch_size=32, heldout_chunks=1)
    assert read_manifest(copy)["shuffled"]["source_identity"] == src.identity()


def test_the_loader_reads_a_copy_whole_chunk_by_chunk_every_row_once(copy):
    loader = ActivationLoader(copy, HOOK, batch_size=50, heldout_chunks=HELDOUT, shuffle_buffer_chunks=3, seed=1)
    assert loader.slice_rows == CHUNK  # rows are in random order already
    rows = loader.plan.rows_per_epoch(0)
    loader.max_rows = rows
    ids = np.concatenate([b[HOOK][:, 0].numpy() for b in loader]).astype(np.int64)
    assert np.array_equal(np.sort(ids), np.sort(_ids(StoreReader(copy), StoreReader(copy).split_chunks("train", HELDOUT))))


def test_a_killed_shuffle_resumes_to_the_same_copy(source, copy, tmp_path):
    out = tmp_path / "killed.zarr"
    config = ["configs/tiny.yaml", "--set", f"generate.store={source}", "--set", f"loader.heldout_chunks={HELDOUT}",
              "--set", "loader.seed=3", "--out", str(out)]
    run = [sys.executable, "-m", "pipeline.cli", "shuffle", *config]
    killed = subprocess.run(run, cwd=REPO, env={**__import__("os").environ, KILL_AT_ENV: "manifest_written:4"},
                            capture_output=True, text=True, timeout=120)
    assert killed.returncode == -9 and 0 < read_manifest(out)["n_chunks"] < N_CHUNKS, killed.stderr[-2000:]
    finished = subprocess.run(run, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert finished.returncode == 0, finished.stderr[-2000:]
    assert compare_stores(out, copy) == []


def test_bad_input_is_refused_in_one_line_and_nothing_is_overwritten(source, copy, tmp_path):
    settings = ["--set", f"loader.heldout_chunks={HELDOUT}", "--set", "loader.seed=3"]
    before = (copy / "zarr.json").read_bytes()
    error = one_error_line("shuffle", "configs/tiny.yaml", "--set", f"generate.store={source}", *settings,
                           "--set", "loader.seed=4", "--out", str(copy))
    assert "already exists and is not this shuffle" in error and "pass --overwrite to replace it" in error
    assert (copy / "zarr.json").read_bytes() == before
    assert shuffle_store(source, copy, heldout_chunks=HELDOUT, seed=3)["updated"] == read_manifest(copy)["updated"]  # done: left alone
    assert (copy / "zarr.json").read_bytes() == before
    other = tmp_path / "other.zarr"
    shuffle_store(source, other, heldout_chunks=HELDOUT, seed=3)
    shuffle_store(source, other, heldout_chunks=HELDOUT, seed=4, overwrite=True)
    assert read_manifest(other)["shuffled"]["seed"] == 4 and validate_store(other) == []
    error = one_error_line("shuffle", "configs/tiny.yaml", "--set", f"generate.store={copy}", *settings, "--out", str(tmp_path / "x"))
    assert "is a shuffled copy already; shuffle its source" in error and not (tmp_path / "x").exists()
    error = one_error_line("features", "configs/tiny.yaml", "--set", f"generate.store={copy}", *settings)
    assert "out of document order" in error and f"--set generate.store={source}" in error
