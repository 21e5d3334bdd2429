"""The stage-2 tests' store: configs/tiny.yaml generated once for the package."""

from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.generate.stage import generate

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="package")
def store(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("store") / "tiny.zarr"
    generate(load_config(REPO / "configs" / "tiny.yaml", [f"generate.store={path}"]))
    return path
