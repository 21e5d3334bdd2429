"""Throughput of shuffled loader batches against a plain sequential read of the same chunk files.

Builds (or reuses) a store of random fp16 rows, d=768, ~1.2 GB, then measures in one run, cold
(page cache dropped with posix_fadvise(DONTNEED) per chunk file, no root needed) and warm:
- sequential: every chunk file read in store order into one reused buffer (a single read stream);
- loader: one shuffled epoch (a fresh loader: it maps, verifies and faults in every chunk) of
  ActivationLoader batches in float32 (what CPU training steps on: the loader's builder threads
  convert in the gather, pipeline/train/stage.py) and in float16 (the stored dtype: what the
  CUDA path gathers, pins and copies to the GPU, which converts);
- warm only: the second epoch of one float32 loader (a training run's steady state: its chunks
  are mapped and verified already), and the first float32 epoch once more with the Python gather
  (SAEFLOW_PYTHON_GATHER=1: each group copied into a group buffer, then np.take and torch's
  conversion) in place of the compiled one-pass gather straight from the chunk maps
  (store/gather.py, store/producer.py), and once with the compiled gather from group buffers
  (each group copied first, as before the maps were gathered from), so both gains are measured
  side by side;
- the float32 (warm) and float16 epochs once more with verified reads off (loader verify=False):
  every other loader epoch checks each chunk against its recorded checksum, as training does by
  default; warm, the checksums alone too (every chunk hashed on the loader's threads), the cost
  they add at least;
- the same epochs on the store's shuffled copy (`saeflow shuffle`, store/shuffled_copy.py, made
  once here): its rows are in random order already, so the loader reads it whole chunk by chunk
  (sequential reads) and its batches mix as the global shuffle's (tests/store/test_mixing.py).
GB/s counts stored bytes delivered; CPU s/GB (all threads) shows the cost independent of other
load on a shared machine. Goals, on both dtypes: shuffled/sequential >= 0.8 cold (the I/O
pattern's cost: a globally shuffled epoch of a store in document order reads every chunk before
its first batch, so the script prints that wait and the rest of the epoch apart; the copy's
first group needs only its own chunks); >= 2 GB/s warm; verified/unverified >= 0.95 (checksums
cost at most 5%). Each figure is the best round's, with every round's value beside it.

    .venv/bin/python bench/loader_throughput.py [--store PATH] [--rows N] [--workers K]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from unittest import mock

import numpy as np
import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from store.format import (  # noqa: E402
    acts_path,
    checksum_path,
    chunk_checksum,
    create_store,
    data_array_paths,
    read_manifest,
    resize_rows,
    write_manifest,
)
from host import print_host  # noqa: E402
from pipeline.heap import keep_large_blocks_in_heap  # noqa: E402
from store.loader import ActivationLoader  # noqa: E402
from store.shuffled_copy import shuffle_store  # noqa: E402
from store.gather import PYTHON_GATHER_ENV  # noqa: E402

HOOK = "blocks.6.hook_resid_post"
D = 768
CHUNK_ROWS = 8192  # 12.6 MB chunks of fp16, the format's default for d=768


def build_store(path: Path, n_rows: int) -> None:
    group = create_store(
        path, hook_dims={HOOK: D}, store_dtype="float16", chunk_rows=CHUNK_ROWS, capacity_rows=n_rows,
        shard_chunks=None, compressor=None, manifest={},
    )
    rng = np.random.default_rng(0)
    array = group[acts_path(HOOK)]
    manifest = read_manifest(path)
    sums = []
    for start in range(0, n_rows, CHUNK_ROWS):
        stop = min(start + CHUNK_ROWS, n_rows)
        rows = rng.standard_normal((stop - start, D), dtype=np.float32).astype(np.float16)
        array[start:stop] = rows
        sums.append(chunk_checksum(rows, manifest["checksum_algorithm"]))
    group[checksum_path(acts_path(HOOK))][: len(sums)] = np.array(sums, dtype="<u8")
    for array_path in data_array_paths(manifest)[1:]:  # tokens, doc, pos: all zeros
        zeros = group[array_path][:CHUNK_ROWS]
        group[checksum_path(array_path)][:] = chunk_checksum(zeros, manifest["checksum_algorithm"])
    manifest.update(n_rows=n_rows, n_chunks=-(-n_rows // CHUNK_ROWS), complete=True)
    resize_rows(group, manifest, n_rows)
    write_manifest(zarr.open_group(str(path), mode="r+"), manifest)
    os.sync()  # DONTNEED only drops clean pages


def shuffled_copy(path: Path) -> Path:
    """The store's shuffled copy beside it (made once; the bench's loaders hold out no chunk)."""
    copy = path.with_name(path.stem + "-shuffled.zarr")
    if not (copy / "zarr.json").exists() or not read_manifest(copy)["complete"]:
        start = time.perf_counter()
        shuffle_store(path, copy, heldout_chunks=0, seed=0)
        os.sync()
        print(f"shuffled copy {copy} in {time.perf_counter() - start:.1f} s")
    return copy


def chunk_files(path: Path) -> list[Path]:
    n_chunks = int(read_manifest(path)["n_chunks"])
    return [path / acts_path(HOOK) / "c" / str(i) / "0" for i in range(n_chunks)]


def drop_cache(files: list[Path]) -> None:
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def sequential_read(files: list[Path]) -> int:
    buffer = bytearray(CHUNK_ROWS * D * 2)
    view = memoryview(buffer)
    total = 0
    for file in files:
        with open(file, "rb", buffering=0) as handle:
            while (n := handle.readinto(view)) > 0:
                total += n
    return total


class GroupBufferLoader(ActivationLoader):
    """The loader with every group copied into a group buffer first, the compiled gather kept."""

    _gathers_from_maps = False


def _batches(path: Path, max_rows: int, workers: int, dtype: torch.dtype, verify: bool = True, kind=ActivationLoader):
    """Batches of `dtype` as the loader delivers them (float32: converted in its gather)."""
    loader = kind(
        path, HOOK, batch_size=4096, heldout_chunks=0, shuffle_buffer_chunks=8, prefetch_batches=4,
        num_workers=workers, dtype=dtype, max_rows=max_rows, seed=0, verify=verify,
    )
    for batch in loader:
        yield batch[HOOK]


def loader_epoch(
    path: Path, n_rows: int, workers: int, dtype: torch.dtype, verify: bool = True, splits: list | None = None,
    kind=ActivationLoader,
) -> int:
    """Stored bytes of one epoch; `splits` gets its (seconds to the first batch, the rest)."""
    rows, start, first = 0, time.perf_counter(), 0.0
    for batch in _batches(path, n_rows, workers, dtype, verify, kind):
        if not rows:
            first = time.perf_counter() - start
        rows += batch.shape[0]
    if splits is not None:
        splits.append((first, time.perf_counter() - start - first))
    return rows * D * 2


def python_gather(run):
    """run() with the loader's Python gather in place of the compiled kernel (store/gather.py)."""
    def wrapped() -> int:
        with mock.patch.dict(os.environ, {PYTHON_GATHER_ENV: "1"}):
            return run()
    return wrapped


