"""End-of-training report: held-out metrics, feature-density histogram, training curves.

Curves are written as CSV (a plain output, for any tool) and as PNG next to the SAE; the plots
are titled by run_title (plots.py), the name that tells the variant apart.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import torch

from pipeline.files import write_text_atomically
from pipeline.sae.metrics import heldout_metrics
from pipeline.train.plots import plot_training_curves, plt, read_log, run_title, save_figure

CURVE_KEYS = ("tokens", "step", "loss", "mse_loss", "fvu", "l0", "dead_fraction_train_window", "lr")


def write_heldout_report(trainer, loader) -> dict:
    """Held-out metrics of the trained SAE (`loader`: the store's held-out split), its plots and curves."""
    raw_mean = trainer.dataset_mean.double().cpu() / float(trainer.sae.norm_factor_out)
    metrics = heldout_metrics(trainer.sae, loader, raw_mean)
    result = metrics.result()
    plots = trainer.out_dir / "plots"
    plots.mkdir(exist_ok=True)
    title = run_title(trainer.out_dir)
    plot_feature_density(metrics.firing_frequency(), plots / "feature_density.png", title)
    records = read_log(trainer.log_path)
    write_curves_csv(records, trainer.out_dir / "curves.csv")
    plot_training_curves({title: records}, plots / "training_curves.png", f"{title}: training curves")
    return {"heldout": result, "steps": trainer.step, "tokens": trainer.tokens}


def write_curves_csv(records: list[dict], path: Path) -> None:
    text = io.StringIO(newline="")
    writer = csv.DictWriter(text, fieldnames=CURVE_KEYS, extrasaction="ignore")
    writer.writeheader()
    for record in records:
        writer.writerow({key: record.get(key, "") for key in CURVE_KEYS})
    write_text_atomically(path, text.getvalue())


def plot_feature_density(frequency: torch.Tensor, path: Path, title: str) -> None:
    """Histogram of log10 firing frequency; dead latents (frequency 0) are counted apart."""
    alive = frequency[frequency > 0]
    figure, axis = plt.subplots(figsize=(6, 3.5))
    if alive.numel():
        axis.hist(torch.log10(alive).numpy(), bins=60, color="#4466aa")
    dead = int((frequency == 0).sum())
    axis.set_xlabel("log10 firing frequency (held-out tokens)")
    axis.set_ylabel("latents")
    title = f"{title}: feature density ({dead} dead of {frequency.numel()})"
    axis.set_title(title)
    figure.tight_layout()
    save_figure(figure, path, title)
