"""StoreWriter on real zarr stores: commits, checksums, statistics, bf16, shards, lock, failures."""

from __future__ import annotations

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr

from store.format import StoreError, chunk_checksum, read_manifest
from store.inspect import describe_store
from store.lock import StoreLock, lock_path
from store.dtypes import from_stored_numpy
from store.reader import StoreReader
from store.recorded_stats import load_stats
from store.validate import compare_stores, validate_store
from store.writer import StoreWriter

ROOT = Path(__file__).resolve().parents[2]
HOOKS = {"blocks.0.hook_resid_post": 24, "blocks.1.hook_mlp_out": 16}


def make_batches(n_batches: int, seed: int = 0, sizes=(37, 50, 64, 13)) -> list[dict]:
    rng = np.random.default_rng(seed)
    batches, doc = [], 0
    for b in range(n_batches):
        n = sizes[b % len(sizes)]
        acts = {hook: torch.from_numpy((rng.standard_normal((n, d)) * 3 + 1).astype(np.float32)) for hook, d in HOOKS.items()}
        batches.append(
            {
                "acts": acts,
                "tokens": rng.integers(0, 1000, n),
                "doc": np.arange(doc, doc + n),
                "pos": rng.integers(-2, 100, n),
                "cursor": {"batch": b},
            }
        )
        doc += n
    return batches


def write(path: Path, batches: list[dict], complete: bool = True, **options) -> dict:
    options = {"hook_dims": HOOKS, "chunk_rows": 40, "capacity_rows": 200, **options}
    writer = StoreWriter.create(path, **options)
    for batch in batches:
        writer.put(batch["acts"], batch["tokens"], batch["doc"], batch["pos"], cursor=batch["cursor"])
    return writer.close(complete=complete)


def resume_batches(writer: StoreWriter, batches: list[dict]) -> None:
    """Resume as generate does: redo the cursor's batch, skipping its stored rows, then the rest."""
    cursor = writer.manifest["cursor"]
    first, skip = cursor["batch"]["batch"], cursor["rows_into_batch"]
    for b, batch in enumerate(batches[first:], start=first):
        s = skip if b == first else 0
        acts = {hook: values[s:] for hook, values in batch["acts"].items()}
        writer.put(acts, batch["tokens"][s:], batch["doc"][s:], batch["pos"][s:], cursor=batch["cursor"])
    writer.close()


def stacked(batches: list[dict], key: str) -> np.ndarray:
    return np.concatenate([b[key] for b in batches])


def stacked_acts(batches: list[dict], hook: str) -> torch.Tensor:
    return torch.cat([b["acts"][hook] for b in batches])


@pytest.mark.parametrize("n", [0, 1, 65_535, 65_537, 3_000_001])  # around the hasher's 64 KiB GIL threshold
def test_chunk_checksums_are_the_xxh3_64_of_the_chunk_bytes(n: int):
    xxhash = pytest.importorskip("xxhash")
    data = np.random.default_rng(n).integers(0, 256, n, dtype=np.uint8)
    assert chunk_checksum(data, "xxh3_64") == xxhash.xxh3_64_intdigest(data.tobytes())  # stores written before
    rows = np.arange(24, dtype=np.float16).reshape(4, 6)[:, ::2]  # not contiguous: its C-order bytes
    assert chunk_checksum(rows, "xxh3_64") == xxhash.xxh3_64_intdigest(np.ascontiguousarray(rows).tobytes())


@pytest.mark.parametrize("compressor", [None, "zstd"])  # memmap fast path / zarr decoding
def test_rows_round_trip_with_short_final_chunk(tmp_path, compressor):
    batches = make_batches(9)
    manifest = write(tmp_path / "s.zarr", batches, compressor=compressor)
    total = sum(len(b["tokens"]) for b in batches)  # 391 rows: 9 full chunks of 40 + 31
    assert (manifest["n_rows"], manifest["n_chunks"], manifest["complete"]) == (total, 10, True)
    reader = StoreReader(tmp_path / "s.zarr")
    for hook in HOOKS:
        stored = np.concatenate([reader.read_chunk(hook, i) for i in range(reader.n_chunks)])
        np.testing.assert_array_equal(stored, stacked_acts(batches, hook).numpy().astype(np.float16))
    for name in ("tokens", "doc", "pos"):
        np.testing.assert_array_equal(reader.read_rows(name, 0, total), stacked(batches, name))
    group = zarr.open_group(str(tmp_path / "s.zarr"), mode="r")
    assert group["acts/blocks.0.hook_resid_post"].shape == (total, 24)  # trimmed from capacity
    assert manifest["cursor"] == {"batch": {"batch": 8}, "rows_into_batch": 37}
    assert validate_store(tmp_path / "s.zarr") == []
    assert not lock_path(tmp_path / "s.zarr").exists()


