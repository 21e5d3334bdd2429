"""Stores on object storage, against a real S3 server (SeaweedFS, started by the `s3` fixture):
generate into s3://, validate, inspect, train from it (bitwise the run on a local store), resume
a killed generate, catch a flipped byte, refuse a second writer, and one clear line for a missing
bucket or wrong credentials."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from pipeline.generate.provenance import load_store_tokenizer
from store.chunk_cache import ChunkCache
from store.loader import ActivationLoader
from store.location import StoreLocation
from store.reader import StoreReader
from store.validate import compare_stores
from tests.s3_server import upload
from tests.store_fixtures import make_store
from tests.test_cli import REPO, run_saeflow, saeflow

SMALL = ["--set", "generate.target_tokens=4096", "--set", "train.total_tokens=8192", "--set", "loader.heldout_chunks=1"]


def last_error_line(result) -> str:
    lines = result.stderr.strip().splitlines()
    assert result.returncode != 0 and lines and lines[-1].startswith("error: "), result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    return lines[-1]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("remote")
    (work / "tiny.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text())
    return work


@pytest.fixture(scope="module")
def local_run(work) -> Path:
    """The reference: the same config on a local store."""
    saeflow("generate", "tiny.yaml", *SMALL, cwd=work)
    saeflow("train", "tiny.yaml", *SMALL, cwd=work)
    return work


@pytest.fixture(scope="module")
def remote_store(s3, local_run) -> str:
    url = f"s3://{s3.new_bucket()}/stores/tiny.zarr"
    saeflow("generate", "tiny.yaml", *SMALL, "--set", f"generate.store={url}", cwd=local_run)
    return url


def test_a_store_on_s3_validates_inspects_and_equals_the_local_store(local_run, remote_store):
    assert saeflow("validate", remote_store, cwd=local_run).stdout.strip() == f"ok: {remote_store}"
    text = saeflow("inspect", remote_store, cwd=local_run).stdout
    assert f"store      {remote_store}  (complete)" in text and " stored" in text
    assert compare_stores(local_run / "data" / "tiny.zarr", remote_store) == []
    tokens = list(range(50))
    assert load_store_tokenizer(remote_store).decode(tokens) == load_store_tokenizer(local_run / "data" / "tiny.zarr").decode(tokens)
    assert not StoreLocation(remote_store).sibling(".lock").read("")  # the lease is released


def test_training_from_s3_equals_training_from_the_local_store(local_run, remote_store, tmp_path):
    local = (local_run / "results" / "tiny" / "sae" / "sae.safetensors").read_bytes()
    cache = tmp_path / "cache"
    for out in ("cold", "cached"):  # the second run reads every chunk from the local cache
        log = saeflow("train", "tiny.yaml", *SMALL, "--set", f"generate.store={remote_store}", "--set", f"loader.cache_dir={cache}",
                      "--set", f"train.out_dir={tmp_path / out}", cwd=local_run).stderr
        assert (tmp_path / out / "sae" / "sae.safetensors").read_bytes() == local, out
        assert "gathered straight from the kept chunk maps" in log and "loader.cache_dir is not set" not in log, out
        cached = sorted(cache.rglob("*.bin"))
        assert len(cached) == 8  # every chunk of its one hook: 7 to train, 1 held out for the final metrics
    record = json.loads((tmp_path / "cold" / "sae" / "run.json").read_text())
    assert record["store"]["path"] == remote_store
    for store, out in ((remote_store, tmp_path / "cold"), ("data/tiny.zarr", local_run / "results" / "tiny")):
        saeflow("evaluate", "tiny.yaml", *SMALL, "--set", f"generate.store={store}", "--set", f"train.out_dir={out}",
                cwd=local_run)
    evaluated = [json.loads((out / "metrics.json").read_text()) for out in (tmp_path / "cold", local_run / "results" / "tiny")]
    assert evaluated[0] == evaluated[1]


def test_a_shuffled_copy_on_s3_of_a_store_on_s3_equals_the_local_copy(s3, local_run, remote_store, tmp_path):
    """`saeflow shuffle` between object-store URLs (the source read through a local chunk cache):
    the same bytes and tokenizer as the local copy."""
    copies = {"local": str(local_run / "data" / "tiny-shuffled.zarr"), "remote": f"s3://{s3.new_bucket()}/shuffled.zarr"}
    cached = ("--set", f"loader.cache_dir={tmp_path / 'cache'}")
    for store, copy, extra in ((local_run / "data" / "tiny.zarr", copies["local"], ()), (remote_store, copies["remote"], cached)):
        saeflow("shuffle", "tiny.yaml", *SMALL, *extra, "--set", f"generate.store={store}", "--out", copy, cwd=local_run)
    assert len(list((tmp_path / "cache").rglob("*.bin"))) == 8 * 5  # each chunk of 2 hooks and tokens/doc/pos fetched once
    assert compare_stores(copies["local"], copies["remote"], ignore=("created", "updated", "shuffled")) == []
    assert saeflow("validate", copies["remote"], cwd=local_run).stdout.strip() == f"ok: {copies['remote']}"
    assert StoreLocation(copies["remote"]).sizes("tokenizer")  # the tokenizer came along
    tokens = list(range(50))
    assert load_store_tokenizer(copies["remote"]).decode(tokens) == load_store_tokenizer(copies["local"]).decode(tokens)
    shuffled = [StoreReader(copy).manifest["shuffled"] for copy in copies.values()]
    assert shuffled[0]["heldout_chunks"] == 1 and shuffled[0]["source_identity"] == shuffled[1]["source_identity"]  # SMALL's split


def test_a_missing_remote_extra_is_named(local_run):
    code = "import sys; sys.modules['obstore'] = None; from pipeline.cli import main; main(['inspect', 's3://bucket/x.zarr'])"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "pip install 'saeflow[s3]'" in last_error_line(result)


def test_a_killed_remote_generate_resumes_to_the_same_store(s3, local_run, tmp_path):
    url = f"s3://{s3.new_bucket()}/killed.zarr"
    args = ("generate", "tiny.yaml", *SMALL, "--set", f"generate.store={url}")
    killed = run_saeflow(*args, cwd=local_run, env_extra={"SAEFLOW_KILL_AT": "manifest_written:3"})
    assert killed.returncode == -9, killed.stderr[-2000:]
    location = StoreLocation(url)
    lease = json.loads(location.sibling(".lock").read(""))
    assert lease["host"] == socket.gethostname()  # left behind by the killed writer: stale, taken over
    saeflow(*args, cwd=local_run)
    assert compare_stores(local_run / "data" / "tiny.zarr", url) == []

    key = "acts/blocks.0.hook_resid_post/c/1/0"
    data = bytearray(location.read(key))
    data[100] ^= 0x40
    location.write(key, bytes(data))
    result = run_saeflow("validate", url, cwd=local_run)
    assert result.returncode == 1
    assert "acts/blocks.0.hook_resid_post: checksum mismatch in chunk(s) 1 of 8" in result.stderr


def test_a_second_writer_is_refused_while_the_lease_is_held(s3, local_run):
    url = f"s3://{s3.new_bucket()}/leased.zarr"
    lease = StoreLocation(url).sibling(".lock")
    args = ("generate", "tiny.yaml", *SMALL, "--set", f"generate.store={url}")
    holder = {"pid": os.getpid(), "host": socket.gethostname(), "created": "now", "token": "x"}
    lease.write("", json.dumps(holder).encode())  # this test process: alive, on this host
    line = last_error_line(run_saeflow(*args, cwd=local_run))
    assert f"is being written by process {os.getpid()} on this host" in line
    lease.write("", json.dumps({**holder, "host": "gpu-node-7"}).encode())
    line = last_error_line(run_saeflow(*args, cwd=local_run))
    assert "held by process" in line and "gpu-node-7" in line and f"delete {url}.lock" in line
    assert StoreLocation(url).is_empty()  # nothing was written


def test_a_missing_bucket_or_wrong_credentials_is_one_clear_line(s3, local_run):
    line = last_error_line(run_saeflow("inspect", "s3://no-such-bucket/x.zarr", cwd=local_run))
    assert "bucket 'no-such-bucket'" in line and "does not exist" in line
    url = f"s3://{s3.new_bucket()}/x.zarr"
    line = last_error_line(run_saeflow("generate", "tiny.yaml", *SMALL, "--set", f"generate.store={url}", cwd=local_run,
                                       env_extra={"AWS_SECRET_ACCESS_KEY": "wrong"}))
    assert "was denied" in line and "AWS_SECRET_ACCESS_KEY" in line
    line = last_error_line(run_saeflow("inspect", url, cwd=local_run))
    assert "is not an activation store" in line


def test_the_chunk_cache_never_returns_rows_that_do_not_match_their_checksum(tmp_path):
    cache = ChunkCache(tmp_path, "xxh3_64")
    rows = np.arange(12, dtype="<f2").reshape(4, 3)
    from store.format import chunk_checksum

    checksum = chunk_checksum(rows, "xxh3_64")
    assert cache.save(checksum ^ 1, rows) is None  # rows that are not those of this checksum are not kept
    assert cache.load(checksum ^ 1, rows.dtype, rows.shape) is None
    saved = cache.save(checksum, rows)  # the kept rows, as a map of their file
    assert isinstance(saved, np.memmap) and np.array_equal(saved, rows)
    assert np.array_equal(cache.load(checksum, rows.dtype, rows.shape), rows)
    (file,) = tmp_path.rglob("*.bin")
    file.write_bytes(bytes(reversed(file.read_bytes())))  # damaged on disk: dropped, never returned
    assert cache.load(checksum, rows.dtype, rows.shape) is None and not file.exists()



@pytest.mark.parametrize("layout", [{}, dict(shard_chunks=2), dict(compressor="zstd")])
def test_a_remote_store_with_a_cache_is_gathered_from_kept_maps_of_its_cached_chunks(s3, tmp_path, layout):
    """With loader.cache_dir every remote chunk, whatever its codec, is fetched and decoded once,
    then read as a map of its cached file, kept, and gathered in one pass like a local chunk:
    the same batches as the local store, in the fetching epoch and from the cache."""
    rows = np.random.default_rng(0).standard_normal((640, 16)).astype(np.float16)
    local = make_store(tmp_path / "local.zarr", {"h": rows}, 64, **layout)
    url = f"s3://{s3.new_bucket()}/cached.zarr"
    upload(local, url)
    settings = dict(batch_size=96, seed=3, heldout_chunks=0, slice_rows=8, max_rows=1280)  # two epochs
    expected = [batch["h"] for batch in ActivationLoader(local, "h", **settings)]
    assert "kept chunk maps" not in ActivationLoader(StoreReader(url), "h", **settings).describe_gather()
    cache = tmp_path / "cache"
    for run in ("fetching", "cached"):
        reader = StoreReader(url, cache_dir=cache)
        loader = ActivationLoader(reader, "h", **settings)
        assert "straight from the kept chunk maps" in loader.describe_gather(), run
        assert all(torch.equal(ours["h"], theirs) for ours, theirs in zip(loader, expected, strict=True)), run
        kept = reader.read_chunk("h", 0, keep_map=True)
        assert isinstance(kept, np.memmap) and Path(kept.filename).is_relative_to(cache), run
        assert reader.read_chunk("h", 0, keep_map=True) is kept, run  # mapped once per reader
    assert len(list(cache.rglob("*.bin"))) == 10


def test_a_cache_dir_that_cannot_be_written_is_one_clear_line(local_run, remote_store, tmp_path):
    blocked = tmp_path / "a-file"
    blocked.write_text("")  # the cache's folders cannot be made under a file
    line = last_error_line(run_saeflow(
        "train", "tiny.yaml", *SMALL, "--set", f"generate.store={remote_store}", "--set", f"loader.cache_dir={blocked}",
        "--set", f"train.out_dir={tmp_path / 'run'}", cwd=local_run))
    assert f"cannot keep a fetched chunk in loader.cache_dir {blocked}" in line and "another local folder" in line

def test_a_store_url_without_a_path_is_refused():
    with pytest.raises(Exception, match="needs a bucket and a path"):
        StoreLocation("s3://bucket-only")


def test_storage_options_are_never_recorded(local_run, remote_store, tmp_path):
    config = yaml.safe_load((local_run / "tiny.yaml").read_text())
    config["generate"]["storage_options"] = {"region": "us-east-1"}
    (tmp_path / "options.yaml").write_text(yaml.safe_dump(config))
    log = saeflow("train", str(tmp_path / "options.yaml"), *SMALL, "--set", f"generate.store={remote_store}",
                  "--set", f"train.out_dir={tmp_path / 'run'}", cwd=local_run).stderr
    record = json.loads((tmp_path / "run" / "sae" / "run.json").read_text())
    assert record["config"]["generate"]["storage_options"] == {"region": "<not recorded>"}
    # without a chunk cache, the run says what the global shuffle costs on object storage
    assert f"{remote_store} is on object storage and loader.cache_dir is not set" in log
