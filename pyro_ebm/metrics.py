# SPDX-License-Identifier: Apache-2.0
"""Sample-quality and model-quality metrics as plain functions over tensors.

Every function is batched and device-agnostic: it computes on the device and in
the dtype of its inputs.
"""

from __future__ import annotations

import copy
import math
import warnings

import numpy as np
import torch

from .energy import check_data, check_finite, exact_trace, hutchinson_trace

__all__ = ["auroc", "fisher_divergence", "frechet_distance", "ksd", "mmd", "mode_coverage"]

_CHUNK = 4096  # samples per block where a score or a critic runs on all of them


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
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", linalg.LinAlgWarning)
        covmean = linalg.sqrtm(cov_a @ cov_b)
        if not np.isfinite(covmean).all():  # singular product: regularize slightly
            eps = 1e-6 * np.eye(a.shape[1])
            covmean = linalg.sqrtm((cov_a + eps) @ (cov_b + eps))
    covmean = np.real(covmean)
    value = ((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2.0 * covmean)
    return float(max(value, 0.0))


def auroc(in_scores, out_scores) -> float:
    r"""Area under the ROC curve for telling in-distribution items (label 1) from
    out-of-distribution items (label 0) by a score that is higher in
    distribution (e.g. −E): the probability that a random in-distribution item
    scores above a random out-of-distribution one, ties counting one half,

    .. math::

        \mathrm{AUROC} = \frac{1}{n_+ n_-}\sum_{i, j}
            \big(\mathbb 1[s^+_i > s^-_j] + \tfrac12 \mathbb 1[s^+_i = s^-_j]\big),

    computed by ``sklearn.metrics.roc_auc_score``.

    :param in_scores: scores of in-distribution items (tensor or array).
    :param out_scores: scores of out-of-distribution items.
    """
    from sklearn.metrics import roc_auc_score

    pos = _numpy(in_scores).astype(np.float64).ravel()
    neg = _numpy(out_scores).astype(np.float64).ravel()
    if pos.size == 0 or neg.size == 0:
        raise ValueError("auroc needs at least one in- and one out-of-distribution score")
    for name, scores in (("in_scores", pos), ("out_scores", neg)):
        if not np.isfinite(scores).all():
            index = int(np.flatnonzero(~np.isfinite(scores))[0])
            raise ValueError(f"auroc: {name} contain NaN or Inf (first at index {index})")
    labels = np.concatenate([np.ones(pos.size), np.zeros(neg.size)])
    return float(roc_auc_score(labels, np.concatenate([pos, neg])))


class _Critic(torch.nn.Module):
    """f(v) = A v + a + MLP(v): a linear part plus a SiLU network."""

    def __init__(self, dim, hidden):
        super().__init__()
        self.linear = torch.nn.Linear(dim, dim)
        nn = torch.nn
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU(),
                                 nn.Linear(hidden, dim))

    def forward(self, v):
        return self.linear(v) + self.net(v)


def _critic_objective(critic, x, s, exact):
    x = x.detach().requires_grad_(True)
    f = critic(x)
    trace = exact_trace(f, x) if exact else hutchinson_trace(f, x)
    return (s * f).sum(-1) + trace - 0.5 * f.pow(2).sum(-1)


def _critic_value(critic, x, s, exact):
    total = 0.0
    for xb, sb in zip(x.split(_CHUNK), s.split(_CHUNK), strict=True):
        total += float(_critic_objective(critic, xb, sb, exact).detach().sum())
    return total / x.shape[0]


