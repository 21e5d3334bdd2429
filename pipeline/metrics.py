"""Reconstruction and sparsity metrics, accumulated exactly over many batches.

FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2, where `mean` is the dataset mean of the target
activations (from the store's statistics), not the batch mean: a batch mean makes FVU depend on
the batch size. explained_variance = 1 - FVU. Sums are kept in float64.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class ReconstructionMetrics:
    dataset_mean: torch.Tensor  # (d,) float64, the target hook's mean over the store
    sum_sq_error: float = 0.0
    sum_sq_centered: float = 0.0
    rows: int = 0
    active_sum: float = 0.0
    fire_counts: torch.Tensor | None = None  # (d_sae,) rows on which each latent fired
    l0_histogram: dict[int, int] = field(default_factory=dict)

    def update(self, target: torch.Tensor, reconstruction: torch.Tensor, active: torch.Tensor) -> None:
        """target, reconstruction: (B, d); active: (B, d_sae) bool of latents that fired."""
        target = target.detach().double()
        error = target - reconstruction.detach().double()
        self.sum_sq_error += float(error.pow(2).sum())
        self.sum_sq_centered += float((target - self.dataset_mean.to(target.device)).pow(2).sum())
        self.rows += target.shape[0]
        l0 = active.sum(dim=1)
        self.active_sum += float(l0.sum())
        counts = active.sum(dim=0).to("cpu", torch.int64)
        self.fire_counts = counts if self.fire_counts is None else self.fire_counts + counts
        for value, count in zip(*torch.unique(l0.cpu(), return_counts=True)):
            self.l0_histogram[int(value)] = self.l0_histogram.get(int(value), 0) + int(count)

    def result(self, dense_threshold: float = 0.1) -> dict[str, float]:
        rows = max(self.rows, 1)
        fvu = self.sum_sq_error / max(self.sum_sq_centered, 1e-30)
        frequency = self.fire_counts.double() / rows if self.fire_counts is not None else torch.zeros(1)
        return {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": self.sum_sq_error / rows,
            "l0": self.active_sum / rows,
            "dead_fraction": float((frequency == 0).double().mean()),
            "dense_fraction": float((frequency > dense_threshold).double().mean()),
            "rows": self.rows,
        }

    def firing_frequency(self) -> torch.Tensor:
        return self.fire_counts.double() / max(self.rows, 1)
