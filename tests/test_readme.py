"""README's Python API examples run as written, on a tiny store and SAE in place of the default's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pipeline.config import load_config
from pipeline.generate.stage import generate
from pipeline.train.stage import train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/minilm-docstrings.yaml"


def readme_example(heading: str) -> str:
    section = (REPO / "README.md").read_text().split(heading, 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> tuple[Path, dict]:
    """A tiny config whose store is generated and SAE trained, and its YAML data."""
    tmp = tmp_path_factory.mktemp("readme")
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["generate"]["store"] = str(tmp / "tiny.zarr")
    data["train"]["out_dir"] = str(tmp / "run")
    data["train"]["total_tokens"] = 2048
    config = tmp / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_config(config)
    generate(cfg)
    train(cfg)
    return config, data


def run_example(heading: str, config: Path) -> str:
    example = readme_example(heading)
    assert DEFAULT_CONFIG in example
    result = subprocess.run([sys.executable, "-c", example.replace(DEFAULT_CONFIG, str(config))], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_the_python_api_example_runs(tiny):
    config, data = tiny
    output = run_example("### Python API", config)
    match = re.search(r"(\d+) rows in the store; held-out batch: L0 ([\d.]+), FVU ([\d.]+)", output)
    assert match, output
    rows, l0, fvu = int(match[1]), float(match[2]), float(match[3])
    assert rows == 8192 and l0 == data["sae"]["top_k"] and 0 < fvu < 1


def test_the_reading_the_latents_example_runs(tiny):
    config, _ = tiny
    output = run_example("### Reading the latents", config)
    examples = re.findall(r"latent 7 at ([\d.]+): .*\[\[.+\]\]", output)
    assert len(examples) == 3 and examples == sorted(examples, reverse=True), output
    per_token = re.search(r"strongest latent per token: \[([\d, ]+)\]", output)
    assert per_token and len(per_token[1].split(",")) > 5, output
    moved = re.search(r"logits move by up to ([\d.]+) with the SAE spliced in", output)
    assert moved and float(moved[1]) > 0, output
