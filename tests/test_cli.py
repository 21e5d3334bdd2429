"""generate -> train -> evaluate on configs/tiny.yaml through the real CLI, in a temp dir."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]


def saeflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=300,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO)},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tiny")
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    saeflow("generate", "tiny.yaml", cwd=work)
    saeflow("train", "tiny.yaml", cwd=work)
    saeflow("evaluate", "tiny.yaml", cwd=work)
    return work


def test_generate_writes_a_valid_store(tiny_run):
    result = saeflow("validate", "data/tiny.zarr", cwd=tiny_run)
    assert "ok" in result.stdout
    text = saeflow("inspect", "data/tiny.zarr", cwd=tiny_run).stdout
    assert "blocks.0.hook_resid_post" in text


def test_train_saves_a_loadable_sae_that_reconstructs(tiny_run):
    run = tiny_run / "results" / "tiny" / "sae"
    weights = load_file(str(run / "sae.safetensors"))
    config = json.loads((run / "config.json").read_text())["sae"]
    assert weights["W_dec"].shape == (config["d_model"] * config["expansion_factor"], config["d_model"])
    metrics = json.loads((run / "train_metrics.json").read_text())["heldout"]
    assert 0 < metrics["fvu"] < 1, metrics  # better than predicting the mean
    assert abs(metrics["l0"] - 8) < 1e-6  # top_k = 8
    assert (run / "plots" / "feature_density.png").is_file()
    assert (run / "saelens" / "sae_weights.safetensors").is_file()


def test_evaluate_writes_metrics_json(tiny_run):
    metrics = json.loads((tiny_run / "results" / "tiny" / "metrics.json").read_text())
    sae = metrics["sae"]
    assert 0 < sae["fvu"] < 1 and sae["l0"] == pytest.approx(8)
