# SPDX-License-Identifier: Apache-2.0
"""Kernels against targets with known moments.

Tolerances are Monte Carlo errors: a mean m of draws with bulk ESS n_eff has
standard error sd / sqrt(n_eff) (ESS from ArviZ over the (chain, draw) array);
every check allows 5 standard errors (a false failure about once in 10^6), plus,
for the unadjusted kernels on the mixture, an allowance for their O(step) bias.
"""

import inspect
import math
import warnings

import numpy as np
import pyro
import pytest
import torch

from pyro_ebm import mcmc
from pyro_ebm.mcmc.kernels import potential_and_grad

with warnings.catch_warnings():
    warnings.simplefilter("ignore", FutureWarning)
    import arviz as az

DT = torch.float64


COV = torch.tensor([[1.0, 0.8], [0.8, 1.0]], dtype=DT)
PREC = torch.linalg.inv(COV)


def gaussian_potential(x):
    return 0.5 * ((x @ PREC) * x).sum(-1)


MIX_W = torch.tensor([0.3, 0.7], dtype=DT)
MIX_MU = torch.tensor([-1.0, 1.0], dtype=DT)
MIX_SD = 0.6
MIX_MEAN = float((MIX_W * MIX_MU).sum())
MIX_VAR = float((MIX_W * (MIX_SD**2 + MIX_MU**2)).sum()) - MIX_MEAN**2


def mixture_potential(x):
    z = (x - MIX_MU) / MIX_SD  # (C, 2) by broadcasting x (C, 1)
    return -torch.logsumexp(MIX_W.log() - 0.5 * z * z, -1)


def mixture_draws(n, gen):
    comp = torch.multinomial(MIX_W, n, replacement=True, generator=gen)
    return (MIX_MU[comp] + MIX_SD * torch.randn(n, dtype=DT, generator=gen)).unsqueeze(-1)


def ess(draws):
    return float(az.ess(draws.detach().cpu().numpy()))


def assert_close_mc(stat_draws, expected, what, k=5.0, bias=0.0):
    """``stat_draws`` (chain, draw): its mean must be within k MC standard errors
    (+ ``bias``) of ``expected``."""
    value = float(stat_draws.mean())
    se = float(stat_draws.std()) / math.sqrt(ess(stat_draws))
    assert abs(value - expected) < k * se + bias, (
        f"{what}: {value:.4f} vs {expected:.4f} (MC s.e. {se:.4f}, bias allowance {bias})"
    )


def assert_gaussian_moments(x, mean, cov):
    """``x`` (chain, draw, 2): means, variances and the covariance within MC error."""
    for i in range(2):
        assert_close_mc(x[..., i], mean[i], f"mean[{i}]")
        assert_close_mc((x[..., i] - mean[i]) ** 2, cov[i][i], f"var[{i}]")
    assert_close_mc((x[..., 0] - mean[0]) * (x[..., 1] - mean[1]), cov[0][1], "cov[0,1]")


def ula_covariance(step):
    """Stationary covariance of ULA on the Gaussian: (P - step P^2 / 2)^-1."""
    return torch.linalg.inv(PREC - 0.5 * step * PREC @ PREC).tolist()


# (name, factory, covariance the kernel's draws have on the Gaussian)
KERNELS = [
    ("ULA", lambda: mcmc.ULA(0.05), ula_covariance(0.05)),
    ("MALA", lambda: mcmc.MALA(0.3), COV.tolist()),
    ("UnderdampedLangevin", lambda: mcmc.UnderdampedLangevin(0.3, friction=1.0), COV.tolist()),
    ("HMC", lambda: mcmc.HMC(0.3, num_steps=3), COV.tolist()),
    ("AnnealedLangevin", lambda: mcmc.AnnealedLangevin(0.05, [4.0, 2.0, 1.0], steps_per_level=30),
     ula_covariance(0.05)),
]


