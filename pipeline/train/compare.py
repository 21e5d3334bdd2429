"""Compare finished training runs at a glance: `saeflow compare RUN_DIR... --out DIR`, and the
end of `saeflow train` for a train.sweep (into <train.out_dir>/sweep/).

It reads only what train writes per variant (train_metrics.json's held-out figures,
train_log.jsonl), so it lives with stage 2 and needs neither the store nor the SAE; metrics.json
(evaluate) is not used: train_metrics.json is there for every finished run, measured on the whole
held-out split, the same figure in a train.sweep's plots and in a comparison of separate runs.
Writes into DIR:
- fvu_vs_l0.png: held-out FVU against L0, one labelled point per variant;
- fvu_vs_l0.json: those points (label, run folder, fvu, l0, dead/dense fractions, tokens);
- training_curves.png: the variants' training curves overlaid, one line per variant.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from pipeline.files import write_text_atomically
from pipeline.train.plots import SOLE_VARIANT, plot_fvu_against_l0, plot_training_curves, read_log, run_title

METRICS_FILE = "train_metrics.json"
LOG_FILE = "train_log.jsonl"
POINT_KEYS = ("fvu", "l0")  # required; the dead and dense fractions are copied where present
EXTRA_KEYS = ("dead_fraction_heldout", "dense_fraction_heldout")


class CompareError(ValueError):
    """A run folder that cannot be compared; the message names it and what to pass instead."""


def compare_runs(run_dirs: list[Path], out_dir: Path, title: str | None = None) -> list[dict]:
    """Write the comparison of every finished variant in `run_dirs` (a variant folder holding
    train_metrics.json, or a train.out_dir holding such folders) into `out_dir`; returns the points."""
    variants = _variants(run_dirs)
    labels = _labels(variants)
    points = [_point(label, variant) for label, variant in zip(labels, variants)]
    title = title or _common_name(variants)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomically(out_dir / "fvu_vs_l0.json", json.dumps({"title": title, "points": points}, indent=1))
    plot_fvu_against_l0(points, out_dir / "fvu_vs_l0.png", f"{title}: held-out FVU against L0")
    curves = {label: read_log(variant / LOG_FILE) for label, variant in zip(labels, variants)}
    plot_training_curves(curves, out_dir / "training_curves.png", f"{title}: training curves")
    return points


def _variants(run_dirs: list[Path]) -> list[Path]:
    if not run_dirs:
        raise CompareError("no run folders given; pass the train.out_dir of each run (or its variant folders)")
    found: list[Path] = []
    for run_dir in map(Path, run_dirs):
        if not run_dir.is_dir():
            raise CompareError(f"{run_dir} is not a folder; pass a train.out_dir that `saeflow train` finished")
        inside = [run_dir] if (run_dir / METRICS_FILE).is_file() else \
            sorted(child for child in run_dir.iterdir() if (child / METRICS_FILE).is_file())
        if not inside:
            raise CompareError(f"{run_dir} holds no finished SAE (no {METRICS_FILE} in it or its folders); "
                               "pass a train.out_dir that `saeflow train` finished")
        found.extend(variant for variant in inside if variant.resolve() not in {f.resolve() for f in found})
    return found


def _labels(variants: list[Path]) -> list[str]:
    """run_title of each variant; where two share one, their paths below the folder all share."""
    labels = [run_title(variant) for variant in variants]
    if len(set(labels)) == len(labels):
        return labels
    common = os.path.commonpath([str(variant.resolve()) for variant in variants])
    return [os.path.relpath(variant.resolve(), common) for variant in variants]


def _common_name(variants: list[Path]) -> str:
    """The folder every variant is under (the sweep's train.out_dir, or the folder of its runs)."""
    folders = [variant.resolve().parent.parent if variant.name == SOLE_VARIANT else variant.resolve().parent
               for variant in variants]
    return Path(os.path.commonpath([str(folder) for folder in folders])).name or "runs"


def _point(label: str, variant: Path) -> dict:
    path = variant / METRICS_FILE
    try:
        metrics = json.loads(path.read_text())
        heldout = metrics["heldout"]
        point = {"label": label, "run": str(variant), **{key: float(heldout[key]) for key in POINT_KEYS}}
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise CompareError(f"{path} cannot be read as train's held-out metrics ({type(error).__name__}: {error}); "
                           "rerun `saeflow train` for that run") from None
    point.update({key: heldout.get(key) for key in EXTRA_KEYS})
    point["tokens"] = metrics.get("tokens")
    return point
