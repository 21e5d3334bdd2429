"""End-of-training report: held-out metrics, feature-density histogram, training curves.

Curves are written as CSV (dvc plots data) and as PNG next to the SAE.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from pipeline.files import write_file_atomically, write_text_atomically  # noqa: E402
from pipeline.sae.metrics import heldout_metrics  # noqa: E402

CURVE_KEYS = ("tokens", "step", "loss", "mse_loss", "fvu", "l0", "dead_fraction_train_window", "lr")


def write_heldout_report(trainer, loader) -> dict:
    """Held-out metrics of the trained SAE (`loader`: the store's held-out split), its plots and curves."""
    raw_mean = trainer.dataset_mean.double().cpu() / float(trainer.sae.norm_factor_out)
    metrics = heldout_metrics(trainer.sae, loader, raw_mean)
    result = metrics.result()
    plots = trainer.out_dir / "plots"
    plots.mkdir(exist_ok=True)
    plot_feature_density(metrics.firing_frequency(), plots / "feature_density.png", trainer.name)
    records = read_log(trainer.log_path)
    write_curves_csv(records, trainer.out_dir / "curves.csv")
    plot_training_curves(records, plots / "training_curves.png", trainer.name)
    return {"heldout": result, "steps": trainer.step, "tokens": trainer.tokens}


def read_log(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_curves_csv(records: list[dict], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CURVE_KEYS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({key: record.get(key, "") for key in CURVE_KEYS})
    write_text_atomically(path, text.getvalue())


def _save_figure(figure, path: Path) -> None:
    try:
        write_file_atomically(path, lambda temp: figure.savefig(temp, format="png", dpi=100))
    finally:
        plt.close(figure)


def plot_feature_density(frequency: torch.Tensor, path: Path, title: str) -> None:
    """Histogram of log10 firing frequency; dead latents (frequency 0) are counted apart."""
    alive = frequency[frequency > 0]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if alive.numel():
        axis.hist(torch.log10(alive).numpy(), bins=60, color="#4466aa")
    dead = int((frequency == 0).sum())
    axis.set_xlabel("log10 firing frequency (held-out tokens)")
    axis.set_ylabel("latents")
    axis.set_title(f"{title}: feature density ({dead} dead of {frequency.numel()})")
    figure.tight_layout()
    _save_figure(figure, path)


def plot_training_curves(records: list[dict], path: Path, title: str) -> None:
    panels = [("fvu", "FVU"), ("l0", "L0"), ("dead_fraction_train_window", "dead fraction (train window)"), ("loss", "loss")]
    figure, axes = plt.subplots(1, len(panels), figsize=(14, 3.2))
    tokens = [record["tokens"] for record in records]
    for axis, (key, label) in zip(axes, panels):
        axis.plot(tokens, [record.get(key, float("nan")) for record in records], color="#aa4422")
        axis.set_xlabel("tokens")
        axis.set_title(label)
        if key in ("fvu", "loss") and records and min(r.get(key, 1) for r in records) > 0:
            axis.set_yscale("log")
    figure.suptitle(title)
    figure.tight_layout()
    _save_figure(figure, path)
