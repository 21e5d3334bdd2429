"""Stage 1 end to end on the seeded random GPT-2 and a local corpus: real model, real stores."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
import zarr

from pipeline.config import ConfigError, validate_config
from pipeline.generate.stage import BATCH_DELAY_ENV, generate
from pipeline.generate.lm import ModelLoadError
from pipeline.generate.text import DatasetError, iter_documents
from store.format import StoreError, read_manifest
from store.lock import lock_path
from store.reader import StoreReader
from store.validate import compare_stores, validate_store
from tests.generate.corpus import HOOKS, RANDOM_MODEL, RARE_WORD, config_dict, make_config

ROOT = Path(__file__).resolve().parents[2]
def token_streams(cfg, lm, n_docs: int) -> list[list[int]]:
    """Each document's token ids, as generate sees them."""
    texts = [text for _, text in zip(range(n_docs), iter_documents(cfg.dataset))]
    return lm.encode(texts)


def read_all(store: Path, name: str) -> np.ndarray:
    reader = StoreReader(store)
    return np.asarray(reader.read_rows(name, 0, reader.n_rows))


# --- what a store holds ---------------------------------------------------------------------
def test_manifest_records_provenance(reference, corpus, lm):
    manifest = read_manifest(reference)
    cfg = make_config(reference, corpus)
    assert manifest["complete"] and manifest["n_rows"] == 3000
    assert manifest["n_chunks"] == 47 and manifest["chunk_rows"] == 64  # 46 full chunks + 56 rows
    assert manifest["hook_points"] == {hook: {"d": 64, "dtype": "float16"} for hook in HOOKS}
    assert manifest["model"]["name"] == "random" and manifest["model"]["random"] == RANDOM_MODEL
    assert manifest["tokenizer"]["bos_id"] == lm.bos_id and manifest["tokenizer"]["eos_id"] == lm.eos_id
    assert manifest["dataset"]["source"] == str(corpus) and len(manifest["dataset"]["fingerprint"]) == 16
    assert (manifest["context_size"], manifest["prepend_bos"], manifest["pack"]) == (32, True, True)
    assert manifest["dropped_special_tokens"] == ["bos", "pad"] and manifest["seed"] == 0
    assert manifest["config"]["generate"]["hook_points"] == HOOKS
    assert "store" not in manifest["config"]["generate"]  # a store may move
    assert manifest["config"]["model"] == cfg.model.model_dump(mode="json")
    assert manifest["saeflow_version"] == "0.1.0" and manifest["created"] <= manifest["updated"]
    assert validate_store(reference) == []
    group = zarr.open_group(str(reference), mode="r")
    assert group[f"acts/{HOOKS[0]}"].shape == (3000, 64)


def test_rows_trace_to_their_tokens_in_stream_order(reference, corpus, lm):
    cfg = make_config(reference, corpus)
    tokens, doc, pos = (read_all(reference, name) for name in ("tokens", "doc", "pos"))
    streams = token_streams(cfg, lm, int(doc.max()) + 1)
    # Packed, BOS dropped: the rows are exactly the stream ids + [EOS] per document, in order.
    expected = [(d, p, t) for d, ids in enumerate(streams) for p, t in enumerate([*ids, lm.eos_id])][: len(tokens)]
    assert list(zip(doc.tolist(), pos.tolist(), tokens.tolist())) == expected


def test_stored_activations_are_the_models(reference, corpus, lm):
    """The first batch, rebuilt by hand ([BOS] + next 31 stream tokens per window) and run."""
    cfg = make_config(reference, corpus)
    stream = [t for ids in token_streams(cfg, lm, 20) for t in [*ids, lm.eos_id]]
    windows = torch.tensor([[lm.bos_id, *stream[31 * w : 31 * (w + 1)]] for w in range(4)])
    acts = lm.run_hooks(windows, HOOKS)
    for hook in HOOKS:
        expected = acts[hook][:, 1:].reshape(-1, 64).to(torch.float16).numpy()
        np.testing.assert_array_equal(read_all(reference, hook)[:124], expected)


