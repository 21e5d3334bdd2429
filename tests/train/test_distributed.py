"""Training under torchrun with 2 CPU processes (gloo): data-parallel (DDP) training agrees with
one rank, a killed 2-rank run resumes bitwise, and a sweep spread over ranks trains every
variant exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.test_cli import REPO, run_saeflow, saeflow

CHECKPOINTS = ["--set", "train.checkpoint_every_tokens=2048"]


def torchrun(*args: str, cwd: Path, nproc: int = 2, wait: bool = True, check: bool = True, env_extra: dict | None = None):
    """`torchrun --standalone --nproc_per_node N -m pipeline.cli ARGS` (the README's command)."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               "-m", "pipeline.cli", *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **(env_extra or {})}
    if not wait:
        return subprocess.Popen(command, cwd=cwd, env=env, start_new_session=True,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 or not check, result.stderr[-4000:]
    return result


def kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant at once (torchrun's workers leave its process group)."""
    tree, todo = [], [pid]
    while todo:
        parent = todo.pop()
        tree.append(parent)
        for task in Path(f"/proc/{parent}/task").glob("*"):
            todo += [int(child) for child in (task / "children").read_text().split()]
    for member in tree:
        try:
            os.kill(member, signal.SIGKILL)
        except ProcessLookupError:
            pass


def run_json(out: Path, variant: str = "sae") -> dict:
    return json.loads((out / variant / "run.json").read_text())


def heldout_fvu(out: Path, variant: str = "sae") -> float:
    return json.loads((out / variant / "train_metrics.json").read_text())["heldout"]["fvu"]


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("ranks")
    (work / "tiny.yaml").write_text((REPO / "configs" / "tiny.yaml").read_text())
    saeflow("generate", "tiny.yaml", cwd=work)
    saeflow("train", "tiny.yaml", "--set", "train.out_dir=one", cwd=work)
    return work


@pytest.fixture(scope="module")
def two_ranks(work) -> Path:
    torchrun("train", "tiny.yaml", "--set", "train.out_dir=two", *CHECKPOINTS, cwd=work)
    return work / "two"


def test_two_rank_ddp_training_agrees_with_one_rank(work, two_ranks):
    assert run_json(two_ranks)["ranks"] == {"world_size": 2, "distribute": "data"}  # ranks ended with equal weights
    one, two = heldout_fvu(work / "one"), heldout_fvu(two_ranks)
    assert abs(two - one) <= 0.05 * one, (one, two)
    logs = [[json.loads(line) for line in (out / "sae" / "train_log.jsonl").read_text().splitlines()]
            for out in (work / "one", two_ranks)]
    assert [r["tokens"] for r in logs[0]] == [r["tokens"] for r in logs[1]]  # tokens count every rank's rows
    assert all(abs(a["fvu"] - b["fvu"]) < 0.05 for a, b in zip(*logs))  # the log's metrics cover every rank


def test_a_killed_two_rank_run_resumes_bitwise(work, two_ranks):
    out = work / "killed"
    args = ("train", "tiny.yaml", "--set", f"train.out_dir={out.name}", *CHECKPOINTS)
    process = torchrun(*args, cwd=work, wait=False)
    checkpoints = out / "sae" / "checkpoints"
    deadline = time.monotonic() + 300
    while not (checkpoints.is_dir() and any(checkpoints.glob("step-*"))):
        assert process.poll() is None and time.monotonic() < deadline, "no checkpoint before the run ended"
        time.sleep(0.05)
    kill_tree(process.pid)  # the launcher and every rank, at once
    process.wait()
    assert not (out / "sae" / "sae.safetensors").exists()

    refused = run_saeflow(*args, cwd=work)  # one process cannot take over a 2-rank checkpoint
    assert refused.returncode != 0 and "torchrun --nproc_per_node 2" in refused.stderr.strip().splitlines()[-1]
    torchrun(*args, cwd=work)
    assert run_json(out)["resumed_from_step"] > 0
    assert (out / "sae" / "sae.safetensors").read_bytes() == (two_ranks / "sae" / "sae.safetensors").read_bytes()


def test_a_sweep_spread_over_ranks_trains_every_variant_once(work):
    sweep = "train.sweep=[{sae.top_k: 4, name: k4}, {sae.top_k: 8, name: k8}, {sae.top_k: 16, name: k16}]"
    torchrun("train", "tiny.yaml", "--set", "train.out_dir=sweep", "--set", "train.distribute=variants", "--set", sweep,
             cwd=work)
    by_rank = {name: run_json(work / "sweep", name)["ranks"]["trained_by_rank"] for name in ("k4", "k8", "k16")}
    assert sorted(by_rank.values()) == [0, 0, 1], by_rank  # 3 variants over 2 ranks, each exactly once
    for name in by_rank:
        steps = [json.loads(line)["step"] for line in (work / "sweep" / name / "train_log.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)), name  # one writer per variant
    # a variant trained on its own rank sees the batches of a one-process run: the same SAE
    assert (work / "sweep" / "k8" / "sae.safetensors").read_bytes() == (work / "one" / "sae" / "sae.safetensors").read_bytes()
    # rank 0 compares the sweep once every rank finished its variants, rank 1's k8 included
    points = json.loads((work / "sweep" / "sweep" / "fvu_vs_l0.json").read_text())["points"]
    assert [point["label"] for point in points] == ["k4", "k8", "k16"]
