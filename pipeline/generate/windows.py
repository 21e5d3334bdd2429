"""Documents -> fixed-length token windows -> batches, with every position traced to its text.

pack=True: the token stream is every document's ids followed by EOS (when the model has one);
each window is [BOS] (if prepend_bos) + the next context_size - 1 (or context_size) stream tokens,
so documents are split across windows and no token is lost. Data running out leaves a last,
partial window, padded (attention mask 0 on the pads).
pack=False: one document per window: [BOS] + ids + [EOS], truncated to context_size (a truncated
document loses its tail and its EOS), then padded.

Every position carries doc (document index in iter_documents order) and pos (index into that
document's ids; EOS = len(ids); BOS = -1; PAD = -2) and a role (text/bos/eos/pad) by which
special tokens are dropped: roles, not ids, because a tokenizer may use one id for several roles.

A WindowCursor (doc, offset) names the first stream token of a window: document `doc`, skipping
`offset` tokens of its stream. Windows and batches are a deterministic function of the cursor
they start from, which is what makes resume exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np

TEXT, BOS, EOS, PAD = 0, 1, 2, 3
ROLE_CODES = {"bos": BOS, "eos": EOS, "pad": PAD}
POS_BOS, POS_PAD = -1, -2
_ENCODE_DOCS = 64  # documents tokenized per call (fast tokenizers batch in Rust)


@dataclass(frozen=True)
class WindowCursor:
    doc: int = 0
    offset: int = 0


@dataclass(frozen=True)
class WindowSpec:
    context_size: int
    prepend_bos: bool
    pack: bool
    bos_id: int | None
    eos_id: int | None
    pad_id: int | None

    @property
    def body(self) -> int:
        """Stream tokens per window (the context minus the BOS slot)."""
        return self.context_size - (1 if self.prepend_bos else 0)


@dataclass
class Batch:
    index: int  # batch number from the start of the dataset
    start: WindowCursor  # cursor of its first window
    tokens: np.ndarray  # (B, T) int64
    doc: np.ndarray  # (B, T) int64
    pos: np.ndarray  # (B, T) int32
    role: np.ndarray  # (B, T) int8
    attention_mask: np.ndarray | None  # (B, T) int64, None when no position is padding

    def cursor(self) -> dict:
        return {"batch": self.index, "doc": self.start.doc, "offset": self.start.offset}

    def kept(self, drop: Iterable[str]) -> np.ndarray:
        """Flat (row-major) indices of the positions whose role is not in `drop` ("bos", ...)."""
        return np.flatnonzero(~np.isin(self.role, [ROLE_CODES[name] for name in drop]).reshape(-1))


@dataclass
class _Window:
    start: WindowCursor
    tokens: np.ndarray
    doc: np.ndarray
    pos: np.ndarray
    role: np.ndarray


def encoded_documents(
    texts: Iterable[str], encode: Callable[[list[str]], list[list[int]]], first: int = 0
) -> Iterator[tuple[int, list[int]]]:
    """(document index, ids) for each text, tokenized a few dozen at a time."""
    index = first
    group: list[str] = []
    for text in texts:
        group.append(text)
        if len(group) == _ENCODE_DOCS:
            for ids in encode(group):
                yield index, ids
                index += 1
            group = []
    for ids in encode(group) if group else []:
        yield index, ids
        index += 1


def iter_windows(documents: Iterable[tuple[int, list[int]]], spec: WindowSpec, start: WindowCursor) -> Iterator[_Window]:
    """Windows from `documents` (which must begin at document start.doc)."""
    if spec.pack:
        return _packed(documents, spec, start)
    if start.offset:
        raise ValueError(f"a pad-mode cursor starts at a document boundary, got offset {start.offset}")
    return _padded(documents, spec)


def iter_batches(windows: Iterable[_Window], batch_size: int, first_index: int = 0) -> Iterator[Batch]:
    index, group = first_index, []
    for window in windows:
        group.append(window)
        if len(group) == batch_size:
            yield _stack(group, index)
            index, group = index + 1, []
    if group:
        yield _stack(group, index)


def _stream(doc: int, ids: list[int], spec: WindowSpec) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One document's stream: ids then EOS, with doc, pos and role per token."""
    n = len(ids) + (spec.eos_id is not None)
    tokens = np.empty(n, dtype=np.int64)
    tokens[: len(ids)] = ids
    role = np.zeros(n, dtype=np.int8)
    if spec.eos_id is not None:
        tokens[-1] = spec.eos_id
        role[-1] = EOS
    return tokens, np.full(n, doc, dtype=np.int64), np.arange(n, dtype=np.int32), role


def _packed(documents, spec: WindowSpec, start: WindowCursor) -> Iterator[_Window]:
    parts: list[tuple[np.ndarray, ...]] = []
    buffered = 0
    for doc, ids in documents:
        if not ids:
            continue  # an empty document contributes nothing, not even an EOS
        stream = _stream(doc, ids, spec)
        if doc == start.doc and start.offset:
            stream = tuple(column[start.offset :] for column in stream)
        parts.append(stream)
        buffered += len(stream[0])
        if buffered < spec.body:
            continue
        tokens, docs, pos, role = (np.concatenate(column) for column in zip(*parts))
        cut = 0
        while buffered - cut >= spec.body:
            yield _window(spec, tokens[cut : cut + spec.body], docs[cut : cut + spec.body], pos[cut : cut + spec.body], role[cut : cut + spec.body])
            cut += spec.body
        parts = [(tokens[cut:], docs[cut:], pos[cut:], role[cut:])] if cut < buffered else []
        buffered -= cut
    if buffered:
        tokens, docs, pos, role = (np.concatenate(column) for column in zip(*parts))
        yield _window(spec, tokens, docs, pos, role)


def _padded(documents, spec: WindowSpec) -> Iterator[_Window]:
    for doc, ids in documents:
        if not ids:
            continue
        tokens, docs, pos, role = _stream(doc, ids, spec)
        keep = spec.body
        yield _window(spec, tokens[:keep], docs[:keep], pos[:keep], role[:keep])


def _window(spec: WindowSpec, tokens, docs, pos, role) -> _Window:
    """Add the BOS slot and pad to context_size."""
    start = WindowCursor(int(docs[0]), int(pos[0]))
    size = spec.context_size
    out_tokens = np.full(size, spec.pad_id if spec.pad_id is not None else 0, dtype=np.int64)
    out_doc = np.full(size, docs[-1], dtype=np.int64)
    out_pos = np.full(size, POS_PAD, dtype=np.int32)
    out_role = np.full(size, PAD, dtype=np.int8)
    at = 0
    if spec.prepend_bos:
        out_tokens[0], out_doc[0], out_pos[0], out_role[0] = spec.bos_id, docs[0], POS_BOS, BOS
        at = 1
    n = len(tokens)
    out_tokens[at : at + n], out_doc[at : at + n], out_pos[at : at + n], out_role[at : at + n] = tokens, docs, pos, role
    return _Window(start, out_tokens, out_doc, out_pos, out_role)


def _stack(windows: list[_Window], index: int) -> Batch:
    role = np.stack([w.role for w in windows])
    padded = bool((role == PAD).any())
    return Batch(
        index=index,
        start=windows[0].start,
        tokens=np.stack([w.tokens for w in windows]),
        doc=np.stack([w.doc for w in windows]),
        pos=np.stack([w.pos for w in windows]),
        role=role,
        attention_mask=(role != PAD).astype(np.int64) if padded else None,
    )
