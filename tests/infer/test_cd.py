# SPDX-License-Identifier: Apache-2.0
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ebm import datasets
from pyro_ebm.infer import ContrastiveDivergence
from pyro_ebm.mcmc import ULA
from pyro_ebm.models import GaussianRBM
from pyro_ebm.models.grbm import GibbsSampler

F64 = torch.float64


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()


def mean_log_likelihood(g, v):
    with torch.no_grad():
        return float(g.log_likelihood(v).mean())


@pytest.mark.parametrize("persistent", [False, True])
def test_cd1_and_pcd1_raise_exact_log_likelihood(persistent):
    torch.manual_seed(0)
    data = datasets.toy("checkerboard", 1024, seed=0).double()
    g = GaussianRBM(2, 8).double()
    cd = ContrastiveDivergence(g, pyro.optim.Adam({"lr": 0.02}), k=1, persistent=persistent)
    before = mean_log_likelihood(g, data)
    for v in datasets.batches(data, 128, seed=0, epochs=20):  # 160 steps
        cd.step(v)
    after = mean_log_likelihood(g, data)
    # N(0, I) at the start gives about -2.17 nats; the best Gaussian about -0.36 and the
    # data's entropy bound is log 2 = 0.69: a working CD gains well over one nat
    assert before < -2.0
    assert after > before + 1.4
    assert after < 0.7
    assert cd.num_steps == 160
    if persistent:
        assert cd.chains.shape == (128, 2)


class _Fixed(NamedTuple):
    position: torch.Tensor


class FixedNegatives:
    """A 'kernel' that returns given negatives, to pin the CD gradient."""

    def __init__(self, negatives):
        self.negatives = negatives

    def init(self, position, potential):
        return _Fixed(self.negatives.reshape(len(self.negatives), -1))

    def step(self, state):
        return state, None


def free_energy_grads(g, v):
    """Hand-derived mean gradients of F(v) = ½‖(v−b)/σ‖² − Σ softplus(c + vW)."""
    sig2 = (2 * g.log_std).exp()
    p = torch.sigmoid(g.c + v @ g.W)
    return {
        "W": -(v[:, :, None] * p[:, None, :]).mean(0),
        "b": -((v - g.b) / sig2).mean(0),
        "c": -p.mean(0),
        "log_std": -((v - g.b) ** 2 / sig2).mean(0),
    }


def _make_grbm():
    torch.manual_seed(1)
    g = GaussianRBM(3, 4, init_scale=0.5).double()
    with torch.no_grad():
        g.b.normal_()
        g.c.normal_()
        g.log_std.uniform_(-0.3, 0.3)
    return g


@pytest.mark.parametrize("sampler", ["fixed", "gibbs"])
def test_cd_gradient_is_difference_of_free_energy_gradients(sampler):
    g = _make_grbm()
    v = torch.randn(6, 3, dtype=F64)
    if sampler == "fixed":
        negatives = torch.randn(5, 3, dtype=F64) * 2
        cd = ContrastiveDivergence(g.marginal, pyro.optim.SGD({"lr": 1.0}), k=3,
                                   sampler=FixedNegatives(negatives))
    else:  # CD-2 by Gibbs: replay the same random numbers by hand
        torch.manual_seed(7)
        negatives = g.gibbs_step(g.gibbs_step(v))
        torch.manual_seed(7)
        cd = ContrastiveDivergence(g, pyro.optim.SGD({"lr": 1.0}), k=2)
    with torch.no_grad():
        gd, gn = free_energy_grads(g, v), free_energy_grads(g, negatives)
        expected_loss = float(g.free_energy(v).mean() - g.free_energy(negatives).mean())
    before = {k: p.detach().clone() for k, p in g.named_parameters()}
    if sampler == "gibbs":
        torch.manual_seed(7)
    loss = cd.step(v)
    assert loss == pytest.approx(expected_loss, abs=1e-12)
    for name, p in g.named_parameters():
        # SGD with lr 1: the parameter moved by minus the CD gradient
        assert torch.allclose(before[name] - p.detach(), gd[name] - gn[name], atol=1e-12), name
        assert p.grad is None or not p.grad.abs().any()  # zeroed after the step


def quadratic_model(v):
    mu = pyro.param("mu", torch.zeros(v.shape[-1], dtype=v.dtype))
    with pyro.plate("data", v.shape[0]):
        pyro.factor("energy", -0.5 * ((v - mu) ** 2).sum(-1))


@pytest.mark.parametrize("persistent", [False, True])
def test_langevin_cd_fits_gaussian_mean(persistent):
    torch.manual_seed(0)
    target = torch.tensor([2.0, -1.0], dtype=F64)
    data = torch.randn(2000, 2, dtype=F64) + target
    sampler = None if not persistent else ULA(step_size=0.05)
    cd = ContrastiveDivergence(quadratic_model, pyro.optim.Adam({"lr": 0.05}), k=5,
                               persistent=persistent, sampler=sampler, num_chains=256 if persistent else None)
    if not persistent:
        assert isinstance(cd.sampler, ULA)  # the default kernel
    for v in datasets.batches(data, 250, seed=1, epochs=25):  # 200 steps
        cd.step(v)
    mu = pyro.param("mu").detach()
    # the fixed point is the data mean; the last steps fluctuate by ~ lr
    assert torch.allclose(mu, data.mean(0), atol=0.15), mu
    if persistent:
        # persistent chains sample N(mu, I) (ULA's variance bias ~ step/2 is small)
        assert torch.allclose(cd.chains.mean(0), mu, atol=0.35)
        assert 0.6 < float(cd.chains.var(0).mean()) < 1.5


