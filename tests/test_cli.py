"""generate -> train -> evaluate on configs/tiny.yaml through the real CLI, in a temp dir;
and `saeflow config`, which prints the effective config."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import BaseModel
from safetensors.torch import load_file

from pipeline.config import ExperimentConfig

REPO = Path(__file__).resolve().parents[1]


def run_saeflow(*args: str, cwd: Path = REPO, timeout: float = 300, env_extra: dict | None = None,
                preexec_fn=None) -> subprocess.CompletedProcess:
    """preexec_fn: a condition of tests/processes.py the command runs under."""
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**__import__("os").environ, "PYTHONPATH": str(REPO), **(env_extra or {})},
        preexec_fn=preexec_fn,
    )


def invoke_saeflow(*args: str):
    """The CLI run in this process (click's runner): a traceback fails the test."""
    from click.testing import CliRunner

    from pipeline.cli import main

    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), f"traceback: {result.exception!r}"
    return result


def one_error_line(*args: str) -> str:
    """The CLI refuses `args`: exit 2, one `error:` line, the last on stderr after any progress
    lines ("saeflow train: ..."); returns it."""
    result = invoke_saeflow(*args)
    lines = result.stderr.strip().splitlines()
    errors = [line for line in lines if line.startswith("error: ")]
    assert result.exit_code == 2 and errors == lines[-1:], result.stderr
    return errors[0]


def saeflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    result = run_saeflow(*args, cwd=cwd)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tiny")
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    (work / "tiny.yaml").write_text(yaml.safe_dump(config))
    saeflow("generate", "tiny.yaml", cwd=work)
    (work / "train.stdout").write_text(saeflow("train", "tiny.yaml", cwd=work).stdout)
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
    # the dead figure train prints is the held-out one it wrote
    assert f"dead {metrics['dead_fraction_heldout']:.2%}, dense {metrics['dense_fraction_heldout']:.2%}" in (
        tiny_run / "train.stdout").read_text()
    assert (run / "plots" / "feature_density.png").is_file()
    assert (run / "saelens" / "sae_weights.safetensors").is_file()
    metadata = json.loads((run / "saelens" / "cfg.json").read_text())["metadata"]  # from the store's manifest
    assert (metadata["model_name"], metadata["context_size"], metadata["prepend_bos"], metadata["dataset_path"]) == (
        "random", 64, True, "python-docstrings")


def test_version_and_help_point_to_the_config_keys():
    from importlib.metadata import version

    assert saeflow("--version", cwd=REPO).stdout.strip() == f"saeflow {version('saeflow')}"
    for command in ("generate", "train", "evaluate", "features"):
        assert "saeflow config CONFIG" in saeflow(command, "--help", cwd=REPO).stdout


def test_evaluate_writes_metrics_json(tiny_run):
    metrics = json.loads((tiny_run / "results" / "tiny" / "metrics.json").read_text())
    sae = metrics["sae"]
    assert 0 < sae["fvu"] < 1 and sae["l0"] == pytest.approx(8)


def leaf_fields(model: type[BaseModel], prefix: str = ""):
    """(dotted key, FieldInfo) per setting, in definition order; sections are walked into."""
    for name, field in model.model_fields.items():
        if isinstance(field.annotation, type) and issubclass(field.annotation, BaseModel):
            yield from leaf_fields(field.annotation, f"{prefix}{name}.")
        else:
            yield prefix + name, field


def config_lines(*args: str) -> dict[str, str]:
    """`saeflow config` output: dotted key -> its line (the legend, starting with #, left out)."""
    result = run_saeflow("config", *args, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if not line.startswith("#")]
    keyed = {line[2:].split(" = ", 1)[0].strip(): line for line in lines}
    assert len(keyed) == len(lines), "a key printed twice"
    return keyed


def test_config_prints_every_key_with_value_default_and_meaning():
    lines = config_lines("configs/tiny.yaml", "--set", "train.lr=0.01")
    fields = dict(leaf_fields(ExperimentConfig))
    assert list(lines) == list(fields)  # every setting, in definition order, nested ones dotted
    for key, field in fields.items():
        assert field.description and field.description in lines[key], lines[key]
    assert lines["train.lr"].startswith("* train.lr ")  # changed by --set: marked, default shown
    assert "= 0.01 " in lines["train.lr"] and "(default 0.0004)" in lines["train.lr"]
    assert lines["train.betas"].startswith("  train.betas ")  # not in tiny.yaml: unmarked
    assert "= [0.9, 0.999]" in lines["train.betas"] and "(default" not in lines["train.betas"]
    assert lines["model.random.n_layers"].startswith("  ")  # tiny.yaml repeats the default
    assert "(required)" in lines["sae.d_model"] and "(required)" in lines["generate.hook_points"]
    assert "[per-SAE]" in lines["train.aux_k"] and "[per-SAE]" not in lines["train.total_tokens"]


def test_config_prints_a_sweep_compactly():
    lines = config_lines("configs/tiny.yaml", "--set", "train.sweep=[{sae.top_k: 4}, {sae.top_k: 16, name: wide}]")
    assert lines["train.sweep"].startswith("* train.sweep ")
    assert '= [{"sae.top_k": 4}, {"sae.top_k": 16, "name": "wide"}]' in lines["train.sweep"]


def test_config_rejects_a_misspelled_key_in_one_line():
    result = run_saeflow("config", "configs/tiny.yaml", "--set", "train.lerning_rate=1", timeout=60)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "train.lerning_rate" in lines[0], result.stderr


def test_config_loads_no_language_model_code():
    code = (
        "import sys\n"
        "from pipeline.cli import main\n"
        "main(['config', 'configs/tiny.yaml'], standalone_mode=False)\n"
        "heavy = {'transformer_lens', 'transformers', 'datasets'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.mark.parametrize("with_obstore", [False, True])
def test_the_entry_point_skips_the_interpreter_teardown_only_once_obstore_is_loaded(with_obstore, tmp_path):
    """With obstore loaded, `run` leaves past the teardown (where obstore's tokio threads can abort
    the process): exit code, the error line and atexit handlers stay, a non-daemon thread is
    joined, and objects are not finalized. Without it, a normal exit."""
    code = (
        "import atexit, sys, threading, time\n"
        + ("import obstore\n" if with_obstore else "")
        + "class Teardown:\n"
        "    def __del__(self): print('teardown', flush=True)\n"
        "kept = Teardown()\n"
        "atexit.register(print, 'atexit', flush=True)\n"
        "threading.Thread(target=lambda: (time.sleep(0.2), print('thread', flush=True))).start()\n"
        "from pipeline.cli import run\n"
        f"sys.argv = ['saeflow', 'validate', {str(tmp_path / 'missing.zarr')!r}]\n"
        "run()\n"
    )
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2 and result.stderr.startswith("error: "), result.stderr[-3000:]
    lines = result.stdout.split()
    assert lines[:2] == ["thread", "atexit"], result.stdout
    assert ("teardown" in lines) is not with_obstore, result.stdout
