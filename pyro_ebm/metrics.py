# SPDX-License-Identifier: Apache-2.0
"""Sample-quality and model-quality metrics as plain functions over tensors.

Every function is batched and device-agnostic: it computes on the device and in
the dtype of its inputs.
"""

from __future__ import annotations

import numpy as np
import torch

__all__ = ["auroc", "fisher_divergence", "frechet_distance", "ksd", "mmd"]


def frechet_distance(features_a, features_b) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets:

    .. math::

        d^2 = \\|\\mu_a - \\mu_b\\|^2 + \\operatorname{tr}\\big(\\Sigma_a + \\Sigma_b
              - 2(\\Sigma_a\\Sigma_b)^{1/2}\\big)

    The matrix square root comes from ``scipy.linalg.sqrtm``.

    :param features_a: ``(n, d)`` tensor or array.
    :param features_b: ``(m, d)`` tensor or array.
    """
    from scipy import linalg

    a = _numpy(features_a).astype(np.float64)
    b = _numpy(features_b).astype(np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"features must be (n, d) and (m, d), got {a.shape} and {b.shape}")
    if len(a) < 2 or len(b) < 2:
        raise ValueError("frechet_distance needs at least two rows in each feature set")
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    covmean = linalg.sqrtm(cov_a @ cov_b)
    if not np.isfinite(covmean).all():  # singular product: regularize slightly
        eps = 1e-6 * np.eye(a.shape[1])
        covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean)
    return float(max(value, 0.0))


def auroc(in_scores, out_scores) -> float:
    """Area under the ROC curve for telling in-distribution items (label 1) from
    out-of-distribution items (label 0) by a score that is higher in
    distribution (e.g. −E). Ties count one half (the Mann–Whitney statistic)."""
    pos = torch.as_tensor(_numpy(in_scores), dtype=torch.float64).flatten()
    neg = torch.as_tensor(_numpy(out_scores), dtype=torch.float64).flatten()
    if pos.numel() == 0 or neg.numel() == 0:
        raise ValueError("auroc needs at least one in- and one out-of-distribution score")
    scores = torch.cat([pos, neg])
    if not torch.isfinite(scores).all():
        raise ValueError("auroc scores contain NaN or Inf")
    # average ranks handle ties
    order = scores.argsort()
    ranks = torch.empty_like(scores)
    ranks[order] = torch.arange(1, len(scores) + 1, dtype=torch.float64)
    uniq, inverse = torch.unique(scores, return_inverse=True)
    sums = torch.zeros_like(uniq).index_add_(0, inverse, ranks)
    counts = torch.zeros_like(uniq).index_add_(0, inverse, torch.ones_like(ranks))
    ranks = (sums / counts)[inverse]
    n_pos, n_neg = len(pos), len(neg)
    u = ranks[:n_pos].sum() - n_pos * (n_pos + 1) / 2
    return float(u / (n_pos * n_neg))


def fisher_divergence(*args, **kwargs):
    """The critic-based Fisher divergence estimate; see
    :func:`pyro_ebm.infer.vages.fisher_divergence`."""
    from .infer.vages import fisher_divergence as impl

    return impl(*args, **kwargs)


def _numpy(x):
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)
