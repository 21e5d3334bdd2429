"""The dvc pipeline: runs end to end, a second repro is a no-op, a train param reruns only
train and evaluate. Runs dvc.yaml as shipped, with its vars pointed at configs/tiny.yaml, in a
temp git repository holding a copy of the project."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from tests.browser import CHROMIUM, rendered_dom

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


RUN_FILES = ("train_metrics.json", "train_log.jsonl")  # what sweep_compare reads of each run


def compare_runs_text(top_k: list[int]) -> tuple[str, str]:
    """sweep_compare's run folders (in its cmd) and its deps on them, as dvc.yaml writes them."""
    folders = " ".join(f"${{run}}/k{k}" for k in top_k)
    deps = "".join(f"      - ${{run}}/k{k}/sae/{name}\n" for k in top_k for name in RUN_FILES)
    return folders, deps


def point_sweep_at(dvc_yaml: Path, top_k: list[int]) -> None:
    """The sweep's top_k list, and the runs sweep_compare names again (dvc cannot gather a foreach)."""
    shipped = yaml.safe_load(dvc_yaml.read_text())["vars"][0]["sweep"]["top_k"]
    replace_once(dvc_yaml, f"top_k: {shipped}", f"top_k: {top_k}")
    for old, new in zip(compare_runs_text(shipped), compare_runs_text(top_k)):
        replace_once(dvc_yaml, old, new)


def stages_run(output: str) -> set[str]:
    return {line.split("'")[1] for line in output.splitlines() if line.startswith("Running stage '")}


def test_dvc_vars_match_the_default_config():
    dvc_vars = yaml.safe_load((REPO / "dvc.yaml").read_text())["vars"][0]
    config = yaml.safe_load((REPO / dvc_vars["config"]).read_text())
    store = config["generate"]["store"].removesuffix(".zarr")
    assert dvc_vars["store_identity"] == store + ".identity.json"
    assert (dvc_vars["shuffled"], dvc_vars["shuffled_identity"]) == (store + "-shuffled.zarr", store + "-shuffled.identity.json")
    assert dvc_vars["run"] == config["train"]["out_dir"]


def test_sweep_compare_names_exactly_the_sweeps_runs():
    dvc = yaml.safe_load((REPO / "dvc.yaml").read_text())
    top_k = dvc["vars"][0]["sweep"]["top_k"]
    stage = dvc["stages"]["sweep_compare"]
    folders, deps = compare_runs_text(top_k)
    assert stage["cmd"] == f"saeflow compare {folders} --out ${{run}}/sweep"
    assert [dep for dep in stage["deps"] if dep.startswith("${run}")] == [
        line.removeprefix("      - ") for line in deps.splitlines()]


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
    replace_once(dvc_yaml, "shuffled: data/minilm-l3-shuffled.zarr", "shuffled: data/tiny-shuffled.zarr")
    replace_once(dvc_yaml, "shuffled_identity: data/minilm-l3-shuffled.identity.json",
                 "shuffled_identity: data/tiny-shuffled.identity.json")
    replace_once(dvc_yaml, "run: results/minilm-docstrings", "run: results/tiny")
    point_sweep_at(dvc_yaml, [4])  # one sweep member keeps the test fast
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
    assert stages_run(first) == {"generate", "shuffle", "train", "evaluate", "features", "sweep_train@4", "sweep_evaluate@4",
                                 "sweep_compare"}
    for run_dir in ("sae", "k4/sae"):  # trained from the shuffled copy
        assert json.loads((project / "results" / "tiny" / run_dir / "run.json").read_text())["store"]["path"] == "data/tiny-shuffled.zarr"
    metrics = json.loads((project / "results" / "tiny" / "metrics.json").read_text())["sae"]
    assert 0 < metrics["fvu"] < 1 and 0 < metrics["ce_loss_recovered"] <= 1.5
    assert (project / "results" / "tiny" / "sae" / "features" / "index.html").is_file()  # the dashboard
    features = json.loads((project / "results" / "tiny" / "sae" / "features" / "features.json").read_text())
    assert len(features["latents"]) == 256 and features["split"] == "heldout"
    sweep = json.loads((project / "results" / "tiny" / "k4" / "metrics.json").read_text())["sae"]
    assert sweep["l0"] == pytest.approx(4)
    compared = json.loads((project / "results" / "tiny" / "sweep" / "fvu_vs_l0.json").read_text())["points"]
    assert [(point["label"], point["l0"]) for point in compared] == [("k4", pytest.approx(4))]

    second = run("dvc", "repro", cwd=project)
    assert stages_run(second) == set(), second
    assert "up to date" in run("dvc", "status", cwd=project)

    shown = run("dvc", "metrics", "show", cwd=project)
    assert "results/tiny/metrics.json" in shown and "ce_loss_recovered" in shown
    run("dvc", "plots", "show", "-o", "plots-html", cwd=project)
    check_plots_page_offline(project / "plots-html" / "index.html")


