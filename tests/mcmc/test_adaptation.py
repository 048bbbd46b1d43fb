# SPDX-License-Identifier: Apache-2.0
"""The one step-size adaptation block (Pyro's dual averaging over per-chain tensors)."""

import math

import pytest
import torch
from pyro.ops.dual_averaging import DualAveraging

from pyro_ebm import mcmc
from pyro_ebm.mcmc.adaptation import StepSizeAdaptation
from pyro_ebm.mcmc.kernels import KernelInfo, KernelState

DT = torch.float64


def _state(step_size):
    zeros = torch.zeros(step_size.shape[0], 1, dtype=DT)
    return KernelState(position=zeros, potential_energy=zeros[:, 0], grad=zeros, step_size=step_size,
                       momentum=None, potential_fn=None)


def _info(accept_prob):
    flags = torch.zeros(accept_prob.shape, dtype=torch.bool)
    return KernelInfo(accept_prob=accept_prob, is_accepted=flags, diverging=flags)


def _pyro_scalar_run(step_size, target, accept_probs):
    """Step sizes from Pyro's DualAveraging driven as pyro.infer.mcmc's adapter does:
    prox center log(10 ε0), statistic target - accept_prob, exp(x_t) during warmup and
    exp(x_avg) after the last warmup step."""
    scheme = DualAveraging(prox_center=math.log(10 * step_size))
    out = []
    for t, a in enumerate(accept_probs):
        scheme.step(target - a)
        x_t, x_avg = scheme.get_state()
        out.append(math.exp(x_avg if t + 1 == len(accept_probs) else x_t))
    return out


def test_one_chain_matches_pyro_dual_averaging_on_scalars():
    accept = [0.1, 0.9, 0.5, 0.0, 1.0, 0.7, 0.3, 0.65]
    expected = _pyro_scalar_run(0.2, 0.65, accept)
    adaptation = StepSizeAdaptation(torch.tensor([0.2], dtype=DT), target_accept_prob=0.65)
    state = _state(torch.tensor([0.2], dtype=DT))
    got = []
    for t, a in enumerate(accept):
        state = adaptation.step(state, _info(torch.tensor([a], dtype=DT)), final=t + 1 == len(accept))
        got.append(float(state.step_size[0]))
    assert got == pytest.approx(expected, rel=1e-12)


def test_chains_adapt_independently_in_one_tensor():
    """One adaptation over a (3,) tensor equals three scalar runs of Pyro's scheme."""
    eps0 = [0.01, 0.3, 2.0]
    accept = torch.tensor([[0.9, 0.2, 0.0], [1.0, 0.5, 0.1], [0.8, 0.6, 0.3], [0.95, 0.7, 0.05]], dtype=DT)
    adaptation = StepSizeAdaptation(torch.tensor(eps0, dtype=DT), target_accept_prob=0.57)
    state = _state(torch.tensor(eps0, dtype=DT))
    got = []
    for t, row in enumerate(accept):
        state = adaptation.step(state, _info(row), final=t + 1 == len(accept))
        got.append(state.step_size.tolist())
    for chain in range(3):
        expected = _pyro_scalar_run(eps0[chain], 0.57, accept[:, chain].tolist())
        assert [row[chain] for row in got] == pytest.approx(expected, rel=1e-12), chain


def test_for_kernel_only_when_warmup_and_adapting():
    state = _state(torch.ones(2, dtype=DT))
    assert StepSizeAdaptation.for_kernel(mcmc.MALA(0.1), state, warmup_steps=0) is None
    assert StepSizeAdaptation.for_kernel(mcmc.ULA(0.1), state, warmup_steps=10) is None
    assert StepSizeAdaptation.for_kernel(mcmc.MALA(0.1, adapt_step_size=False), state, 10) is None
    adaptation = StepSizeAdaptation.for_kernel(mcmc.HMC(0.1, target_accept_prob=0.7), state, 10)
    assert adaptation.target_accept_prob == 0.7


@pytest.mark.parametrize("make,target", [(lambda: mcmc.MALA(0.01, target_accept_prob=0.57), 0.57),
                                         (lambda: mcmc.HMC(0.01, num_steps=4, target_accept_prob=0.8), 0.8)],
                         ids=["MALA", "HMC"])
def test_each_chain_reaches_its_target_on_its_own_scale(make, target):
    """Chain c samples N(0, s_c² I) with s_c from 0.1 to 10: each chain adapts its own
    step size, which grows with s_c, and every chain's acceptance rate after warmup is
    near the target."""
    torch.manual_seed(0)
    scales = torch.logspace(-1, 1, 5, dtype=DT).repeat_interleave(40)  # 200 chains

    def pot(x):
        return 0.5 * (x / scales[:, None]).pow(2).sum(-1)

    samples = mcmc.sample(potential_fn=pot, kernel=make(), num_chains=200, num_samples=300, warmup_steps=300,
                          initial=scales[:, None] * torch.randn(200, 3, dtype=DT), progress=False)
    step = samples.stats["step_size"][:, 0].view(5, 40)
    assert (step[1:].mean(1) > 3 * step[:-1].mean(1)).all()  # scales grow by 3.16x per group
    rate = samples.stats["accept_prob"].mean(1).view(5, 40).mean(1)
    assert ((rate - target).abs() < 0.1).all(), rate
