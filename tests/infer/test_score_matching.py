# SPDX-License-Identifier: Apache-2.0
"""Score-matching objectives against closed forms on a Gaussian model.

Model: log p̃(v) = −‖v − μ‖² / (2 s²); data ~ N(m, τ²).
"""

import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ebm.energy import hutchinson_trace
from pyro_ebm.infer import DSM, MDSM, SSM, ExactSM
from pyro_ebm.infer.score_matching import noise_grid
from pyro_ebm.models import GaussianRBM


@pytest.fixture(autouse=True)
def clean_store():
    pyro.clear_param_store()
    yield
    pyro.clear_param_store()


def gaussian_model(v):
    mu = pyro.param("mu", torch.zeros((), dtype=v.dtype))
    log_s = pyro.param("log_s", torch.zeros((), dtype=v.dtype))
    with pyro.plate("data", v.shape[0]):
        pyro.factor("energy", -0.5 * ((v - mu) ** 2).sum(-1) * torch.exp(-2 * log_s))


def no_guide(v):
    pass


def params():
    store = pyro.get_param_store()
    return store["mu"], store["log_s"]


def grads(loss):
    mu, log_s = params()
    return torch.autograd.grad(loss, [mu, log_s])


def data(n=4000, m=1.5, tau=0.8, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return (m + tau * torch.randn(n, 1, generator=g)).to(dtype)


def fit(loss, v, steps=600, lr=0.05):
    svi = pyro.infer.SVI(gaussian_model, no_guide, pyro.optim.Adam({"lr": lr}), loss=loss)
    for _ in range(steps):
        svi.step(v)
    mu, log_s = params()
    return float(mu.detach()), float(torch.exp(2 * log_s.detach()))


def set_params(mu, log_s):
    gaussian_model(torch.zeros(1, 1, dtype=torch.float64))
    store = pyro.get_param_store()
    store["mu"].data.fill_(mu)
    store["log_s"].data.fill_(log_s)


def test_exact_sm_value_and_gradient_closed_form():
    v = data(50)
    set_params(0.3, -0.2)
    a = torch.exp(torch.tensor(0.4, dtype=torch.float64))  # 1 / s²
    m2 = ((v - 0.3) ** 2).mean()
    loss = ExactSM()(gaussian_model, no_guide, v)
    assert torch.allclose(loss, 0.5 * a**2 * m2 - a)
    g_mu, g_logs = grads(loss)
    assert torch.allclose(g_mu, -(a**2) * (v - 0.3).mean())
    assert torch.allclose(g_logs, -2 * a * (a * m2 - 1))


def test_ssm_equals_exact_sm_for_diagonal_hessian():
    # uᵀ H u = tr H for Rademacher u when H is diagonal: SSM is exact here.
    v = data(30).repeat(1, 3)
    set_params(0.1, 0.2)
    assert torch.allclose(SSM(num_projections=2)(gaussian_model, no_guide, v),
                          ExactSM()(gaussian_model, no_guide, v))


def test_hutchinson_trace_unbiased_for_full_hessian():
    torch.manual_seed(0)
    A = torch.randn(4, 4, dtype=torch.float64)
    x = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    s = x @ A.T  # ∇_x s = A
    est = hutchinson_trace(s.expand(1, 4), x, num_projections=4000)
    assert abs(float(est) - float(torch.trace(A))) < 0.15 * float(A.abs().sum())**0.5


def test_exact_sm_and_ssm_minimizer():
    v = data()
    for loss in (ExactSM(), SSM()):
        pyro.clear_param_store()
        mu, var = fit(loss, v)
        assert abs(mu - float(v.mean())) < 0.02
        assert abs(var - float(v.var(unbiased=False))) / float(v.var()) < 0.03


def test_dsm_gradient_closed_form():
    v, sigma = data(40), 0.3
    set_params(0.5, 0.1)
    torch.manual_seed(3)
    eps = torch.randn_like(v)
    torch.manual_seed(3)
    loss = DSM(sigma)(gaussian_model, no_guide, v)
    a = torch.exp(torch.tensor(-0.2, dtype=torch.float64))
    x = v + sigma * eps
    r = -a * (x - 0.5) + eps / sigma
    assert torch.allclose(loss, 0.5 * (r**2).mean())
    g_mu, g_logs = grads(loss)
    assert torch.allclose(g_mu, (r * a).mean())
    assert torch.allclose(g_logs, (r * -(x - 0.5)).mean() * -2 * a)


def test_dsm_minimizer_is_noised_data_variance():
    v, sigma = data(), 0.5
    mu, var = fit(DSM(sigma), v, steps=800)
    assert abs(mu - 1.5) < 0.05
    target = float(v.var()) + sigma**2
    assert abs(var - target) / target < 0.05


def test_mdsm_minimizer_closed_form():
    v, (lo, hi, s0) = data(), (0.1, 1.0, 0.5)
    mu, var = fit(MDSM(lo, hi, s0), v, steps=800)
    sig = noise_grid(len(v), lo, hi, v).flatten()
    tau2 = float(v.var())
    a_star = (len(v) / s0**2) / float(((tau2 + sig**2) / sig**2).sum())
    assert abs(mu - 1.5) < 0.05
    assert abs(1 / var - a_star) / a_star < 0.05


def test_noise_grid_is_geometric():
    g = noise_grid(5, 0.01, 1.0, torch.zeros(5, 2)).flatten()
    assert g.shape == (5,)
    assert torch.allclose(g[0], torch.tensor(1.0)) and torch.allclose(g[-1], torch.tensor(0.01))
    ratios = g[1:] / g[:-1]
    assert torch.allclose(ratios, ratios[0].expand(4))


def test_dsm_score_sign():
    # A model whose score is −v: the DSM loss at σ→0 scale has ε/σ cancel the noise term only
    # with the right sign; with E = ½v² and data ≈ N(0, 1 + σ²) the optimum is already reached.
    def model(v):
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -0.5 * (v**2).sum(-1))

    torch.manual_seed(0)
    v = torch.randn(20000, 1, dtype=torch.float64) * 0.0  # all data at 0: noised data ~ N(0, σ²)
    sigma = 1.0
    loss = DSM(sigma)(model, no_guide, v)
    # s(x) = −x = −σε so s + ε/σ = 0 exactly when the sign is right
    assert float(loss) < 1e-12


