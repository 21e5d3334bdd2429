"""Kills at every point of a commit, alone and chained, end in the uninterrupted run's store.

Each killed run is a fork of the test process (the model is loaded once) that SIGKILLs itself
where store.writer's KILL_AT_ENV hook says: at a commit phase, the n-th time it is reached. No
timing decides where a kill lands. After the kills, generate runs to completion in-process and
the store must equal the reference run's bitwise, manifest included.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import numpy as np
import pytest
import tqdm

from pipeline.generate.stage import generate
from store.format import read_manifest
from store.reader import StoreReader
from store.validate import compare_stores, validate_store
from store.writer import COMMIT_PHASES, KILL_AT_ENV
from tests.generate.corpus import make_config

N_CHUNKS = 47  # commits of the reference run (3000 rows in chunks of 64)


@pytest.fixture(autouse=True)
def no_tqdm_monitor():
    """No tqdm monitor thread may hold tqdm's lock when the test forks."""
    tqdm.tqdm.monitor_interval = 0
    if tqdm.tqdm.monitor is not None:
        tqdm.tqdm.monitor.exit()
        tqdm.tqdm.monitor = None


def run_killed(cfg, lm, kill_at: str) -> int | None:
    """generate(cfg) in a forked child killed at `kill_at`; returns the chunks it left committed
    (None: it left no store at the path)."""
    pid = os.fork()
    if pid == 0:  # the child never returns into pytest
        code = 1
        try:
            os.environ[KILL_AT_ENV] = kill_at
            generate(cfg, lm=lm)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, f"{kill_at} was never reached ({status})"
    return read_manifest(cfg.generate.store)["n_chunks"] if Path(cfg.generate.store).exists() else None


def complete_and_compare(cfg, lm, reference: Path) -> None:
    result = generate(cfg, lm=lm)
    assert result.n_rows == 3000
    store = cfg.generate.store
    assert validate_store(store) == []
    reader = StoreReader(store)
    pairs = set(zip(reader.read_rows("doc", 0, 3000).tolist(), reader.read_rows("pos", 0, 3000).tolist()))
    assert len(pairs) == 3000, "rows lost or duplicated (by (doc, pos))"
    assert compare_stores(reference, store) == []


SINGLE_KILLS = [f"{phase}:10" for phase in COMMIT_PHASES if phase != "arrays_trimmed"] + [
    f"commit_started:{N_CHUNKS}", f"stats_written:{N_CHUNKS}", "arrays_trimmed:1", f"manifest_written:{N_CHUNKS}",
]


@pytest.mark.parametrize("kill_at", SINGLE_KILLS)
def test_one_kill_anywhere_in_a_commit_resumes_bitwise(tmp_path, corpus, lm, reference, kill_at):
    cfg = make_config(tmp_path / "store.zarr", corpus)
    run_killed(cfg, lm, kill_at)
    complete_and_compare(cfg, lm, reference)


def test_a_kill_while_the_store_is_created_leaves_nothing_half_made(tmp_path, corpus, lm, reference):
    cfg = make_config(tmp_path / "store.zarr", corpus)
    assert run_killed(cfg, lm, "store_created:1") is None  # built beside the path, never renamed into it

    def half_made():
        return [path.name for path in tmp_path.iterdir() if path.name.startswith(".store.zarr.creating-")]

    assert half_made()
    complete_and_compare(cfg, lm, reference)  # the rerun creates the store afresh
    assert not half_made()


@pytest.mark.parametrize("kills", [
    ("manifest_written:30", "manifest_written:1"),  # the first commit of a resume, inside its batch
    ("manifest_written:30", "manifest_written:1", "manifest_written:1"),
    ("data_written:12", "checksums_written:1", "stats_written:2", "acts_written:1"),
    ("manifest_written:40", "arrays_trimmed:1"),
])
def test_chained_kills_resume_bitwise(tmp_path, corpus, lm, reference, kills):
    cfg = make_config(tmp_path / "store.zarr", corpus)
    for kill_at in kills:
        run_killed(cfg, lm, kill_at)
    complete_and_compare(cfg, lm, reference)


def test_a_seeded_random_kill_campaign_resumes_bitwise(tmp_path, corpus, lm, reference):
    rng = np.random.default_rng(2026)
    cfg = make_config(tmp_path / "store.zarr", corpus)
    committed, campaign = 0, []
    for _ in range(4):
        left = N_CHUNKS - committed  # commits a run still makes (it dies at or before the last)
        phase = str(rng.choice([p for p in COMMIT_PHASES if p != "arrays_trimmed"]))
        kill_at = f"{phase}:{int(rng.integers(1, max(2, left // 2)))}"
        campaign.append(kill_at)
        committed = run_killed(cfg, lm, kill_at)
    complete_and_compare(cfg, lm, reference)
