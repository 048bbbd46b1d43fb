# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ebm import mcmc
from pyro_ebm.mcmc import AmortizedLangevin


def quadratic_ebm(mu):
    """E(x) = ½‖x − μ‖² (a standard normal around μ), or μ[y] with labels."""

    def model(x, y=None):
        centre = mu if y is None else mu[y]
        with pyro.plate("data", len(x)):
            pyro.factor("energy", -0.5 * (x - centre).pow(2).flatten(1).sum(-1))

    return model


def ula_moments(x0, mu, gamma, k):
    """Mean and per-coordinate variance of K ULA steps on ½‖x − μ‖² from a fixed x0:
    x' = (1 − γ)x + γμ + √(2γ)ξ."""
    a = 1 - gamma
    mean = mu + a**k * (x0 - mu)
    var = 2 * gamma * (1 - a ** (2 * k)) / (1 - a**2)
    return mean, var


def test_revision_matches_ula_closed_form():
    torch.manual_seed(0)
    n, gamma, k = 4000, 0.1, 10
    mu = torch.tensor([1.0, -2.0])
    x0 = torch.tensor([3.0, 0.0])
    sampler = AmortizedLangevin(lambda n: x0.expand(n, 2).clone(), quadratic_ebm(mu), mcmc.ULA(gamma), k)
    x, path = sampler.sample(n, return_trajectory=True)
    mean, var = ula_moments(x0, mu, gamma, k)
    # Monte Carlo error of the mean: sqrt(var / n); of the variance: var * sqrt(2 / n)
    assert torch.allclose(x.mean(0), mean, atol=5 * math.sqrt(var / n))
    assert torch.allclose(x.var(0), torch.full((2,), var), atol=5 * var * math.sqrt(2 / n))
    assert path.shape == (n, k + 1, 2)
    assert torch.equal(path[:, 0], x0.expand(n, 2)) and torch.equal(path[:, -1], x)
    assert not x.requires_grad


def test_noise_off_is_gradient_descent():
    mu = torch.tensor([1.0, -2.0], dtype=torch.float64)
    x0 = torch.randn(5, 2, dtype=torch.float64)
    sampler = AmortizedLangevin(lambda n: x0, quadratic_ebm(mu), mcmc.ULA(0.1), 7, noise=False)
    x = sampler.sample(5)
    assert x.dtype == torch.float64
    torch.testing.assert_close(x, mu + 0.9**7 * (x0 - mu))


def test_conditional_image_shaped_chains():
    """Labels go to both the initializer and the energy; (C, 1, 4, 4) positions
    keep their shape."""
    torch.manual_seed(1)
    mu = torch.stack([torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), 2.0)])
    gamma, k, n = 0.2, 15, 2000
    y = torch.arange(n) % 2
    sampler = AmortizedLangevin(lambda n, y: torch.zeros(n, 1, 4, 4), quadratic_ebm(mu), mcmc.ULA(gamma), k)
    x = sampler.sample(n, y)
    assert x.shape == (n, 1, 4, 4)
    for label in (0, 1):
        mean, var = ula_moments(torch.zeros(()), mu[label, 0, 0, 0], gamma, k)
        got = x[y == label].mean()
        assert abs(float(got - mean)) < 5 * math.sqrt(var / (n / 2 * 16))


def test_revision_lowers_energy():
    torch.manual_seed(2)
    net = torch.nn.Sequential(torch.nn.Linear(3, 32), torch.nn.Tanh(), torch.nn.Linear(32, 1))

    def ebm(x):
        pyro.module("net", net)
        with pyro.plate("data", len(x)):
            pyro.factor("energy", -(net(x).squeeze(-1) + 0.5 * x.pow(2).sum(-1)))

    sampler = AmortizedLangevin(lambda n: 3 * torch.randn(n, 3), ebm, mcmc.ULA(0.05), 20)
    x, path = sampler.sample(500, return_trajectory=True)
    e0, e1 = sampler.energy(path[:, 0]).detach(), sampler.energy(x).detach()
    se = ((e0 - e1).std() / math.sqrt(500)).item()
    assert (e0 - e1).mean().item() > 10 * se


def test_energy_model_with_latent_site_is_rejected():
    def eblvm(x):
        with pyro.plate("data", len(x)):
            h = pyro.sample("h", dist.Normal(0.0, 1.0))
            pyro.factor("energy", -(x.sum(-1) - h) ** 2)

    sampler = AmortizedLangevin(lambda n: torch.zeros(n, 2), eblvm, mcmc.ULA(0.1), 3)
    with pytest.raises(ValueError, match=r"latent site\(s\) \['h'\]"):
        sampler.sample(4)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"num_steps": -1}, "num_steps"),
        ({"num_steps": 2.5}, "num_steps"),
        ({"kernel": mcmc.MALA(0.1), "noise": False}, "ULA kernel only, got MALA"),
        ({"kernel": "ula"}, "init"),
    ],
)
def test_bad_arguments(kwargs, match):
    args = {"initializer": lambda n: torch.zeros(n, 2), "energy_model": quadratic_ebm(torch.zeros(2)),
            "kernel": mcmc.ULA(0.1), "num_steps": 3}
    args.update(kwargs)
    with pytest.raises((ValueError, TypeError), match=match):
        AmortizedLangevin(**args)


def test_bad_initial_points():
    ebm = quadratic_ebm(torch.zeros(2))
    with pytest.raises(ValueError, match=r"shape \(4, \*event\), got shape \(3, 2\)"):
        AmortizedLangevin(lambda n: torch.zeros(3, 2), ebm, mcmc.ULA(0.1), 3).sample(4)
    bad = torch.zeros(4, 2)
    bad[2, 1] = float("nan")
    match = r"initial points contains 1 non-finite value\(s\): NaN at index \(2, 1\)"
    with pytest.raises(ValueError, match=match):
        AmortizedLangevin(lambda n: bad, ebm, mcmc.ULA(0.1), 3).sample(4)


def test_energy_is_per_item_and_usable_under_no_grad():
    sampler = AmortizedLangevin(lambda n: torch.zeros(n, 2), quadratic_ebm(torch.tensor([1.0, 0.0])),
                                mcmc.ULA(0.1), 2)
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [1.0, -1.0]])
    with torch.no_grad():  # a shape seen for the first time is validated even here
        e = sampler.energy(x)
    torch.testing.assert_close(e, torch.tensor([0.0, 2.0, 0.5]))
