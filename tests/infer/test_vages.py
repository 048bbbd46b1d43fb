# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pyro.distributions as dist
import pytest
import torch

from pyro_ebm.energy import GuideView, energy_view
from pyro_ebm.guides import AmortizedBernoulli
from pyro_ebm.infer import DSM, VaGES, vaes_score
from pyro_ebm.infer.bism import lower_loss
from pyro_ebm.infer.vages import fisher_divergence, ksd_halves
from pyro_ebm.models import GaussianRBM

D64 = torch.float64


def make_grbm(visible, hidden, seed, scale=1.0, name=""):
    torch.manual_seed(seed)
    grbm = GaussianRBM(visible, hidden, init_scale=scale, name=name).double()
    with torch.no_grad():
        grbm.b.normal_(0, 0.5)
        grbm.c.normal_(0, 0.5)
        grbm.log_std.uniform_(-0.3, 0.3)
    return grbm


def marginal_score(grbm, v):
    """∇v log p(v) = −∇v F(v), analytic."""
    with torch.enable_grad():
        x = v.detach().requires_grad_(True)
        (g,) = torch.autograd.grad(-grbm.free_energy(x).sum(), x, create_graph=True)
    return g


def exact_posterior_guide(grbm):
    def guide(v):
        with pyro.plate("data", v.shape[0]):
            pyro.sample("h", dist.Bernoulli(grbm.hidden_probs(v)).to_event(1))

    return guide


