"""Streaming float64 moments of activations (count, mean, covariance, mean norm).

Pure tensor code (no store access); a split's moments are in store/split_moments.py.
Everything accumulates in float64: fp16 activations summed over millions of rows in fp32 lose the
mean's low digits, and the covariance's small eigenvalues drown in rounding.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

_F64 = torch.float64


def norm_scale_factor(mean_norm: float, d: int) -> float:
    """The factor that scales activations so their mean L2 norm becomes sqrt(d)."""
    if not mean_norm > 0:
        raise ValueError(f"mean norm must be positive to normalize, got {mean_norm}")
    return math.sqrt(d) / mean_norm


# --- streaming moments ---------------------------------------------------------------------
class RunningMoments:
    """Streaming float64 count, mean, M2 (sum of outer products of deviations) and norm sum.

    Batches and partial accumulators combine with Chan et al.'s parallel update, so rows can be
    accumulated in any grouping (per chunk, per worker, per resume segment) with the same result.
    `track_covariance=False` keeps only the mean and norm (M2 costs d^2 memory and a matmul).
    """

    def __init__(self, d: int, *, track_covariance: bool = True):
        self.d = d
        self.track_covariance = track_covariance
        self.count = 0
        self._mean = torch.zeros(d, dtype=_F64)
        self.M2 = torch.zeros(d, d, dtype=_F64) if track_covariance else None
        self.norm_sum = 0.0

    def update(self, batch: torch.Tensor | np.ndarray) -> None:
        """Add the rows of an (n, d) batch."""
        rows = torch.as_tensor(batch).detach().to("cpu", _F64)
        if rows.ndim != 2 or rows.shape[1] != self.d:
            raise ValueError(f"expected a batch of shape (n, {self.d}), got {tuple(rows.shape)}")
        if rows.shape[0] == 0:
            return
        other = RunningMoments(self.d, track_covariance=self.track_covariance)
        other.count = rows.shape[0]
        other._mean = rows.mean(dim=0)
        if self.track_covariance:
            centered = rows - other._mean
            other.M2 = centered.T @ centered
        other.norm_sum = float(torch.linalg.vector_norm(rows, dim=1).sum())
        self.merge(other)

    def merge(self, other: RunningMoments) -> RunningMoments:
        """Fold another accumulator into this one (in place; returns self)."""
        if other.d != self.d:
            raise ValueError(f"cannot merge moments of width {other.d} into width {self.d}")
        if other.count == 0:
            return self
        n_a, n_b = self.count, other.count
        n = n_a + n_b
        delta = other._mean - self._mean
        if self.track_covariance:
            if other.M2 is None:
                raise ValueError("cannot merge moments without covariance into ones that track it")
            self.M2 = self.M2 + other.M2 + torch.outer(delta, delta) * (n_a * n_b / n)
        self._mean = self._mean + delta * (n_b / n)
        self.count = n
        self.norm_sum += other.norm_sum
        return self

    def subtract(self, part: RunningMoments) -> RunningMoments:
        """The moments of the rows not in `part`, where `part` is a subset of this accumulator's rows.

        Inverts merge exactly in arithmetic; in float64 the rounding left is ~1e-16 relative to the
        whole, so removing a small part (the held-out chunks) from recorded statistics is accurate.
        Returns a new accumulator.
        """
        if part.d != self.d or part.count > self.count:
            raise ValueError(f"cannot remove {part.count} rows of width {part.d} from {self.count} rows of width {self.d}")
        rest = RunningMoments(self.d, track_covariance=self.track_covariance)
        n, m = self.count, part.count
        rest.count = n - m
        if rest.count == 0 or m == 0:
            return rest if m else rest.merge(self)
        rest._mean = (self._mean * n - part._mean * m) / rest.count
        if self.track_covariance:
            if part.M2 is None:
                raise ValueError("cannot remove moments without covariance from ones that track it")
            delta = part._mean - rest._mean
            rest.M2 = self.M2 - part.M2 - torch.outer(delta, delta) * (rest.count * m / n)
        rest.norm_sum = self.norm_sum - part.norm_sum
        return rest

    @property
    def mean(self) -> torch.Tensor:
        return self._mean.clone()

    @property
    def mean_norm(self) -> float:
        return self.norm_sum / self.count if self.count else float("nan")

    def covariance(self, ddof: int = 1) -> torch.Tensor:
        """M2 / (count - ddof); ddof=1 matches np.cov, ddof=0 is the population covariance."""
        if self.M2 is None:
            raise ValueError("these moments were accumulated with track_covariance=False")
        if self.count - ddof <= 0:
            raise ValueError(f"covariance of {self.count} rows with ddof={ddof} is undefined")
        return self.M2 / (self.count - ddof)

    def state_dict(self) -> dict[str, Any]:
        """Float64 arrays (mean, M2) and JSON-able scalars (count, norm_sum, d)."""
        state: dict[str, Any] = {
            "d": self.d,
            "count": self.count,
            "norm_sum": self.norm_sum,
            "mean": self._mean.numpy().copy(),
        }
        if self.M2 is not None:
            state["M2"] = self.M2.numpy().copy()
        return state

    @classmethod
    def from_state(cls, state: dict[str, Any]) -> RunningMoments:
        mean = np.asarray(state["mean"], dtype=np.float64)
        moments = cls(int(state.get("d", mean.shape[0])), track_covariance=state.get("M2") is not None)
        moments.count = int(state["count"])
        moments.norm_sum = float(state["norm_sum"])
        moments._mean = torch.from_numpy(mean.copy())
        if moments.track_covariance:
            moments.M2 = torch.from_numpy(np.asarray(state["M2"], dtype=np.float64).copy())
        return moments
