"""The shuffled loader on real zarr stores: coverage, determinism, resume, ranks, splits, memory."""

from __future__ import annotations

import itertools
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from threadpoolctl import ThreadpoolController

from store.format import StoreError
from store.loader import ActivationLoader
from store.rawread import mapped_byte_range, read_mapped_into
from store.reader import StoreReader
from store.staging import DeviceBatches, convert_on_this_thread, gather_rows, serial_openmp_team
from store.gather import PYTHON_GATHER_ENV
from store.sampling import sample_rows
from tests.store_fixtures import make_store, random_rows

HOOK = "blocks.0.hook_resid_post"
OUT_HOOK = "blocks.0.hook_mlp_out"
CHUNK = 64


def _id_rows(n: int, d: int = 4) -> np.ndarray:
    """Rows whose first column is their index (exact in float32), the rest derived from it."""
    ids = np.arange(n, dtype=np.float32)
    return np.stack([ids] + [ids * (k + 2) + k for k in range(d - 1)], axis=1)


@pytest.fixture
def id_store(tmp_path: Path) -> Path:
    # 20 chunks of 64 rows, the last one short (50 rows): 1266 rows.
    return make_store(tmp_path / "ids.zarr", {HOOK: _id_rows(19 * CHUNK + 50)}, CHUNK, store_dtype="float32")


def _rows(batches) -> list[torch.Tensor]:
    """The HOOK tensor of each {hook: tensor} batch."""
    return [batch[HOOK] for batch in batches]


def _ids(batches) -> list[int]:
    return [int(v) for batch in batches for v in (batch[HOOK] if isinstance(batch, dict) else batch)[:, 0]]


def _take(loader: ActivationLoader, n_batches: int) -> list[torch.Tensor]:
    return _rows(itertools.islice(iter(loader), n_batches))


def _split_ids(store: Path | StoreReader, split: str, heldout_chunks: int) -> list[int]:
    """Store rows of a split in store order (on id_store a row's id is its store row)."""
    reader = store if isinstance(store, StoreReader) else StoreReader(store)
    return [row for r in reader.split_ranges(split, heldout_chunks) for row in range(r.start, r.stop)]


