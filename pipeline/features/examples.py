"""Examples in their context: each token of the context decoded and shaded by the latent's activation.

The activations of the context rows come from a second, small pass: the rows of every context
(their union is at most the split plus 2W rows) are read from the store and encoded once, and
only the (row, latent) pairs some context shows are kept. Token texts come from the store's own
tokenizer (tokenizer/ in the store), decoded after a fixed word so that word-piece and
byte-level tokenizers both keep their spacing.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.features.context import Columns, ContextBounds, WindowLayout, context_bounds
from pipeline.features.scan import scan
from pipeline.features.stats import LatentStats, firings
from pipeline.sae.model import SparseAutoencoder
from store.format import StoreError
from store.reader import Split, StoreReader


@dataclass
class ExampleContexts:
    latents: np.ndarray  # (E,)
    rows: np.ndarray  # (E,) the example rows
    bounds: ContextBounds
    columns: Columns | None  # tokens/doc/pos of the rows around them (None without examples)
    activations: list[np.ndarray]  # per example, its latent on each row of its context


@torch.no_grad()
def example_contexts(sae: SparseAutoencoder, reader: StoreReader, latents: np.ndarray, rows: np.ndarray, width: int,
                     batch_size: int = 4096) -> ExampleContexts:
    latents, rows = np.asarray(latents, dtype=np.int64), np.asarray(rows, dtype=np.int64)
    if len(rows) == 0:  # no latent fired
        return ExampleContexts(latents, rows, ContextBounds(rows, rows, [], []), None, [])
    bounds, columns = context_bounds(WindowLayout.of(reader.manifest), reader, rows, width)
    lengths = bounds.stop - bounds.first
    starts = np.cumsum(lengths) - lengths
    pair_rows = np.repeat(bounds.first, lengths) + np.arange(lengths.sum()) - np.repeat(starts, lengths)
    d_sae = sae.cfg.d_sae
    keys = pair_rows * d_sae + np.repeat(latents, lengths)
    values = _pair_activations(sae, reader, np.unique(pair_rows), np.unique(keys), keys, batch_size)
    return ExampleContexts(latents, rows, bounds, columns, np.split(values, starts[1:]))


def _pair_activations(sae: SparseAutoencoder, reader: StoreReader, rows: np.ndarray, wanted: np.ndarray,
                      keys: np.ndarray, batch_size: int) -> np.ndarray:
    """The activation of each (row * d_sae + latent) in `keys` (0 where it does not fire)."""
    hook, device = sae.cfg.hook_point_in, sae.W_dec.device
    wanted_t = torch.from_numpy(wanted).to(device)  # sorted (np.unique): a binary search per firing
    found_keys, found_values = [], []
    for start in range(0, len(rows), batch_size):
        batch = rows[start : start + batch_size]
        _, out = sae(sae.normalize_input(read_rows(reader, hook, batch).to(device)))
        in_batch, latents, values = firings(out)
        pair = torch.from_numpy(batch).to(device)[in_batch] * sae.cfg.d_sae + latents
        at = torch.searchsorted(wanted_t, pair).clamp_(max=len(wanted) - 1)
        keep = wanted_t[at] == pair
        found_keys.append(pair[keep].cpu())
        found_values.append(values[keep].cpu())
    found = torch.cat(found_keys).numpy() if found_keys else np.zeros(0, dtype=np.int64)
    if len(found) == 0:
        return np.zeros(len(keys), dtype=np.float32)
    order = np.argsort(found)
    found, acts = found[order], torch.cat(found_values).numpy()[order]
    at = np.minimum(np.searchsorted(found, keys), len(found) - 1)
    return np.where(found[at] == keys, acts[at], 0.0).astype(np.float32)


def read_rows(reader: StoreReader, hook: str, rows: np.ndarray) -> torch.Tensor:
    """(len(rows), d) float32 activations of sorted store rows, read chunk by chunk (verified)."""
    chunk_of = rows // reader.chunk_rows
    return torch.cat([reader.read_tensor(hook, np.asarray(reader.read_chunk(hook, int(chunk)))[rows[chunk_of == chunk] % reader.chunk_rows],
                                         torch.float32) for chunk in np.unique(chunk_of)])


def store_tokenizer(reader: StoreReader) -> Any | None:
    """The store's own tokenizer, or None (tokens then show as ids) for a store without one."""
    from pipeline.generate.provenance import load_store_tokenizer

    try:
        return load_store_tokenizer(reader.path)
    except StoreError as error:
        print(f"saeflow features: {error}; tokens are shown as ids", file=sys.stderr, flush=True)
        return None


