"""Geometric median (Weiszfeld) and principal components: the estimators behind SAE initialization."""

from __future__ import annotations

import pytest
import torch

from pipeline.sae.geometry import geometric_median, principal_components


def _sum_of_distances(x: torch.Tensor, y: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x.double() - y.double(), dim=1).sum())


def _reference_median(x: torch.Tensor) -> torch.Tensor:
    """An independent optimizer: LBFGS on the sum of distances, started at the mean."""
    data = x.double()
    y = data.mean(dim=0).clone().requires_grad_(True)
    opt = torch.optim.LBFGS([y], lr=1, max_iter=2000, tolerance_grad=1e-12, tolerance_change=1e-15, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.sqrt(((data - y) ** 2).sum(dim=1) + 1e-18).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return y.detach()


def test_geometric_median_matches_reference_optimizer():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(300, 8, generator=gen, dtype=torch.float64) * torch.linspace(0.5, 3, 8, dtype=torch.float64) + 2
    ours = geometric_median(x, tol=1e-10, max_iter=5000)
    ref = _reference_median(x)
    assert torch.allclose(ours, ref, atol=1e-5)
    assert _sum_of_distances(x, ours) <= _sum_of_distances(x, ref) + 1e-9
    # and it is not simply the mean
    assert _sum_of_distances(x, ours) < _sum_of_distances(x, x.mean(dim=0))


def test_geometric_median_resists_outliers_where_the_mean_does_not():
    gen = torch.Generator().manual_seed(1)
    inliers = torch.randn(900, 16, generator=gen) * 0.1 + 1.0
    outliers = torch.full((100, 16), 1000.0)
    x = torch.cat([inliers, outliers])
    median = geometric_median(x)
    center = torch.ones(16)
    assert float(torch.linalg.vector_norm(median - center)) < 0.2
    assert float(torch.linalg.vector_norm(x.mean(dim=0) - center)) > 100


def test_geometric_median_when_the_median_is_a_data_point():
    # Many copies of one point dominate: the median is that point, and the iterate starts on it.
    x = torch.cat([torch.zeros(10, 3, dtype=torch.float64), torch.eye(3, dtype=torch.float64) * 5])
    median = geometric_median(x, max_iter=4)  # converged within 4 steps
    assert torch.allclose(median, torch.zeros(3, dtype=torch.float64))
    assert torch.isfinite(median).all()


def test_geometric_median_recovers_from_a_data_point_that_is_not_the_median():
    # Start (coordinate-wise median) coincides with x[0], which is not the geometric median.
    x = torch.tensor([[0.0, 0.0], [10.0, 0.0], [10.0, 1.0], [10.0, -1.0], [0.0, 0.5]], dtype=torch.float64)
    ours = geometric_median(x, tol=1e-12, max_iter=10_000)
    ref = _reference_median(x)
    assert torch.isfinite(ours).all()
    assert _sum_of_distances(x, ours) <= _sum_of_distances(x, ref) + 1e-6


def test_geometric_median_dtype_and_weights():
    x = torch.randn(64, 4).half()
    assert geometric_median(x).dtype == torch.float16
    # integer weights equal repeating rows
    base = torch.randn(20, 3, dtype=torch.float64)
    w = torch.arange(1, 21, dtype=torch.float64)
    repeated = base.repeat_interleave(w.long(), dim=0)
    assert torch.allclose(geometric_median(base, weights=w, tol=1e-12, max_iter=5000), geometric_median(repeated, tol=1e-12, max_iter=5000), atol=1e-6)


def test_principal_components_match_svd():
    gen = torch.Generator().manual_seed(2)
    mixing = torch.randn(6, 6, generator=gen, dtype=torch.float64)
    x = torch.randn(500, 6, generator=gen, dtype=torch.float64) @ mixing
    centered = x - x.mean(dim=0)
    cov = centered.T @ centered / (x.shape[0] - 1)
    components, ratio = principal_components(cov, k=3)
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)
    variance = s**2
    assert torch.allclose(ratio, variance[:3] / variance.sum(), atol=1e-10)
    for ours, theirs in zip(components, vh[:3]):
        assert torch.allclose(ours.abs(), theirs.abs(), atol=1e-8)
        assert abs(float(ours @ theirs)) == pytest.approx(1.0, abs=1e-10)
    assert torch.allclose(components @ components.T, torch.eye(3, dtype=torch.float64), atol=1e-10)
    assert bool((ratio[:-1] >= ratio[1:]).all())
