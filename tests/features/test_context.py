"""An example's context is the run of stored rows of its LM window: checked against the windows
generate itself cuts (pipeline.generate.stage.window_batches), for each way windows can be cut
and special tokens dropped, on real stores of the tiny model."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.config import load_config
from pipeline.generate.lm import load_language_model
from pipeline.generate.stage import generate, window_batches, window_spec
from pipeline.generate.windows import BOS, PAD
from pipeline.features.context import WindowLayout, context_bounds
from store.reader import StoreReader
from tests.features.conftest import TINY

WIDTH = 5


@pytest.fixture(scope="module")
def lm():
    return load_language_model(load_config(TINY).model)


def lm_windows(cfg, lm, n_rows: int) -> tuple[dict, np.ndarray]:
    """{(doc, pos): (window, slot)} of every text/EOS position, and the windows' roles, for the
    windows generate cuts (enough of them to hold n_rows stored rows)."""
    where, roles, kept = {}, [], 0
    for batch in window_batches(cfg, lm, window_spec(cfg, lm)):
        for doc, pos, role in zip(batch.doc, batch.pos, batch.role):
            for slot, key in enumerate(zip(doc.tolist(), pos.tolist())):
                if key[1] >= 0:
                    where[key] = (len(roles), slot)
            roles.append(role)
        kept += batch.kept(cfg.generate.drop_special_tokens).size
        if kept >= n_rows:
            return where, np.stack(roles)
    return where, np.stack(roles)


@pytest.mark.parametrize("pack, drop", [
    (True, ["bos", "pad"]),  # the default: a dropped BOS starts every window
    (True, ["bos", "eos", "pad"]),  # EOS rows dropped too: a row's stream index is no longer its row index
    (True, ["pad"]),  # BOS rows stored
    (False, ["bos", "eos", "pad"]),  # one document per window, padded
    (False, ["bos", "pad"]),
])
def test_contexts_are_the_runs_of_rows_of_their_lm_window(tmp_path, lm, pack, drop):
    cfg = load_config(TINY, [f"generate.store={tmp_path / 's.zarr'}", f"generate.pack={str(pack).lower()}",
                             f"generate.drop_special_tokens={drop}", "generate.target_tokens=3000", "generate.chunk_rows=512"])
    generate(cfg, lm=lm)
    reader = StoreReader(cfg.generate.store)
    layout = WindowLayout.of(reader.manifest)
    rows = np.arange(reader.n_rows)
    bounds, columns = context_bounds(layout, reader, rows, WIDTH)
    doc, pos = columns["doc", rows], columns["pos", rows]
    where, roles = lm_windows(cfg, lm, reader.n_rows)
    # a stored BOS row (pos -1) belongs to the window of the row after it
    window = np.array([where[(d, p)][0] if p >= 0 else -1 for d, p in zip(doc, pos)])
    for r in range(len(window) - 2, -1, -1):
        if window[r] < 0:
            window[r] = window[r + 1]
    slot = np.array([where[(d, p)][1] if p >= 0 else 0 for d, p in zip(doc, pos)])
    first_of = {w: int(np.flatnonzero(window == w)[0]) for w in np.unique(window)}
    last_of = {w: int(np.flatnonzero(window == w)[-1]) for w in np.unique(window)}
    padded = [False, False]
    for r in rows:
        first, stop, w = int(bounds.first[r]), int(bounds.stop[r]), window[r]
        assert (window[first:stop] == w).all()  # never a row of another window
        assert first == max(r - WIDTH, first_of[w]) and stop - 1 == min(r + WIDTH, last_of[w])  # as wide as the window allows
        bos_dropped = "bos" in drop and roles[w][0] == BOS
        assert (bounds.before[r] == "bos") == (bos_dropped and first == first_of[w]), r
        if bounds.before[r]:
            assert slot[first] == 1
        pad_dropped = "pad" in drop and (roles[w] == PAD).any()
        reaches_end = stop - 1 == last_of[w] < reader.n_rows - 1  # the store's last window may go on unstored
        assert (bounds.after[r] == "pad") == (pad_dropped and reaches_end), r
        padded[bounds.after[r] == "pad"] = True
    if not pack:
        assert padded == [True, True]  # some windows are padded, some are not
    assert any(b == "bos" for b in bounds.before) == ("bos" in drop)