def test_pad_mode_one_document_per_window(tmp_path, corpus, lm):
    cfg = make_config(tmp_path / "pad.zarr", corpus, pack=False, drop_special_tokens=[], target_tokens=10_000)
    cfg.dataset.max_docs = 20
    result = generate(cfg, lm=lm)
    assert result.n_rows == 20 * 32  # data ran out first: every window kept whole
    manifest = read_manifest(cfg.generate.store)
    assert manifest["complete"] and manifest["n_chunks"] == 10 and manifest["pack"] is False
    tokens, doc, pos = (read_all(cfg.generate.store, name).reshape(20, 32) for name in ("tokens", "doc", "pos"))
    streams = token_streams(cfg, lm, 20)
    for w, ids in enumerate(streams):
        assert (doc[w] == w).all()
        assert (tokens[w, 0], pos[w, 0]) == (lm.bos_id, -1)
        body = [*ids, lm.eos_id][:31]  # truncated documents lose their tail and EOS
        assert tokens[w, 1 : 1 + len(body)].tolist() == body
        assert pos[w, 1 : 1 + len(body)].tolist() == list(range(len(body)))
        assert (tokens[w, 1 + len(body) :] == lm.pad_id).all() and (pos[w, 1 + len(body) :] == -2).all()
    assert any(len(ids) >= 31 for ids in streams) and any(len(ids) < 30 for ids in streams)


