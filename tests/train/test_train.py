"""Training on a real tiny store: sweeps in one pass, bitwise resume after SIGKILL, losses."""

import json
import shutil
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.config import load_config, validate_config
from pipeline.train.aux_k import aux_k_loss
from pipeline.train.schedules import annealed_k, lr_multiplier
from pipeline.train.stage import train
from store.reader import StoreReader

REPO = Path(__file__).resolve().parents[2]


def tiny_config(store: Path, out_dir: Path, *overrides: str):
    return load_config(
        REPO / "configs" / "tiny.yaml",
        [f"generate.store={store}", f"train.out_dir={out_dir}", "train.total_tokens=6144", *overrides],
    )


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "sae.safetensors"))


def test_sweep_variants_share_one_pass_and_match_solo_runs(store, tmp_path):
    sweep = "train.sweep=[{sae.top_k: 4}, {sae.act_fn: relu, name: relu}]"
    dirs = train(tiny_config(store, tmp_path / "sweep", sweep))
    assert [d.name for d in dirs] == ["top_k=4", "relu"]
    solo = train(tiny_config(store, tmp_path / "solo", "sae.top_k=4"))[0]
    for key, value in weights(solo).items():
        assert torch.equal(value, weights(dirs[0])[key]), key  # same batches, same result
    k4 = json.loads((dirs[0] / "train_metrics.json").read_text())["heldout"]
    relu = json.loads((dirs[1] / "train_metrics.json").read_text())["heldout"]
    assert k4["l0"] == pytest.approx(4)
    assert relu["fvu"] < 1 and relu["l0"] > 0
    logged = [json.loads(line) for line in (dirs[1] / "train_log.jsonl").read_text().splitlines()]
    assert all("sparsity_loss" in record and record["sparsity_loss"] > 0 for record in logged)


def test_sweep_may_not_change_shared_loader_settings(store, tmp_path):
    from pipeline.config import ConfigError

    with pytest.raises(ConfigError, match="all variants share"):
        train(tiny_config(store, tmp_path, "train.sweep=[{loader.batch_size: 128}]"))


def _train_command(config_path: Path) -> list[str]:
    return [sys.executable, "-m", "pipeline.cli", "train", str(config_path)]


