"""Geometric median and principal directions of activation samples, in float64.

Both feed SAE initialization (pipeline/sae/initialize.py): the geometric median is the decoder
bias, the principal directions span the active subspace of the decoder rows.
"""

from __future__ import annotations

import torch

_F64 = torch.float64
# Rows per block when subtracting the estimate from the data: bounds the temporary to ~50 MB.
_BLOCK_ROWS = 8192


# --- geometric median ----------------------------------------------------------------------
def geometric_median(
    x: torch.Tensor,
    *,
    tol: float = 1e-6,
    max_iter: int = 200,
    eps: float = 1e-8,
    weights: torch.Tensor | None = None,
) -> torch.Tensor:
    """The point minimizing the (weighted) sum of Euclidean distances to the rows of x (n, d).

    Weiszfeld's iteration in float64, started at the coordinate-wise median (already robust to
    outliers, so few iterations are needed). A data point that coincides with the iterate (distance
    <= eps * scale) is handled by the Vardi-Zhang modification rather than dividing by zero, so the
    iteration also converges when the median is a data point. Stops when a step moves the estimate
    by less than tol * (mean distance to the data), or after max_iter steps.

    Returns a (d,) tensor in x's dtype (float64 for non-float inputs); cast as needed.
    """
    out_dtype = x.dtype if x.is_floating_point() else _F64
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"geometric_median needs a non-empty (n, d) tensor, got shape {tuple(x.shape)}")
    data = x.detach().to(_F64)
    w = torch.ones(data.shape[0], dtype=_F64, device=data.device) if weights is None else weights.detach().to(data.device, _F64).flatten()
    if w.shape[0] != data.shape[0] or bool((w < 0).any()) or not float(w.sum()) > 0:
        raise ValueError("weights must be non-negative, one per row, and not all zero")
    estimate = data.median(dim=0).values if weights is None else (w @ data) / w.sum()
    scale = float(_distances(data, torch.zeros_like(estimate)).max()) or 1.0
    for _ in range(max_iter):
        dist = _distances(data, estimate)
        at_estimate = dist <= eps * scale
        inv = torch.where(at_estimate, torch.zeros_like(dist), w / dist.clamp_min(eps * scale))
        if float(inv.sum()) == 0.0:
            break  # every point with weight sits on the estimate
        target = (inv @ data) / inv.sum()
        coincident_weight = float(w[at_estimate].sum())
        if coincident_weight > 0:
            # Vardi-Zhang: blend towards the data point by how strongly the others pull away.
            pull = float(torch.linalg.vector_norm((inv @ data) - inv.sum() * estimate))
            if pull <= coincident_weight:
                break  # the coinciding point is the median
            share = coincident_weight / pull
            target = (1 - share) * target + share * estimate
        step = float(torch.linalg.vector_norm(target - estimate))
        estimate = target
        if step <= tol * max(float((w @ dist) / w.sum()), eps):
            break
    return estimate.to(out_dtype)


def _distances(data: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
    """Row-wise ||data_i - point|| computed block by block (exact, unlike the ||a||^2 expansion)."""
    out = torch.empty(data.shape[0], dtype=_F64, device=data.device)
    for start in range(0, data.shape[0], _BLOCK_ROWS):
        block = data[start : start + _BLOCK_ROWS]
        out[start : start + block.shape[0]] = torch.linalg.vector_norm(block - point, dim=1)
    return out


# --- principal components ------------------------------------------------------------------
def principal_components(cov: torch.Tensor, k: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k principal directions of a covariance matrix (d, d), in float64.

    Returns (components (k, d): unit rows sorted by variance, largest first, each signed so its
    largest-magnitude coordinate is positive; explained_variance_ratio (k,): each component's
    share of the total variance, i.e. of the trace). k=None returns all d components.
    """
    if cov.ndim != 2 or cov.shape[0] != cov.shape[1]:
        raise ValueError(f"covariance must be square (d, d), got shape {tuple(cov.shape)}")
    d = cov.shape[0]
    k = d if k is None else k
    if not 1 <= k <= d:
        raise ValueError(f"k must be between 1 and d={d}, got {k}")
    sym = cov.detach().to(_F64)
    sym = (sym + sym.T) / 2  # eigh reads one triangle: make a numerically asymmetric input agree
    eigenvalues, eigenvectors = torch.linalg.eigh(sym)
    order = torch.argsort(eigenvalues, descending=True)[:k]
    variances = eigenvalues[order].clamp_min(0)
    components = eigenvectors[:, order].T.contiguous()
    signs = torch.sign(components.gather(1, components.abs().argmax(dim=1, keepdim=True)))
    components = components * signs
    total = float(eigenvalues.clamp_min(0).sum())
    ratio = variances / total if total > 0 else torch.zeros_like(variances)
    return components, ratio