def token_texts(tokenizer: Any | None, ids: list[int]) -> dict[int, str]:
    """{id: text} as the token reads inside running text (its leading space or not)."""
    if tokenizer is None:
        return {i: f"<{i}>" for i in ids}
    ref = tokenizer.encode("the", add_special_tokens=False).ids[:1]
    prefix = tokenizer.decode(ref, skip_special_tokens=False) if ref else ""
    joined = tokenizer.decode_batch([ref + [i] for i in ids], skip_special_tokens=False)
    alone = tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
    return {i: (both[len(prefix):] if ref and both.startswith(prefix) else single)
            for i, both, single in zip(ids, joined, alone)}


@dataclass
class Example:
    latent: int
    row: int  # the store row
    activation: float
    doc: int
    pos: int  # in the document (store/FORMAT.md: BOS -1, PAD -2, EOS len(ids))
    tokens: list[str]  # the context's tokens, decoded
    activations: list[float]  # the latent on each of them
    index: int  # the example's own token in `tokens`
    before: str | None  # "bos": the window's dropped BOS precedes the context
    after: str | None  # "pad": dropped padding follows it

    @property
    def text(self) -> str:
        """The context as text, the example's token in [[ ]]."""
        parts = [f"[[{t}]]" if i == self.index else t for i, t in enumerate(self.tokens)]
        return "".join([f"<{self.before}>" if self.before else "", *parts, f"<{self.after}>" if self.after else ""])


def examples_of(contexts: ExampleContexts, values: list[float], tokenizer: Any | None) -> list[Example]:
    bounds, columns = contexts.bounds, contexts.columns
    spans = [np.arange(first, stop) for first, stop in zip(bounds.first, bounds.stop)]
    texts = token_texts(tokenizer, sorted({int(t) for span in spans for t in columns["tokens", span]}))
    examples = []
    for e, (latent, row, span) in enumerate(zip(contexts.latents, contexts.rows, spans)):
        examples.append(Example(
            int(latent), int(row), float(values[e]), int(columns["doc", row]), int(columns["pos", row]),
            [texts[int(t)] for t in columns["tokens", span]], contexts.activations[e].tolist(),
            int(row - bounds.first[e]), bounds.before[e], bounds.after[e]))
    return examples


def top_examples(sae: SparseAutoencoder, store: str | Path | StoreReader, latent: int, n: int = 10, *,
                 split: Split = "heldout", heldout_chunks: int = 1, window: int = 10, batch_size: int = 4096) -> list[Example]:
    """The n rows of the store's split on which `latent` fires most strongly, highest first, each
    with +-window tokens of context. split="train" with heldout_chunks=0 reads the whole store."""
    reader = store if isinstance(store, StoreReader) else StoreReader(store)
    if not 0 <= latent < sae.cfg.d_sae:
        raise ValueError(f"latent {latent} is not one of the SAE's {sae.cfg.d_sae} latents")
    stats = LatentStats(sae.cfg.d_sae, top_n=n, sample_n=0, bins=2, intervals=1, seed=0, device=sae.W_dec.device)
    scan(sae, reader, stats, split=split, heldout_chunks=heldout_chunks, batch_size=batch_size)
    rows, values = stats.top_rows(latent)
    contexts = example_contexts(sae, reader, np.full(len(rows), latent), np.array(rows, dtype=np.int64), window, batch_size)
    return examples_of(contexts, values, store_tokenizer(reader))
