"""Figures of trained runs, drawn from what train writes (train_log.jsonl, train_metrics.json):
one variant's training curves (report.py) and a sweep's, overlaid (compare.py). matplotlib and
the files only: comparing runs never loads torch or the SAE.
"""

from __future__ import annotations

import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402

from pipeline.files import write_file_atomically  # noqa: E402

# (log key, panel title): the panels of a training-curves figure, one run or several
CURVE_PANELS = (("fvu", "FVU"), ("l0", "L0"), ("dead_fraction_train_window", "dead fraction (train window)"),
                ("loss", "loss"))
# the folder of the one variant of a config without train.sweep
SOLE_VARIANT = "sae"


def run_title(variant_dir: Path) -> str:
    """The name that tells a variant apart: its folder (a train.sweep variant's name), or for the
    sole variant of a config without a sweep (<train.out_dir>/sae) the run folder above it."""
    variant_dir = Path(variant_dir)
    if variant_dir.name != SOLE_VARIANT:
        return variant_dir.name
    return variant_dir.resolve().parent.name or SOLE_VARIANT


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def save_figure(figure, path: Path, title: str) -> None:
    """Write `figure` as PNG; `title` also goes into the file's Title text chunk (readable without the picture)."""
    try:
        write_file_atomically(path, lambda temp: figure.savefig(temp, format="png", dpi=100, metadata={"Title": title}))
    finally:
        plt.close(figure)


def plot_training_curves(runs: dict[str, list[dict]], path: Path, title: str) -> None:
    """One panel per CURVE_PANELS metric against tokens; one line per run ({label: log records}),
    with a legend when there are several."""
    figure, axes = plt.subplots(1, len(CURVE_PANELS), figsize=(14, 3.4))
    single = len(runs) == 1
    for axis, (key, label) in zip(axes, CURVE_PANELS):
        for name, records in runs.items():
            axis.plot([record["tokens"] for record in records], [record.get(key, float("nan")) for record in records],
                      color="#aa4422" if single else None, marker="." if len(records) < 20 else None, label=name)
        axis.set_xlabel("tokens")
        axis.set_title(label)
        values = [record.get(key, 1) for records in runs.values() for record in records]
        if key in ("fvu", "loss") and values and min(values) > 0:
            axis.set_yscale("log")
    if not single:
        axes[-1].legend(fontsize="small", loc="best")
    figure.suptitle(title)
    figure.tight_layout()
    save_figure(figure, path, title)


def plot_fvu_against_l0(points: list[dict], path: Path, title: str) -> None:
    """Held-out FVU against L0, one labelled point per run (points: {"label", "l0", "fvu"})."""
    figure, axis = plt.subplots(figsize=(6.5, 4.5))
    l0 = [point["l0"] for point in points]
    fvu = [point["fvu"] for point in points]
    axis.scatter(l0, fvu, color="#4466aa", zorder=2)
    for point in points:
        axis.annotate(point["label"], (point["l0"], point["fvu"]), textcoords="offset points", xytext=(5, 5),
                      fontsize="small")
    if l0 and min(l0) > 0 and max(l0) >= 4 * min(l0):  # a k sweep doubles L0: evenly spaced on a log axis
        axis.set_xscale("log")
    axis.set_xlabel("L0 (held-out mean active latents)")
    axis.set_ylabel("FVU (held-out)")
    axis.set_title(title)
    axis.margins(0.12)  # room for the labels at the edges
    axis.grid(alpha=0.3)
    figure.tight_layout()
    save_figure(figure, path, title)
