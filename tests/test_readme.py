"""README's Python API example runs as written, on a tiny store and SAE in place of the default's."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

from pipeline.config import load_config
from pipeline.generate.stage import generate
from pipeline.train.stage import train

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = "configs/minilm-docstrings.yaml"


def python_api_example() -> str:
    section = (REPO / "README.md").read_text().split("### Python API", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_python_api_example_runs(tmp_path):
    data = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    data["generate"]["store"] = str(tmp_path / "tiny.zarr")
    data["train"]["out_dir"] = str(tmp_path / "run")
    data["train"]["total_tokens"] = 2048
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(data))
    cfg = load_config(config)
    generate(cfg)
    train(cfg)
    example = python_api_example()
    assert DEFAULT_CONFIG in example
    result = subprocess.run([sys.executable, "-c", example.replace(DEFAULT_CONFIG, str(config))], cwd=REPO,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    match = re.search(r"(\d+) rows in the store; held-out batch: L0 ([\d.]+), FVU ([\d.]+)", result.stdout)
    assert match, result.stdout
    rows, l0, fvu = int(match[1]), float(match[2]), float(match[3])
    assert rows == 8192 and l0 == data["sae"]["top_k"] and 0 < fvu < 1
