# SPDX-License-Identifier: Apache-2.0
"""GuideView.pure: a guide's draws and log density as pure functions of (weights, data, noise)."""

import pyro.distributions as dist
import pytest
import torch
from pyro.nn import PyroModule

from pyro_ebm.energy import GuideView, NotTraced
from pyro_ebm.guides import AmortizedBernoulli, AmortizedNormal


class Encoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 6)

    def forward(self, v):
        loc, raw = self.net(v).chunk(2, -1)
        return loc, torch.nn.functional.softplus(raw) + 1e-3


class DiscreteGuide(PyroModule):
    """Bernoulli draws: not reparameterized, their randomness reads the weights."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(2, 3)

    def conditionals(self, v, *args, **kwargs):
        return {"h": dist.Bernoulli(logits=self.net(v)).to_event(1)}

    def forward(self, v):
        raise NotImplementedError


@pytest.mark.parametrize("make", [lambda: AmortizedBernoulli(2, 4), lambda: AmortizedNormal(Encoder())])
@pytest.mark.parametrize("num_particles", [1, 3])
def test_pure_draws_equal_eager_draws_and_differentiate(make, num_particles):
    torch.manual_seed(0)
    guide, v = make(), torch.randn(5, 2)
    view = GuideView(guide)
    pure = view.pure(v, num_particles=num_particles)
    assert view.pure(v, num_particles=num_particles) is pure  # traced once per signature
    torch.manual_seed(1)
    eager = view.sample(v, num_particles=num_particles)
    eager_lq = view.log_density(v, values=eager, num_particles=num_particles)
    torch.manual_seed(1)
    mine = pure.sample(pure.parameters(), v, noise=pure.draw())
    torch.testing.assert_close(mine["h"], eager["h"].detach())
    torch.testing.assert_close(pure.log_density(pure.parameters(), v, values=mine), eager_lq.detach())
    # gradients in the weights through the draws and the density, as autograd's
    noise = pure.draw()

    def lq(weights):
        h = pure.sample(weights, v, noise=noise)
        return pure.log_density(weights, v, values=h)

    mine = torch.func.grad(lq)(pure.parameters())
    theirs = torch.autograd.grad(lq(pure.parameters()), pure.parameters())
    for a, b in zip(mine, theirs, strict=True):
        torch.testing.assert_close(a, b)


def test_draws_that_read_the_weights_or_a_function_guide_have_no_pure_form():
    v = torch.randn(5, 2)
    normed = AmortizedNormal(torch.nn.Sequential(torch.nn.BatchNorm1d(2), Encoder()))
    with pytest.raises(NotTraced, match="buffers"):  # running statistics would be frozen into the graph
        GuideView(normed).pure(v)
    with pytest.raises(NotTraced, match="not reparameterized"):
        GuideView(DiscreteGuide()).pure(v)
    with pytest.raises(NotTraced, match="conditionals"):
        GuideView(lambda v: None).pure(v)