@pytest.mark.parametrize("name,make,cov", KERNELS, ids=[k[0] for k in KERNELS])
def test_kernel_gaussian_moments(name, make, cov):
    """Started far from the target (sd 3), every kernel converges to the correlated
    Gaussian: exact for MALA, HMC and BAOAB (exact in x for Gaussians), the known
    O(step) covariance for ULA and annealed Langevin at its last temperature."""
    torch.manual_seed(1)
    kernel = make()
    warmup = 200 + getattr(kernel, "num_steps", 0)
    init = 3.0 * torch.randn(1000, 2, dtype=DT)
    samples = mcmc.sample(potential_fn=gaussian_potential, kernel=kernel, num_chains=1000, num_samples=100,
                          warmup_steps=warmup, initial=init, progress=False)
    x = samples.get_samples()["x"]
    assert x.shape == (1000, 100, 2) and x.dtype == DT
    assert_gaussian_moments(x, [0.0, 0.0], cov)
    assert samples.num_divergences == 0


MIX_KERNELS = [
    ("ULA", lambda: mcmc.ULA(0.01), 0.02),
    ("MALA", lambda: mcmc.MALA(0.3), 0.0),
    ("UnderdampedLangevin", lambda: mcmc.UnderdampedLangevin(0.2, friction=1.0), 0.02),
    ("HMC", lambda: mcmc.HMC(0.3, num_steps=3), 0.0),
    ("AnnealedLangevin", lambda: mcmc.AnnealedLangevin(0.01, [2.0, 1.0], steps_per_level=50), 0.02),
]


@pytest.mark.parametrize("name,make,bias", MIX_KERNELS, ids=[k[0] for k in MIX_KERNELS])
def test_kernel_mixture_moments(name, make, bias):
    """Started at exact draws, every kernel keeps the two-component mixture: mean
    and variance within MC error (+ a bias allowance of 0.02 for the unadjusted
    kernels, whose bias here is below 0.01)."""
    gen = torch.Generator().manual_seed(2)
    torch.manual_seed(2)
    kernel = make()
    init = mixture_draws(1000, gen)
    samples = mcmc.sample(potential_fn=mixture_potential, kernel=kernel, num_chains=1000, num_samples=100,
                          warmup_steps=100, initial=init, progress=False)
    x = samples.get_samples()["x"][..., 0]
    assert_close_mc(x, MIX_MEAN, "mixture mean", bias=bias)
    assert_close_mc((x - MIX_MEAN) ** 2, MIX_VAR, "mixture variance", bias=bias)


def test_mala_exact_at_large_step():
    """MALA with a large fixed step (no adaptation) on N(0, 1) is still exact; the
    unadjusted chain at that step would have variance 1 / (1 - 1.5/2) = 4."""
    torch.manual_seed(3)
    pot = lambda x: 0.5 * x.pow(2).sum(-1)  # noqa: E731
    init = torch.randn(2000, 1, dtype=DT)
    samples = mcmc.sample(potential_fn=pot, kernel=mcmc.MALA(1.5, adapt_step_size=False), num_chains=2000,
                          num_samples=50, warmup_steps=20, initial=init, progress=False)
    x = samples.get_samples()["x"][..., 0]
    assert (samples.stats["step_size"] == 1.5).all()
    assert_close_mc(x, 0.0, "mean")
    assert_close_mc(x**2, 1.0, "variance")
    assert 0.2 < float(samples.stats["accept_prob"].mean()) < 0.9


def test_ula_bias_shrinks_with_step():
    """ULA's variance on N(0, 1) is 1 / (1 - step / 2): measured within MC error of
    that closed form, so its bias shrinks linearly with the step size."""
    torch.manual_seed(4)
    pot = lambda x: 0.5 * x.pow(2).sum(-1)  # noqa: E731
    biases = []
    for step in (0.4, 0.1):
        samples = mcmc.sample(potential_fn=pot, kernel=mcmc.ULA(step), num_chains=2000, num_samples=100,
                              warmup_steps=50, initial=torch.randn(2000, 1, dtype=DT), progress=False)
        x2 = samples.get_samples()["x"][..., 0] ** 2
        expected = 1.0 / (1.0 - step / 2)
        assert_close_mc(x2, expected, f"ULA variance at step {step}")
        biases.append(float(x2.mean()) - 1.0)
    assert biases[1] < 0.5 * biases[0]


