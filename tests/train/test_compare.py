"""Sweeps compared at a glance: plots titled by the variant, a train.sweep's comparison written by
train, `saeflow compare` over separate runs, and its one-line errors on bad input."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from pipeline.config import ConfigError, load_config
from pipeline.sweeps import sweep_variants
from pipeline.train.stage import train

REPO = Path(__file__).resolve().parents[2]


def tiny(store: Path, out_dir: Path, *overrides: str):
    # configs/tiny.yaml: 1024 tokens = 4 batches of 256, a log line every 2
    return load_config(REPO / "configs" / "tiny.yaml", [f"generate.store={store}", f"train.out_dir={out_dir}",
                                                       "train.total_tokens=1024", "train.log_every_steps=2", *overrides])


def title(png: Path) -> str:
    """The Title text chunk of a PNG the report wrote (the title drawn on the figure)."""
    with Image.open(png) as image:
        assert image.size[0] > 300 and image.size[1] > 200
        return image.text["Title"]


def heldout(variant: Path) -> dict:
    return json.loads((variant / "train_metrics.json").read_text())["heldout"]


def saeflow(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pipeline.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=120)


@pytest.fixture(scope="module")
def separate_runs(store, tmp_path_factory) -> Path:
    """Two runs as dvc's sweep_train makes them: one config each, <root>/k4/sae and <root>/k8/sae."""
    root = tmp_path_factory.mktemp("runs")
    for k in (4, 8):
        train(tiny(store, root / f"k{k}", f"sae.top_k={k}"))
    return root


def test_a_runs_plots_are_titled_by_its_run_folder_not_sae(separate_runs):
    plots = separate_runs / "k4" / "sae" / "plots"
    assert title(plots / "training_curves.png") == "k4: training curves"
    assert title(plots / "feature_density.png").startswith("k4: feature density (")


def test_a_train_sweep_writes_its_comparison_and_titles_plots_by_variant(store, tmp_path):
    dirs = train(tiny(store, tmp_path / "lr-sweep", "train.sweep=[{sae.top_k: 4}, {sae.top_k: 8, name: wide}]"))
    assert title(dirs[1] / "plots" / "training_curves.png") == "wide: training curves"
    sweep = tmp_path / "lr-sweep" / "sweep"
    points = json.loads((sweep / "fvu_vs_l0.json").read_text())
    assert points["title"] == "lr-sweep"
    assert [point["label"] for point in points["points"]] == ["top_k=4", "wide"]  # one point per variant
    for point, variant in zip(points["points"], dirs):
        assert (point["fvu"], point["l0"], point["dense_fraction_heldout"]) == (
            heldout(variant)["fvu"], heldout(variant)["l0"], heldout(variant)["dense_fraction_heldout"])
    assert points["points"][0]["l0"] == pytest.approx(4) and points["points"][1]["l0"] == pytest.approx(8)
    assert title(sweep / "fvu_vs_l0.png") == "lr-sweep: held-out FVU against L0"
    assert title(sweep / "training_curves.png") == "lr-sweep: training curves"


def test_no_sweep_variant_may_take_the_plots_folder_name(store, tmp_path):
    with pytest.raises(ConfigError, match="'sweep' is the folder of the sweep's comparison plots"):
        sweep_variants(tiny(store, tmp_path, "train.sweep=[{sae.top_k: 4, name: sweep}]"))


def test_compare_command_plots_separate_runs(separate_runs, tmp_path):
    result = saeflow("compare", str(separate_runs / "k4"), str(separate_runs / "k8" / "sae"), "--out", "cmp",
                     cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    points = json.loads((tmp_path / "cmp" / "fvu_vs_l0.json").read_text())["points"]
    assert [point["label"] for point in points] == ["k4", "k8"]
    for point, k in zip(points, (4, 8)):
        expected = heldout(separate_runs / f"k{k}" / "sae")
        assert (point["fvu"], point["l0"]) == (expected["fvu"], expected["l0"])
        assert point["dead_fraction_heldout"] == expected["dead_fraction_heldout"]
        assert f"k{k}: held-out fvu {expected['fvu']:.4f}, l0 {expected['l0']:.1f}" in result.stdout
    assert title(tmp_path / "cmp" / "training_curves.png") == f"{separate_runs.name}: training curves"
    # a run named twice (its folder and its variant) is one point
    again = saeflow("compare", str(separate_runs / "k4"), str(separate_runs / "k4" / "sae"), "--out", "one",
                    cwd=tmp_path)
    assert again.returncode == 0 and len(json.loads((tmp_path / "one" / "fvu_vs_l0.json").read_text())["points"]) == 1


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2 and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


def test_compare_names_a_folder_without_a_finished_run(separate_runs, tmp_path):
    (tmp_path / "empty").mkdir()
    line = one_error_line(saeflow("compare", str(separate_runs / "k4"), "empty", "--out", "cmp", cwd=tmp_path))
    assert "empty holds no finished SAE (no train_metrics.json" in line and "saeflow train" in line
    line = one_error_line(saeflow("compare", "missing", "--out", "cmp", cwd=tmp_path))
    assert "missing is not a folder" in line
    broken = tmp_path / "broken" / "sae"
    broken.mkdir(parents=True)
    (broken / "train_metrics.json").write_text('{"heldout": {"l0": 4}}')
    line = one_error_line(saeflow("compare", "broken", "--out", "cmp", cwd=tmp_path))
    assert "train_metrics.json cannot be read as train's held-out metrics (KeyError: 'fvu')" in line
    assert not (tmp_path / "cmp").exists()