def test_stats_equal_float64_numpy_on_the_stored_rows(tmp_path):
    batches = make_batches(11)
    write(tmp_path / "s.zarr", batches, chunk_rows=32)
    reader = StoreReader(tmp_path / "s.zarr")
    for hook in HOOKS:
        rows = reader.read_rows(hook, 0, reader.n_rows).astype(np.float64)
        moments = load_stats(tmp_path / "s.zarr", hook)
        assert moments.count == len(rows)
        np.testing.assert_allclose(moments.mean.numpy(), rows.mean(0), rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(moments.covariance().numpy(), np.cov(rows.T), rtol=1e-10, atol=1e-12)
        assert moments.mean_norm == pytest.approx(np.linalg.norm(rows, axis=1).mean(), rel=1e-12)
    summary = describe_store(tmp_path / "s.zarr")
    assert "top eigenvalue share" in summary and "complete" in summary


def test_writer_thread_statistics_equal_the_producers_bitwise(tmp_path):
    """A CPU writer's producer computes each chunk's moments; a GPU writer's thread does (the path
    taken here with the producer's turned off): the same chunks give the same statistics bits."""
    batches = make_batches(9)
    write(tmp_path / "producer.zarr", batches, chunk_rows=32)
    writer = StoreWriter.create(tmp_path / "thread.zarr", hook_dims=HOOKS, chunk_rows=32, capacity_rows=200)
    assert writer._stats_by_producer  # a CPU writer's default
    writer._stats_by_producer = False
    for batch in batches:
        writer.put(batch["acts"], batch["tokens"], batch["doc"], batch["pos"], cursor=batch["cursor"])
    writer.close()
    for hook in HOOKS:
        ours, theirs = load_stats(tmp_path / "producer.zarr", hook), load_stats(tmp_path / "thread.zarr", hook)
        assert ours.count == theirs.count == sum(len(b["tokens"]) for b in batches)
        assert torch.equal(ours.mean, theirs.mean) and torch.equal(ours.M2, theirs.M2)
        assert ours.norm_sum == theirs.norm_sum


def test_bfloat16_is_stored_bit_exact(tmp_path):
    batches = make_batches(4)
    write(tmp_path / "s.zarr", batches, store_dtype="bfloat16")
    reader = StoreReader(tmp_path / "s.zarr")
    hook = "blocks.1.hook_mlp_out"
    stored = from_stored_numpy(reader.read_rows(hook, 0, reader.n_rows), "bfloat16")
    expected = stacked_acts(batches, hook).to(torch.bfloat16)
    assert stored.dtype == torch.bfloat16
    assert torch.equal(stored.view(torch.int16), expected.view(torch.int16))
    moments = load_stats(tmp_path / "s.zarr", hook)
    np.testing.assert_allclose(moments.mean.numpy(), expected.double().mean(0).numpy(), rtol=1e-12, atol=1e-13)


def test_nonfinite_and_overflowing_rows_are_refused(tmp_path):
    batches = make_batches(6)
    writer = StoreWriter.create(tmp_path / "s.zarr", hook_dims=HOOKS, chunk_rows=40, capacity_rows=400)
    for batch in batches[:4]:
        writer.put(batch["acts"], batch["tokens"], batch["doc"], batch["pos"], cursor=batch["cursor"])
    bad = {hook: values.clone() for hook, values in batches[4]["acts"].items()}
    bad["blocks.1.hook_mlp_out"][3, 2] = float("nan")
    with pytest.raises(StoreError, match=r"hook 'blocks.1.hook_mlp_out' in batch 4 .*NaN/inf"):
        writer.put(bad, batches[4]["tokens"], batches[4]["doc"], batches[4]["pos"], label="batch 4")
    huge = {hook: values * 1e5 for hook, values in batches[4]["acts"].items()}
    with pytest.raises(StoreError, match="beyond float16's range.*bfloat16 or float32"):
        writer.put(huge, batches[4]["tokens"], batches[4]["doc"], batches[4]["pos"])
    writer.abort()
    manifest = read_manifest(tmp_path / "s.zarr")
    assert manifest["n_chunks"] == 4  # 164 rows accepted before: the 4 full chunks are kept
    assert not manifest["complete"] and validate_store(tmp_path / "s.zarr") == []


def test_disk_full_keeps_the_last_commit_and_resume_matches(tmp_path, monkeypatch):
    batches = make_batches(10)
    write(tmp_path / "reference.zarr", batches)

    import zarr.storage._local as local

    real_put = local._put

    def put_failing_on_chunk_3(path, value, exclusive=False):
        if "acts/blocks.1.hook_mlp_out/c/3/" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put_failing_on_chunk_3)
    path = tmp_path / "s.zarr"
    writer = StoreWriter.create(path, hook_dims=HOOKS, chunk_rows=40, capacity_rows=200)
    with pytest.raises(StoreError, match=r"disk full while writing chunk 3 .*consistent at 3 committed chunks"):
        for batch in batches:
            writer.put(batch["acts"], batch["tokens"], batch["doc"], batch["pos"], cursor=batch["cursor"])
            time.sleep(0.05)  # let the writer thread reach the failing chunk before the last put
        writer.close()
    writer.abort()
    monkeypatch.setattr(local, "_put", real_put)
    manifest = read_manifest(path)
    assert manifest["n_chunks"] == 3 and validate_store(path) == []
    assert not lock_path(path).exists()

    resume_batches(StoreWriter.open(path), batches)
    assert compare_stores(tmp_path / "reference.zarr", path) == []


