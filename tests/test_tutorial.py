"""docs/tutorial.md runs as written: its shell and Python blocks, in order, in a fresh folder
holding configs/tiny.yaml. `saeflow` lines run through the CLI in this process (click's runner:
the same entry point as the installed command, without paying the imports per line), other
shell lines in bash; the install block is the README's set-up command, checked, not rerun."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

from tests.test_cli import invoke_saeflow

REPO = Path(__file__).resolve().parents[1]
TUTORIAL = REPO / "docs" / "tutorial.md"


def tutorial_blocks() -> list[tuple[str, str]]:
    """(language, code) of each fenced block, in order."""
    return re.findall(r"```(bash|python)\n(.*?)```", TUTORIAL.read_text(), re.S)


def shell_lines(code: str) -> list[str]:
    """Commands of a shell block: continuation lines joined, comments and blank lines dropped."""
    lines = code.replace("\\\n", " ").splitlines()
    return [line for line in lines if shlex.split(line, comments=True)]


def run_shell_line(line: str, cwd: Path) -> str:
    words = shlex.split(line, comments=True)
    if words[0] == "saeflow":
        result = invoke_saeflow(*words[1:])
        assert result.exit_code == 0, f"{line}\n{result.output}"
        return result.output
    done = subprocess.run(["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, f"{line}\n{done.stderr}"
    return done.stdout


def test_every_tutorial_command_runs(tmp_path, monkeypatch, capsys):
    (tmp_path / "configs").mkdir()
    shutil.copy(REPO / "configs" / "tiny.yaml", tmp_path / "configs" / "tiny.yaml")
    monkeypatch.chdir(tmp_path)
    readme = (REPO / "README.md").read_text()
    outputs, ran = {}, []
    for language, code in tutorial_blocks():
        if language == "python":
            exec(compile(code, str(TUTORIAL), "exec"), {"__name__": "__tutorial__"})
            outputs["python"] = capsys.readouterr().out
            continue
        lines = shell_lines(code)
        if any("pip install" in line for line in lines):  # the set-up, as the README gives it
            assert lines[0] in readme, lines[0]
            continue
        for line in lines:
            outputs[line] = run_shell_line(line, tmp_path)
            ran.append(line)

    assert ran[:3] == ["saeflow config configs/tiny.yaml", "saeflow generate configs/tiny.yaml",
                       "saeflow inspect data/tiny.zarr"]
    assert "text       document 0: " in outputs["saeflow inspect data/tiny.zarr"]
    assert outputs["saeflow validate data/tiny.zarr"].startswith("ok: data/tiny.zarr")
    assert "ce_loss_recovered" in json.loads(outputs["cat results/tiny/metrics.json"])["sae"]
    assert set(outputs["ls results/tiny/sae/features"].split()) == {"features.json", "index.html"}

    # the latent read from Python: its top example is the one features.json lists first
    features = json.loads((tmp_path / "results/tiny/sae/features/features.json").read_text())
    latent = max(features["latents"], key=lambda entry: entry["fires"])
    printed = outputs["python"].splitlines()
    assert printed[0].startswith(f"latent {latent['latent']} fires on ")
    assert len(printed) == 4 and float(printed[1].split()[0]) == round(latent["top"][0]["activation"], 3)
    assert all("[[" in line for line in printed[1:])

    sweep = json.loads(outputs["cat results/tiny-sweep/metrics.json"])
    assert set(sweep) == {"k4", "k16"} and sweep["k16"]["fvu"] < sweep["k4"]["fvu"]
    assert (sweep["k4"]["l0"], sweep["k16"]["l0"]) == (4, 16)
