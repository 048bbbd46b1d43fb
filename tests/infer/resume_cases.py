# SPDX-License-Identifier: Apache-2.0
"""Trainers built the same way in any process, for the resume tests (imported by
tests/infer/test_resume.py and by the subprocess it starts), and the small modules
the trainer tests share."""

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import nn

from pyro_ebm.guides import AmortizedBernoulli, AmortizedNormal
from pyro_ebm.infer import DSM, KALE, BiDVL, BiSM, ContrastiveDivergence, MCMCTeaching, ScoreMatching, VaGES
from pyro_ebm.mcmc import ULA
from pyro_ebm.models import GEBM, GaussianDecoder, GaussianRBM
from pyro_ebm.models.nets import MLP

D, H = 2, 3
NAMES = ["ScoreMatching", "BiSM", "VaGES", "PCD", "KALE", "MCMCTeaching", "BiDVL"]


class Energy(PyroModule):
    def __init__(self):
        super().__init__()
        self.net = MLP(D, 1, (8,))
        to_pyro_module_(self.net)

    def forward(self, x):
        with pyro.plate("data", len(x)):
            pyro.factor("energy", -self.net(x).squeeze(-1))


class VAE(nn.Module):
    def __init__(self):
        super().__init__()
        self.dec, self.enc = nn.Linear(H, D), nn.Linear(D, 2 * H)

    def model(self, x):
        pyro.module("vae_dec", self.dec)
        with pyro.plate("data", len(x)):
            z = pyro.sample("z", dist.Normal(x.new_zeros(len(x), H), 1.0).to_event(1))
            pyro.sample("x", dist.Normal(self.dec(z), 0.5).to_event(1), obs=x)

    def guide(self, x):
        pyro.module("vae_enc", self.enc)
        loc, raw = self.enc(x).chunk(2, -1)
        with pyro.plate("data", len(x)):
            pyro.sample("z", dist.Normal(loc, nn.functional.softplus(raw) + 1e-3).to_event(1))


class Encoder(nn.Module):
    def __init__(self, latent=H):
        super().__init__()
        self.net = nn.Linear(D, 2 * latent)

    def forward(self, v):
        loc, raw = self.net(v).chunk(2, -1)
        return loc, nn.functional.softplus(raw) + 1e-3


def adam(lr=1e-2):
    return pyro.optim.Adam({"lr": lr})


def build(name):
    """A fresh trainer (the param store cleared, modules initialized from seed 0)."""
    pyro.clear_param_store()
    torch.manual_seed(0)
    grbm = GaussianRBM(D, H)
    if name == "ScoreMatching":
        return ScoreMatching(grbm.marginal, adam(), objective=DSM(0.1))
    if name == "BiSM":
        guide = AmortizedBernoulli(D, H, site="h")
        return BiSM(grbm, guide, adam(), objective=DSM(0.1), inner_steps=2, unroll_steps=5)
    if name == "VaGES":
        guide = AmortizedBernoulli(D, H, site="h")
        return VaGES(grbm, guide, adam(), objective="dsm", num_particles=2, inner_steps=2)
    if name == "PCD":
        return ContrastiveDivergence(grbm, adam(), k=2, persistent=True, num_chains=6)
    if name == "KALE":
        gebm = GEBM(MLP(D, D, (8,)), MLP(D, 1, (8,)), latent_dim=D)
        return KALE(gebm, adam(), adam(), critic_steps=2, warmup_critic_steps=3)
    if name == "MCMCTeaching":
        energy, vae = Energy(), VAE()
        return MCMCTeaching(energy, vae.model, vae.guide, adam(), adam(), kernel=ULA(0.01),
                            num_langevin_steps=2)
    if name == "BiDVL":
        energy = Energy()
        decoder = GaussianDecoder(MLP(H, D, (8,)), latent_dim=H, output=None)
        encoder = AmortizedNormal(Encoder(), site="h")
        return BiDVL(energy, decoder, encoder, adam(), adam())
    raise KeyError(name)


def batch(step):
    """The data of step ``step`` (its own generator: the same in every process)."""
    return torch.randn(8, D, generator=torch.Generator().manual_seed(1000 + step))


def train(trainer, first, last):
    for step in range(first, last):
        trainer.step(batch(step))


def parameters(trainer):
    """Every level's parameters by name."""
    return {f"{level}/{name}": p.detach().clone()
            for level, state in trainer.state_dict()["levels"].items() for name, p in state["params"].items()}