def fisher_divergence(x, score, critic=None, critic_steps=1000, batch_size=256, lr=1e-3, hidden=64,
                      holdout=0.5, validation=0.2, eval_every=50, max_exact_dim=64, return_critic=False):
    r"""Estimate the Fisher divergence between the distribution of the samples
    ``x`` and a model given by its score :math:`s = \nabla_x \log p` (never the
    energy gradient),

    .. math::

        \mathcal F = \tfrac12\, \mathbb E_{q}\big\|\nabla_x \log q(x)
            - \nabla_x \log p(x)\big\|^2,

    from the samples alone (the density :math:`q` of the samples is unknown).
    For any critic :math:`f`, :math:`\tfrac12\|a\|^2 \ge a^\top f - \tfrac12\|f\|^2`
    with equality at :math:`f = a`, and integration by parts gives
    :math:`\mathbb E_q[f^\top \nabla \log q] = -\mathbb E_q[\operatorname{tr} \nabla_x f]`, so

    .. math::

        \mathcal F = \max_f\ \mathbb E_q\Big[s(x)^\top f(x)
            + \operatorname{tr}\nabla_x f(x) - \tfrac12\|f(x)\|^2\Big],

    attained at :math:`f = \nabla \log p - \nabla \log q`. The scores may be
    noisy but unbiased estimates (e.g. a VaES, see
    :func:`pyro_ebm.infer.vages.fisher_divergence`): the noise averages out
    because :math:`f` depends on :math:`x` only. A critic short of the optimum
    gives a lower bound, short by :math:`\tfrac12\mathbb E\|f - f^*\|^2`.

    The samples are split three ways: the critic (default: a linear map plus a
    two-layer SiLU network) is trained by Adam on minibatches of the first
    part, with the trace by Hutchinson's estimator
    (:math:`u^\top \nabla_x (f^\top u)`, Rademacher :math:`u`); every
    ``eval_every`` steps it is scored on the ``validation`` part and the best
    checkpoint is kept (on a finite sample the objective is unbounded, so a
    critic trained too long overfits); the estimate is its objective on the
    ``holdout`` part, with an exact trace up to ``max_exact_dim`` dimensions.

    :param torch.Tensor x: samples of :math:`q`, shape ``(N, *event)``.
    :param score: a callable ``score(x) -> (n, *event)`` (called on blocks of
        4096 samples), or the scores themselves, shape of ``x``.
    :param torch.nn.Module critic: a critic ``f`` mapping flattened items
        ``(n, D)`` to ``(n, D)``; default as above.
    :param int critic_steps: Adam steps of the critic.
    :param int batch_size: critic minibatch size.
    :param float lr: critic learning rate.
    :param int hidden: width of the default critic.
    :param float holdout: fraction of the samples kept for the estimate.
    :param float validation: fraction of the rest kept for choosing the checkpoint.
    :param int eval_every: steps between validation scores.
    :param int max_exact_dim: largest dimension with an exact trace in evaluations.
    :param bool return_critic: also return the trained critic.
    :returns: the estimate (a float), or ``(estimate, critic)``.

    >>> fisher_divergence(samples, lambda x: -x)       # against N(0, I)

    **References:** F. Bao, K. Xu, C. Li, L. Hong, J. Zhu, B. Zhang, "Variational
    (gradient) estimate of the score function in energy-based latent variable
    models", ICML 2021; J. Gorham, L. Mackey, "Measuring sample quality with
    Stein's method", NeurIPS 2015.
    """
    check_data(x, "samples x")
    for name, frac in (("holdout", holdout), ("validation", validation)):
        if not 0 < frac < 1:
            raise ValueError(f"{name} must be in (0, 1), got {frac}")
    for name, value, least in (("critic_steps", critic_steps, 0), ("batch_size", batch_size, 1),
                               ("eval_every", eval_every, 1)):
        if not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr must be > 0, got {lr}")
    n = x.shape[0]
    n_eval = int(round(holdout * n))
    n_val = int(round(validation * (n - n_eval)))
    n_train = n - n_eval - n_val
    if min(n_eval, n_val, n_train) < 1:
        raise ValueError(
            f"holdout={holdout} and validation={validation} leave an empty split of the {n} samples"
        )
    if callable(score):
        s = torch.cat([score(chunk).detach() for chunk in x.split(_CHUNK)])
    else:
        s = score.detach() if torch.is_tensor(score) else score
    if not torch.is_tensor(s) or s.shape != x.shape:
        got = tuple(s.shape) if torch.is_tensor(s) else type(s).__name__
        raise ValueError(f"scores must have the samples' shape {tuple(x.shape)}, got {got}")
    x, s = _flat(x.detach()), _flat(s).to(x.dtype)
    check_finite("the model's scores", s)
    train = x[:n_train], s[:n_train]
    val = x[n_train:n_train + n_val], s[n_train:n_train + n_val]
    held = x[n_train + n_val:], s[n_train + n_val:]
    dim = x.shape[1]
    exact = dim <= max_exact_dim
    if critic is None:
        critic = _Critic(dim, hidden).to(dtype=x.dtype, device=x.device)
    optimizer = torch.optim.Adam(critic.parameters(), lr=lr)
    gen = torch.Generator(device="cpu").manual_seed(0)
    with torch.enable_grad():
        best, best_state = _critic_value(critic, *val, exact), copy.deepcopy(critic.state_dict())
        for step in range(1, critic_steps + 1):
            idx = torch.randint(n_train, (min(batch_size, n_train),), generator=gen).to(x.device)
            loss = -_critic_objective(critic, train[0][idx], train[1][idx], exact=False).mean()
            if not math.isfinite(float(loss.detach())):
                raise ValueError(
                    f"fisher_divergence's critic diverged at step {step}: loss is {float(loss)}"
                )
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if step % eval_every == 0 or step == critic_steps:
                value = _critic_value(critic, *val, exact)
                if value > best:
                    best, best_state = value, copy.deepcopy(critic.state_dict())
        critic.load_state_dict(best_state)
        estimate = _critic_value(critic, *held, exact)
    return (estimate, critic) if return_critic else estimate


