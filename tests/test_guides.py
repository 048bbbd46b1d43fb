# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro.infer import SVI, Trace_ELBO

from pyro_ebm.energy import GuideView
from pyro_ebm.guides import AmortizedBernoulli, AmortizedNormal, ConcreteBernoulli

D64 = torch.float64


def test_concrete_bernoulli_draws_and_log_prob():
    torch.manual_seed(0)
    logits = torch.tensor([-2.0, 0.0, 1.5], dtype=D64, requires_grad=True)
    d = ConcreteBernoulli(logits, temperature=0.05)
    h = d.rsample((20000,))
    assert h.shape == (20000, 3) and bool(((h >= 0) & (h <= 1)).all())
    # as τ → 0 the draws approach Bernoulli(sigmoid(logits)): mean within MC error + relaxation bias
    pi = torch.sigmoid(logits.detach())
    se = (pi * (1 - pi) / 20000).sqrt()
    assert ((h.detach().mean(0) - pi).abs() < 5 * se + 0.01).all()
    # the log-prob is the Bernoulli formula at the relaxed value
    x = torch.tensor([0.2, 0.7, 0.99], dtype=D64)
    expected = x * pi.log() + (1 - x) * (1 - pi).log()
    torch.testing.assert_close(d.log_prob(x).detach(), expected)
    # reparameterized: the draw is differentiable in the logits
    (g,) = torch.autograd.grad(h.sum(), logits)
    assert bool((g > 0).all())
    assert d.expand((4, 3)).rsample().shape == (4, 3)
    with pytest.raises(ValueError, match="temperature"):
        ConcreteBernoulli(logits, 0.0)


class LinearGaussianEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 2)

    def forward(self, v):
        loc, raw = self.net(v).chunk(2, -1)
        return loc, torch.nn.functional.softplus(raw) + 1e-4


def test_amortized_normal_learns_exact_posterior_with_trace_elbo():
    """z ~ N(0, 1), x | z ~ N(z, 0.5²): q(z | x) trained by Pyro's Trace_ELBO reaches
    the posterior N(0.8 x, 0.2)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    x = torch.randn(256, 1, dtype=D64) * math.sqrt(1.25)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            z = pyro.sample("z", dist.Normal(x.new_zeros(1), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(z, 0.5).to_event(1), obs=x)

    guide = AmortizedNormal(LinearGaussianEncoder().double(), site="z")
    elbo = Trace_ELBO(num_particles=4, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(300):
        svi.step(x)
    lin = guide.encoder.net.requires_grad_(False)
    assert float(lin.weight[0, 0]) == pytest.approx(0.8, abs=0.05)
    assert float(lin.bias[0]) == pytest.approx(0.0, abs=0.05)
    scale = torch.nn.functional.softplus(lin.bias[1] + lin.weight[1, 0] * x).detach() + 1e-4
    assert bool(((scale - math.sqrt(0.2)).abs() < 0.05).all())


def test_amortized_bernoulli_learns_exact_posterior_with_trace_elbo():
    """h ~ Bernoulli(½) (its relaxation), x | h ~ N(2h, 1): the posterior log-odds are
    2x − 2; the linear encoder trained by Trace_ELBO gets close."""
    pyro.clear_param_store()
    torch.manual_seed(1)
    h_true = torch.bernoulli(torch.full((512, 1), 0.5, dtype=D64))
    x = 2 * h_true + torch.randn(512, 1, dtype=D64)

    def model(x):
        with pyro.plate("data", x.shape[0]):
            h = pyro.sample("h", ConcreteBernoulli(x.new_zeros(1), 0.1).to_event(1))
            pyro.sample("x", dist.Normal(2 * h, 1.0).to_event(1), obs=x)

    guide = AmortizedBernoulli(visible_dim=1, hidden_dim=1, site="h", temperature=0.1).double()
    elbo = Trace_ELBO(num_particles=8, vectorize_particles=True, max_plate_nesting=1)
    svi = SVI(model, guide, pyro.optim.Adam({"lr": 0.05}), elbo)
    for _ in range(250):
        svi.step(x)
    exact = torch.sigmoid(2 * x - 2)
    learned = guide.probs(x).detach()
    assert float((learned - exact).abs().mean()) < 0.03, float((learned - exact).abs().mean())


def test_direct_path_equals_pyro_path():
    """GuideView samples and scores a self-describing guide without a Pyro run; the
    result is the same as running the guide through Pyro."""
    torch.manual_seed(0)
    guide = AmortizedBernoulli(visible_dim=3, hidden_dim=4, site="h", temperature=0.2)
    v = torch.randn(6, 3)
    direct = GuideView(guide)
    general = GuideView(guide)
    general.direct = False
    direct.sites(v), general.sites(v)  # the one structure trace draws random numbers too
    for particles in (1, 3):
        torch.manual_seed(1)
        values_d, lq_d = direct.sample_and_log_density(v, num_particles=particles)
        torch.manual_seed(1)
        values_g, lq_g = general.sample_and_log_density(v, num_particles=particles)
        expected_shape = (particles, 6, 4) if particles > 1 else (6, 4)
        assert values_d["h"].shape == values_g["h"].shape == expected_shape
        torch.testing.assert_close(values_d["h"], values_g["h"])
        torch.testing.assert_close(lq_d, lq_g)
        torch.testing.assert_close(direct.log_density(v, values=values_d, num_particles=particles), lq_g)
        torch.testing.assert_close(general.log_density(v, values=values_d, num_particles=particles), lq_g)


def test_clear_errors():
    with pytest.raises(ValueError, match="temperature"):
        AmortizedBernoulli(2, 3, temperature=-1.0)
    guide = AmortizedBernoulli(2, 3, site="h")
    with pytest.raises(ValueError, match="visible_dim=2"):
        guide(torch.randn(4, 5))
    with pytest.raises(ValueError, match="batch"):
        guide(torch.randn(2))

    class Bad(torch.nn.Module):
        def forward(self, v):
            return torch.zeros(len(v), 2), torch.ones(len(v), 3)

    with pytest.raises(ValueError, match="equal shape"):
        AmortizedNormal(Bad(), site="z")(torch.randn(4, 2))
    with pytest.raises(TypeError, match="nn.Module"):
        AmortizedNormal(lambda v: v, site="z")