def test_annealed_langevin_level_temperature():
    """At a fixed level T the chains target exp(-U / T): on N(0, 1) with step γ
    the variance is T / (1 - γ/2); the schedule runs its levels in order."""
    torch.manual_seed(5)
    kernel = mcmc.AnnealedLangevin(0.1, temperatures=[4.0], steps_per_level=10)
    assert [kernel.temperature(i) for i in (0, 9, 10, 1000)] == [4.0] * 4
    schedule = mcmc.AnnealedLangevin(0.1, temperatures=[9.0, 3.0, 1.0], steps_per_level=5)
    assert schedule.num_steps == 15
    assert [schedule.temperature(i) for i in (0, 4, 5, 10, 99)] == [9.0, 9.0, 3.0, 1.0, 1.0]
    pot = lambda x: 0.5 * x.pow(2).sum(-1)  # noqa: E731
    samples = mcmc.sample(potential_fn=pot, kernel=kernel, num_chains=2000, num_samples=60, warmup_steps=60,
                          initial=2 * torch.randn(2000, 1, dtype=DT), progress=False)
    x2 = samples.get_samples()["x"][..., 0] ** 2
    assert_close_mc(x2, 4.0 / (1 - 0.05), "variance at T=4")


@pytest.mark.parametrize("make", [lambda: mcmc.MALA(2.5, adapt_step_size=False),
                                  lambda: mcmc.HMC(1.2, num_steps=3, adapt_step_size=False)],
                         ids=["MALA", "HMC"])
def test_rejection_restores_cached_potential_and_gradient(make):
    """With a step so large that most proposals are rejected, the cached potential
    and gradient in the state always belong to the current position."""
    torch.manual_seed(6)
    kernel = make()
    state = kernel.init(torch.randn(500, 2, dtype=DT), gaussian_potential)
    rejected = 0
    for _ in range(20):
        before = state.position
        state, info = kernel.step(state)
        rejected += int((state.position == before).all(-1).sum())
        assert torch.equal(info.is_accepted, (state.position != before).any(-1))
        u, g = potential_and_grad(gaussian_potential, state.position)
        torch.testing.assert_close(state.potential_energy, u)
        torch.testing.assert_close(state.grad, g)
    assert rejected > 500  # rejections did happen
    assert state.position.grad_fn is None and not state.position.requires_grad


def test_divergent_proposals_are_rejected_and_counted():
    """A potential that is NaN beyond x = 1.5: chains never enter the region, the
    failed proposals count as divergent, and the run goes on."""
    torch.manual_seed(7)

    def pot(x):
        u = 0.5 * x.pow(2).sum(-1)
        return torch.where(x[:, 0] > 1.5, torch.full_like(u, float("nan")), u)

    for kernel in (mcmc.ULA(0.3), mcmc.MALA(0.5), mcmc.UnderdampedLangevin(0.5), mcmc.HMC(0.5, 3),
                   mcmc.AnnealedLangevin(0.3, [2.0, 1.0], 5)):
        samples = mcmc.sample(potential_fn=pot, kernel=kernel, num_chains=300, num_samples=50,
                              warmup_steps=10, initial=torch.zeros(300, 1, dtype=DT), progress=False)
        x = samples.get_samples()["x"]
        assert torch.isfinite(x).all() and (x <= 1.5).all(), type(kernel).__name__
        assert samples.num_divergences > 0, type(kernel).__name__
        assert torch.isfinite(samples.stats["potential_energy"]).all()
        div = samples.stats["diverging"]
        assert (samples.stats["accept_prob"][div] == 0).all()


def test_step_size_adaptation_reaches_target():
    """Dual averaging brings MALA's per-chain acceptance near its target."""
    torch.manual_seed(8)
    samples = mcmc.sample(potential_fn=gaussian_potential, kernel=mcmc.MALA(0.01, target_accept_prob=0.6),
                          num_chains=500, num_samples=50, warmup_steps=200,
                          initial=torch.randn(500, 2, dtype=DT), progress=False)
    step = samples.stats["step_size"]
    assert (step == step[:, :1]).all()  # fixed after warmup
    assert float(step.mean()) > 0.05  # grew from 0.01
    assert abs(float(samples.stats["accept_prob"].mean()) - 0.6) < 0.08