def test_resume_after_sigkill_is_bitwise_identical(store, tmp_path):
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["generate"]["store"] = str(store)
    # checkpoints every 4 steps, log lines every 3: a resume starts inside a log window
    data["train"].update(total_tokens=24576, checkpoint_every_tokens=1024, log_every_steps=3)
    env = {**os.environ, "PYTHONPATH": str(REPO)}

    def config(out: str) -> Path:
        data["train"]["out_dir"] = str(tmp_path / out)
        path = tmp_path / f"{out}.yaml"
        path.write_text(yaml.safe_dump(data))
        return path

    straight = config("straight")
    subprocess.run(_train_command(straight), env=env, check=True, capture_output=True, timeout=300)

    resumed = config("resumed")
    checkpoints = tmp_path / "resumed" / "sae" / "checkpoints"
    kills = 0
    for wanted_checkpoints in (2, 5):
        process = subprocess.Popen(_train_command(resumed), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.time() + 120
        while time.time() < deadline and process.poll() is None:
            steps = sorted(checkpoints.glob("step-*"))
            if steps and int(steps[-1].name.split("-")[1]) >= wanted_checkpoints * 4:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.02)
        kills += process.wait() == -signal.SIGKILL
    assert kills >= 1, "training finished before it could be killed"
    result = subprocess.run(_train_command(resumed), env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "resuming from the checkpoints of step " in result.stderr
    record = json.loads((tmp_path / "resumed" / "sae" / "run.json").read_text())
    assert record["resumed_from_step"] > 0 and record["finished"]

    a, b = weights(tmp_path / "straight" / "sae"), weights(tmp_path / "resumed" / "sae")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # the logs read as the uninterrupted run's, bit for bit, but for the one wall-clock field
    def log(run: str) -> list[dict]:
        lines = (tmp_path / run / "sae" / "train_log.jsonl").read_text().splitlines()
        return [{key: value for key, value in json.loads(line).items() if key != "tokens_per_second"} for line in lines]

    assert log("resumed") == log("straight") and len(log("straight")) == 96 // 3
    curves = [(tmp_path / run / "sae" / "curves.csv").read_bytes() for run in ("straight", "resumed")]
    assert curves[0] == curves[1]


def test_a_run_folder_records_its_provenance_and_is_never_silently_replaced(store, tmp_path, capfd):
    from pipeline.config import ConfigError

    cfg = tiny_config(store, tmp_path, "train.total_tokens=2048")
    run = train(cfg)[0]
    record = json.loads((run / "run.json").read_text())
    assert validate_config(record["config"]) == cfg  # the provenance round-trips into the config
    assert record["store"]["identity"] == StoreReader(store).identity() and record["finished"]
    assert record["versions"]["saeflow"] != "unknown" and record["resumed_from_step"] == 0
    written = {path: path.read_bytes() for path in run.rglob("*") if path.is_file()}
    assert train(cfg) == [run]  # the same config: nothing to do, nothing rewritten
    assert "trained already; nothing to do" in capfd.readouterr().err
    shutil.copytree(run.parent, tmp_path / "moved")  # where a run lives is not what it is
    train(tiny_config(store, tmp_path / "moved", "train.total_tokens=2048"))
    assert "trained already; nothing to do" in capfd.readouterr().err
    other = tiny_config(store, tmp_path, "train.total_tokens=2048", "sae.top_k=4")
    with pytest.raises(ConfigError, match=r"finished SAE of a different config \(changed: sae.top_k\); pass --overwrite"):
        train(other)
    assert {path: path.read_bytes() for path in run.rglob("*") if path.is_file()} == written
    train(other, overwrite=True)
    assert json.loads((run / "run.json").read_text())["config"]["sae"]["top_k"] == 4


def test_checkpoint_of_another_config_is_refused(store, tmp_path):
    from pipeline.config import ConfigError

    train(tiny_config(store, tmp_path, "train.checkpoint_every_tokens=1024"))
    with pytest.raises(ConfigError, match="different config"):
        train(tiny_config(store, tmp_path, "train.checkpoint_every_tokens=1024", "train.lr=0.01"))


def test_decoder_rows_stay_unit_norm_and_bf16_autocast_runs_on_cpu(store, tmp_path):
    run = train(tiny_config(store, tmp_path, "train.autocast_dtype=bfloat16", "train.total_tokens=2048"))[0]
    metrics = json.loads((run / "train_metrics.json").read_text())["heldout"]
    assert metrics["fvu"] < 1.5  # trained, not diverged


def test_fp16_autocast_scales_the_loss_and_a_resume_restores_the_scale(store, tmp_path):
    from pipeline.sweeps import sweep_variants
    from pipeline.train.stage import build_trainer, open_store

    cfg = tiny_config(store, tmp_path, "train.autocast_dtype=float16", "train.total_tokens=2048",
                      "train.checkpoint_every_tokens=1024")
    run = train(cfg)[0]
    assert json.loads((run / "train_metrics.json").read_text())["heldout"]["fvu"] < 1.5
    checkpoint = sorted((run / "checkpoints").glob("step-*"))[-1]
    saved = json.loads((checkpoint / "state.json").read_text())["grad_scaler"]
    assert saved["scale"] > 1 and saved["growth_interval"] == 2000  # a live GradScaler was saved
    trainer = build_trainer("sae", sweep_variants(cfg)[0][1], open_store(str(store)), tmp_path / "again", 8)
    assert trainer.scaler.is_enabled() and trainer.scaler.get_scale() == 65536.0
    trainer.restore(checkpoint)
    assert trainer.scaler.state_dict() == saved
    bf16 = build_trainer("sae", tiny_config(store, tmp_path, "train.autocast_dtype=bfloat16"), open_store(str(store)),
                         tmp_path / "bf16", 8)
    assert not bf16.scaler.is_enabled()  # bfloat16 has float32's range: no scaling


def test_aux_k_loss_reaches_only_dead_latents():
    torch.manual_seed(0)
    hidden_pre = torch.randn(32, 16, requires_grad=True)
    decoder = torch.randn(16, 8, requires_grad=True)
    residual = torch.randn(32, 8)
    dead = torch.zeros(16, dtype=torch.bool)
    assert aux_k_loss(residual, hidden_pre, dead, decoder, k_aux=4).item() == 0
    dead[:5] = True
    loss = aux_k_loss(residual, hidden_pre, dead, decoder, k_aux=4)
    loss.backward()
    assert loss.item() > 0
    assert hidden_pre.grad[:, 5:].abs().sum() == 0 and hidden_pre.grad[:, :5].abs().sum() > 0


def test_schedules():
    cfg = validate_config(yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())).train
    cfg = cfg.model_copy(update={"lr_warmup_steps": 10, "lr_decay_steps": 20})
    assert lr_multiplier(0, 100, cfg) == pytest.approx(0.1)
    assert lr_multiplier(50, 100, cfg) == 1.0
    assert lr_multiplier(90, 100, cfg) == pytest.approx(0.5)
    # a decay longer than the run starts at the peak right after warmup
    assert lr_multiplier(10, 25, cfg) == 1.0 and lr_multiplier(20, 25, cfg) == pytest.approx(1 / 3)
    cosine = cfg.model_copy(update={"lr_schedule": "cosine"})
    assert lr_multiplier(10, 100, cosine) == pytest.approx(1.0) and lr_multiplier(100, 100, cosine) == pytest.approx(0)
    anneal = cfg.model_copy(update={"k_anneal_steps": 10})
    assert annealed_k(0, 8, 256, anneal) == 32 and annealed_k(10, 8, 256, anneal) == 8


