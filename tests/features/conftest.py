"""One tiny run through the real CLI for the feature tests: generate, train, evaluate, then
`saeflow features` on the held-out split and on the training split (1024-row batches, so the
statistics stream over several batches and latents' histogram scales grow between them)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pipeline.config import ExperimentConfig, load_config
from tests.test_cli import REPO, saeflow

TINY = REPO / "configs" / "tiny.yaml"
FEATURES = Path("results/tiny/sae/features")


@dataclass
class FeaturesRun:
    work: Path
    cfg: ExperimentConfig  # tiny.yaml with the run's absolute paths
    heldout: dict  # features.json of the held-out split
    train: dict  # features.json of the training split
    dashboard: Path  # index.html of the training split


@pytest.fixture(scope="package")
def features_run(tmp_path_factory) -> FeaturesRun:
    work = tmp_path_factory.mktemp("features")
    (work / "tiny.yaml").write_text(yaml.safe_dump(yaml.safe_load(TINY.read_text())))
    for command in ("generate", "train", "evaluate", "features"):
        saeflow(command, "tiny.yaml", cwd=work)
    heldout = json.loads((work / FEATURES / "features.json").read_text())
    (work / FEATURES).rename(work / "heldout-features")
    saeflow("features", "tiny.yaml", "--split", "train", "--set", "features.batch_size=1024", cwd=work)
    cfg = load_config(work / "tiny.yaml", [f"generate.store={work / 'data' / 'tiny.zarr'}",
                                           f"train.out_dir={work / 'results' / 'tiny'}"])
    train = json.loads((work / FEATURES / "features.json").read_text())
    return FeaturesRun(work, cfg, heldout, train, work / FEATURES / "index.html")