def next_epoch(path: Path, n_rows: int, workers: int, dtype: torch.dtype):
    """A run() for timed(): the first epoch of one loader runs untimed, the call times the second."""
    batches = _batches(path, 2 * n_rows, workers, dtype)
    rows = 0
    while rows < n_rows:  # batches roll over the epoch boundary: stop at the first that crosses it
        rows += next(batches).shape[0]

    def run() -> int:
        return sum(batch.shape[0] for batch in batches) * D * 2
    return run


def checksum_pass(files: list[Path], workers: int, algorithm: str):
    """A run() for timed(): every chunk file's checksum on `workers` threads, as the loader verifies,
    from maps whose pages were faulted in before the call (an unverified epoch faults them too)."""
    maps = [np.memmap(file, dtype=np.uint8, mode="r") for file in files]
    for mapped in maps:
        int(mapped[::4096].sum())  # fault every page in, untimed

    def run() -> int:
        with ThreadPoolExecutor(workers) as pool:  # chunk_checksum releases the GIL
            list(pool.map(lambda mapped: chunk_checksum(mapped, algorithm), maps))
        return sum(mapped.nbytes for mapped in maps)
    return run


def timed(label: str, run) -> float:
    start, cpu_start = time.perf_counter(), time.process_time()
    nbytes = run()
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu_start
    rate = nbytes / seconds / 1e9
    print(
        f"{label:<34} {nbytes / 1e9:5.2f} GB in {seconds:5.2f} s: {rate:5.2f} GB/s, "
        f"{nbytes / (2 * D) / seconds / 1e6:5.2f} M rows/s, {cpu / (nbytes / 1e9):5.2f} CPU s/GB"
    )
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--store", type=Path, help="store path (built there if missing); default: a temp dir")
    parser.add_argument("--rows", type=int, default=100 * CHUNK_ROWS, help="rows of the store (default 1.26 GB)")
    parser.add_argument("--workers", type=int, default=2, help="loader reader threads")
    parser.add_argument("--repeats", type=int, default=2, help="cold/warm rounds; each figure is the best round's (a ratio: of the two runs of one round)")
    args = parser.parse_args()
    print_host()
    keep_large_blocks_in_heap()  # as CPU training does
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        path = args.store or Path(tmp) / "bench.zarr"
        if not (path / "zarr.json").exists():
            start = time.perf_counter()
            build_store(path, args.rows)
            print(f"built {path} in {time.perf_counter() - start:.1f} s")
        n_rows = int(read_manifest(path)["n_rows"])
        copy = shuffled_copy(path)
        files = chunk_files(path)
        algorithm = read_manifest(path)["checksum_algorithm"]
        cold_files = files + chunk_files(copy)  # both dropped before every cold run
        print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores (timings are shared-machine figures)")
        print(f"store: {n_rows} rows x {D} fp16 = {n_rows * D * 2 / 1e9:.2f} GB in {len(files)} chunk files; torch threads {torch.get_num_threads()}")
        for store, dtype in ((path, torch.float32), (path, torch.float16), (copy, torch.float32)):
            loader = ActivationLoader(store, HOOK, batch_size=4096, heldout_chunks=0, dtype=dtype)
            print(f"{'global shuffle' if store == path else 'shuffled copy'}, {dtype} batches: {loader.describe_gather()}")
        results: dict[str, list[float]] = {}

        def record(key: str, label: str, run, cold: bool) -> None:
            if cold:
                drop_cache(cold_files)
            results.setdefault(key, []).append(timed(label, run))

        cold_splits: list[tuple[float, float]] = []  # the cold global-shuffle float32 epochs, split
        warm_splits: list[tuple[float, float]] = []  # the warm ones (a fresh loader each)

        for _ in range(args.repeats):
            record("seq_cold", "sequential read, cold", lambda: sequential_read(files), cold=True)
            record("loader_cold", "loader shuffled float32, cold", lambda: loader_epoch(path, n_rows, args.workers, torch.float32, splits=cold_splits), cold=True)
            record("loader_cold16", "loader shuffled float16, cold", lambda: loader_epoch(path, n_rows, args.workers, torch.float16), cold=True)
            record("unverified_cold16", "  the same, verify=False", lambda: loader_epoch(path, n_rows, args.workers, torch.float16, verify=False), cold=True)
            record("copy_cold", "shuffled copy, float32, cold", lambda: loader_epoch(copy, n_rows, args.workers, torch.float32), cold=True)
            record("copy_cold16", "shuffled copy, float16, cold", lambda: loader_epoch(copy, n_rows, args.workers, torch.float16), cold=True)
        sequential_read(cold_files)  # untimed: the cold runs left part of both stores out of the page cache
        for _ in range(args.repeats):
            record("seq_warm", "sequential read, warm", lambda: sequential_read(files), cold=False)
            record("loader_warm", "loader shuffled float32, warm", lambda: loader_epoch(path, n_rows, args.workers, torch.float32, splits=warm_splits), cold=False)
            record("unverified_warm", "  the same, verify=False", lambda: loader_epoch(path, n_rows, args.workers, torch.float32, verify=False), cold=False)
            record("next_warm", "  its next epoch, same loader", next_epoch(path, n_rows, args.workers, torch.float32), cold=False)
            record("python_warm", "  the first, Python gather", python_gather(lambda: loader_epoch(path, n_rows, args.workers, torch.float32)), cold=False)
            record("buffered_warm", "  the first, from group buffers", lambda: loader_epoch(path, n_rows, args.workers, torch.float32, kind=GroupBufferLoader), cold=False)
            record("loader_warm16", "loader shuffled float16, warm", lambda: loader_epoch(path, n_rows, args.workers, torch.float16), cold=False)
            record("unverified_warm16", "  the same, verify=False", lambda: loader_epoch(path, n_rows, args.workers, torch.float16, verify=False), cold=False)
            record("checksums_warm", "  its checksums alone", checksum_pass(files, args.workers, algorithm), cold=False)
            record("copy_warm", "shuffled copy, float32, warm", lambda: loader_epoch(copy, n_rows, args.workers, torch.float32), cold=False)
            record("copy_next", "  its next epoch, same loader", next_epoch(copy, n_rows, args.workers, torch.float32), cold=False)
            record("copy_warm16", "shuffled copy, float16, warm", lambda: loader_epoch(copy, n_rows, args.workers, torch.float16), cold=False)
        best = {key: max(values) for key, values in results.items()}
        if best["seq_cold"] > 0.8 * best["seq_warm"]:
            print("note: cold and warm sequential reads are alike: the page cache was probably not dropped")

        def per_round(key: str, baseline: str | None = None) -> list[float]:
            """Each round's figure (a ratio: of the two runs of one round)."""
            return results[key] if baseline is None else [a / b for a, b in zip(results[key], results[baseline])]

        def best_round(key: str, baseline: str | None = None) -> int:
            rounds = per_round(key, baseline)
            return rounds.index(max(rounds))

        def summary(label: str, key: str, baseline: str | None = None, goal: str = "") -> None:
            """The best round and every round's value."""
            rounds = per_round(key, baseline)
            spread = "" if len(rounds) < 2 else f", rounds {min(rounds):.2f}-{max(rounds):.2f}"
            print(f"{label} (best of {len(rounds)}{spread}): {max(rounds):.2f}" + (f" (goal {goal})" if goal else ""))

        summary("loader warm GB/s, float32 batches (what CPU training steps on)", "loader_warm", goal=">= 2")
        summary("loader warm GB/s, float32 batches, the next epoch of one loader", "next_warm", goal=">= 2")
        summary("loader warm GB/s, float16 batches (what a CUDA trainer copies)", "loader_warm16", goal=">= 2")
        summary("loader warm, float32 batches: compiled gather from the chunk maps / Python gather", "loader_warm", "python_warm")
        summary("loader warm, float32 batches: compiled gather from the chunk maps / from group buffers", "loader_warm", "buffered_warm")
        summary("loader shuffled/sequential warm, float32 batches", "loader_warm", "seq_warm")
        summary("loader shuffled/sequential cold, float32 batches", "loader_cold", "seq_cold", goal=">= 0.8")
        summary("loader shuffled/sequential cold, float16 batches", "loader_cold16", "seq_cold", goal=">= 0.8")
        # Why the cold global shuffle falls short: its first batch waits for every chunk.
        round_ = best_round("loader_cold", "seq_cold")
        first, rest = cold_splits[round_]
        seq_s = n_rows * D * 2 / 1e9 / results["seq_cold"][round_]
        print(
            f"global shuffle cold, float32, that round: its first batch after {first:.2f} s (every chunk read and "
            f"verified; the sequential read took {seq_s:.2f} s), then {rest:.2f} s of warm work for the rest of the "
            f"epoch; 0.8 needs the rest within {max(0.0, seq_s / 0.8 - first):.2f} s"
        )
        # What a fresh loader's first epoch spends beyond a loader's next one: the wait for its first batch.
        round_ = best_round("loader_warm")
        first, rest = warm_splits[round_]
        print(
            f"global shuffle warm, float32, that round: a fresh loader's first batch after {first:.2f} s (every chunk "
            f"mapped, faulted in and verified), then {rest:.2f} s for the rest of the epoch; a loader's next epoch "
            f"took {n_rows * D * 2 / 1e9 / results['next_warm'][round_]:.2f} s"
        )
        summary("verified/unverified loader, float16 batches, cold", "loader_cold16", "unverified_cold16")
        summary("verified/unverified loader, float32 batches, warm", "loader_warm", "unverified_warm", goal=">= 0.95")
        summary("verified/unverified loader, float16 batches, warm", "loader_warm16", "unverified_warm16", goal=">= 0.95")
        # Why verifying a warm store costs more than 5% where memory is slow: the checksums read every
        # chunk once more through memory, and under the global shuffle before the first batch.
        for dtype, verified, unverified in (("float32", "loader_warm", "unverified_warm"),
                                            ("float16", "loader_warm16", "unverified_warm16")):
            round_ = best_round(verified, unverified)
            epoch_s, sums_s = (n_rows * D * 2 / 1e9 / results[key][round_] for key in (unverified, "checksums_warm"))
            print(
                f"verified warm, {dtype}, that round: the unverified epoch took {epoch_s:.2f} s; the checksums alone "
                f"(every chunk hashed from its faulted-in pages on {args.workers} threads, one more read of the store "
                f"through memory) took {sums_s:.2f} s, and each chunk is verified before any batch holds its rows (under "
                f"the global shuffle every batch holds rows of every chunk), so 0.95 needs them within {epoch_s / 19:.3f} s"
            )
        summary("shuffled copy: loader warm GB/s, float16 batches", "copy_warm16", goal=">= 2")
        summary("shuffled copy: loader warm GB/s, float32 batches, the next epoch of one loader", "copy_next", goal=">= 2")
        summary("shuffled copy: loader warm GB/s, float32 batches", "copy_warm", goal=">= 2")
        summary("shuffled copy: loader/sequential cold, float16 batches", "copy_cold16", "seq_cold", goal=">= 0.8")
        summary("shuffled copy: loader/sequential cold, float32 batches", "copy_cold", "seq_cold", goal=">= 0.8")


if __name__ == "__main__":
    main()
