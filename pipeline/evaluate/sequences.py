"""Held-out token sequences for the language-model metrics of `saeflow evaluate`.

Source, in order of preference:
1. "heldout_text": documents the store never consumed (those after the last document any stored
   row came from, and after the manifest's resume cursor), tokenized and cut into windows exactly
   as generate does (context_size, prepend_bos, pack; pipeline/generate/windows.py).
2. "heldout_store_rows": when the dataset has no documents left (generate exhausted it), the
   token rows of the store's held-out split, regrouped into their documents and windowed the
   same way. The split already leaves out documents that training rows also hold
   (store/split.py), so no sequence holds text that training rows came from. BOS/pad rows (if the store kept them) are
   dropped and re-added by the windowing.

Each sequence carries a loss mask over its next-token predictions: the prediction made at
position t (of token t + 1) counts unless position t is BOS or padding or token t + 1 is padding.
BOS positions are excluded because the first prediction is conditioned on no text at all.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice

import numpy as np
import torch

from pipeline.config import ExperimentConfig
from pipeline.generate.lm import LanguageModel
from pipeline.generate.stage import window_spec
from pipeline.generate.text import iter_documents
from pipeline.generate.windows import BOS, PAD, WindowCursor, encoded_documents, iter_windows
from store.reader import StoreReader

HELDOUT_TEXT = "heldout_text"
HELDOUT_STORE_ROWS = "heldout_store_rows"


@dataclass
class EvalSequences:
    tokens: torch.Tensor  # (N, T) int64
    role: torch.Tensor  # (N, T) int8: TEXT/BOS/EOS/PAD per position (pipeline/generate/windows.py)
    source: str  # HELDOUT_TEXT or HELDOUT_STORE_ROWS
    first_doc: int | None  # first held-out document (HELDOUT_TEXT)

    def __len__(self) -> int:
        return int(self.tokens.shape[0])

    @property
    def loss_mask(self) -> torch.Tensor:
        """(N, T - 1) bool: the prediction at position t (of token t + 1) counts."""
        before, after = self.role[:, :-1], self.role[:, 1:]
        return (before != BOS) & (before != PAD) & (after != PAD)


def first_unused_document(reader: StoreReader) -> int:
    """Index of the first document no stored row (and no regenerated batch) came from."""
    last_chunk = reader.n_chunks - 1
    last_stored = int(np.max(reader.read_chunk("doc", last_chunk))) if last_chunk >= 0 else -1
    cursor = (reader.manifest.get("cursor") or {}).get("batch") or {}
    return max(last_stored, int(cursor.get("doc", -1))) + 1


def heldout_sequences(cfg: ExperimentConfig, lm: LanguageModel, reader: StoreReader, n: int) -> EvalSequences:
    """Up to n sequences of held-out text, else of the held-out chunks' tokens (see module doc)."""
    spec = window_spec(cfg, lm)
    start = first_unused_document(reader)
    documents = encoded_documents(iter_documents(cfg.dataset, start=start), lm.encode, first=start)
    windows = list(islice(iter_windows(documents, spec, WindowCursor(start, 0)), n))
    if windows:
        return _stack(windows, HELDOUT_TEXT, start)
    documents = _heldout_row_documents(reader, cfg.loader.heldout_chunks, lm.eos_id)
    windows = list(islice(iter_windows(documents, spec, WindowCursor(documents[0][0], 0)), n)) if documents else []
    if not windows:
        raise ValueError("no held-out text and no held-out token rows to evaluate the language model on")
    return _stack(windows, HELDOUT_STORE_ROWS, None)


def _heldout_row_documents(reader: StoreReader, heldout_chunks: int, eos_id: int | None) -> list[tuple[int, list[int]]]:
    """(doc, ids) per document of the held-out chunks' rows, without BOS/pad/trailing EOS rows."""
    ranges = reader.split_ranges("heldout", heldout_chunks)
    columns = {name: np.concatenate([np.asarray(reader.read_rows(name, r.start, r.stop)) for r in ranges])
               for name in ("tokens", "doc", "pos")}
    keep = columns["pos"] >= 0  # POS_BOS = -1, POS_PAD = -2
    tokens, docs = columns["tokens"][keep], columns["doc"][keep]
    documents = []
    for doc in _ordered_unique(docs):
        ids = tokens[docs == doc].astype(np.int64).tolist()
        if eos_id is not None and ids and ids[-1] == eos_id:
            ids = ids[:-1]  # windowing appends the EOS again
        if ids:
            documents.append((int(doc), ids))
    return documents


def _ordered_unique(values: np.ndarray) -> Iterator[int]:
    _, first = np.unique(values, return_index=True)
    return (int(values[i]) for i in sorted(first))


def _stack(windows: list, source: str, first_doc: int | None) -> EvalSequences:
    tokens = torch.from_numpy(np.stack([w.tokens for w in windows])).long()
    role = torch.from_numpy(np.stack([w.role for w in windows]))
    return EvalSequences(tokens, role, source, first_doc)