def _flat(x):
    return x.reshape(x.shape[0], -1)


def _numpy(x):
    if torch.is_tensor(x):
        return x.detach().cpu().numpy()
    return np.asarray(x)


def _sq_dists(a, b):
    """Pairwise squared Euclidean distances of the rows of ``a`` and ``b``."""
    return torch.cdist(a, b).pow(2)


def _median_distance(x, max_points=1000):
    x = x[:max_points]
    d = _sq_dists(x, x)
    upper = d[torch.triu(torch.ones_like(d, dtype=torch.bool), diagonal=1)]
    return upper.median().sqrt()


def ksd(x, score, kernel="imq", u_statistic=True, c=1.0, beta=-0.5, bandwidth=None, chunk_size=2048):
    r"""Kernelized Stein discrepancy of the samples ``x`` from the density whose
    score is :math:`s = \nabla_x \log p` (never the energy gradient): the U- or
    V-statistic estimate of

    .. math::

        \mathrm{KSD}^2 = \mathbb E_{x, x' \sim q}\big[u_p(x, x')\big],\quad
        u_p(x, y) = s(x)^\top s(y)\,k + s(x)^\top\nabla_y k + s(y)^\top\nabla_x k
                    + \operatorname{tr}\nabla_x\nabla_y k,

    which is zero iff q = p (for the IMQ kernel, it also controls weak
    convergence). For a radial kernel :math:`k = \phi(r^2)`, :math:`r = \|x - y\|`,

    .. math::

        u_p(x, y) = \phi\, s(x)^\top s(y) + 2\phi'\,(s(y) - s(x))^\top(x - y)
                    - 2D\phi' - 4\phi'' r^2,

    with the IMQ kernel :math:`\phi = (c^2 + r^2)^\beta` or the RBF kernel
    :math:`\phi = \exp(-r^2 / 2h^2)`. Computed in row blocks of ``chunk_size``
    with matrix products, on the device and in the dtype of ``x``.

    :param torch.Tensor x: ``(n, *event)`` samples (flattened per row).
    :param score: a callable ``score(x) -> (n, *event)``, or the scores themselves.
    :param str kernel: ``"imq"`` or ``"rbf"``.
    :param bool u_statistic: the unbiased U-statistic (may be negative) or the
        V-statistic (≥ 0, biased).
    :param float c: IMQ scale c > 0.
    :param float beta: IMQ exponent β in (-1, 0).
    :param float bandwidth: RBF bandwidth h; the median pairwise distance if ``None``.
    :param int chunk_size: rows per block.
    :returns: the KSD² estimate, a 0-dim tensor (differentiable through ``score``).

    >>> ksd(samples, lambda x: -x)    # against N(0, I)

    **References:** Q. Liu, J. Lee, M. Jordan, "A kernelized Stein discrepancy for
    goodness-of-fit tests", ICML 2016; J. Gorham, L. Mackey, "Measuring sample
    quality with kernels", ICML 2017.
    """
    least = 2 if u_statistic else 1
    if not torch.is_tensor(x) or x.dim() < 2 or x.shape[0] < least:
        raise ValueError(
            f"ksd needs samples of shape (n >= {least}, *event), got {tuple(getattr(x, 'shape', ()))}"
        )
    if not (isinstance(chunk_size, int) and chunk_size >= 1):
        raise ValueError(f"chunk_size must be an int >= 1, got {chunk_size!r}")
    s = score(x) if callable(score) else score
    if not torch.is_tensor(s) or s.shape != x.shape:
        got = tuple(s.shape) if torch.is_tensor(s) else type(s).__name__
        raise ValueError(f"scores must have the samples' shape {tuple(x.shape)}, got {got}")
    for name, t in (("samples", x), ("scores", s)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"ksd: the {name} contain NaN or Inf")
    x, s = x.reshape(x.shape[0], -1), s.reshape(s.shape[0], -1).to(x.dtype)
    n, dim = x.shape
    if kernel == "imq":
        if not (c > 0 and -1 < beta < 0):
            raise ValueError(f"the IMQ kernel needs c > 0 and -1 < beta < 0, got c={c}, beta={beta}")

        def phis(r2):
            q = c * c + r2
            return q.pow(beta), beta * q.pow(beta - 1), beta * (beta - 1) * q.pow(beta - 2)
    elif kernel == "rbf":
        h = _median_distance(x.detach()) if bandwidth is None else bandwidth
        h2 = torch.as_tensor(h, dtype=x.dtype, device=x.device) ** 2  # in x's precision
        if not bool(h2 > 0):
            raise ValueError(f"the RBF bandwidth must be > 0, got {float(h2.sqrt())}")

        def phis(r2):
            k = torch.exp(-r2 / (2 * h2))
            return k, -k / (2 * h2), k / (4 * h2 * h2)
    else:
        raise ValueError(f"kernel must be 'imq' or 'rbf', got {kernel!r}")
    xs = (x * s).sum(-1)  # x_i^T s_i
    total = x.new_zeros(())
    for start in range(0, n, chunk_size):
        xi, si, xsi = x[start:start + chunk_size], s[start:start + chunk_size], xs[start:start + chunk_size]
        r2 = _sq_dists(xi, x)
        phi, dphi, ddphi = phis(r2)
        # (s_j - s_i)^T (x_i - x_j) = x_i^T s_j - x_j^T s_j - x_i^T s_i + x_j^T s_i
        cross = xi @ s.T - xs[None, :] - xsi[:, None] + si @ x.T
        u = phi * (si @ s.T) + 2 * dphi * cross - 2 * dim * dphi - 4 * ddphi * r2
        total = total + u.sum()
    if not u_statistic:
        return total / (n * n)
    zero = x.new_zeros(1)
    phi0, dphi0, _ = phis(zero)
    diagonal = phi0 * s.pow(2).sum() - 2 * dim * dphi0 * n
    return (total - diagonal.squeeze()) / (n * (n - 1))


