"""When train_log.jsonl gets a line: every log_every_steps (or log_every_tokens) and the last step."""

import json
import re
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.sae import decode_path
from pipeline.train import aux_k_path
from pipeline.train.checkpoint import checkpoint_path, read_info
from pipeline.train.stage import train

REPO = Path(__file__).resolve().parents[2]


def run(store: Path, out: Path, *overrides: str) -> list[Path]:
    # configs/tiny.yaml: batches of 256 rows; 6144 tokens = 24 steps
    cfg = load_config(REPO / "configs" / "tiny.yaml",
                      [f"generate.store={store}", f"train.out_dir={out}", "train.total_tokens=6144", *overrides])
    return train(cfg)


def logged_steps(run_dir: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_a_sweep_shorter_than_the_log_cadence_logs_its_last_step(store, tmp_path):
    dirs = run(store, tmp_path / "short", "train.log_every_steps=100", "train.sweep=[{sae.top_k: 4}, {sae.top_k: 8}]")
    for directory in dirs:  # what dvc's sweep_train stage lists as outputs
        assert logged_steps(directory) == [24]
        record = json.loads((directory / "train_log.jsonl").read_text())
        assert record["tokens"] == 6144 and 0 < record["fvu"]
        assert len((directory / "curves.csv").read_text().splitlines()) == 2  # header and the one line


def test_the_last_step_closes_the_log_and_log_every_tokens_sets_the_cadence(store, tmp_path):
    (by_steps,) = run(store, tmp_path / "steps", "train.log_every_steps=5")
    assert logged_steps(by_steps) == [5, 10, 15, 20, 24]
    (by_tokens,) = run(store, tmp_path / "tokens", "train.log_every_steps=5", "train.log_every_tokens=1100")
    assert logged_steps(by_tokens) == [4, 8, 12, 16, 20, 24]  # 1100 tokens: 4 whole batches
    with pytest.raises(ConfigError, match=r"train.log_every_tokens=100 is less than one batch") as error:
        run(store, tmp_path / "bad", "train.log_every_tokens=100")
    assert "\n" not in str(error.value)


def test_a_checkpoint_records_the_encoder_kernel_its_steps_used(store, tmp_path):
    (directory,) = run(store, tmp_path / "kernels", "train.checkpoint_every_tokens=2048")
    info = read_info(checkpoint_path(directory / "checkpoints", 8))
    assert info["encoder_kernels"]["256x64->256 float32"] == "matmul"  # too small a problem to time


def test_a_checkpoint_records_the_topk_path_its_steps_timed(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(decode_path, "PROBE_MIN_MACS", 0)  # time the tiny problem (d_sae / k = 32: in the band)
    decode_path.paths.forget()
    try:
        (directory,) = run(store, tmp_path / "paths", "train.checkpoint_every_tokens=2048")
        info = read_info(checkpoint_path(directory / "checkpoints", 8))
        (path,) = info["topk_decode_paths"].values()
        assert info["topk_decode_paths"] == {"cpu float32 64->256 k<=8": path}
        assert f"topk decode for cpu float32 64->256 k<=8: {path} (" in capsys.readouterr().err
    finally:
        decode_path.paths.forget()


def test_a_checkpoint_records_the_aux_k_decodes_its_steps_timed(store, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(aux_k_path, "PROBE_MIN_MACS", 0)  # time the tiny problems (k_aux 4: 4 to 64 dead in the band)
    aux_k_path.paths.forget()
    try:
        (directory,) = run(store, tmp_path / "aux", "train.checkpoint_every_tokens=2048", "train.aux_k=4")
        choices = read_info(checkpoint_path(directory / "checkpoints", 16))["aux_k_paths"]
        logged = capsys.readouterr().err
        assert choices, logged
        for key, path in choices.items():
            assert re.fullmatch(r"cpu float32 64->256 k_aux=4 dead<=(4|8|16|32|64)", key)
            assert logged.count(f"aux-k decode for {key}: ") == 1 and f"aux-k decode for {key}: {path} (" in logged
    finally:
        aux_k_path.paths.forget()
