"""`saeflow generate` under torchrun with 2 CPU processes (gloo): the merged store holds exactly
the rows one process writes, a kill of the ranks (while writing parts, or while merging them)
is recovered by rerunning the command, and an unrelated writer is still refused."""

from __future__ import annotations

import subprocess
import sys

import pytest

from store.format import read_manifest
from store.validate import compare_stores, validate_store
from tests.generate.test_generate import HOLD_LOCK, ROOT
from tests.test_cli import REPO, saeflow
from tests.train.test_distributed import torchrun

MERGE_KEYS = ("created", "updated", "merged_from_ranks")  # what a 2-rank store adds or dates differently


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    work = tmp_path_factory.mktemp("generate-ranks")
    (work / "tiny.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text())
    saeflow("generate", "tiny.yaml", "--set", "generate.store=one.zarr", cwd=work)
    return work


def parts_left(work, name: str) -> list[str]:
    return sorted(path.name for path in work.iterdir() if path.name.startswith(f"{name}.rank-") and path.is_dir())


def test_two_rank_generate_writes_the_rows_of_one_process(work):
    torchrun("generate", "tiny.yaml", "--set", "generate.store=two.zarr", cwd=work)
    assert validate_store(work / "two.zarr") == []
    assert read_manifest(work / "two.zarr")["merged_from_ranks"] == 2
    # same rows, same order: activations, tokens/doc/pos, checksums, statistics
    assert compare_stores(work / "one.zarr", work / "two.zarr", ignore=MERGE_KEYS) == []
    assert parts_left(work, "two.zarr") == []


@pytest.mark.parametrize("kills", [["manifest_written:2", "manifest_written:12"]], ids=["in-parts-then-in-merge"])
def test_killed_ranks_resume_to_the_same_store(work, kills):
    args = ("generate", "tiny.yaml", "--set", "generate.store=killed.zarr")
    for kill in kills:  # every rank carries the kill point: each dies at its n-th commit (or torchrun stops it)
        result = torchrun(*args, cwd=work, check=False, env_extra={"SAEFLOW_KILL_AT": kill})
        assert result.returncode != 0
    assert parts_left(work, "killed.zarr") == ["killed.zarr.rank-0-of-2", "killed.zarr.rank-1-of-2"]
    merging = read_manifest(work / "killed.zarr")  # the last kill came in the merge: a store half merged
    assert merging["merged_from_ranks"] == 2 and not merging["complete"] and merging["n_chunks"] > 0
    torchrun(*args, cwd=work)
    assert compare_stores(work / "one.zarr", work / "killed.zarr", ignore=MERGE_KEYS) == []
    assert parts_left(work, "killed.zarr") == []


def test_an_unrelated_writer_of_the_store_is_refused(work):
    store = work / "held.zarr"
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK.format(root=str(ROOT), store=str(store))],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        result = torchrun("generate", "tiny.yaml", "--set", f"generate.store={store.name}", cwd=work, check=False)
        assert result.returncode != 0 and f"is being written by process {holder.pid}" in result.stderr
        assert not store.exists() and parts_left(work, "held.zarr") == []
    finally:
        holder.kill()
        holder.wait()
