# SPDX-License-Identifier: Apache-2.0
import math

import pyro
import pytest
import torch

from pyro_ebm.energy import EnergyView
from pyro_ebm.infer import DSM
from pyro_ebm.models import GaussianRBM
from pyro_ebm.models.grbm import GibbsSampler

F64 = torch.float64


def make_grbm(visible_dim=2, hidden_dim=3, scale=0.8, seed=0):
    torch.manual_seed(seed)
    g = GaussianRBM(visible_dim, hidden_dim, init_scale=scale).double()
    with torch.no_grad():
        g.b.normal_(0, 0.5)
        g.c.normal_(0, 0.5)
        g.log_std.uniform_(-0.4, 0.3)
    return g


def all_hidden_states(H):
    codes = torch.arange(2**H)
    return ((codes[:, None] >> torch.arange(H)) & 1).to(F64)  # (2^H, H)


def exact_hidden_marginal(g):
    """log p(h) up to a constant, over all hidden states (the v-integral done by hand)."""
    h = all_hidden_states(g.hidden_dim)
    wh = h @ g.W.T
    return h, h @ g.c + wh @ g.b + 0.5 * ((2 * g.log_std).exp() * wh**2).sum(-1)


@pytest.fixture(autouse=True)
def _fresh_param_store():
    pyro.clear_param_store()


def test_free_energy_sums_out_hidden_units():
    g = make_grbm()
    v = torch.randn(6, 2, dtype=F64)
    h = all_hidden_states(3)[:, None, :]  # (8, 1, 3) broadcasts against v
    energies = g.energy(v, h)  # (8, 6)
    assert energies.shape == (8, 6)
    assert torch.allclose(g.free_energy(v), -torch.logsumexp(-energies, 0), atol=1e-12)


def test_energy_broadcasts_over_chain_dim():
    g = make_grbm()
    v = torch.randn(5, 2, dtype=F64)
    h = torch.bernoulli(torch.full((4, 5, 3), 0.5, dtype=F64))
    batched = g.energy(v, h)
    assert batched.shape == (4, 5)
    for k in range(4):
        by_hand = (0.5 * ((v - g.b) / g.log_std.exp()) ** 2).sum(-1) - h[k] @ g.c - ((v @ g.W) * h[k]).sum(-1)
        assert torch.allclose(batched[k], by_hand, atol=1e-12)


def test_log_partition_matches_numerical_integration():
    g = make_grbm(visible_dim=2, hidden_dim=3)
    grid = torch.linspace(-12, 12, 1201, dtype=F64)
    x, y = torch.meshgrid(grid, grid, indexing="ij")
    v = torch.stack([x.flatten(), y.flatten()], -1)
    cell = float(grid[1] - grid[0]) ** 2
    with torch.no_grad():
        numeric = torch.logsumexp(-g.free_energy(v), 0) + math.log(cell)
        exact = g.log_partition()
        # the normalized density integrates to one
        mass = g.log_likelihood(v, log_partition=exact).exp().sum() * cell
    assert abs(float(exact - numeric)) < 1e-8
    assert abs(float(mass) - 1) < 1e-8
    assert exact.dtype == F64


def test_log_partition_is_differentiable_and_guarded():
    g = make_grbm(hidden_dim=4)
    g.log_partition().backward()
    # d log Z / d c_j = E_model[h_j]
    h, log_ph = exact_hidden_marginal(g)
    expected = (log_ph.softmax(0)[:, None] * h).sum(0)
    assert torch.allclose(g.c.grad, expected.detach(), atol=1e-10)
    with pytest.raises(ValueError, match="hidden_dim=21"):
        GaussianRBM(2, 21).log_partition()


def test_ais_matches_exact_log_partition():
    g = make_grbm(visible_dim=3, hidden_dim=12, scale=0.5, seed=1)
    torch.manual_seed(2)
    exact = float(g.log_partition().detach())
    estimate, stderr = g.ais_log_partition(num_chains=400, num_temperatures=400, return_stderr=True)
    # AIS is biased low by O(var(w)); with a reported stderr < 0.03 the estimate
    # lies within 4 stderr plus a small bias allowance of the truth
    assert 0 < float(stderr) < 0.03
    assert abs(float(estimate) - exact) < 4 * float(stderr) + 0.01


def test_gibbs_sampler_matches_exact_moments():
    g = make_grbm(visible_dim=2, hidden_dim=3, scale=1.0)
    torch.manual_seed(3)
    with torch.no_grad():
        h, log_ph = exact_hidden_marginal(g)
        ph = log_ph.softmax(0)
        mean = ph @ g.visible_mean(h)
        # E[v v^T] = sum_h p(h) (m_h m_h^T + diag σ²)
        m = g.visible_mean(h)
        second = torch.einsum("s,si,sj->ij", ph, m, m) + torch.diag((2 * g.log_std).exp())
        v = g.sample(4000, num_steps=30)
    assert v.dtype == F64 and v.shape == (4000, 2)
    var = torch.diag(second) - mean**2
    se = (var / 4000).sqrt()
    assert ((v.mean(0) - mean).abs() < 4 * se).all()
    sample_second = (v[:, :, None] * v[:, None, :]).mean(0)
    assert torch.allclose(sample_second, second, atol=0.15)


