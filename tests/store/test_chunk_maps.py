"""The loader's fast paths: chunk maps kept per reader, converting gathers, no reads past max_rows."""

from __future__ import annotations

import resource
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from store.chunk_maps import MAX_KEPT_MAPS, ChunkMaps, kept_maps_limit
from store.loader import ActivationLoader
from store.reader import StoreReader
from store.staging import _BatchMemory, gather_rows
from tests.store_fixtures import make_store, random_rows

HOOK = "blocks.0.hook_resid_post"
CHUNK = 64


@pytest.fixture
def fp16_store(tmp_path: Path) -> Path:
    return make_store(tmp_path / "fp16.zarr", {HOOK: random_rows(20 * CHUNK, 24, seed=5)}, CHUNK)


def _batches(loader: ActivationLoader) -> list[torch.Tensor]:
    return [batch[HOOK] for batch in loader]


def test_a_shuffled_loader_maps_each_chunk_once_and_the_rows_do_not_change(fp16_store: Path):
    settings = dict(batch_size=50, seed=1, shuffle_buffer_chunks=3, heldout_chunks=2, max_rows=3 * 18 * CHUNK)
    kept = StoreReader(fp16_store)
    fresh = StoreReader(fp16_store)
    fresh._maps = ChunkMaps(limit=0)  # every read maps its chunk afresh, as before kept maps
    ours, theirs = _batches(ActivationLoader(kept, HOOK, **settings)), _batches(ActivationLoader(fresh, HOOK, **settings))
    assert len(ours) == len(theirs) and all(torch.equal(a, b) for a, b in zip(ours, theirs))
    assert len(kept._maps) == 18 and len(fresh._maps) == 0  # the 18 training chunks, over 3 epochs
    again = kept.read_chunk(HOOK, 0, keep_map=True)
    assert again is kept.read_chunk(HOOK, 0, keep_map=True)  # the kept map, not a new one
    assert kept.read_chunk(HOOK, 0) is not again  # other readers of a chunk map it afresh
    kept.close()
    assert len(kept._maps) == 0
    assert np.array_equal(kept.read_chunk(HOOK, 0, keep_map=True), again)  # still readable after close


def test_kept_maps_stop_at_their_bound(fp16_store: Path):
    reader = StoreReader(fp16_store)
    reader._maps = ChunkMaps(limit=5)
    rows = [np.asarray(reader.read_chunk(HOOK, i, keep_map=True)) for i in range(20)]
    assert len(reader._maps) == 5
    assert all(np.array_equal(a, np.asarray(reader.read_chunk(HOOK, i, keep_map=True))) for i, a in enumerate(rows))
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    limit = kept_maps_limit()
    assert 0 < limit <= MAX_KEPT_MAPS
    assert soft == resource.RLIM_INFINITY or limit <= soft // 4  # a kept map holds a file descriptor
    assert limit <= int(Path("/proc/sys/vm/max_map_count").read_text()) // 4


def test_a_one_pass_read_keeps_no_maps(fp16_store: Path):
    reader = StoreReader(fp16_store)
    rows = sum(b.shape[0] for b in _batches(ActivationLoader(reader, HOOK, batch_size=100, shuffle=False, heldout_chunks=0)))
    assert rows == 20 * CHUNK and len(reader._maps) == 0


@pytest.mark.parametrize("stored", ["float16", "bfloat16", "float32"])
@pytest.mark.parametrize("d", [5, 768, 40_000])  # rows per converted block: many, 42, one
def test_converting_gathers_match_gather_then_convert(stored: str, d: int):
    values = torch.randn(300, d).to(getattr(torch, stored))
    source = values.view(torch.int16).numpy().view(np.uint16) if stored == "bfloat16" else values.numpy()
    order = np.random.default_rng(d).permutation(300)
    for rows in (order[:1], order[:43], order, slice(7, 250)):
        for dtype in (torch.float32, torch.float64):
            target = torch.full((len(values[rows]), d), float("nan"), dtype=dtype)
            gather_rows(source, rows, target)
            assert torch.equal(target, values[torch.as_tensor(rows) if not isinstance(rows, slice) else rows].to(dtype))
    same = np.empty((43, d), dtype=source.dtype)
    gather_rows(source, order[:43], same)  # no conversion: a plain gather
    assert np.array_equal(same, source[order[:43]])


class _CountingReader(StoreReader):
    """A real reader that counts the chunk reads the loader asks for."""

    def read_chunk(self, name, index, **kwargs):
        self.reads = getattr(self, "reads", 0) + 1
        return super().read_chunk(name, index, **kwargs)


def test_a_finite_stream_reads_no_group_past_its_last_row(fp16_store: Path):
    reader = _CountingReader(fp16_store)
    loader = ActivationLoader(reader, HOOK, batch_size=32, shuffle_buffer_chunks=2, heldout_chunks=0, max_rows=1)
    first_group = loader.plan.group_pieces(0, 0)
    assert sum(b.shape[0] for b in _batches(loader)) == 1
    assert reader.reads == len(set(first_group.chunk.tolist()))  # group 1 was never loaded


@pytest.mark.parametrize("dtype", [torch.float32, None])  # converted in the gather; the stored dtype
def test_batch_memory_is_reused_only_when_the_consumer_let_go(fp16_store: Path, dtype):
    loader = ActivationLoader(fp16_store, HOOK, batch_size=40, seed=2, shuffle_buffer_chunks=2, heldout_chunks=0,
                              prefetch_batches=1, dtype=dtype, max_rows=6 * 20 * CHUNK)
    held, copies = [], []
    for number, batch in enumerate(loader):
        rows = batch[HOOK]
        if number % 5 == 0:  # kept by the consumer, whole or as a view
            held.append(rows if number % 10 else rows[3:9, 2:])
            copies.append(held[-1].clone())
    assert len(held) == 39 and all(torch.equal(a, b) for a, b in zip(held, copies))  # none was written again


def test_batch_memory_goes_round_once_released():
    memory = _BatchMemory([(4, 3), (4, 2)], [torch.float32, torch.bfloat16], size=2)
    first = memory.take()
    pooled = memory._sets[0]
    view = first[1][:2]  # a view of one tensor holds the whole set
    del first
    second = memory.take()
    assert not any(np.shares_memory(t.view(torch.int16).numpy() if t.dtype == torch.bfloat16 else t.numpy(), a)
                   for t, a in zip(second, pooled))
    del second, view
    third = memory.take()
    assert third[0].dtype == torch.float32 and third[1].dtype == torch.bfloat16 and third[1].shape == (4, 2)
    assert np.shares_memory(third[0].numpy(), pooled[0]) and np.shares_memory(third[1].view(torch.int16).numpy(), pooled[1])
    fourth, fifth = memory.take(), memory.take()  # all held: a new set, and the oldest is forgotten (third keeps it alive)
    assert len(memory._sets) == 2 and all(s is not pooled for s in memory._sets) and fourth[0].shape == fifth[0].shape


def test_batch_memory_is_allocated_by_the_thread_that_builds_the_pool():
    """The planner thread takes sets the iterating thread allocated (glibc arenas are per thread:
    memory a finished loader's planner freed was not reused by the next loader's)."""
    memory = _BatchMemory([(4, 3)], [torch.float32], size=3)
    allocated = [arrays[0].ctypes.data for arrays in memory._sets]  # addresses: a reference would hold a set
    taken: list[torch.Tensor] = []
    worker = threading.Thread(target=lambda: taken.extend(memory.take()[0] for _ in range(3)))
    worker.start()
    worker.join()
    assert len(allocated) == 3 and [t.data_ptr() for t in taken] == allocated