def test_pack_mode_drops_special_tokens_by_role(tmp_path, corpus, lm):
    kept_all = make_config(tmp_path / "all.zarr", corpus, drop_special_tokens=[], target_tokens=10_000)
    kept_all.dataset.max_docs = 12
    text_only = make_config(tmp_path / "text.zarr", corpus, drop_special_tokens=["bos", "eos", "pad"], target_tokens=10_000)
    text_only.dataset.max_docs = 12
    generate(kept_all, lm=lm)
    generate(text_only, lm=lm)
    streams = token_streams(kept_all, lm, 12)
    stream_length = sum(len(ids) + 1 for ids in streams)
    windows = -(-stream_length // 31)
    pos_all = read_all(kept_all.generate.store, "pos")
    assert len(pos_all) == windows * 32  # the last, partial window is padded, not dropped
    assert (pos_all.reshape(windows, 32)[:, 0] == -1).all()
    assert (pos_all == -2).sum() == windows * 31 - stream_length
    tokens, doc, pos = (read_all(text_only.generate.store, name) for name in ("tokens", "doc", "pos"))
    assert len(tokens) == sum(len(ids) for ids in streams)
    assert all(0 <= p < len(streams[d]) and streams[d][p] == t for d, p, t in zip(doc, pos, tokens))
    assert read_manifest(text_only.generate.store)["dropped_special_tokens"] == ["bos", "eos", "pad"]


def test_bfloat16_store_and_shards(tmp_path, corpus, lm, reference):
    cfg = make_config(tmp_path / "bf16.zarr", corpus, store_dtype="bfloat16", shard_chunks=4)
    generate(cfg, lm=lm)
    assert validate_store(cfg.generate.store) == []
    reader = StoreReader(cfg.generate.store)
    assert reader.store_dtype(HOOKS[0]) == "bfloat16" and reader.n_rows == 3000
    bits = read_all(cfg.generate.store, HOOKS[1]).astype(np.uint32) << 16
    as_fp32 = bits.view(np.float32)
    np.testing.assert_allclose(as_fp32, read_all(reference, HOOKS[1]).astype(np.float32), rtol=2**-7, atol=1e-4)
    np.testing.assert_array_equal(read_all(cfg.generate.store, "tokens"), read_all(reference, "tokens"))


# --- resume and reuse --------------------------------------------------------------------------
RUN = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {root!r})
    from pipeline.config import load_config
    from pipeline.generate.stage import generate
    generate(load_config({config!r}))
    """
)


def committed_chunks(store: Path) -> int | None:
    try:
        return json.loads((store / "zarr.json").read_text())["attributes"]["saeflow"]["n_chunks"]
    except (FileNotFoundError, json.JSONDecodeError, KeyError):
        return None


def kill_when(store: Path, config: Path, chunks: int) -> int:
    """Run generate in a subprocess and SIGKILL it once `chunks` chunks are committed."""
    env = {**os.environ, BATCH_DELAY_ENV: "0.15", "PYTHONPATH": str(ROOT)}
    process = subprocess.Popen(
        [sys.executable, "-c", RUN.format(root=str(ROOT), config=str(config))],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and process.poll() is None:
        committed = committed_chunks(store)
        if committed is not None and committed >= chunks:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.01)
    process.wait()
    assert process.returncode == -signal.SIGKILL, f"generate ended before the kill: {process.stderr.read()[-2000:]}"
    return committed_chunks(store)


def test_resume_after_sigkill_is_bitwise_identical(tmp_path, corpus, lm, reference):
    store = tmp_path / "store.zarr"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(config_dict(store, corpus)))
    seen = []
    for at in (0, 9, 26):  # right after creation, early, and later (between or inside commits)
        seen.append(kill_when(store, config, at))
        assert seen[-1] >= at and lock_path(store).exists()  # a stale lock left by the dead writer
        assert validate_store(store) == [] and not read_manifest(store)["complete"]
    assert seen == sorted(seen) and seen[-1] < 47
    result = generate(make_config(store, corpus), lm=lm)
    assert result.resumed and result.n_rows == 3000 and result.rows_written == 3000 - seen[-1] * 64
    assert compare_stores(reference, store) == []


def test_disk_full_mid_run_then_resume(tmp_path, corpus, lm, reference, monkeypatch):
    import zarr.storage._local as local

    real_put = local._put

    def put(path, value, exclusive=False):
        if f"acts/{HOOKS[1]}/c/5/" in str(path):
            raise OSError(28, "No space left on device")
        return real_put(path, value, exclusive)

    monkeypatch.setattr(local, "_put", put)
    cfg = make_config(tmp_path / "store.zarr", corpus)
    with pytest.raises(StoreError, match="disk full while writing chunk 5 .*free space and rerun"):
        generate(cfg, lm=lm)
    monkeypatch.setattr(local, "_put", real_put)
    assert read_manifest(cfg.generate.store)["n_chunks"] == 5 and validate_store(cfg.generate.store) == []
    assert generate(cfg, lm=lm).resumed
    assert compare_stores(reference, cfg.generate.store) == []


def test_complete_store_is_left_alone(tmp_path, corpus, reference, capfd):
    store = tmp_path / "store.zarr"
    shutil.copytree(reference, store)
    before = (store / "zarr.json").stat().st_mtime_ns
    assert generate(make_config(store, corpus)).path == store  # no model load for a complete store
    assert "complete (3000 rows, same config); nothing to do" in capfd.readouterr().err
    assert (store / "zarr.json").stat().st_mtime_ns == before
    same_data = make_config(store, corpus, queue_chunks=2)  # queue depth cannot change the bytes
    assert generate(same_data).already_complete


def test_other_config_is_refused_unless_overwrite(tmp_path, corpus, lm, reference):
    store = tmp_path / "store.zarr"
    shutil.copytree(reference, store)
    changed = make_config(store, corpus, context_size=48)
    with pytest.raises(ConfigError, match=r"different config \(changed: generate.context_size\); pass --overwrite"):
        generate(changed, lm=lm)
    assert compare_stores(reference, store) == []
    generate(changed, lm=lm, overwrite=True)
    assert read_manifest(store)["context_size"] == 48 and validate_store(store) == []
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "keep.txt").write_text("mine")
    with pytest.raises(StoreError, match="exists and is not a store"):
        generate(make_config(tmp_path / "notes", corpus), lm=lm, overwrite=True)
    assert (tmp_path / "notes" / "keep.txt").exists()


# --- bad input ---------------------------------------------------------------------------------
def test_unknown_hook_lists_valid_ones(tmp_path, corpus, lm):
    data = config_dict(tmp_path / "s.zarr", corpus, hook_points=["blocks.0.hook_resid_pots"])
    data["sae"].update(hook_point_in="blocks.0.hook_resid_pots", hook_point_out="blocks.0.hook_resid_pots")
    with pytest.raises(ModelLoadError, match="unknown hook point 'blocks.0.hook_resid_pots'.*valid hooks include"):
        generate(validate_config(data), lm=lm)
    assert not (tmp_path / "s.zarr").exists() and not lock_path(tmp_path / "s.zarr").exists()


def test_context_above_the_models_is_refused(tmp_path, corpus, lm):
    with pytest.raises(ConfigError, match="context_size 512 exceeds .* 256 tokens"):
        generate(make_config(tmp_path / "s.zarr", corpus, context_size=512), lm=lm)
    assert not (tmp_path / "s.zarr").exists()


def test_empty_dataset_creates_nothing(tmp_path, lm):
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"text": ""}\n{"text": "   "}\n')
    with pytest.raises(DatasetError):
        generate(make_config(tmp_path / "s.zarr", empty), lm=lm)
    assert not (tmp_path / "s.zarr").exists()


def test_nan_activations_stop_before_commit(tmp_path, corpus, lm):
    embedding = next(p for _, p in lm.model.named_parameters() if p.shape[0] == lm.d_vocab)
    (rare,) = lm.encode([RARE_WORD])[0]
    saved = embedding.data[rare].clone()
    embedding.data[rare] = float("nan")
    try:
        cfg = make_config(tmp_path / "s.zarr", corpus)
        with pytest.raises(StoreError, match=rf"hook '{HOOKS[0]}' in batch \d+ \(documents \d+-\d+\) contain \d+ NaN/inf"):
            generate(cfg, lm=lm)
    finally:
        embedding.data[rare] = saved
    manifest = read_manifest(cfg.generate.store)
    assert 0 < manifest["n_chunks"] < 47 and not manifest["complete"]  # rows before it are kept
    assert validate_store(cfg.generate.store) == [] and not lock_path(cfg.generate.store).exists()


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


def test_store_being_written_elsewhere_is_refused(tmp_path, corpus, lm):
    store = tmp_path / "s.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(ROOT), store=str(store))], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(StoreError, match=rf"being written by process {holder.pid} .*{lock_path(store).name}"):
            generate(make_config(store, corpus), lm=lm)
    finally:
        holder.kill()
        holder.wait()


def test_a_copied_store_decodes_its_own_tokens(tmp_path, reference, lm):
    from pipeline.generate.provenance import load_store_tokenizer

    copy = tmp_path / "elsewhere" / "store.zarr"
    shutil.copytree(reference, copy)  # the tokenizer travels inside the store
    assert read_manifest(copy)["tokenizer"]["files"] == "tokenizer"
    tokenizer = load_store_tokenizer(copy)
    reader = StoreReader(copy)
    doc, pos, tokens = (np.asarray(reader.read_rows(name, 0, 200)) for name in ("doc", "pos", "tokens"))
    first = tokens[(doc == doc[0]) & (pos >= 0)].tolist()
    assert tokenizer.decode(first, skip_special_tokens=False) == lm.tokenizer.decode(first)
    assert tokenizer.get_vocab_size() == len(lm.tokenizer)


def test_generate_on_a_read_only_store(tmp_path, corpus, reference):
    """A complete store needs no writing, so no lock: confirmed as it is. An incomplete one cannot
    be resumed there: one line naming the lock that cannot be made, and the store untouched."""
    from store.format import write_manifest
    from tests.processes import honour_file_modes, make_read_only
    from tests.test_cli import run_saeflow

    stores = {}
    for kind in ("complete", "incomplete"):
        store = tmp_path / kind / "store.zarr"
        shutil.copytree(reference, store)
        if kind == "incomplete":  # as a killed run leaves it: 46 full chunks committed
            manifest = read_manifest(store)
            manifest.update(complete=False, n_rows=46 * 64, n_chunks=46)
            write_manifest(zarr.open_group(str(store), mode="r+"), manifest)
        config = tmp_path / kind / "config.yaml"
        config.write_text(json.dumps(config_dict(store, corpus)))
        make_read_only(store.parent)
        stores[kind] = (store, config, {p: p.read_bytes() for p in store.rglob("*") if p.is_file()})
    try:
        store, config, _ = stores["complete"]
        result = run_saeflow("generate", str(config), preexec_fn=honour_file_modes)
        assert result.returncode == 0 and "is complete (3000 rows, same config); nothing to do" in result.stderr, result.stderr
        store, config, before = stores["incomplete"]
        result = run_saeflow("generate", str(config), preexec_fn=honour_file_modes)
        lines = result.stderr.strip().splitlines()
        assert result.returncode == 2 and len(lines) == 1, result.stderr
        assert lines[0] == (f"error: cannot create the writer lock {lock_path(store)} (Permission denied): writing store "
                            f"{store} needs write access to {store.parent}; make it writable or write the store elsewhere")
        assert {p: p.read_bytes() for p in store.rglob("*") if p.is_file()} == before
    finally:
        for kind in stores:
            subprocess.run(["chmod", "-R", "u+w", str(tmp_path / kind)], check=True)
