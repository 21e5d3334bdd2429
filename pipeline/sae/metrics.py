"""Reconstruction and sparsity metrics, accumulated exactly over many batches.

The one accumulator behind the training log's windows and the held-out evaluation.
FVU = sum ||x - x_hat||^2 / sum ||x - mean||^2, where `mean` is the dataset mean of the target
activations (from the store's statistics), not the batch mean: a batch mean makes FVU depend on
the batch size. explained_variance = 1 - FVU. Sums are float64 tensors on the batches' device,
so accumulating costs no host sync; result() reads them once.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from pipeline.sae.model import SAEOutput, SparseAutoencoder

DENSE_FREQUENCY = 0.1  # a latent firing on more than 10% of the measured tokens counts as dense


class ReconstructionMetrics:
    """FVU, MSE, L0 and per-latent firing counts over every row passed to update()."""

    def __init__(self, dataset_mean: Tensor, d_sae: int, *, l0_histogram: bool = False):
        self.dataset_mean = dataset_mean  # (d,) the target hook's mean, in the space of the targets
        self.d_sae = d_sae
        self.rows = 0
        self._sums: dict[str, Tensor] = {}
        self._fire_counts: Tensor | None = None  # (d_sae,) int64: rows on which each latent fired
        self._l0_counts: Tensor | None = None  # (d_sae + 1,) int64: rows per L0 value
        self._track_l0 = l0_histogram

    def update(self, target: Tensor, squared_error: Tensor, out: SAEOutput, fire_counts: Tensor | None = None) -> None:
        """target (B, d); squared_error: the batch's sum of ||target - x_hat||^2 (a tensor); out:
        the SAE's output for the batch (fire_counts: its firing_counts(), if already computed)."""
        with torch.no_grad():
            centered = (target - self.dataset_mean.to(target)).pow(2).sum()
            self._add("sq_error", squared_error.detach())
            self._add("sq_centered", centered)
            counts = (out.firing_counts() if fire_counts is None else fire_counts).to(torch.int64)
            self._fire_counts = counts if self._fire_counts is None else self._fire_counts + counts
            if self._track_l0:
                l0 = torch.bincount(out.l0.to(torch.int64), minlength=self.d_sae + 1)
                self._l0_counts = l0 if self._l0_counts is None else self._l0_counts + l0
        self.rows += target.shape[0]

    def combine(self, sum_over_processes: Callable[[list[Tensor]], list[Tensor]]) -> None:
        """Replace every sum and count with its sum over processes (e.g. Ranks.all_reduce_sums:
        the list of tensors summed in as few collectives as their dtypes need), so result()
        describes all their rows."""
        keys = sorted(self._sums)
        counts = [name for name in ("_fire_counts", "_l0_counts") if getattr(self, name) is not None]
        rows = torch.tensor(self.rows, dtype=torch.int64, device=self.dataset_mean.device)
        summed = sum_over_processes([*(self._sums[key] for key in keys), *(getattr(self, name) for name in counts), rows])
        self._sums = dict(zip(keys, summed))
        for name, value in zip(counts, summed[len(keys):]):
            setattr(self, name, value)
        self.rows = int(summed[-1])

    def _add(self, key: str, value: Tensor) -> None:
        value = value.to(torch.float64)
        self._sums[key] = value if key not in self._sums else self._sums[key] + value

    def state(self) -> tuple[int, dict[str, Tensor]]:
        """(rows, tensors): what a checkpoint keeps to continue accumulating exactly (not the L0 histogram)."""
        tensors = dict(self._sums)
        if self._fire_counts is not None:
            tensors["fire_counts"] = self._fire_counts
        return self.rows, tensors

    def restore(self, rows: int, tensors: dict[str, Tensor]) -> None:
        """Continue from a state(); tensors go to the dataset mean's device."""
        device = self.dataset_mean.device
        self.rows = rows
        self._sums = {key: value.to(device) for key, value in tensors.items() if key != "fire_counts"}
        counts = tensors.get("fire_counts")
        self._fire_counts = None if counts is None else counts.to(device)

    def fire_counts(self) -> Tensor:
        """(d_sae,) int64 on the CPU: the rows on which each latent fired."""
        if self._fire_counts is None:
            return torch.zeros(self.d_sae, dtype=torch.int64)
        return self._fire_counts.cpu()

    def firing_frequency(self) -> Tensor:
        """(d_sae,) float64 on the CPU: the share of rows on which each latent fired."""
        return self.fire_counts().double() / max(self.rows, 1)

    def silent_fraction(self) -> float:
        """The share of latents that fired on none of the rows passed to update()."""
        return float((self.fire_counts() == 0).double().mean())

    def dense_fraction(self) -> float:
        """The share of latents that fired on more than DENSE_FREQUENCY of the rows passed to update()."""
        return float((self.firing_frequency() > DENSE_FREQUENCY).double().mean())

    def l0_histogram(self) -> dict[int, int]:
        """{L0: rows} for the L0 values that occurred (needs l0_histogram=True)."""
        if self._l0_counts is None:
            return {}
        counts = self._l0_counts.cpu()
        return {int(l0): int(counts[l0]) for l0 in torch.nonzero(counts).flatten()}

    def result(self) -> dict[str, float | int]:
        """Every figure over the rows passed. Written whole only as held-out reports (metrics.json,
        train_metrics.json), so the dead and dense figures are named for those rows: dead_fraction_heldout
        (firing on none of them; dead_latents counts them) and dense_fraction_heldout (dense_latents).
        The training log takes fvu..l0 and, as dense_fraction_train_window, dense_fraction()."""
        rows = max(self.rows, 1)
        sq_error = float(self._sums.get("sq_error", 0.0))
        fvu = sq_error / max(float(self._sums.get("sq_centered", 0.0)), 1e-30)
        frequency = self.firing_frequency()
        dead, dense = frequency == 0, frequency > DENSE_FREQUENCY
        return {
            "fvu": fvu,
            "explained_variance": 1.0 - fvu,
            "mse": sq_error / rows,
            "l0": int(self.fire_counts().sum()) / rows,
            "dead_fraction_heldout": self.silent_fraction(),
            "dense_fraction_heldout": self.dense_fraction(),
            "dead_latents": int(dead.sum()),
            "dense_latents": int(dense.sum()),
            "rows": self.rows,
        }


def squared_error(target: Tensor, reconstruction: Tensor) -> Tensor:
    """sum ||target - reconstruction||^2 over the batch, in float64."""
    return (target.double() - reconstruction.double()).pow(2).sum()


@torch.no_grad()
def heldout_metrics(
    sae: SparseAutoencoder, batches: Iterable[dict[str, Tensor]], dataset_mean_out: Tensor, *, l0_histogram: bool = False
) -> ReconstructionMetrics:
    """Metrics in the raw activation space of hook_point_out over `batches` ({hook: rows}, e.g.
    a held-out ActivationLoader), with the SAE in eval mode."""
    metrics = ReconstructionMetrics(dataset_mean_out.double(), sae.cfg.d_sae, l0_histogram=l0_histogram)
    was_training = sae.training
    sae.eval()
    for batch in batches:
        x_in, x_out = batch[sae.cfg.hook_point_in], batch[sae.cfg.hook_point_out]
        x_hat, out = sae(sae.normalize_input(x_in))
        reconstruction = sae.denormalize_output(x_hat, x_in)
        metrics.update(x_out.double(), squared_error(x_out, reconstruction), out)
    sae.train(was_training)
    return metrics