def test_every_training_row_exactly_once_per_epoch(id_store: Path):
    reader = StoreReader(id_store)
    heldout = 2
    train = _split_ids(reader, "train", heldout)
    train_rows = len(train)
    assert train_rows == 1266 - heldout * CHUNK  # chunks 1 and 14 are held out; the short last one trains
    loader = ActivationLoader(reader, HOOK, batch_size=100, heldout_chunks=heldout, shuffle_buffer_chunks=3, seed=7, max_rows=3 * train_rows)
    batches = _rows(loader)
    assert all(b.shape == (100, 4) for b in batches[:-1]) and batches[-1].shape[0] == 3 * train_rows % 100
    ids = _ids(batches)
    assert len(ids) == 3 * train_rows
    for epoch in range(3):
        assert sorted(ids[epoch * train_rows : (epoch + 1) * train_rows]) == train
    # shuffled across the whole split (not a few chunks), and differently in each epoch
    assert ids[:train_rows] != sorted(ids[:train_rows])
    assert len({i // CHUNK for i in ids[:100]}) >= 15
    assert ids[:train_rows] != ids[train_rows : 2 * train_rows]
    assert loader.rows_yielded == 3 * train_rows


def test_short_last_chunk_in_training_split(id_store: Path):
    loader = ActivationLoader(id_store, HOOK, batch_size=128, heldout_chunks=0, shuffle_buffer_chunks=4, max_rows=1266)
    ids = _ids(loader)
    assert sorted(ids) == list(range(1266))


def test_rows_match_the_stored_values(tmp_path: Path):
    data = random_rows(700, 24, seed=3)
    path = make_store(tmp_path / "fp16.zarr", {HOOK: data}, CHUNK)
    loader = ActivationLoader(path, HOOK, batch_size=64, heldout_chunks=0, max_rows=700, dtype=torch.float32)
    dicts = list(loader)
    assert all(set(batch) == {HOOK} for batch in dicts)
    batches = _rows(dicts)
    assert all(b.dtype == torch.float32 for b in batches)
    got = torch.cat(batches).numpy()
    # every loaded row is a stored row, converted exactly once from fp16
    expected = {row.tobytes() for row in data.astype(np.float32)}
    assert {row.tobytes() for row in got} == expected
    kept = next(iter(ActivationLoader(path, HOOK, batch_size=64, heldout_chunks=0, dtype=None)))[HOOK]
    assert kept.dtype == torch.float16


def test_bfloat16_store(tmp_path: Path):
    values = torch.randn(300, 8).to(torch.bfloat16)
    bits = values.view(torch.int16).numpy().view(np.uint16)
    path = make_store(tmp_path / "bf16.zarr", {HOOK: bits}, CHUNK, store_dtype="bfloat16")
    heldout = ActivationLoader(path, HOOK, batch_size=128, split="heldout", heldout_chunks=4, dtype=None)
    got = torch.cat(_rows(heldout))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, values[_split_ids(path, "heldout", 4)])


def test_same_seed_same_batches_other_seed_different(id_store: Path):
    def run(seed: int) -> list[int]:
        return _ids(_take(ActivationLoader(id_store, HOOK, batch_size=50, seed=seed, shuffle_buffer_chunks=4, num_workers=2), 40))

    assert run(3) == run(3)
    assert run(3) != run(4)


@pytest.mark.parametrize("stop_after", [1, 5, 23, 24, 37])  # inside groups, at a group end, past an epoch
def test_restored_cursor_reproduces_the_remaining_batches(id_store: Path, stop_after: int):
    settings = dict(batch_size=48, seed=11, shuffle_buffer_chunks=4, heldout_chunks=1, max_rows=48 * 50 - 7)
    uninterrupted = _rows(ActivationLoader(id_store, HOOK, **settings))
    first = ActivationLoader(id_store, HOOK, **settings)
    head = _take(first, stop_after)
    saved = json.loads(json.dumps(first.state_dict()))
    assert saved["batches"] == stop_after
    resumed = ActivationLoader(id_store, HOOK, **settings, cursor=saved)
    tail = _rows(resumed)
    assert len(head) + len(tail) == len(uninterrupted) == 50
    for ours, theirs in zip(head + tail, uninterrupted):
        assert torch.equal(ours, theirs)
    # iterating again continues the stream rather than restarting it
    again = ActivationLoader(id_store, HOOK, **settings)
    assert torch.equal(torch.cat(_take(again, 2) + _take(again, 3)), torch.cat(uninterrupted[:5]))


def test_cursor_from_other_settings_is_refused(id_store: Path):
    loader = ActivationLoader(id_store, HOOK, batch_size=48, seed=1)
    _take(loader, 2)
    with pytest.raises(StoreError, match="batch_size"):
        ActivationLoader(id_store, HOOK, batch_size=64, seed=1, cursor=loader.state_dict())
    with pytest.raises(StoreError, match="seed"):
        ActivationLoader(id_store, HOOK, batch_size=48, seed=2, cursor=loader.state_dict())


@pytest.mark.parametrize("world_size", [2, 3])
def test_ranks_are_disjoint_and_cover_the_training_split(id_store: Path, world_size: int):
    train = _split_ids(id_store, "train", 1)  # chunk 11 is held out; 10 groups are uneven for both world sizes
    per_rank = []
    for rank in range(world_size):
        loader = ActivationLoader(id_store, HOOK, batch_size=32, seed=5, rank=rank, world_size=world_size, shuffle_buffer_chunks=2)
        rows = loader.plan.rows_per_epoch(0)
        per_rank.append(set(_ids(ActivationLoader(id_store, HOOK, batch_size=32, seed=5, rank=rank, world_size=world_size, shuffle_buffer_chunks=2, max_rows=rows))))
    assert sum(map(len, per_rank)) == len(train)
    assert set.union(*per_rank) == set(train)
    with pytest.raises(StoreError, match="rank"):
        ActivationLoader(id_store, HOOK, batch_size=32, rank=3, world_size=3)


def test_heldout_split_is_store_order_and_never_trained_on(id_store: Path):
    heldout = ActivationLoader(id_store, HOOK, batch_size=60, split="heldout", heldout_chunks=3)
    batches = _rows(heldout)
    held = [row for chunk in (4, 10, 15) for row in range(chunk * CHUNK, (chunk + 1) * CHUNK)]  # spread, not the tail
    assert _ids(batches) == held  # store order, each row once
    assert [b.shape[0] for b in batches] == [60, 60, 60, 12]  # 192 rows: short last batch
    assert _ids(heldout) == _ids(batches)  # every pass starts at the beginning
    train = ActivationLoader(id_store, HOOK, batch_size=60, heldout_chunks=3, max_rows=5 * 1266)
    assert not set(_ids(train)) & set(held)
    with pytest.raises(StoreError, match="heldout_chunks"):
        ActivationLoader(id_store, HOOK, batch_size=8, heldout_chunks=20)


def test_an_unshuffled_training_split_is_one_pass_in_store_order(id_store: Path):
    train = ActivationLoader(id_store, HOOK, batch_size=100, split="train", shuffle=False, heldout_chunks=3)
    expected = _split_ids(id_store, "train", 3)
    assert len(expected) == 1266 - 3 * CHUNK
    assert _ids(_rows(train)) == expected  # each training row once, in order; no held-out row
    assert _ids(_rows(train)) == expected  # and again from the start
    everything = ActivationLoader(id_store, HOOK, batch_size=100, shuffle=False, heldout_chunks=0, max_rows=1000)
    assert _ids(_rows(everything)) == list(range(1000))
    with pytest.raises(StoreError, match="only the shuffled training split has a cursor"):
        train.state_dict()


def test_transcoder_pairs_stay_aligned(tmp_path: Path):
    x_in = random_rows(900, 12, seed=1, dtype=np.float32)
    x_out = np.concatenate([2 * x_in + 1, x_in[:, :4] ** 2], axis=1)  # a row-wise function, d_out=16
    path = make_store(tmp_path / "pair.zarr", {HOOK: x_in, OUT_HOOK: x_out}, CHUNK, store_dtype="float32")
    loader = ActivationLoader(path, (HOOK, OUT_HOOK), batch_size=100, shuffle_buffer_chunks=5, max_rows=2000, num_workers=2)
    n = 0
    for batch in loader:
        a, b = batch[HOOK], batch[OUT_HOOK]
        assert a.shape[1] == 12 and b.shape[1] == 16
        torch.testing.assert_close(b, torch.cat([2 * a + 1, a[:, :4] ** 2], dim=1))
        n += a.shape[0]
    assert n == 2000


@pytest.mark.parametrize("layout", [dict(shard_chunks=4), dict(compressor="zstd")])
def test_sharded_and_compressed_stores_give_the_same_batches(tmp_path: Path, layout: dict):
    data = _id_rows(600)
    plain = make_store(tmp_path / "plain.zarr", {HOOK: data}, CHUNK, store_dtype="float32")
    other = make_store(tmp_path / "other.zarr", {HOOK: data}, CHUNK, store_dtype="float32", **layout)
    settings = dict(batch_size=70, seed=2, shuffle_buffer_chunks=3, max_rows=1500)
    for ours, theirs in zip(ActivationLoader(other, HOOK, **settings), ActivationLoader(plain, HOOK, **settings), strict=True):
        assert torch.equal(ours[HOOK], theirs[HOOK])


def test_pin_memory_on_a_cpu_only_machine_is_skipped_cleanly(id_store: Path):
    pinned = ActivationLoader(id_store, HOOK, batch_size=64, seed=1, pin_memory=True, device="cpu")
    plain = ActivationLoader(id_store, HOOK, batch_size=64, seed=1, pin_memory=False, device="cpu")
    assert not pinned.pinned
    for a, b in zip(_take(pinned, 6), _take(plain, 6)):
        assert torch.equal(a, b) and a.device.type == "cpu" and not a.is_pinned()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_batches_are_pinned_copies(id_store: Path):
    gpu = ActivationLoader(id_store, HOOK, batch_size=64, seed=1, device="cuda")
    cpu = ActivationLoader(id_store, HOOK, batch_size=64, seed=1, pin_memory=False)
    assert gpu.pinned
    for a, b in zip(_take(gpu, 6), _take(cpu, 6)):
        assert a.device.type == "cuda" and torch.equal(a.cpu(), b)


def test_breaking_out_early_stops_the_threads_and_errors_reach_the_consumer(id_store: Path):
    loader = ActivationLoader(id_store, HOOK, batch_size=16, prefetch_batches=2)
    for _ in zip(range(3), loader):
        pass
    # a truncated chunk file fails in a reader thread; the consumer sees the error
    chunk_file = id_store / "acts" / HOOK / "c" / "3" / "0"
    chunk_file.write_bytes(chunk_file.read_bytes()[:100])
    with pytest.raises(StoreError, match=r"chunk 3 file .* has 100 bytes, a chunk has 1024; run `saeflow validate"):
        list(ActivationLoader(id_store, HOOK, batch_size=16, heldout_chunks=1, max_rows=5000))


def _anonymous_bytes() -> int:
    """This process's private memory (RssAnon): what the loader allocates. Its chunk maps are
    page cache (RssFile), shared with the kernel and reclaimed under pressure (store/chunk_maps.py)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon")


def _peak_anonymous_bytes_while(run) -> tuple[object, int]:
    """run()'s result and the peak of RssAnon while it ran (sampled every millisecond)."""
    done, peak = threading.Event(), [_anonymous_bytes()]

    def sample() -> None:
        while not done.wait(0.001):
            peak[0] = max(peak[0], _anonymous_bytes())

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        result = run()
    finally:
        done.set()
        sampler.join()
    return result, max(peak[0], _anonymous_bytes())


def test_memory_stays_bounded_by_the_buffer_not_the_store(tmp_path: Path):
    d, chunk_rows, n_chunks = 512, 512, 160  # 512 KiB chunks, an 80 MiB store
    path = tmp_path / "big.zarr"
    group_rows = np.random.default_rng(0).standard_normal((chunk_rows, d)).astype(np.float16)
    make_store(path, {HOOK: np.tile(group_rows, (n_chunks, 1))}, chunk_rows)
    store_bytes = n_chunks * chunk_rows * d * 2
    settings = dict(batch_size=256, shuffle_buffer_chunks=2, prefetch_batches=2, dtype=torch.float32)
    list(ActivationLoader(path, HOOK, **settings, max_rows=4096))  # first-use allocations (threads, torch)
    base = _anonymous_bytes()
    rows, peak = _peak_anonymous_bytes_while(
        lambda: sum(batch[HOOK].shape[0] for batch in ActivationLoader(path, HOOK, **settings, max_rows=3 * n_chunks * chunk_rows))
    )
    assert rows == 3 * n_chunks * chunk_rows
    growth = peak - base
    # two group buffers (2 MiB) + staging + queued batches are a few MiB; the store is 80 MiB
    assert growth < store_bytes / 4, f"private memory grew by {growth / 2**20:.1f} MiB reading an {store_bytes / 2**20:.0f} MiB store"


def test_raw_reads_locate_memmap_bytes_exactly(tmp_path: Path):
    data = np.arange(5000 * 8, dtype="<f2").reshape(5000, 8)
    file = tmp_path / "raw.bin"
    file.write_bytes(b"\0" * 123 + data.tobytes())
    mapped = np.memmap(file, dtype="<f2", mode="r", offset=123, shape=(5000, 8))
    for view in (mapped, mapped[:100], mapped[4001:4999]):  # slices keep the parent's offset attribute
        target = np.empty_like(view)
        assert read_mapped_into(view, target)
        assert np.array_equal(target, view)
    assert mapped_byte_range(mapped[4001:]) == (str(file), 123 + 4001 * 16, 999 * 16)
    assert not read_mapped_into(mapped[:, :4], np.empty((5000, 4), "<f2"))  # not contiguous
    assert not read_mapped_into(np.asarray(mapped), np.empty_like(mapped))  # not a memmap


def test_sampled_rows_of_two_hooks_align(tmp_path: Path):
    x_in = _id_rows(1000)
    path = make_store(tmp_path / "pair.zarr", {HOOK: x_in, OUT_HOOK: 3 * x_in}, CHUNK, store_dtype="float32")
    reader = StoreReader(path)
    a, b = (sample_rows(reader, hook, 200, seed=9) for hook in (HOOK, OUT_HOOK))
    assert torch.equal(3 * a, b)


class _DevicePathLoader(ActivationLoader):
    """The CUDA batch path (pooled staging buffers, copy + convert by the consumer) run on the CPU."""

    def _new_sink(self):
        widths = [self.reader.d(h) for h in self.hooks]
        return DeviceBatches(self.prefetch_batches + 2, self.batch_size, widths, self.stored_dtypes, self.out_dtypes, self.device, self.pinned)


def test_device_batch_path_gives_the_same_batches_on_cpu(tmp_path: Path):
    x_in = random_rows(900, 12, seed=1)
    path = make_store(tmp_path / "pair.zarr", {HOOK: x_in, OUT_HOOK: 2 * x_in}, CHUNK)
    settings = dict(batch_size=100, shuffle_buffer_chunks=3, max_rows=1950, prefetch_batches=2, seed=4)
    device_path = list(_DevicePathLoader(path, (HOOK, OUT_HOOK), **settings))  # kept: buffers must not alias
    host_path = list(ActivationLoader(path, (HOOK, OUT_HOOK), **settings))
    assert len(device_path) == len(host_path) == 20
    for device_batch, host_batch in zip(device_path, host_path):
        (a, b), (c, e) = device_batch.values(), host_batch.values()
        assert a.dtype == torch.float32 and torch.equal(a, c) and torch.equal(b, e)


def test_conversion_on_this_thread_matches_copy():
    for d in (7, 768, 50_000):  # rows per piece: many, 42, and one row per piece
        source = torch.randn(97, d).to(torch.bfloat16)
        target = torch.empty(97, d)
        convert_on_this_thread(source, target)
        assert torch.equal(target, source.float())


def _threads() -> set[str]:
    """This process's thread ids (a set: threads of earlier tests that end meanwhile do not count)."""
    return {task.name for task in Path("/proc/self/task").iterdir()}


def _gather_on_a_new_thread(source: np.ndarray, rows: np.ndarray | slice, team: int | None) -> tuple[torch.Tensor, int, int]:
    """gather_rows into float32 on a fresh thread whose OpenMP team is `team` threads (None: a
    builder's serial team); (the batch, the thread's team size, threads the gather started)."""
    result = {}

    def work() -> None:
        if team is None:
            assert serial_openmp_team()
        else:
            torch.get_num_threads()
            ThreadpoolController().limit(limits=team, user_api="openmp")
        target = torch.empty(len(source[rows]), source.shape[1])
        before = _threads()
        gather_rows(source, rows, target)
        result.update(batch=target, team=torch.get_num_threads(), started=len(_threads() - before))

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    return result["batch"], result["team"], result["started"]


@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="counts threads in /proc")
def test_converting_gather_of_a_builder_thread_is_one_call_on_that_thread_and_equals_the_blocked_one(
    monkeypatch: pytest.MonkeyPatch,
):
    monkeypatch.setenv(PYTHON_GATHER_ENV, "1")  # the Python gather, not the kernel (tests/store/test_gather.py)
    rng = np.random.default_rng(0)
    source = rng.standard_normal((600, 768)).astype(np.float16)  # 460,800 values: above torch's parallel grain
    threads = torch.get_num_threads()
    torch.set_num_threads(2)  # a new thread would start with a team of 2 (the suite runs 1)
    try:
        for rows in (rng.permutation(600)[:500], slice(50, 600)):  # shuffled rows; consecutive ones
            expected = torch.from_numpy(source[rows]).float()
            serial, team, started = _gather_on_a_new_thread(source, rows, None)
            assert team == 1 and started == 0  # no OpenMP team of its own next to the trainer's
            assert torch.equal(serial, expected)
            blocked, team, _ = _gather_on_a_new_thread(source, rows, 2)  # the fallback: blocks below the grain
            assert team == 2 and torch.equal(blocked, expected)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("batch_size", [7, 64, 300])  # 300 rows span three 2-chunk groups (128 rows)