def exact_samples(grbm, n, seed):
    """Exact draws of a small GaussianRBM: h from its marginal by enumeration, then v | h."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        H = grbm.hidden_dim
        codes = torch.arange(2**H)
        hs = ((codes[:, None] >> torch.arange(H)) & 1).to(D64)
        wh = hs @ grbm.W.T
        var = (2 * grbm.log_std).exp()
        logits = hs @ grbm.c + wh @ grbm.b + 0.5 * (var * wh.pow(2)).sum(-1)
        idx = torch.multinomial(torch.softmax(logits, 0), n, replacement=True, generator=g)
        h = hs[idx]
        mean = grbm.b + var * (h @ grbm.W.T)
        return mean + grbm.log_std.exp() * torch.randn(n, grbm.visible_dim, generator=g, dtype=D64)


def test_vaes_with_exact_posterior_matches_analytic_score():
    pyro.clear_param_store()
    grbm = make_grbm(3, 5, seed=0)
    v = torch.randn(20, 3, dtype=D64)
    L = 4000
    torch.manual_seed(1)
    s = vaes_score(grbm, exact_posterior_guide(grbm), v, num_particles=L)
    exact = marginal_score(grbm, v).detach()
    # the per-particle score is −(v − b)/σ² + W h: its MC error is W diag(π(1 − π)) Wᵀ / L
    with torch.no_grad():
        p = grbm.hidden_probs(v)
        sd = ((grbm.W.pow(2)[None] * (p * (1 - p))[:, None, :]).sum(-1) / L).sqrt()
    assert s.shape == v.shape
    assert ((s - exact).abs() <= 5 * sd).all(), ((s - exact).abs() / sd).max()
    # and not by accident: a guide that ignores v (h ~ Bernoulli(1/2)) would be far off
    with torch.no_grad():
        prior_guess = -(v - grbm.b) / (2 * grbm.log_std).exp() + 0.5 * grbm.W.sum(-1)
    assert (prior_guess - exact).abs().max() > 20 * sd.max()


def test_vaes_error_shrinks_as_the_guide_trains():
    pyro.clear_param_store()
    grbm = make_grbm(2, 4, seed=3, scale=1.5)
    data = exact_samples(grbm, 256, seed=4)
    torch.manual_seed(5)
    guide = AmortizedBernoulli(2, 4, site="h", temperature=0.1).double()
    with torch.no_grad():
        guide.encoder.weight.normal_(0, 2.0)
    exact = marginal_score(grbm, data).detach()

    def error():
        torch.manual_seed(6)
        s = vaes_score(grbm, guide, data, num_particles=50)
        return float((s - exact).pow(2).sum(-1).mean())

    view, gview = energy_view(grbm), GuideView(guide)
    optimizer = torch.optim.Adam(guide.parameters(), lr=0.05)
    errors = [error()]
    for steps in (30, 300):
        for _ in range(steps):
            loss = lower_loss("kl", view, gview, data)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        errors.append(error())
    assert errors[1] < 0.7 * errors[0] and errors[2] < 0.5 * errors[1], errors


@pytest.mark.parametrize("objective", ["dsm", "ksd"])
def test_vages_gradient_is_unbiased_with_exact_posterior(objective):
    """E[VaGES gradient] = the gradient of the objective on the exact marginal score,
    checked on the differences at matched noise, within their Monte Carlo error."""
    pyro.clear_param_store()
    grbm = make_grbm(2, 3, seed=7, scale=1.0)
    v = exact_samples(grbm, 64, seed=8)
    guide = exact_posterior_guide(grbm)
    vages = VaGES(grbm, guide, pyro.optim.Adam({"lr": 0.0}), objective=objective, noise_scale=0.3,
                  bandwidth=1.0, num_particles=2, inner_steps=0)
    params = {"W": grbm.W, "b": grbm.b, "c": grbm.c, "log_std": grbm.log_std}
    dsm = DSM(0.3)

    def true_grad(seed):
        torch.manual_seed(seed)
        with torch.enable_grad():
            if objective == "dsm":
                loss = dsm.per_item(lambda x: marginal_score(grbm, x), v).mean()
            else:
                loss = ksd_halves(lambda x: marginal_score(grbm, x), v, bandwidth=1.0)
            return dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))

    diffs = {k: [] for k in params}
    reps = 60
    for r in range(reps):
        exact = true_grad(100 + r)
        torch.manual_seed(100 + r)
        _, est = vages.gradient(v)
        for k in params:
            diffs[k].append(est[k] - exact[k])
    for k in params:
        d = torch.stack(diffs[k])
        mean, se = d.mean(0), d.std(0) / math.sqrt(reps)
        assert (mean.abs() <= 4.5 * se + 1e-12).all(), (k, mean, se)
    # the test has power: the gradient is far larger than the Monte Carlo error of the check
    scale = true_grad(0)["W"].abs().max()
    assert scale > 10 * torch.stack(diffs["W"]).std(0).max() / math.sqrt(reps)


def test_fisher_divergence_matches_exact_value():
    """Data from one GaussianRBM, model another (D = 20); the critic estimate that sees
    only VaES scores is within 10 % of ½ E_data‖∇log p_data − ∇log p_model‖²."""
    pyro.clear_param_store()
    data_grbm = make_grbm(20, 6, seed=10, scale=0.4, name="data")
    model = make_grbm(20, 6, seed=11, scale=0.4, name="model")
    with torch.no_grad():
        model.W.mul_(0.6).add_(0.4 * data_grbm.W)
        model.b.mul_(0.5).add_(0.5 * data_grbm.b)
        model.log_std.copy_(data_grbm.log_std + 0.1)
    data = exact_samples(data_grbm, 10000, seed=12).float()
    model.float()
    data_grbm.float()
    torch.manual_seed(13)
    estimate = fisher_divergence(model, exact_posterior_guide(model), data, num_particles=4, critic_steps=600,
                                 batch_size=512, holdout=0.5)
    held_out = data[5000:]
    gap = (marginal_score(data_grbm, held_out) - marginal_score(model, held_out)).detach()
    exact = float(0.5 * gap.pow(2).sum(-1).mean())
    assert abs(estimate - exact) <= 0.1 * exact, (estimate, exact)


def test_clear_errors():
    pyro.clear_param_store()
    grbm = make_grbm(2, 3, seed=0)
    v = torch.randn(8, 2, dtype=D64)
    optim = pyro.optim.Adam({"lr": 1e-3})
    with pytest.raises(ValueError, match="num_particles must be an integer >= 2"):
        VaGES(grbm, exact_posterior_guide(grbm), optim, num_particles=1)
    with pytest.raises(ValueError, match="objective must be"):
        VaGES(grbm, exact_posterior_guide(grbm), optim, objective="ssm")
    with pytest.raises(ValueError, match="'h'.*discrete"):
        VaGES(grbm, exact_posterior_guide(grbm), optim, inner_steps=2).step(v)

    def wrong(v):
        with pyro.plate("data", v.shape[0]):
            pyro.sample("z", dist.Normal(torch.zeros(v.shape[0], 3, dtype=D64), 1.0).to_event(1))

    with pytest.raises(ValueError, match="missing the model's latent site"):
        vaes_score(grbm, wrong, v)
    with pytest.raises(ValueError, match="holdout"):
        fisher_divergence(grbm, exact_posterior_guide(grbm), v, holdout=1.0)
    with pytest.raises(ValueError, match="empty split"):
        fisher_divergence(grbm, exact_posterior_guide(grbm), v[:2], holdout=0.5)


def direct_ksd_halves(s, x, h2):
    """The cross-pair RBF KSD² of the two halves, written out pair by pair."""
    n = x.shape[0] // 2
    total = 0.0
    for i in range(n):
        for j in range(n, 2 * n):
            d = x[i] - x[j]
            r2 = d.pow(2).sum()
            k = torch.exp(-r2 / (2 * h2))
            total = total + k * (s[i] @ s[j] + (s[i] - s[j]) @ d / h2 + x.shape[1] / h2 - r2 / h2**2)
    return total / n**2


@pytest.mark.parametrize("bandwidth", [None, 0.7])
def test_ksd_objective_is_metrics_ksd_on_the_halves(bandwidth):
    """VaGES's KSD objective (through pyro_ebm.metrics.ksd) equals the cross-pair sum
    computed directly, in value and in its gradient w.r.t. the model's parameters."""
    pyro.clear_param_store()
    grbm = make_grbm(3, 4, seed=2)
    x = torch.randn(11, 3, dtype=D64)  # odd: the last item is left out
    loss = ksd_halves(lambda v: marginal_score(grbm, v), x, bandwidth=bandwidth)
    s = marginal_score(grbm, x)
    if bandwidth is None:  # the median squared distance between the halves
        h2 = (x[:5, None, :] - x[None, 5:10, :]).pow(2).sum(-1).median()
    else:
        h2 = torch.tensor(bandwidth**2, dtype=D64)
    direct = direct_ksd_halves(s, x, h2)
    assert float(loss.detach()) == pytest.approx(float(direct.detach()), rel=1e-10)
    (g,) = torch.autograd.grad(loss, grbm.W)
    (g_direct,) = torch.autograd.grad(direct, grbm.W)
    torch.testing.assert_close(g, g_direct, rtol=1e-9, atol=1e-12)
    assert g.abs().max() > 1e-3  # the gradient flows through the scores


def test_fisher_divergence_trains_its_critic_under_no_grad():
    pyro.clear_param_store()
    data_grbm, model = make_grbm(2, 3, seed=20, name="data"), make_grbm(2, 3, seed=21, name="model")
    data = exact_samples(data_grbm, 600, seed=22)
    settings = dict(num_particles=4, critic_steps=50, eval_every=10)
    fisher_divergence(model, exact_posterior_guide(model), data, critic_steps=0)  # first traces draw too
    torch.manual_seed(0)
    with torch.no_grad():
        estimate, critic = fisher_divergence(model, exact_posterior_guide(model), data, return_critic=True,
                                             **settings)
    torch.manual_seed(0)
    again = fisher_divergence(model, exact_posterior_guide(model), data, **settings)  # grad mode on
    assert math.isfinite(estimate) and estimate == pytest.approx(again, rel=1e-9)
    assert all(p.requires_grad for p in critic.parameters())
