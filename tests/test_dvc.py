"""The dvc pipeline: runs end to end, a second repro is a no-op, a train param reruns only
train and evaluate. Runs dvc.yaml as shipped, with its vars pointed at configs/tiny.yaml, in a
temp git repository holding a copy of the project."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
# The venv's bin: python, dvc, and saeflow (an editable install: it runs this checkout's code,
# which the copy below equals).
BIN = Path(sys.executable).parent


def run(*args: str, cwd: Path) -> str:
    env = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"}
    result = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{' '.join(args)} failed:\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"
    return result.stdout + result.stderr


def replace_once(path: Path, old: str, new: str) -> None:
    text = path.read_text()
    assert text.count(old) == 1, f"{old!r} not found once in {path}"
    path.write_text(text.replace(old, new))


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_dvc_vars_match_the_default_config():
    dvc_vars = yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][0]
    config = yaml.safe_load((REPO / dvc_vars["config"]).read_text())
    assert dvc_vars["store_identity"] == config["generate"]["store"].removesuffix(".zarr") + ".identity.json"
    assert dvc_vars["run"] == config["train"]["out_dir"]


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + dvc repository holding the project's files, dvc.yaml pointed at tiny.yaml."""
    root = tmp_path_factory.mktemp("dvc-project")
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=REPO, capture_output=True,
                            text=True, check=True).stdout.splitlines()
    for name in listed:
        source = REPO / name
        if source.is_file() and not name.startswith(("bench/", "tests/")):
            (root / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, root / name)
    dvc_yaml = root / "dvc.yaml"
    replace_once(dvc_yaml, "config: configs/minilm-docstrings.yaml", "config: configs/tiny.yaml")
    replace_once(dvc_yaml, "store_identity: data/minilm-l3.identity.json", "store_identity: data/tiny.identity.json")
    replace_once(dvc_yaml, "run: results/minilm-docstrings", "run: results/tiny")
    replace_once(dvc_yaml, "top_k: [16, 32, 64]", "top_k: [4]")  # one sweep member keeps the test fast
    # 4 steps of 256, fewer than tiny's log_every_steps=5: the sweep's train_log.jsonl (a dvc
    # output) must exist all the same
    replace_once(dvc_yaml, "total_tokens: 131072", "total_tokens: 1024")
    run("git", "init", "-q", cwd=root)
    if not (root / ".dvc" / "config").is_file():
        run("dvc", "init", "-q", cwd=root)
    run("git", "add", "-A", cwd=root)
    run("git", "-c", "user.name=test", "-c", "user.email=test@example.com", "commit", "-qm", "project", cwd=root)
    return root


def test_repro_runs_everything_then_nothing(project):
    first = run("dvc", "repro", cwd=project)
    assert stages_run(first) == {"generate", "train", "evaluate", "features", "sweep_train@4", "sweep_evaluate@4"}
    metrics = json.loads((project / "results" / "tiny" / "metrics.json").read_text())["sae"]
    assert 0 < metrics["fvu"] < 1 and 0 < metrics["ce_loss_recovered"] <= 1.5
    assert (project / "results" / "tiny" / "sae" / "features" / "index.html").is_file()  # the dashboard
    features = json.loads((project / "results" / "tiny" / "sae" / "features" / "features.json").read_text())
    assert len(features["latents"]) == 256 and features["split"] == "heldout"
    sweep = json.loads((project / "results" / "tiny" / "k4" / "metrics.json").read_text())["sae"]
    assert sweep["l0"] == pytest.approx(4)

    second = run("dvc", "repro", cwd=project)
    assert stages_run(second) == set(), second
    assert "up to date" in run("dvc", "status", cwd=project)

    shown = run("dvc", "metrics", "show", cwd=project)
    assert "results/tiny/metrics.json" in shown and "ce_loss_recovered" in shown
    run("dvc", "plots", "show", "-o", "plots-html", cwd=project)
    assert (project / "plots-html" / "index.html").is_file()


def test_a_train_param_reruns_train_and_evaluate_only(project):
    if not (project / "dvc.lock").is_file():
        pytest.fail("needs the pipeline built by test_repro_runs_everything_then_nothing")
    replace_once(project / "configs" / "tiny.yaml", "lr: 1.0e-3", "lr: 2.0e-3")
    changed = json.loads(run("dvc", "status", "--json", cwd=project))
    assert set(changed) == {"train", "sweep_train@4"}  # the evaluates follow once their SAE changes
    output = run("dvc", "repro", "evaluate", cwd=project)
    assert stages_run(output) == {"train", "evaluate"}
    assert "Stage 'generate' didn't change, skipping" in output
    assert set(json.loads(run("dvc", "status", "--json", cwd=project))) == {"features", "sweep_train@4"}


def append_comment(path: Path) -> None:
    path.write_text(path.read_text() + "\n# an edit that changes no behaviour\n")


def test_code_edits_rerun_exactly_the_stages_that_run_the_code(project):
    if not (project / "dvc.lock").is_file():
        pytest.fail("needs the pipeline built by test_repro_runs_everything_then_nothing")
    run("dvc", "repro", cwd=project)  # everything up to date, whatever the tests before changed
    append_comment(project / "pipeline" / "evaluate" / "splice.py")
    assert set(json.loads(run("dvc", "status", "--json", cwd=project))) == {"evaluate", "sweep_evaluate@4"}
    assert stages_run(run("dvc", "repro", cwd=project)) == {"evaluate", "sweep_evaluate@4"}

    append_comment(project / "pipeline" / "sae" / "activation_fns.py")
    changed = set(json.loads(run("dvc", "status", "--json", cwd=project)))
    assert changed == {"train", "evaluate", "features", "sweep_train@4", "sweep_evaluate@4"}  # never generate
    append_comment(project / "store" / "reader.py")
    assert "generate" in set(json.loads(run("dvc", "status", "--json", cwd=project)))


def test_train_follows_the_store_identity_not_the_store_directory(project):
    if not (project / "dvc.lock").is_file():
        pytest.fail("needs the pipeline built by test_repro_runs_everything_then_nothing")
    run("dvc", "repro", cwd=project)
    identity_file = project / "data" / "tiny.identity.json"
    identity = json.loads(identity_file.read_text())
    assert identity["complete"] and "zarr" not in (project / "dvc.lock").read_text().split("generate:")[1].split("train:")[0]

    append_comment(project / "pipeline" / "generate" / "text.py")  # generate reruns and finds its store complete
    ran = stages_run(run("dvc", "repro", cwd=project))
    assert "generate" in ran and not ran & {"train", "sweep_train@4"}, ran
    assert json.loads(identity_file.read_text()) == identity

    replace_once(project / "configs" / "tiny.yaml", "n_ctx: 256, seed: 0}", "n_ctx: 256, seed: 1}")  # another model
    ran = stages_run(run("dvc", "repro", cwd=project))
    assert {"generate", "train", "evaluate", "sweep_train@4"} <= ran, ran
    assert json.loads(identity_file.read_text())["identity"] != identity["identity"]