def test_tensorboard_logger_gets_every_log_record_and_resumes_without_duplicates(store, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    overrides = ("train.logger=tensorboard", "train.log_every_steps=1", "train.checkpoint_every_tokens=2048")
    run = train(tiny_config(store, tmp_path, *overrides))[0]
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    fvu = [(event.step, event.value) for event in events.Scalars("train/fvu")]
    assert fvu == [(record["step"], pytest.approx(record["fvu"])) for record in logged]
    heldout = json.loads((run / "train_metrics.json").read_text())["heldout"]
    assert events.Scalars("heldout/fvu")[0].value == pytest.approx(heldout["fvu"])

    # a run resumed from its first checkpoint (step 8) replaces what the first run logged after it
    for late in sorted((run / "checkpoints").glob("step-*"))[1:]:
        for file in late.iterdir():
            file.unlink()
        late.rmdir()
    train(tiny_config(store, tmp_path, *overrides))
    events = EventAccumulator(str(run / "tensorboard")).Reload()
    steps = [event.step for event in events.Scalars("train/fvu")]
    assert steps == sorted(set(steps)) == [record["step"] for record in logged]


def test_wandb_tracker_runs_offline_or_names_its_install(tmp_path, monkeypatch):
    from pipeline.config import ConfigError
    from pipeline.train.trackers import open_tracker

    try:
        import wandb  # noqa: F401
    except ImportError:
        with pytest.raises(ConfigError, match="pip install 'wandb"):
            open_tracker("wandb", tmp_path, "sae", {}, resume_step=0)
    else:  # installed here: an offline run must start, log and finish
        monkeypatch.setenv("WANDB_MODE", "offline")
        tracker = open_tracker("wandb", tmp_path, "sae", {}, resume_step=0)
        tracker.log({"train/fvu": 0.5}, step=1)
        tracker.close()
        assert (tmp_path / "wandb_run_id").read_text()


def test_dead_figures_name_their_rows_and_the_heldout_one_is_a_direct_count(store, tmp_path):
    from pipeline.sae.io import load_sae
    from store.loader import ActivationLoader

    # a one-batch dead window: latents silent for the last batch, which a log line per step also
    # measures on its own (silent_in_window_fraction, from the window's firing counts)
    cfg = tiny_config(store, tmp_path, "train.dead_threshold_tokens=256", "train.log_every_steps=1",
                      "sae.expansion_factor=16")
    run = train(cfg)[0]
    logged = [json.loads(line) for line in (run / "train_log.jsonl").read_text().splitlines()]
    assert all("dead_fraction" not in record for record in logged)
    assert [record["dead_fraction_train_window"] for record in logged] == [
        pytest.approx(record["silent_in_window_fraction"]) for record in logged]
    assert any(record["dead_fraction_train_window"] > 0 for record in logged)
    assert all("dense_fraction" not in record and 0 <= record["dense_fraction_train_window"] <= 1 for record in logged)

    heldout = json.loads((run / "train_metrics.json").read_text())["heldout"]
    assert "dead_fraction" not in heldout and "dead_fraction_train_window" not in heldout
    sae = load_sae(run, device="cpu")
    rows = ActivationLoader(StoreReader(store), sae.cfg.hook_point_in, batch_size=256, split="heldout",
                            heldout_chunks=cfg.loader.heldout_chunks, dtype=torch.float32)
    with torch.no_grad():
        fired = sum((sae.encode(batch[sae.cfg.hook_point_in]) != 0).sum(0) for batch in rows)
    assert heldout["dead_latents"] == int((fired == 0).sum()) >= 1
    assert heldout["dead_fraction_heldout"] == pytest.approx(float((fired == 0).double().mean()))
    assert "dense_fraction" not in heldout and "dense_fraction_train_window" not in heldout
    dense = fired.double() / heldout["rows"] > 0.1
    assert heldout["dense_latents"] == int(dense.sum())
    assert heldout["dense_fraction_heldout"] == pytest.approx(float(dense.double().mean()))