def test_per_chain_step_size_tensor():
    """A (C,) step size gives each chain its own step."""
    step = torch.tensor([0.01, 0.1, 1.0], dtype=DT)
    state = mcmc.ULA(step).init(torch.zeros(3, 2, dtype=DT), gaussian_potential)
    torch.testing.assert_close(state.step_size, step)
    with pytest.raises(ValueError, match=r"shape \(4,\)"):
        mcmc.ULA(step).init(torch.zeros(4, 2, dtype=DT), gaussian_potential)


@pytest.mark.parametrize("make", [
    lambda s: mcmc.ULA(s), lambda s: mcmc.MALA(s), lambda s: mcmc.UnderdampedLangevin(s, 1.0),
    lambda s: mcmc.HMC(s, 5), lambda s: mcmc.AnnealedLangevin(s, [2.0, 1.0], 3),
], ids=["ULA", "MALA", "UnderdampedLangevin", "HMC", "AnnealedLangevin"])
@pytest.mark.parametrize("bad", [0.0, -0.1, float("nan"), float("inf")])
def test_bad_step_size(make, bad):
    with pytest.raises(ValueError, match="step_size"):
        make(bad)


def test_bad_kernel_arguments():
    with pytest.raises(ValueError, match="friction"):
        mcmc.UnderdampedLangevin(0.1, friction=0.0)
    with pytest.raises(ValueError, match="num_steps"):
        mcmc.HMC(0.1, num_steps=0)
    with pytest.raises(ValueError, match="target_accept_prob"):
        mcmc.MALA(0.1, target_accept_prob=1.5)
    with pytest.raises(ValueError, match="adapt_step_size=False"):
        mcmc.HMC(0.1, target_accept_prob=None)
    with pytest.raises(ValueError, match="temperatures"):
        mcmc.AnnealedLangevin(0.1, temperatures=[1.0, -2.0])
    with pytest.raises(ValueError, match="steps_per_level"):
        mcmc.AnnealedLangevin(0.1, temperatures=[1.0], steps_per_level=0)
    with pytest.raises(ValueError, match="step_size"):
        mcmc.ULA(torch.tensor([0.1, -0.1]))


def test_bad_initial_positions():
    kernel = mcmc.MALA(0.1)
    x = torch.zeros(4, 2, dtype=DT)
    x[2, 1] = float("nan")
    with pytest.raises(ValueError, match=r"non-finite.*index \(2, 1\).*chain 2"):
        kernel.init(x, gaussian_potential)
    with pytest.raises(ValueError, match="chains first"):
        kernel.init(torch.zeros(2, dtype=DT), gaussian_potential)
    with pytest.raises(ValueError, match=r"shape \(4,\), got shape \(4, 1\)"):
        kernel.init(torch.zeros(4, 2, dtype=DT), lambda x: x.pow(2).sum(-1, keepdim=True))
    with pytest.raises(ValueError, match="potential is NaN at the initial positions of all 4 chains"):
        kernel.init(torch.full((4, 2), -1.0, dtype=DT), lambda x: x.log().sum(-1))
    some = torch.ones(4, 2, dtype=DT)
    some[1:3] = -1.0
    with pytest.raises(ValueError, match=r"NaN at the initial position of 2 of 4 chains, "
                                         r"e.g. chain\(s\) \[1, 2\]; start them elsewhere"):
        kernel.init(some, lambda x: x.log().sum(-1))
    with pytest.raises(ValueError, match="gradient of the potential has NaN entries .* all 4 chains.*"
                                         "not differentiable"):
        kernel.init(torch.zeros(4, 2, dtype=DT), lambda x: x.abs().sqrt().sum(-1))
    with pytest.raises(ValueError, match="does not depend differentiably"):
        kernel.init(torch.zeros(4, 2, dtype=DT), lambda x: x.detach().sum(-1))