def test_batches_do_not_depend_on_thread_count_or_batch_group_overlap(id_store: Path, batch_size: int):
    settings = dict(batch_size=batch_size, seed=3, shuffle_buffer_chunks=2, heldout_chunks=1, prefetch_batches=3)
    train = _split_ids(id_store, "train", 1)
    epoch_rows = len(train)
    one = _rows(ActivationLoader(id_store, HOOK, **settings, num_workers=1, max_rows=2 * epoch_rows))
    three = _rows(ActivationLoader(id_store, HOOK, **settings, num_workers=3, max_rows=2 * epoch_rows))
    assert len(one) == len(three) == -(-2 * epoch_rows // batch_size)
    for a, b in zip(one, three):
        assert torch.equal(a, b)
    ids = _ids(one)
    assert sorted(ids[:epoch_rows]) == sorted(ids[epoch_rows:]) == train


def _reference_stream(plan, n_rows_by_chunk: list[int], epochs: int) -> list[int]:
    """Row ids in the order the plan defines, written out directly from ShufflePlan."""
    stream = []
    for epoch in range(epochs):
        for group in range(plan.groups_per_epoch):
            pieces = plan.group_pieces(epoch, group)
            rows = [c * CHUNK + r for c, first, stop in zip(pieces.chunk, pieces.start, pieces.stop) for r in range(first, stop)]
            assert all(r % CHUNK < n_rows_by_chunk[r // CHUNK] for r in rows)
            stream += [rows[i] for i in plan.row_order(epoch, group, len(rows))]
    return stream


@pytest.mark.parametrize("seed", range(4))
def test_batches_follow_the_shuffle_plan(id_store: Path, seed: int):
    rng = np.random.default_rng(seed)
    world_size = int(rng.integers(1, 4))
    settings = dict(
        batch_size=int(rng.integers(1, 400)), seed=seed, shuffle_buffer_chunks=int(rng.integers(1, 6)),
        heldout_chunks=int(rng.integers(0, 3)), num_workers=int(rng.integers(1, 4)),
        prefetch_batches=int(rng.integers(1, 4)), world_size=world_size, rank=int(rng.integers(0, world_size)),
    )
    loader = ActivationLoader(id_store, HOOK, **settings, max_rows=2500)
    sizes = [CHUNK] * 19 + [50]
    expected = _reference_stream(loader.plan, sizes, epochs=8)[:2500]  # >= 6 chunks per epoch per rank
    assert _ids(loader) == expected, settings