def test_gibbs_sampler_is_the_kernel_form_of_gibbs_step():
    """grbm.gibbs_sampler() runs the same sweeps as gibbs_step, as init / step -> (state, info)."""
    g = make_grbm(visible_dim=3, hidden_dim=4, scale=1.0)
    v = torch.randn(5, 3, dtype=F64)
    torch.manual_seed(11)
    expected = g.gibbs_step(g.gibbs_step(v))
    sampler = g.gibbs_sampler()
    assert isinstance(sampler, GibbsSampler) and sampler.marginal == g.marginal
    torch.manual_seed(11)
    state = sampler.init(v)
    for _ in range(2):
        state, info = sampler.step(state)
    assert torch.equal(state.position, expected)
    assert info.hidden.shape == (5, 4) and set(info.hidden.unique().tolist()) <= {0.0, 1.0}
    with pytest.raises(ValueError, match=r"visible units of shape \(chains, 3\), got \(5, 2\)"):
        sampler.init(torch.randn(5, 2, dtype=F64))


def test_hidden_probs_match_conditional_of_energy():
    g = make_grbm()
    v = torch.randn(4, 2, dtype=F64)
    h = all_hidden_states(3)[:, None, :]
    log_joint = -g.energy(v, h)  # (8, 4)
    posterior = (log_joint - torch.logsumexp(log_joint, 0)).exp()
    expected = (posterior[:, :, None] * h).sum(0)
    assert torch.allclose(g.hidden_probs(v), expected, atol=1e-12)


def test_joint_and_marginal_models_through_energy_view():
    g = make_grbm()
    v = torch.randn(5, 2, dtype=F64)
    h = torch.bernoulli(torch.full((7, 5, 3), 0.5, dtype=F64))
    joint = EnergyView(g)
    assert joint.structure(v).latents["h"].is_discrete
    lp = joint.log_density(v, values={"h": h}, per_item=True, num_chains=7)
    assert torch.allclose(lp, -g.energy(v, h) + 3 * math.log(0.5), atol=1e-12)
    marginal = EnergyView(g.marginal)
    assert torch.allclose(marginal.log_density(v, per_item=True), -g.free_energy(v), atol=1e-12)
    # Fisher identity: the marginal score is the posterior mean of the joint score
    states = all_hidden_states(3)
    joint_scores = torch.stack([joint.score(v, values={"h": s.expand(5, 3)}) for s in states])
    log_post = -g.energy(v, states[:, None, :])
    post = (log_post - torch.logsumexp(log_post, 0)).exp()
    expected = (post[:, :, None] * joint_scores).sum(0)
    assert torch.allclose(marginal.score(v), expected, atol=1e-10)


def test_svi_with_dsm_on_marginal_model_learns():
    torch.manual_seed(0)
    g = GaussianRBM(2, 4, init_scale=0.1).double()
    data = torch.randn(256, 2, dtype=F64) * 0.5 + torch.tensor([1.0, -1.0], dtype=F64)
    svi = pyro.infer.SVI(g.marginal, lambda v: None, pyro.optim.Adam({"lr": 0.05}), loss=DSM(0.05))

    def fixed_noise_loss():
        torch.manual_seed(123)
        return DSM(0.05).evaluate(g.marginal, data)

    before, ll_before = fixed_noise_loss(), float(g.log_likelihood(data).mean().detach())
    params = {k: p.detach().clone() for k, p in g.named_parameters()}
    svi.step(data)
    assert all((p - params[k]).abs().max() > 0 for k, p in g.named_parameters())
    for _ in range(100):
        svi.step(data)
    # with the noise fixed, the DSM loss differs from ½E‖s − ∇log p_σ‖² by a constant; the
    # initial mismatch is about 3 (the N(0, I) score against that of N(m, I/4)); the exact
    # log-likelihood goes from about -3.1 towards the data entropy bound of about -1.45
    assert fixed_noise_loss() < before - 2.0
    assert float(g.log_likelihood(data).mean().detach()) > ll_before + 1.0


def test_float32_and_errors():
    g = GaussianRBM(3, 2)
    v = torch.randn(4, 3)
    assert g.free_energy(v).dtype == torch.float32 and g.sample(5, 1).dtype == torch.float32
    assert g.gibbs_step(v).requires_grad is False
    with pytest.raises(ValueError, match="NaN"):
        g.log_likelihood(torch.full((2, 3), float("nan")))
    with pytest.raises(ValueError, match="shape"):
        g.sample(4, 1, init=torch.zeros(4, 2))
    with pytest.raises(ValueError, match="visible_dim"):
        GaussianRBM(0, 2)
