"""Loader throughput from a store on S3 (a local SeaweedFS server) against the same store on local disk.

Builds a store of random fp16 rows (d=768, 12.6 MB chunks; bench/loader_throughput.py's), copies
its files as objects into a bucket of a SeaweedFS server started here (tests/s3_server.py), then
times one shuffled float16 loader epoch (verified reads, as training does) from:
- local, cold (page cache dropped per chunk file) and warm;
- s3, no cache: every chunk fetched over HTTP by the loader's reader threads;
- s3 with loader.cache_dir, first epoch (fetch + write the cache) and second epoch (the cache);
- raw concurrent GETs of the chunk objects by obstore and, when installed, s3fs.
The server shares this machine's cores with the loader, so the s3 figures are a lower bound of
what a separate object store gives. Each epoch is timed on a reader opened just before it, and
the open (manifest and array metadata: a few requests to the server) is printed on its own: it
is paid once per run, not per epoch. Ratios printed: s3/local cold, and cached/local warm (goal:
the cache makes the second epoch read at local speed, >= 0.9).

    .venv/bin/python bench/remote_read.py [--rows N] [--workers K] [--repeats R]
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from loader_throughput import CHUNK_ROWS, D, HOOK, build_store, chunk_files, drop_cache, timed  # noqa: E402

from host import print_host  # noqa: E402
from store.loader import ActivationLoader  # noqa: E402
from store.location import StoreLocation  # noqa: E402
from store.reader import StoreReader  # noqa: E402
from tests.s3_server import start_s3_server, stop_s3_server, upload  # noqa: E402


def opened(store, cache_dir: Path | None = None) -> tuple[StoreReader, float]:
    """A fresh reader of `store` and the seconds its open took."""
    start = time.perf_counter()
    reader = StoreReader(store, cache_dir=cache_dir)
    return reader, time.perf_counter() - start


def epoch(reader: StoreReader, n_rows: int, workers: int) -> int:
    loader = ActivationLoader(reader, HOOK, batch_size=4096, heldout_chunks=0, shuffle_buffer_chunks=8,
                              num_workers=workers, dtype=torch.float16, max_rows=n_rows, seed=0)
    return sum(batch[HOOK].shape[0] for batch in loader) * D * 2


def client_read(location: StoreLocation, keys: list[str], workers: int, client: str) -> int:
    """Raw GETs of the chunk objects by obstore (what saeflow uses) or s3fs (the fsspec client)."""
    from concurrent.futures import ThreadPoolExecutor

    if client == "obstore":
        import obstore

        store = location._bucket
        fetch = lambda key: len(obstore.get(store, location.key(key)).bytes())  # noqa: E731
    else:
        import s3fs

        fs = s3fs.S3FileSystem(endpoint_url=os.environ["AWS_ENDPOINT_URL"])
        fetch = lambda key: len(fs.cat_file(f"{location.bucket}/{location.key(key)}"))  # noqa: E731
    with ThreadPoolExecutor(workers) as pool:
        return sum(pool.map(fetch, keys))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=32 * CHUNK_ROWS, help="rows of the store (default 0.4 GB)")
    parser.add_argument("--workers", type=int, default=4, help="loader reader threads (concurrent fetches)")
    parser.add_argument("--repeats", type=int, default=3, help="rounds; each ratio is the best round's, every round's range beside it")
    args = parser.parse_args()
    print_host()
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as tmp:
        tmp = Path(tmp)
        local = tmp / "bench.zarr"
        build_store(local, args.rows)
        server = start_s3_server(tmp / "s3")
        try:
            os.environ.update(server.env)
            url = f"s3://{server.new_bucket()}/bench.zarr"
            upload(local, url)
            files = chunk_files(local)
            print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; store {args.rows} rows x {D} fp16 = "
                  f"{args.rows * D * 2 / 1e9:.2f} GB in {len(files)} chunks; {args.workers} reader threads")
            results: dict[str, list[float]] = {}
            opens: dict[str, list[float]] = {"local": [], "s3": []}

            def record(key: str, label: str, run) -> None:
                results.setdefault(key, []).append(timed(label, run))

            def record_epoch(key: str, label: str, store, cache: Path | None = None) -> None:
                reader, seconds = opened(store, cache)
                opens["s3" if store == url else "local"].append(seconds)
                record(key, label, lambda: epoch(reader, args.rows, args.workers))

            for round_ in range(args.repeats):
                drop_cache(files)
                record_epoch("local_cold", "local, cold", local)
                record_epoch("local_warm", "local, warm", local)
                record_epoch("s3", "s3, no cache", url)
                cache = tmp / f"cache{round_}"
                record_epoch("s3_fill", "s3, cache_dir first epoch", url, cache)
                os.sync()  # untimed: the next epoch reads the cache, it does not wait on its writeback
                record_epoch("s3_cached", "s3, cache_dir second epoch", url, cache)
                keys = [file.relative_to(local).as_posix() for file in files]
                record("get_obstore", "raw GETs, obstore", lambda: client_read(StoreLocation(url), keys, args.workers, "obstore"))
                if importlib.util.find_spec("s3fs"):
                    record("get_s3fs", "raw GETs, s3fs", lambda: client_read(StoreLocation(url), keys, args.workers, "s3fs"))
        finally:
            stop_s3_server(server)
        print("store open, median ms (before each epoch, not in its time): "
              + ", ".join(f"{where} {statistics.median(seconds) * 1e3:.0f}" for where, seconds in opens.items()))

        def ratio(label: str, key: str, baseline: str, goal: str = "") -> None:
            """The best round's ratio (of the two runs of one round), and every round's range."""
            rounds = [a / b for a, b in zip(results[key], results[baseline])]
            spread = f" (rounds {min(rounds):.2f}-{max(rounds):.2f})" if len(rounds) > 1 else ""
            print(f"{label}: {max(rounds):.2f}{spread}" + (f" (goal {goal})" if goal else ""))

        if "get_s3fs" in results:
            ratio("raw GETs obstore / s3fs (why saeflow reads through obstore)", "get_obstore", "get_s3fs")
        ratio("s3 (no cache) / local cold", "s3", "local_cold")
        ratio("s3 first epoch with cache_dir / local cold", "s3_fill", "local_cold")
        ratio("s3 second epoch from cache_dir / local warm", "s3_cached", "local_warm", goal=">= 0.9")


if __name__ == "__main__":
    main()