# Appended to a copy of dvc's page: on load, the body records each image's natural width (0: not loaded).
IMAGE_CHECK = """<script>window.addEventListener("load", function () {
  document.body.setAttribute("data-images", Array.from(document.images).map(function (image) {
    return image.getAttribute("src") + "=" + image.naturalWidth; }).join(" "));
});</script></body>"""


def check_plots_page_offline(page: Path) -> None:
    """`dvc plots show`'s page names nothing on the internet and, in a browser with the network off,
    shows every plot dvc.yaml declares as an image that loaded."""
    html = page.read_text()
    assert not re.search(r"https?://", html), re.findall(r"https?://[^\s\"']+", html)
    if CHROMIUM is None:
        pytest.skip("no chromium installed (.ci/run installs it): the page's images were not rendered")
    checked = page.with_name("checked.html")  # beside it, so its relative image paths resolve
    checked.write_text(html.replace("</body>", IMAGE_CHECK))
    widths = dict(item.rsplit("=", 1) for item in
                  re.search(r'data-images="([^"]*)"', rendered_dom(checked.as_uri())).group(1).split())
    declared = [png for stage in yaml.safe_load((page.parents[1] / "dvc.yaml").read_text())["stages"].values()
                for png in (stage.get("do", stage).get("plots") or [])]
    assert len(widths) == len(declared)  # sweep_train's (a foreach) once: the sweep is [4]
    assert all(int(width) > 0 for width in widths.values()), widths
    assert any("fvu_vs_l0" in src for src in widths) and any("sweep_training_curves" in src for src in widths), widths


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

    edited = [project / "pipeline" / "sae" / "activation_fns.py", project / "store" / "reader.py"]
    originals = [path.read_text() for path in edited]
    try:
        append_comment(edited[0])
        changed = set(json.loads(run("dvc", "status", "--json", cwd=project)))
        assert changed == {"train", "evaluate", "features", "sweep_train@4", "sweep_evaluate@4"}  # never generate
        append_comment(edited[1])
        assert "generate" in set(json.loads(run("dvc", "status", "--json", cwd=project)))
    finally:  # undone, so the pipeline is up to date again without rerunning every stage
        for path, text in zip(edited, originals):
            path.write_text(text)
    assert json.loads(run("dvc", "status", "--json", cwd=project)) == {}


def test_train_follows_the_store_identity_not_the_store_directory(project):
    if not (project / "dvc.lock").is_file():
        pytest.fail("needs the pipeline built by test_repro_runs_everything_then_nothing")
    run("dvc", "repro", cwd=project)
    identity_file = project / "data" / "tiny.identity.json"
    identity = json.loads(identity_file.read_text())
    assert identity["complete"] and "zarr" not in (project / "dvc.lock").read_text().split("generate:")[1].split("train:")[0]

    append_comment(project / "pipeline" / "generate" / "text.py")  # generate reruns and finds its store complete
    ran = stages_run(run("dvc", "repro", cwd=project))
    assert "generate" in ran and not ran & {"train", "sweep_train@4"}, ran  # shuffle too finds its copy complete
    assert json.loads(identity_file.read_text()) == identity

    replace_once(project / "configs" / "tiny.yaml", "n_ctx: 256, seed: 0}", "n_ctx: 256, seed: 1}")  # another model
    ran = stages_run(run("dvc", "repro", "train", cwd=project))  # the stages after train need not run
    assert ran == {"generate", "shuffle", "train"}, ran
    assert json.loads(identity_file.read_text())["identity"] != identity["identity"]
    assert {"evaluate", "sweep_train@4"} <= set(json.loads(run("dvc", "status", "--json", cwd=project)))