def test_kernels_follow_dtype_and_keep_no_graph():
    """float32 in, float32 out; a potential with trainable parameters leaves no
    graph and no gradient on them."""
    weight = torch.nn.Parameter(torch.ones(2))

    def pot(x):
        return 0.5 * (weight * x * x).sum(-1)

    for kernel in (mcmc.ULA(0.1), mcmc.MALA(0.1), mcmc.UnderdampedLangevin(0.1), mcmc.HMC(0.1, 2),
                   mcmc.AnnealedLangevin(0.1)):
        state = kernel.init(torch.randn(8, 2), pot)
        for _ in range(3):
            state, info = kernel.step(state)
        for t in (state.position, state.grad, state.potential_energy, state.step_size, info.accept_prob):
            assert t.dtype == torch.float32 and t.grad_fn is None
        assert info.diverging.dtype == torch.bool and state.iteration == 3
    assert weight.grad is None
    np.testing.assert_array_equal(weight.detach().numpy(), [1.0, 1.0])


def test_step_returns_state_and_info():
    """step(state) -> (KernelState, KernelInfo): the state holds what the next step
    needs (a velocity only for the underdamped kernel, which carries it), the info
    what the step reports; the Hamiltonian U + |v|^2 / 2 of the state after the
    step for the underdamped kernel, a finite energy >= U for HMC, none otherwise."""
    from pyro_ebm.mcmc.kernels import KernelInfo, KernelState

    assert not {"accept_prob", "diverging"} & set(KernelState._fields)
    assert {"accept_prob", "is_accepted", "diverging", "energy"} <= set(KernelInfo._fields)
    torch.manual_seed(9)
    for kernel in (mcmc.ULA(0.1), mcmc.MALA(0.3), mcmc.UnderdampedLangevin(0.2), mcmc.HMC(0.3, 3),
                   mcmc.AnnealedLangevin(0.1, [2.0, 1.0], 2)):
        name = type(kernel).__name__
        state = kernel.init(torch.randn(16, 2, dtype=DT), gaussian_potential)
        out = kernel.step(state)
        assert isinstance(out, tuple) and len(out) == 2, name
        state, info = out
        assert isinstance(state, KernelState) and isinstance(info, KernelInfo), name
        assert info.accept_prob.shape == info.is_accepted.shape == info.diverging.shape == (16,), name
        assert info.is_accepted.dtype == torch.bool and state.iteration == 1, name
        if name == "UnderdampedLangevin":
            torch.testing.assert_close(info.energy, state.potential_energy
                                       + 0.5 * state.momentum.pow(2).sum(-1))
        elif name == "HMC":
            assert state.momentum is None
            assert torch.isfinite(info.energy).all() and (info.energy >= state.potential_energy).all()
        else:
            assert info.energy is None and state.momentum is None, name
    # the unadjusted kernels accept every finite proposal
    state, info = mcmc.ULA(0.1).step(mcmc.ULA(0.1).init(torch.zeros(4, 2, dtype=DT), gaussian_potential))
    assert info.is_accepted.all() and (info.accept_prob == 1).all() and not info.diverging.any()


def test_kernel_keywords_are_pyros():
    """MALA and HMC take Pyro's keyword names (pyro.infer.HMC's), so a Pyro user's
    mcmc.HMC(step_size=0.3, num_steps=5) works; max_delta_energy is pyro_ebm's own."""
    pyro_names = set(inspect.signature(pyro.infer.HMC).parameters)
    for cls in (mcmc.MALA, mcmc.HMC):
        names = set(inspect.signature(cls).parameters) - {"max_delta_energy"}
        assert names <= pyro_names, (cls.__name__, names - pyro_names)
    kernel = mcmc.HMC(step_size=0.3, num_steps=5, target_accept_prob=0.9, adapt_step_size=False)
    assert (kernel.num_steps, kernel.target_accept_prob, kernel.adapt_step_size) == (5, 0.9, False)
    assert mcmc.MALA(step_size=0.1).target_accept_prob == 0.57