def test_evaluate_loss_leaves_chains_and_params_alone():
    torch.manual_seed(0)
    g = GaussianRBM(2, 3).double()
    v = torch.randn(32, 2, dtype=F64)
    cd = ContrastiveDivergence(g, pyro.optim.Adam({"lr": 0.1}), persistent=True, num_chains=50)
    cd.step(v)
    chains = cd.chains.clone()
    params = [p.detach().clone() for p in g.parameters()]
    value = cd.evaluate_loss(v)
    assert isinstance(value, float)
    assert torch.equal(cd.chains, chains) and chains.shape == (50, 2)
    assert all(torch.equal(a, b) for a, b in zip(params, g.parameters(), strict=True))


def discrete_latent_model(v):
    with pyro.plate("data", v.shape[0]):
        h = pyro.sample("h", dist.Bernoulli(0.5 * torch.ones(2)).to_event(1))
        pyro.factor("energy", -((v - h) ** 2).sum(-1))


class CountingGibbs:
    """A sampler offered by a model: block Gibbs of a GaussianRBM that counts its steps."""

    def __init__(self, grbm):
        self.inner, self.steps = GibbsSampler(grbm), 0
        self.marginal = grbm.marginal

    def init(self, position, potential=None):
        return self.inner.init(position)

    def step(self, state):
        self.steps += 1
        return self.inner.step(state)


class OffersSampler(GaussianRBM):
    """Any model may offer its sampler: CD takes it without knowing the class."""

    def gibbs_sampler(self):
        self.offered = CountingGibbs(self)
        return self.offered


def test_cd_uses_the_sampler_the_model_offers_else_langevin():
    g = OffersSampler(2, 3).double()
    cd = ContrastiveDivergence(g, pyro.optim.SGD({"lr": 0.01}), k=3)
    assert cd.sampler is g.offered and cd.model == g.marginal  # the free energy of the sampled model
    cd.step(torch.randn(8, 2, dtype=F64))
    assert g.offered.steps == 3
    grbm = GaussianRBM(2, 3)
    cd = ContrastiveDivergence(grbm.marginal, pyro.optim.SGD({"lr": 0.01}))
    assert isinstance(cd.sampler, GibbsSampler) and cd.model == grbm.marginal
    given = ULA(0.01)  # a sampler given wins over the model's own, on the same free energy
    cd = ContrastiveDivergence(grbm, pyro.optim.SGD({"lr": 0.01}), sampler=given)
    assert cd.sampler is given and cd.model == grbm.marginal
    assert isinstance(ContrastiveDivergence(quadratic_model, pyro.optim.SGD({"lr": 0.01})).sampler, ULA)


def test_errors():
    g = GaussianRBM(2, 3)
    optim = pyro.optim.Adam({"lr": 0.1})
    with pytest.raises(ValueError, match="k"):
        ContrastiveDivergence(g, optim, k=0)
    with pytest.raises(ValueError, match="persistent"):
        ContrastiveDivergence(g, optim, num_chains=10)
    with pytest.raises(ValueError, match=r"discrete latent site\(s\) \['h'\]"):
        ContrastiveDivergence(discrete_latent_model, optim).step(torch.randn(4, 2))
    with pytest.raises(ValueError, match="NaN"):
        ContrastiveDivergence(g, optim).step(torch.tensor([[0.0, float("nan")]]))
    # a diverged loss or update stops with the step named
    v = torch.randn(4, 2, dtype=F64)
    g = GaussianRBM(2, 3).double()
    far = ContrastiveDivergence(g, optim, sampler=FixedNegatives(torch.full((4, 2), 1e200, dtype=F64)))
    with pytest.raises(ValueError, match="step 1: loss is"):
        far.step(v)
    huge = ContrastiveDivergence(g, pyro.optim.SGD({"lr": 1e308}))
    with pytest.raises(ValueError, match=r"diverged at step \d: (parameter|Gibbs)"):
        for _ in range(3):
            huge.step(v * 100)


@pytest.mark.parametrize("persistent", [False, True], ids=["CD", "PCD"])
@pytest.mark.parametrize("sampler", [None, ULA(0.01)], ids=["gibbs", "ula"])
def test_compiled_loss_equals_eager(persistent, sampler):
    """compile=: the loss and its gradient as one compiled pure function give the
    eager trainer's losses and parameters from the same seed (PCD with chains of
    another size than the batch: two signatures)."""
    import warnings

    results = []
    for compile in (False, {"backend": "aot_eager"}):
        pyro.clear_param_store()
        torch.manual_seed(0)
        g = GaussianRBM(4, 3).double()
        cd = ContrastiveDivergence(g, pyro.optim.Adam({"lr": 1e-2}), k=2, sampler=sampler,
                                   persistent=persistent, num_chains=7 if persistent else None,
                                   compile=compile)
        v = torch.randn(10, 4, dtype=torch.float64)
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # no fallback
            losses = [cd.step(v) for _ in range(3)]
        if compile:
            assert [c for c in cd._compiled_steps.values() if c is not None and not c.fell_back]
        results.append((losses, [p.detach().clone() for p in g.parameters()]))
    (eager, eager_params), (compiled, compiled_params) = results
    torch.testing.assert_close(torch.tensor(compiled), torch.tensor(eager), rtol=1e-10, atol=1e-12)
    for a, b in zip(compiled_params, eager_params, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