def test_torn_statistics_snapshot_is_recomputed_bitwise(tmp_path):
    batches = make_batches(10)
    write(tmp_path / "reference.zarr", batches)
    path = tmp_path / "s.zarr"
    write(path, batches[:6], complete=False)  # 251 rows: 6 commits of 40, the last 11 rows dropped
    # A crash while the statistics were being saved: one array newer than the manifest says.
    group = zarr.open_group(str(path), mode="r+")
    group["stats/blocks.0.hook_resid_post/mean"][0] += 1.0
    assert any("checksum mismatch" in p for p in validate_store(path))
    resumed = StoreWriter.open(path)
    assert resumed.manifest.n_rows == 240 and resumed.manifest["cursor"] == {"batch": {"batch": 5}, "rows_into_batch": 39}
    resume_batches(resumed, batches)
    assert compare_stores(tmp_path / "reference.zarr", path) == []


def test_shards_commit_whole_shards_and_read_through_memmap(tmp_path):
    batches = make_batches(8)
    path = tmp_path / "s.zarr"
    manifest = write(path, batches[:5], complete=False, shard_chunks=3)
    assert manifest["n_chunks"] == 3  # 214 rows fill 5 chunks: one whole shard is committed
    assert sorted(os.listdir(path / "acts/blocks.0.hook_resid_post/c")) == ["0"]
    assert validate_store(path) == []
    write(tmp_path / "full.zarr", batches, shard_chunks=3)
    reader = StoreReader(tmp_path / "full.zarr")
    hook = "blocks.0.hook_resid_post"
    mapped = reader.read_chunk(hook, 4)
    assert isinstance(mapped, np.memmap)  # inner chunk located through the shard index
    np.testing.assert_array_equal(mapped, stacked_acts(batches, hook).numpy().astype(np.float16)[160:200])
    assert validate_store(tmp_path / "full.zarr") == []


def test_validate_names_corrupted_and_missing_chunks(tmp_path):
    path = tmp_path / "s.zarr"
    write(path, make_batches(9))
    chunk = path / "acts/blocks.0.hook_resid_post/c/2/0"
    data = bytearray(chunk.read_bytes())
    data[100] ^= 0xFF
    chunk.write_bytes(bytes(data))
    (path / "tokens/c/5").unlink()
    problems = validate_store(path)
    assert any("acts/blocks.0.hook_resid_post: checksum mismatch in chunk(s) 2 " in p for p in problems)
    assert any(p.startswith("tokens chunk 5: is missing") for p in problems)  # never read as fill values
    assert len(problems) == 2


def test_incompatible_format_version_is_refused(tmp_path):
    path = tmp_path / "s.zarr"
    write(path, make_batches(2))
    group = zarr.open_group(str(path), mode="r+")
    manifest = dict(group.attrs["saeflow"], version=99)
    group.attrs.update({"saeflow": manifest})
    with pytest.raises(StoreError, match="format version 99.*reads version 1"):
        StoreReader(path)
    with pytest.raises(StoreError, match="format version 99"):
        StoreWriter.open(path)


HOLD_LOCK = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {root!r})
    from store.lock import StoreLock
    StoreLock({store!r}).acquire()
    print("locked", flush=True)
    time.sleep(60)
    """
)


def test_lock_refuses_a_second_writer_and_takes_over_stale_locks(tmp_path):
    path = tmp_path / "s.zarr"
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_LOCK.format(root=str(ROOT), store=str(path))], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=rf"being written by process {holder.pid} .*lock {lock_path(path)}"):
            StoreWriter.create(path, hook_dims=HOOKS, chunk_rows=40, capacity_rows=80)
        assert not path.exists()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert lock_path(path).exists()  # left behind by the killed process: stale
    write(path, make_batches(2))
    with StoreLock(path):
        with pytest.raises(StoreError, match="already being written by this process"):
            StoreWriter.open(path)
    lock_path(path).write_text(json.dumps({"pid": 12345, "host": "elsewhere", "created": "x"}))
    with pytest.raises(StoreError, match=rf"host elsewhere .*delete {lock_path(path)}"):
        StoreLock(path).acquire()
    lock_path(path).write_text(json.dumps({"pid": 2**22 + 7, "host": socket.gethostname(), "created": "x"}))
    with StoreLock(path) as lock:  # dead pid on this host: stale
        assert json.loads(lock.path.read_text())["pid"] == os.getpid()
