"""The context of an example row: the neighbouring store rows of the same LM window.

Rows are stored in window order minus the dropped roles (store/FORMAT.md, "Windows"), so the
window a row came from follows from the manifest's windowing settings:
- pack: the stream is every document's ids then EOS; window w holds stream tokens
  [w * body, (w + 1) * body) after its BOS slot. A row's stream index is its row index, plus one
  per document before it when EOS rows were dropped (each document ended with one), less one per
  window when BOS rows were stored (then windows are simply context_size rows, unless EOS rows
  were dropped too: not derivable, so contexts fall back to the document).
- one document per window (pack false): the window is the document; slot = pos + BOS slot.
A context is the rows within +-W of the example in its window. "bos" before it marks the
window's BOS when it was dropped and the context reaches the window's start; "pad" after it the
padding dropped after the window's last token; neither has an activation in the store.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from store.reader import StoreReader

COLUMNS = ("tokens", "doc", "pos")


@dataclass(frozen=True)
class WindowLayout:
    context_size: int | None  # None: the manifest does not say how windows were cut
    prepend_bos: bool
    pack: bool
    dropped: frozenset[str]
    has_eos: bool
    exhausted: bool  # the data ran out: the store's last window is padded

    @classmethod
    def of(cls, manifest: dict) -> WindowLayout:
        eos = (manifest.get("special_token_ids") or {}).get("eos")
        exhausted = bool(manifest.get("complete")) and manifest.get("n_rows", 0) < (manifest.get("target_rows") or 0)
        return cls(manifest.get("context_size"), bool(manifest.get("prepend_bos")), bool(manifest.get("pack", True)),
                   frozenset(manifest.get("dropped_special_tokens") or ()), eos is not None, exhausted)

    @property
    def bos_dropped(self) -> bool:
        return self.prepend_bos and "bos" in self.dropped

    def windows(self, rows: np.ndarray, doc: np.ndarray, pos: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
        """(window id, slot in the window) of each row, or None where the store cannot say."""
        if self.context_size is None:
            return None
        if not self.pack:
            return doc, np.where(pos >= 0, pos + self.prepend_bos, 0)
        eos_dropped = "eos" in self.dropped and self.has_eos
        if self.prepend_bos and not self.bos_dropped:  # a BOS row starts every window
            if eos_dropped:
                return None
            return rows // self.context_size, rows % self.context_size
        body = self.context_size - self.prepend_bos
        stream = rows + (doc if eos_dropped else 0)
        return stream // body, stream % body + self.prepend_bos

    def padded_after(self, last_row: int, n_rows: int, slot: int, pos: int) -> bool:
        """Whether dropped padding follows the window whose last stored row is `last_row`."""
        if "pad" not in self.dropped or self.context_size is None:
            return False
        if last_row == n_rows - 1 and not self.exhausted:
            return False  # the store stopped at its target: the window may go on unstored
        if self.pack:
            return last_row == n_rows - 1 and slot < self.context_size - 1
        if pos >= 0 and "eos" in self.dropped and self.has_eos and slot < self.context_size - 1:
            slot += 1  # the document's EOS took a slot
        return slot < self.context_size - 1


class Columns:
    """tokens/doc/pos of some store rows: each chunk holding any is read (verified) once and only
    those rows are kept, so memory follows the examples, not the store."""

    def __init__(self, reader: StoreReader, rows: np.ndarray):
        self.rows = np.unique(rows)
        chunk_rows = reader.chunk_rows
        chunks = np.unique(self.rows // chunk_rows)
        bounds = np.searchsorted(self.rows, np.append(chunks, chunks[-1] + 1) * chunk_rows) if len(chunks) else []
        parts: dict[str, list[np.ndarray]] = {name: [] for name in COLUMNS}
        for chunk, start, stop in zip(chunks, bounds[:-1], bounds[1:]):
            local = self.rows[start:stop] - chunk * chunk_rows
            for name in COLUMNS:
                parts[name].append(np.asarray(reader.read_chunk(name, int(chunk)))[local].astype(np.int64))
        self._data = {name: np.concatenate(parts[name]) if chunks.size else np.zeros(0, dtype=np.int64) for name in COLUMNS}

    def __getitem__(self, key: tuple[str, np.ndarray]) -> np.ndarray:
        name, rows = key
        return self._data[name][np.searchsorted(self.rows, rows)]


@dataclass
class ContextBounds:
    first: np.ndarray  # (E,) first row of each example's context
    stop: np.ndarray  # (E,) one past its last row
    before: list[str | None]  # "bos" or None
    after: list[str | None]  # "pad" or None


def context_bounds(layout: WindowLayout, reader: StoreReader, rows: np.ndarray, width: int) -> tuple[ContextBounds, Columns]:
    """The +-width context of each example row, within its window (or document)."""
    n_rows = reader.n_rows
    offsets = np.arange(-width - 1, width + 2)
    around = rows[:, None] + offsets[None, :]  # one more row each side: does the window go on?
    inside = (around >= 0) & (around < n_rows)
    clipped = np.clip(around, 0, n_rows - 1)
    columns = Columns(reader, clipped)
    doc, pos = columns["doc", clipped], columns["pos", clipped]
    windows = layout.windows(clipped, doc, pos)
    group = doc if windows is None else windows[0]
    centre = width + 1
    same = inside & (group == group[:, centre : centre + 1])
    # windows are runs of rows, so a context is the run of `same` around the centre
    left = np.cumprod(same[:, centre - 1 :: -1], 1).sum(1)
    right = np.cumprod(same[:, centre + 1 :], 1).sum(1)
    first_index, last_index = centre - np.minimum(left, width), centre + np.minimum(right, width)
    starts, ends = left <= width, right <= width  # the run stops inside the one-row margin
    before, after = [], []
    slot = None if windows is None else windows[1]
    for e in range(len(rows)):
        f, l = first_index[e], last_index[e]
        bos = windows is not None and layout.bos_dropped and starts[e] and slot[e, f] == 1
        before.append("bos" if bos else None)
        pad = windows is not None and ends[e] and layout.padded_after(int(clipped[e, l]), n_rows, int(slot[e, l]), int(pos[e, l]))
        after.append("pad" if pad else None)
    return ContextBounds(rows + first_index - centre, rows + last_index - centre + 1, before, after), columns
