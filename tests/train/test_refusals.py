"""A run folder that was interrupted, moved or tampered with: train resumes it to the result of
an uninterrupted run, or stops in one line (exit 2) and touches nothing already written. And a
store that generate has not finished is refused unless --allow-incomplete."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from store.writer import KILL_AT_ENV
from tests.processes import file_size_limit
from tests.test_cli import REPO, invoke_saeflow, one_error_line, run_saeflow

CHECKPOINT = "sae/checkpoints/step-000000004"  # the one checkpoint of the 8-step run below


def write_config(path: Path, store: Path, out_dir: Path, **train) -> Path:
    """configs/tiny.yaml on `store` into `out_dir`: 8 steps, a checkpoint after step 4, log lines
    every 3 steps (a resume starts inside a log window)."""
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["generate"]["store"], data["train"]["out_dir"] = str(store), str(out_dir)
    data["train"].update(total_tokens=2048, checkpoint_every_tokens=1024, log_every_steps=3, **train)
    data["evaluate"]["lm_eval_sequences"] = 0
    path.write_text(json.dumps(data))
    return path


@pytest.fixture(scope="module")
def finished(store, tmp_path_factory) -> Path:
    """An uninterrupted run (its folder)."""
    root = tmp_path_factory.mktemp("finished")
    assert invoke_saeflow("train", str(write_config(root / "tiny.yaml", store, root / "run"))).exit_code == 0
    return root / "run"


def interrupted_copy(finished: Path, run: Path) -> Path:
    """The finished run as a kill after its checkpoint (and its log line of step 6) leaves it:
    checkpoints, run.json and the log; nothing of the end of training."""
    shutil.copytree(finished, run)
    for path in (run / "sae").iterdir():
        if path.name not in ("checkpoints", "run.json", "train_log.jsonl"):
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    return run


def files(run: Path) -> dict[Path, bytes]:
    return {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}


def log_records(run: Path) -> list[dict]:
    """train_log.jsonl without its one wall-clock field (tokens_per_second)."""
    lines = (run / "sae" / "train_log.jsonl").read_text().splitlines()
    return [{key: value for key, value in json.loads(line).items() if key != "tokens_per_second"} for line in lines]


def _tear_log(run: Path) -> None:
    with (run / "sae" / "train_log.jsonl").open("a") as handle:
        handle.write('{"step": 7, "tokens": 17')  # a crash mid-append


def _leave_temporaries(run: Path) -> None:
    half_saved = run / "sae" / "checkpoints" / ".step-000000008.k2j4x9.tmp"  # a kill inside a checkpoint save
    half_saved.mkdir()
    (half_saved / "state.safetensors").write_bytes(b"\0" * 100)
    (run / "sae" / ".sae.safetensors.4242-0badf00d.tmp").write_bytes(b"\0" * 100)  # a kill inside save_sae


# Interrupted runs whose rerun must finish equal to the uninterrupted one: weights, log, curves.
INTERRUPTIONS = {
    "killed after a checkpoint": lambda run: None,
    "log line torn by the kill": _tear_log,
    "kill inside a save": _leave_temporaries,
    "run folder and store moved": lambda run: None,  # the config below points at the new places
}


@pytest.mark.parametrize("case", sorted(INTERRUPTIONS))
def test_an_interrupted_run_resumes_to_the_uninterrupted_result(store, finished, tmp_path, case):
    run = interrupted_copy(finished, tmp_path / "run")
    INTERRUPTIONS[case](run)
    if case == "run folder and store moved":
        shutil.copytree(store, tmp_path / "moved.zarr")
        store = tmp_path / "moved.zarr"
    result = invoke_saeflow("train", str(write_config(tmp_path / "tiny.yaml", store, run)))
    assert result.exit_code == 0 and "resuming from the checkpoints of step 4 of 8" in result.stderr, result.output
    for key, value in load_file(str(finished / "sae" / "sae.safetensors")).items():
        assert torch.equal(load_file(str(run / "sae" / "sae.safetensors"))[key], value), key
    assert log_records(run) == log_records(finished)
    assert [record["step"] for record in log_records(run)] == [3, 6, 8]  # every 3 steps, and the last
    assert (run / "sae" / "curves.csv").read_bytes() == (finished / "sae" / "curves.csv").read_bytes()
    assert not [path for path in run.rglob(".*") if path.name.endswith(".tmp")]


def _edit_tensors(name: str, change):
    def edit(checkpoint: Path) -> None:
        tensors = load_file(str(checkpoint / "state.safetensors"))
        tensors[name] = change(tensors[name])
        save_file(tensors, str(checkpoint / "state.safetensors"))

    return edit


def _edit_info(**changes):
    def edit(checkpoint: Path) -> None:
        info = json.loads((checkpoint / "state.json").read_text())
        info.update(changes)
        (checkpoint / "state.json").write_text(json.dumps(info))

    return edit


# A checkpoint tampered with or damaged: refused in one line, not resumed from (issue 21 saw an
# int32 cast and a step of 10^9 resume, and train_metrics report 1000000008 steps).
DAMAGED_CHECKPOINTS = {
    "weights cast to int32": (_edit_tensors("model.W_dec", lambda t: t.to(torch.int32)),
                              "W_dec is int32 (256, 64), not float32 (256, 64)"),
    "Adam state cast to float16": (_edit_tensors("optim.0.exp_avg", lambda t: t.half()),
                                   "optim.0.exp_avg is float16 (64, 256), not float32 (64, 256)"),
    "step set to 10^9": (_edit_info(step=10**9), "it says step 1000000000 and 1024 tokens; a checkpoint of step 4 "
                                                 "of this run's 8 steps has 1024 tokens"),
    "state.json not JSON": (lambda c: (c / "state.json").write_text("{"), "state.json is unreadable"),
    "state.safetensors truncated": (lambda c: (c / "state.safetensors").write_bytes(b"\x10\0\0\0"),
                                    "state.safetensors is unreadable"),
}


@pytest.mark.parametrize("case", sorted(DAMAGED_CHECKPOINTS))
def test_a_damaged_checkpoint_is_refused_in_one_line(store, finished, tmp_path, case):
    run = interrupted_copy(finished, tmp_path / "run")
    damage, problem = DAMAGED_CHECKPOINTS[case]
    damage(run / CHECKPOINT)
    written = files(run)
    line = one_error_line("train", str(write_config(tmp_path / "tiny.yaml", store, run)))
    assert line.startswith(f"error: checkpoint {run / CHECKPOINT} is damaged ({problem}"), line
    assert line.endswith(f"); delete it to resume from the one before, or delete {run / 'sae' / 'checkpoints'} to start over")
    assert files(run) == written


# Disk full during train, as a file-size limit makes it (EFBIG): one line naming the file, the
# files already saved intact, no temp file left; a rerun with room finishes the run.
DISK_FULL = {
    "at the first checkpoint": (False, 300_000, "sae/checkpoints/step-000000004"),  # a checkpoint is ~400 KB
    "at the final SAE": (True, 100_000, "sae/sae.safetensors"),  # an SAE is ~130 KB, plots < 50 KB
}


@pytest.mark.parametrize("case", sorted(DISK_FULL))
def test_disk_full_during_train_is_one_line_and_resumable(store, finished, tmp_path, case):
    resumed, limit, failing = DISK_FULL[case]
    run = interrupted_copy(finished, tmp_path / "run") if resumed else tmp_path / "run"
    written = {path: data for path, data in files(run).items() if path.name not in ("run.json", "train_log.jsonl")
               } if resumed else {}  # a resume rewrites these two first
    config = write_config(tmp_path / "tiny.yaml", store, run)
    result = run_saeflow("train", str(config), preexec_fn=file_size_limit(limit))
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2 and lines[-1].startswith(f"error: could not write {run / failing} ("), result.stderr
    assert "File too large" in lines[-1] and "Traceback" not in result.stderr
    assert not [line for line in lines[:-1] if line.startswith("error")]
    assert not [path for path in run.rglob(".*") if path.name.endswith(".tmp")]
    assert {path: data for path, data in files(run).items() if path in written} == written
    assert invoke_saeflow("train", str(config)).exit_code == 0
    assert torch.equal(load_file(str(run / "sae" / "sae.safetensors"))["W_dec"],
                       load_file(str(finished / "sae" / "sae.safetensors"))["W_dec"])


def test_a_store_generate_has_not_finished_needs_allow_incomplete(finished, tmp_path, monkeypatch):
    store = tmp_path / "unfinished.zarr"
    config = write_config(tmp_path / "tiny.yaml", store, tmp_path / "run")
    monkeypatch.setenv(KILL_AT_ENV, "manifest_written:6")  # generate killed after 6 of 16 chunks
    assert run_saeflow("generate", str(config)).returncode == -9
    monkeypatch.delenv(KILL_AT_ENV)
    refused = ("is not complete (3,072 of 8,192 rows written: generate is still writing it or was stopped); rerun "
               "`saeflow generate` to finish it, or pass --allow-incomplete to use the rows it has")
    for command in ("train", "evaluate"):
        assert one_error_line(command, str(config)) == f"error: store {store} {refused}"
    assert not (tmp_path / "run").exists()
    for command in ("train", "evaluate"):
        result = invoke_saeflow(command, str(config), "--allow-incomplete")
        assert result.exit_code == 0, result.output
        assert f"store {store} is not complete: using the 3,072 of 8,192 rows it has (--allow-incomplete)" in result.stderr
    assert json.loads((tmp_path / "run" / "sae" / "run.json").read_text())["store"]["n_rows"] == 3072
    assert os.path.exists(tmp_path / "run" / "metrics.json")
    # the same config on this store is another run: a checkpoint made on the complete store is refused
    interrupted = interrupted_copy(finished, tmp_path / "interrupted")
    written = files(interrupted)
    line = one_error_line("train", str(write_config(tmp_path / "other.yaml", store, interrupted)), "--allow-incomplete")
    assert "holds a checkpoint of a different config (changed: the store (its identity)); choose another" in line
    assert files(interrupted) == written


@pytest.mark.parametrize("case", ["pickle named sae.safetensors", "weights cast to int32", "extra key in config.json"])
def test_evaluate_refuses_a_damaged_saved_sae_in_one_line(store, finished, tmp_path, case):
    from tests.sae.test_io import DAMAGED_SAES

    run = tmp_path / "run"
    shutil.copytree(finished, run)
    DAMAGED_SAES[case][0](run / "sae")
    written = files(run)
    line = one_error_line("evaluate", str(write_config(tmp_path / "tiny.yaml", store, run)))
    assert str(run / "sae") in line and line.endswith(f"retrain the SAE or restore {run / 'sae'} from a copy"), line
    assert files(run) == written