# -- errors ---------------------------------------------------------------


def test_latent_model_rejected_as_svi_loss():
    def model(v):
        with pyro.plate("data", v.shape[0]):
            h = pyro.sample("h", dist.Normal(0.0, 1.0))
            pyro.factor("energy", -((v.squeeze(-1) - h) ** 2))

    with pytest.raises(ValueError, match=r"latent site\(s\) \['h'\].*BiSM"):
        DSM(0.1)(model, no_guide, torch.randn(3, 1))


@pytest.mark.parametrize("make", [lambda: DSM(0.0), lambda: DSM(-1), lambda: SSM(0),
                                  lambda: MDSM(0.0, 1.0, 0.1), lambda: MDSM(1.0, 0.5, 0.1),
                                  lambda: ExactSM(num_projections=0)])
def test_bad_hyperparameters(make):
    with pytest.raises(ValueError):
        make()


def test_nan_data_rejected():
    v = torch.randn(4, 1)
    v[1, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        DSM(0.1)(gaussian_model, no_guide, v)


@pytest.mark.parametrize("objective", [ExactSM(), SSM(), DSM(0.1), MDSM(0.05, 1.0, 0.1)],
                         ids=["ExactSM", "SSM", "DSM", "MDSM"])
def test_svi_evaluate_loss_equals_the_step_loss(objective):
    """SVI.evaluate_loss runs the loss under torch.no_grad; score matching needs
    ∇_v, so the loss turns gradients on: same value as SVI.step, same data and seed."""
    pyro.clear_param_store()
    grbm = GaussianRBM(2, 4, init_scale=0.5).double()
    v = torch.randn(32, 2, dtype=torch.float64)
    svi = pyro.infer.SVI(grbm.marginal, lambda v: None, pyro.optim.Adam({"lr": 1e-2}), loss=objective)
    torch.manual_seed(5)
    evaluated = svi.evaluate_loss(v)
    before = grbm.W.detach().clone()
    torch.manual_seed(5)
    stepped = svi.step(v)
    assert evaluated == pytest.approx(stepped, rel=1e-12, abs=1e-12)
    assert not torch.equal(grbm.W.detach(), before)  # the step did update, after computing that loss
    with torch.no_grad():  # a caller's own no_grad block too
        torch.manual_seed(6)
        assert math.isfinite(svi.evaluate_loss(v))
