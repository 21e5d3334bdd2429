"""A damaged store never reaches an optimizer silently: every corruption below is reported by
`saeflow validate`, described by `inspect` without a traceback, and stops `train` and `evaluate`
with one line (exit 2) before anything already written is touched."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.generate.stage import generate
from pipeline.train.stage import train
from store.split import heldout_chunk_indices

REPO = Path(__file__).resolve().parents[2]
HOOK = "blocks.0.hook_resid_post"  # the hook the tiny SAE trains on
CHUNK_BYTES = 512 * 64 * 2  # tiny.yaml: chunks of 512 rows, d 64, float16
HELDOUT_CHUNK = heldout_chunk_indices(16, 2)[-1]  # of 16, two held out, spread over the store
TRAIN_CHUNK = 3
assert TRAIN_CHUNK not in heldout_chunk_indices(16, 2)


def chunk_file(store: Path, index: int = TRAIN_CHUNK) -> Path:
    return store / "acts" / HOOK / "c" / str(index) / "0"


def flip_byte(store: Path, index: int = TRAIN_CHUNK) -> None:
    data = bytearray(chunk_file(store, index).read_bytes())
    data[1000] ^= 0x10
    chunk_file(store, index).write_bytes(bytes(data))


def write_nan(store: Path) -> None:
    rows = np.frombuffer(chunk_file(store).read_bytes(), dtype="<f2").copy()
    rows[70] = np.nan
    chunk_file(store).write_bytes(rows.tobytes())


def edit_manifest(store: Path, **changes) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    meta["attributes"]["saeflow"].update(changes)
    (store / "zarr.json").write_text(json.dumps(meta))


def rename_hook(store: Path, name: str) -> None:
    meta = json.loads((store / "zarr.json").read_text())
    hooks = meta["attributes"]["saeflow"]["hook_points"]
    hooks[name] = hooks.pop(HOOK)
    (store / "zarr.json").write_text(json.dumps(meta))


DAMAGE = {
    "flipped byte": flip_byte,
    "NaN written in": write_nan,
    "flipped byte in a held-out chunk": lambda store: flip_byte(store, HELDOUT_CHUNK),
    "chunk file deleted": lambda store: chunk_file(store).unlink(),
    "chunk file grown": lambda store: chunk_file(store).write_bytes(chunk_file(store).read_bytes() + b"\0" * 100),
    "chunk file truncated": lambda store: chunk_file(store).write_bytes(chunk_file(store).read_bytes()[:100]),
    "root zarr.json not JSON": lambda store: (store / "zarr.json").write_text("{not json"),
    "array zarr.json deleted": lambda store: (store / "acts" / HOOK / "zarr.json").unlink(),
    "chunk_rows changed": lambda store: edit_manifest(store, chunk_rows=256),
    "n_rows digit changed": lambda store: edit_manifest(store, n_rows=8191),
    # claims 10^12 rows (and the matching chunk count): refused from the metadata, no row is read
    "n_rows set to 10^12": lambda store: edit_manifest(store, n_rows=10**12, n_chunks=10**12 // 512),
    "hook renamed to ..": lambda store: rename_hook(store, ".."),
}
# What validate names for each case.
REPORTED = {
    "flipped byte": f"acts/{HOOK}: checksum mismatch in chunk(s) {TRAIN_CHUNK} ",
    "NaN written in": f"acts/{HOOK}: checksum mismatch in chunk(s) {TRAIN_CHUNK} ",
    "flipped byte in a held-out chunk": f"acts/{HOOK}: checksum mismatch in chunk(s) {HELDOUT_CHUNK} ",
    "chunk file deleted": f"acts/{HOOK} chunk {TRAIN_CHUNK}: is missing",
    "chunk file grown": f"acts/{HOOK} chunk {TRAIN_CHUNK}: file {'{store}'}/acts/{HOOK}/c/3/0 has {CHUNK_BYTES + 100} bytes",
    "chunk file truncated": f"acts/{HOOK} chunk {TRAIN_CHUNK}: file {'{store}'}/acts/{HOOK}/c/3/0 has 100 bytes",
    "root zarr.json not JSON": "zarr.json is unreadable (JSONDecodeError",
    "array zarr.json deleted": f"acts/{HOOK}: array metadata missing or unreadable",
    "chunk_rows changed": "manifest says 16 chunks for 8192 rows of 256",
    "n_rows digit changed": f"acts/{HOOK}: 8192 rows, manifest commits 8191",
    "n_rows set to 10^12": f"acts/{HOOK}: 8192 rows, manifest commits 1000000000000",
    "hook renamed to ..": "acts/..: array metadata missing or unreadable",
}


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> dict:
    """A complete tiny store, the config that reads it and a finished run trained from it."""
    root = tmp_path_factory.mktemp("good")
    data = load_config(REPO / "configs" / "tiny.yaml").model_dump(mode="json")
    data["generate"]["store"] = str(root / "tiny.zarr")
    data["train"].update(out_dir=str(root / "run"), total_tokens=2048, checkpoint_every_tokens=1024)
    data["evaluate"]["lm_eval_sequences"] = 0  # the corruptions stop evaluate before the LM runs
    config = root / "tiny.yaml"
    config.write_text(json.dumps(data))
    cfg = load_config(config)
    generate(cfg)
    train(cfg)
    assert CliRunner().invoke(main, ["evaluate", str(config)]).exit_code == 0
    return {"root": root, "config": config}


@pytest.fixture(params=sorted(DAMAGE))
def damaged(request, good, tmp_path) -> dict:
    """A copy of the good store and run, the store damaged one way; the config points at the copy."""
    store, run = tmp_path / "tiny.zarr", tmp_path / "run"
    shutil.copytree(good["root"] / "tiny.zarr", store)
    shutil.copytree(good["root"] / "run", run)
    data = json.loads(good["config"].read_text())
    data["generate"]["store"], data["train"]["out_dir"] = str(store), str(run)
    config = tmp_path / "tiny.yaml"
    config.write_text(json.dumps(data))
    DAMAGE[request.param](store)
    return {"case": request.param, "store": store, "run": run, "config": config}


def invoke(*args: str):
    result = CliRunner().invoke(main, list(args))
    assert result.exception is None or isinstance(result.exception, SystemExit), f"traceback: {result.exception!r}"
    return result


def test_validate_reports_the_damage(damaged):
    result = invoke("validate", str(damaged["store"]))
    assert result.exit_code in (1, 2)
    expected = REPORTED[damaged["case"]].format(store=damaged["store"])
    assert expected in result.stderr, result.stderr


def test_inspect_describes_or_refuses_in_one_line(damaged):
    result = invoke("inspect", str(damaged["store"]))
    if result.exit_code:
        assert len(result.stderr.strip().splitlines()) == 1 and result.stderr.startswith("error: ")


# Changed bytes inside a training chunk: evaluate reads only the held-out split, so its numbers
# are unaffected and it runs; train, validate and every verified read of that chunk stop.
TRAINING_CONTENT_ONLY = {"flipped byte", "NaN written in"}


@pytest.mark.parametrize("command", ["train", "evaluate"])
def test_train_and_evaluate_stop_in_one_line_and_touch_nothing_written(damaged, command, good):
    if command == "train":  # a run interrupted after its checkpoint: the resume reads the store
        (damaged["run"] / "sae" / "sae.safetensors").unlink()
    written = {path: path.read_bytes() for path in damaged["run"].rglob("*") if path.is_file()}
    result = invoke(command, str(damaged["config"]))
    if command == "evaluate" and damaged["case"] in TRAINING_CONTENT_ONLY:
        assert result.exit_code == 0, result.output
        metrics = json.loads((damaged["run"] / "metrics.json").read_text())
        assert metrics == json.loads((good["root"] / "run" / "metrics.json").read_text())
        return
    assert result.exit_code == 2, result.output
    lines = result.stderr.strip().splitlines()  # progress lines ("saeflow train: ..."), then the error
    errors = [line for line in lines if line.startswith("error: ")]
    assert errors == lines[-1:] and str(damaged["store"]) in errors[0] and "Traceback" not in result.stderr, result.stderr
    after = {path: path.read_bytes() for path in damaged["run"].rglob("*") if path.is_file()}
    assert {p: b for p, b in after.items() if p in written} == written