def mmd(x, y, bandwidths=None, unbiased=True):
    r"""Maximum mean discrepancy between the samples ``x`` and ``y`` with the
    multi-bandwidth RBF kernel :math:`k(a, b) = \sum_h \exp(-\|a - b\|^2 / 2h^2)`:

    .. math::

        \mathrm{MMD}^2 = \mathbb E[k(x, x')] + \mathbb E[k(y, y')] - 2\,\mathbb E[k(x, y)],

    the unbiased estimate (within-sample sums over :math:`i \ne j`, divided by
    :math:`m(m-1)`, may be negative) or the biased V-statistic (all pairs, divided
    by :math:`m^2`).

    :param torch.Tensor x: ``(m, *event)`` samples.
    :param torch.Tensor y: ``(n, *event)`` samples.
    :param bandwidths: the h values; ``None`` uses the median pairwise distance of
        the pooled samples times (0.5, 1, 2).
    :param bool unbiased: the unbiased or the biased estimate.
    :returns: the MMD² estimate, a 0-dim tensor.

    >>> mmd(model_samples, data, bandwidths=(0.1, 0.5, 1.0))

    **References:** A. Gretton, K. Borgwardt, M. Rasch, B. Schölkopf, A. Smola,
    "A kernel two-sample test", JMLR 2012.
    """
    if not (torch.is_tensor(x) and torch.is_tensor(y)) or x.dim() < 2 or y.dim() < 2:
        raise ValueError("mmd needs two tensors of shape (n, *event)")
    x, y = x.reshape(x.shape[0], -1), y.reshape(y.shape[0], -1).to(x.dtype)
    if x.shape[1] != y.shape[1]:
        raise ValueError(f"samples differ in dimension: {tuple(x.shape)} and {tuple(y.shape)}")
    m, n = x.shape[0], y.shape[0]
    if unbiased and (m < 2 or n < 2):
        raise ValueError("the unbiased MMD needs at least two samples on each side")
    for name, t in (("x", x), ("y", y)):
        if not bool(torch.isfinite(t).all()):
            raise ValueError(f"mmd: samples {name} contain NaN or Inf")
    if bandwidths is None:
        med = _median_distance(torch.cat([x, y]).detach())
        h = med * torch.tensor([0.5, 1.0, 2.0], dtype=x.dtype, device=x.device)
    else:
        h = torch.as_tensor(bandwidths, dtype=x.dtype, device=x.device).reshape(-1)
    if not bool((h > 0).all()):
        raise ValueError(f"bandwidths must be > 0, got {h.tolist()}")
    scale = 1.0 / (2 * h.pow(2))

    def gram(a, b):
        return torch.exp(-_sq_dists(a, b)[..., None] * scale).sum(-1)

    kxx, kyy, kxy = gram(x, x), gram(y, y), gram(x, y)
    if unbiased:
        kxx_mean = (kxx.sum() - kxx.diagonal().sum()) / (m * (m - 1))
        kyy_mean = (kyy.sum() - kyy.diagonal().sum()) / (n * (n - 1))
    else:
        kxx_mean, kyy_mean = kxx.mean(), kyy.mean()
    return kxx_mean + kyy_mean - 2 * kxy.mean()


