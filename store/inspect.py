"""A human-readable summary of a store: manifest, provenance, sizes on disk, hooks, statistics,
and the text of its first document, decoded by the store's own tokenizer (store/tokenizer.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import zarr

from store.format import TOKEN_ARRAYS, StoreError, acts_path, open_store_group, read_manifest
from store.location import StoreLocation, locate
from store.integrity import layout_problems, manifest_problems
from store.recorded_stats import moments_from_arrays, read_stats_arrays, stats_problems
from store.split import SHUFFLED_KEY
from store.tokenizer import load_store_tokenizer

SAMPLE_ROWS, SAMPLE_CHARS = 512, 160  # the text line: the first document's rows among these, cut to this


def describe_store(path: str | Path | StoreLocation) -> str:
    path = locate(path)
    group = open_store_group(path)
    manifest = read_manifest(path, group)
    problems = manifest_problems(manifest) or layout_problems(group, manifest)
    if problems:
        more = f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""
        return f"store {path} is DAMAGED: {problems[0]}{more}; run `saeflow validate {path}`"
    rows, chunks = int(manifest["n_rows"]), int(manifest["n_chunks"])
    shuffled = manifest.get(SHUFFLED_KEY)
    rerun = "saeflow shuffle" if shuffled else "generate"
    state = "complete" if manifest["complete"] else f"INCOMPLETE (rerun {rerun} to resume)"
    lines = [
        f"store      {path}  ({state})",
        f"format     {manifest['format']} v{manifest['version']}, saeflow {manifest.get('saeflow_version', '?')}",
        f"rows       {rows:,} in {chunks} chunks of {manifest['chunk_rows']} rows"
        + (f", {manifest['shard_chunks']} chunks per shard" if manifest.get("shard_chunks") else "")
        + f", compressor {manifest.get('compressor') or 'none'}",
        f"written    created {manifest.get('created')}, updated {manifest.get('updated')}",
        f"size       {_human(_stored_bytes(path))} {'stored' if path.remote else 'on disk'}",
    ]
    if shuffled:
        lines.append(f"shuffled   training rows in a random order (seed {shuffled['seed']}) from {shuffled['source']}; "
                     f"its {shuffled['heldout_chunks']} held-out chunk(s) as they were")
    lines += _provenance(manifest)
    lines.append("hooks")
    for hook, info in manifest["hook_points"].items():
        lines.append(f"  {hook}: d={info['d']} {info['dtype']}, {_human(_stored_bytes(path, acts_path(hook)))}")
        lines.append(f"    {_stats_summary(group, manifest, hook)}")
    lines.append(_token_summary(path, group, manifest))
    if int(manifest["n_rows"]) and not shuffled:  # a shuffled copy's first rows are no document's text
        lines.append(_text_sample(path, group, manifest))
    return "\n".join(lines)


def _provenance(manifest: dict) -> list[str]:
    model = manifest.get("model") or {}
    dataset = manifest.get("dataset") or {}
    tokenizer = manifest.get("tokenizer") or {}
    if not model:
        return []
    return [
        f"model      {model.get('name')} ({model.get('architecture') or '?'}, {model.get('n_layers')} layers, "
        f"d_model {model.get('d_model')}, {model.get('dtype')}) from {model.get('source')}",
        f"tokenizer  {tokenizer.get('name') or tokenizer.get('class')}: bos {tokenizer.get('bos_id')}, "
        f"eos {tokenizer.get('eos_id')}, pad {tokenizer.get('pad_id')}",
        f"dataset    {dataset.get('source')} split {dataset.get('split')}, fingerprint {dataset.get('fingerprint')}",
        f"windows    context {manifest.get('context_size')}, prepend_bos {manifest.get('prepend_bos')}, "
        f"pack {manifest.get('pack')}, dropped {', '.join(manifest.get('dropped_special_tokens') or []) or 'none'}",
    ]


def _stats_summary(group: zarr.Group, manifest: dict, hook: str) -> str:
    if not manifest.get("stats"):
        return "stats: none saved yet"
    problems = stats_problems(group, manifest, hook)
    if problems:
        return f"stats: unusable ({problems[0]})"
    moments = moments_from_arrays(read_stats_arrays(group, hook))
    if moments.count < 2:
        return f"stats: {moments.count} rows"
    eigenvalues = np.linalg.eigvalsh(moments.covariance().numpy())
    total = float(eigenvalues.sum())
    top = float(eigenvalues[-1]) / total if total > 0 else float("nan")
    return (
        f"stats over {moments.count:,} rows: mean norm {moments.mean_norm:.4g}, |mean| "
        f"{float(np.linalg.norm(moments.mean.numpy())):.4g}, variance {total:.4g}, top eigenvalue share {top:.3f}"
    )


def _token_summary(path: StoreLocation, group: zarr.Group, manifest: dict) -> str:
    rows = int(manifest["n_rows"])
    if rows == 0:
        return "tokens     none committed yet"
    tokens = f"{_human(sum(_stored_bytes(path, name) for name in TOKEN_ARRAYS))} of tokens/doc/pos"
    if manifest.get(SHUFFLED_KEY):
        return f"tokens     {rows:,} rows, each with its document and position; {tokens}"
    doc = group["doc"]
    first, last = int(doc[0]), int(doc[rows - 1])
    return f"tokens     {rows:,} rows from documents {first}..{last}; {tokens}"


def _text_sample(path: StoreLocation, group: zarr.Group, manifest: dict) -> str:
    """The first stored document's text (its first rows), decoded from the tokens column."""
    try:
        tokenizer = load_store_tokenizer(path)
    except StoreError:
        return "text       not decodable: the store has no tokenizer/ folder (made before stores carried one)"
    rows = min(int(manifest["n_rows"]), SAMPLE_ROWS)
    tokens, doc, pos = (np.asarray(group[name][:rows]) for name in ("tokens", "doc", "pos"))
    ids = tokens[(doc == doc[0]) & (pos >= 0)].tolist()  # pos < 0: BOS and padding
    text = " ".join(tokenizer.decode(ids).split())
    cut = text[:SAMPLE_CHARS] + ("..." if len(text) > SAMPLE_CHARS else "")
    return f"text       document {int(doc[0])}: {cut!r}"


def _stored_bytes(location: StoreLocation, relative: str = "") -> int:
    """Bytes stored under `relative` (a folder of the store, or the whole store)."""
    if location.remote:
        return sum(location.sizes(relative).values())
    path = location.local / relative if relative else location.local
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.1f} {unit}" if unit != "B" else f"{int(size)} B"
        size /= 1024
    return f"{n} B"
