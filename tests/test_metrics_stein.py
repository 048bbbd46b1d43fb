# SPDX-License-Identifier: Apache-2.0
"""Kernelized Stein discrepancy and MMD against closed forms and hand computations."""

import math

import pytest
import torch

from pyro_ebm import metrics

DT = torch.float64


def stein_kernel_autograd(x, y, sx, sy, k):
    """u_p(x, y) from its definition, derivatives of k by autograd (one pair)."""
    x = x.clone().requires_grad_(True)
    y = y.clone().requires_grad_(True)
    kv = k(x, y)
    gx, gy = torch.autograd.grad(kv, (x, y), create_graph=True)
    trace = sum(torch.autograd.grad(gx[i], y, retain_graph=True)[0][i] for i in range(len(x)))
    return (kv * (sx @ sy) + sx @ gy + sy @ gx + trace).detach()


def imq(x, y):
    return (1.0 + (x - y).pow(2).sum()) ** -0.5


def rbf(h):
    return lambda x, y: torch.exp(-(x - y).pow(2).sum() / (2 * h * h))


@pytest.mark.parametrize("kernel", ["imq", "rbf"])
def test_ksd_matches_definition(kernel):
    """U- and V-statistics equal the averages of u_p(x_i, x_j) built by autograd."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(6, 3, dtype=DT, generator=gen)
    s = -x + 0.3 * torch.randn(6, 3, dtype=DT, generator=gen)
    k = imq if kernel == "imq" else rbf(0.8)
    u = torch.stack([torch.stack([stein_kernel_autograd(x[i], x[j], s[i], s[j], k) for j in range(6)])
                     for i in range(6)])
    kw = {} if kernel == "imq" else {"bandwidth": 0.8}
    v_stat = metrics.ksd(x, s, kernel=kernel, u_statistic=False, chunk_size=4, **kw)
    u_stat = metrics.ksd(x, s, kernel=kernel, u_statistic=True, **kw)
    torch.testing.assert_close(v_stat, u.mean())
    torch.testing.assert_close(u_stat, (u.sum() - u.diagonal().sum()) / 30)


def test_ksd_one_point_closed_form():
    """V-statistic of one point with the IMQ kernel (c, β = -1/2):
    u(x, x) = ‖s‖² / c + D / c³."""
    x = torch.tensor([[0.5, -1.0, 2.0]], dtype=DT)
    s = torch.tensor([[1.0, 2.0, -0.5]], dtype=DT)
    for c in (1.0, 2.0):
        expected = s.pow(2).sum() / c + 3 / c**3
        torch.testing.assert_close(metrics.ksd(x, s, u_statistic=False, c=c), expected)


def test_ksd_near_zero_for_exact_samples_and_positive_when_shifted():
    """For N(0, I) in 2-D the U-statistic of 1000 exact draws is within its null
    spread of 0 (|KSD²| < 0.005); draws shifted by 0.5 give KSD² > 0.05."""
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(1000, 2, dtype=DT, generator=gen)

    def score(z):
        return -z

    exact = float(metrics.ksd(x, score))
    shifted = float(metrics.ksd(x + 0.5, score))
    assert abs(exact) < 0.005, exact
    assert shifted > 0.05, shifted
    # the score function may need autograd (e.g. a model's score)
    via_grad = metrics.ksd(x, lambda z: torch.func.grad(lambda q: -0.5 * q.pow(2).sum())(z))
    torch.testing.assert_close(via_grad, torch.tensor(exact, dtype=DT))


def test_ksd_is_differentiable_and_device_dtype_follow():
    x = torch.randn(10, 2)
    theta = torch.zeros(2, requires_grad=True)
    value = metrics.ksd(x, -(x - theta))
    assert value.dtype == torch.float32
    (grad,) = torch.autograd.grad(value, theta)
    assert torch.isfinite(grad).all() and grad.abs().sum() > 0


def test_ksd_errors():
    x = torch.randn(5, 2)
    with pytest.raises(ValueError, match="shape"):
        metrics.ksd(x, torch.zeros(5, 3))
    with pytest.raises(ValueError, match="kernel"):
        metrics.ksd(x, -x, kernel="laplace")
    with pytest.raises(ValueError, match="n >= 2"):
        metrics.ksd(x[:1], -x[:1])
    bad = x.clone()
    bad[0, 0] = float("nan")
    with pytest.raises(ValueError, match="samples contain NaN"):
        metrics.ksd(bad, -x)


def test_mmd_hand_computation():
    """Two 1-D samples, one bandwidth: both estimates by hand."""
    x = torch.tensor([[0.0], [1.0]], dtype=DT)
    y = torch.tensor([[0.5], [2.0], [3.0]], dtype=DT)
    h = 1.0

    def k(a, b):
        return math.exp(-((a - b) ** 2) / (2 * h * h))

    xs, ys = [0.0, 1.0], [0.5, 2.0, 3.0]
    kxx = sum(k(a, b) for a in xs for b in xs)
    kyy = sum(k(a, b) for a in ys for b in ys)
    kxy = sum(k(a, b) for a in xs for b in ys)
    biased = kxx / 4 + kyy / 9 - 2 * kxy / 6
    unbiased = (kxx - 2) / 2 + (kyy - 3) / 6 - 2 * kxy / 6
    torch.testing.assert_close(metrics.mmd(x, y, bandwidths=[h], unbiased=False),
                               torch.tensor(biased, dtype=DT))
    torch.testing.assert_close(metrics.mmd(x, y, bandwidths=[h]), torch.tensor(unbiased, dtype=DT))
    # several bandwidths add kernels
    two = metrics.mmd(x, y, bandwidths=[1.0, 2.0], unbiased=False)
    torch.testing.assert_close(two, metrics.mmd(x, y, bandwidths=[1.0], unbiased=False)
                               + metrics.mmd(x, y, bandwidths=[2.0], unbiased=False))


def test_mmd_same_vs_different_distributions():
    gen = torch.Generator().manual_seed(2)
    a, b = torch.randn(500, 2, generator=gen), torch.randn(500, 2, generator=gen)
    same = float(metrics.mmd(a, b))
    different = float(metrics.mmd(a, b + 1.0))
    assert abs(same) < 0.01 and different > 0.1, (same, different)
    assert float(metrics.mmd(a, b, unbiased=False)) > 0


def test_mmd_errors():
    with pytest.raises(ValueError, match="dimension"):
        metrics.mmd(torch.zeros(3, 2), torch.zeros(3, 3))
    with pytest.raises(ValueError, match="bandwidths"):
        metrics.mmd(torch.zeros(3, 2), torch.ones(3, 2), bandwidths=[0.0])
    with pytest.raises(ValueError, match="two samples"):
        metrics.mmd(torch.zeros(1, 2), torch.ones(3, 2))


def test_frechet_distance_closed_form_and_singular_features():
    import warnings

    import numpy as np

    from pyro_ebm.metrics import frechet_distance

    rng = np.random.default_rng(0)
    a = rng.normal(size=(4000, 3))
    b = 2.0 * rng.normal(size=(4000, 3)) + 1.0
    # N(0, I) vs N(1, 4I): ‖Δμ‖² + tr(I + 4I − 2·2I) = 3 + 3
    assert abs(frechet_distance(a, b) - 6.0) < 0.3
    singular = np.concatenate([a[:, :2], np.zeros((4000, 1))], 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        value = frechet_distance(singular, singular)
    assert abs(value) < 1e-3


def test_ksd_float_bandwidth_keeps_double_precision():
    torch.manual_seed(0)
    x = torch.randn(50, 2, dtype=torch.float64)
    h = 0.1 + 1e-9  # not representable in float32
    a = metrics.ksd(x, -x, kernel="rbf", bandwidth=h)
    b = metrics.ksd(x, -x, kernel="rbf", bandwidth=torch.tensor(h, dtype=torch.float64))
    assert a.dtype == torch.float64 and float(a) == float(b)
@pytest.mark.parametrize("as_tensor", [False, True])
def test_fisher_divergence_of_a_score_matches_the_closed_form(as_tensor):
    """Samples of N(0, I), model N(μ, I) given by its score −(x − μ): the Fisher divergence
    is ½ E‖−x + (x − μ)‖² = ½‖μ‖²; the scores go in as a function (default critic) or as a
    tensor (a linear critic, which holds the optimum f* = μ)."""
    torch.manual_seed(0)
    x = torch.randn(4000, 2, dtype=torch.float64)
    mu = torch.tensor([1.0, -0.5], dtype=torch.float64)
    score = (mu - x) if as_tensor else (lambda y: mu - y)
    critic = torch.nn.Linear(2, 2).double() if as_tensor else None
    torch.manual_seed(1)
    estimate = metrics.fisher_divergence(x, score, critic=critic, critic_steps=300, lr=1e-2)
    exact = 0.5 * float(mu.pow(2).sum())
    # the objective at f* on the held-out half (the last 2000 samples) is ½‖μ‖² − mean(xᵀμ):
    # the estimate is near it, and within the sampling error of the truth
    held = x[2000:] @ mu
    assert abs(estimate - (exact - float(held.mean()))) < 0.02
    assert abs(estimate - exact) < 4 * float(held.std()) / math.sqrt(2000), (estimate, exact)
    with pytest.raises(ValueError, match=r"scores must have the samples' shape \(4000, 2\), got \(4000, 3\)"):
        metrics.fisher_divergence(x, torch.zeros(4000, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="holdout must be in"):
        metrics.fisher_divergence(x, score, holdout=0.0)