def mode_coverage(x, centers, radius, min_share=0.05):
    r"""How many modes of a mixture the samples ``x`` cover, and how many samples
    fall between the modes. A sample is *on* mode :math:`k` when its nearest
    centre is :math:`\mu_k` and :math:`\|x - \mu_k\| < r`; a mode is covered when

    .. math::

        \frac1m \#\{i: x_i \text{ on mode } k\} \ge s_\text{min}.

    :param torch.Tensor x: ``(m, d)`` samples.
    :param torch.Tensor centers: ``(K, d)`` mode centres (e.g.
        :func:`pyro_ebm.datasets.toy_centers`).
    :param float radius: :math:`r > 0` (e.g. three standard deviations of a mode).
    :param float min_share: :math:`s_\text{min}`.
    :returns: ``(covered, off)``: the number of covered modes and the share of
        samples on no mode.

    >>> mode_coverage(samples, datasets.toy_centers("8gaussians"), radius=0.6)
    (8, 0.012)
    """
    if not (torch.is_tensor(x) and torch.is_tensor(centers)) or x.dim() != 2 or centers.dim() != 2 \
            or x.shape[1] != centers.shape[1] or len(x) == 0:
        raise ValueError(f"mode_coverage needs samples (m, d) and centers (K, d) with m >= 1; got "
                         f"{tuple(getattr(x, 'shape', ()))} and {tuple(getattr(centers, 'shape', ()))}")
    if not float(radius) > 0:
        raise ValueError(f"mode_coverage: radius must be > 0, got {radius}")
    nearest = torch.cdist(x, centers.to(x.dtype)).min(-1)
    on_mode = nearest.values < radius
    share = torch.bincount(nearest.indices[on_mode], minlength=len(centers)).to(x.dtype) / len(x)
    return int((share >= min_share).sum()), float(1 - on_mode.to(x.dtype).mean())
