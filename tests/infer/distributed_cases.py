# SPDX-License-Identifier: Apache-2.0
"""The trainings of tests/infer/test_distributed.py, run by one process (the
reference, no process group) and by each rank of a 2-process gloo group
(``python distributed_cases.py RANK WORLD PORT OUT``).

Noise and latents that do not depend on the rank split: every random draw of
these cases (DSM's noise, the guide's latents, the GEBM's base latents, KALE's
interpolation weights, the VAE prior) comes from :class:`SlicedDraws`, which
draws the *global* batch's numbers from one generator seeded alike on every
rank and hands each rank its slice. So two ranks with half a batch each see the
numbers one process sees with the whole batch, and the trainings must agree.
"""

import sys

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from pyro_ebm import mcmc
from pyro_ebm.infer import DSM, KALE, BiDVL, BiSM, ExactSM, MCMCTeaching, ScoreMatching, fit
from pyro_ebm.infer.distributed import rank, world_size
from pyro_ebm.models import GEBM

D64 = torch.float64
GLOBAL_BATCH, STEPS = 8, 3
NAMES = ("exact_sm", "dsm", "bism", "kale", "teaching", "bidvl")


class SlicedDraws:
    """Standard normal / uniform draws whose leading dimension is this rank's
    ``local`` rows: drawn for all ranks' rows from one generator and sliced;
    other shapes are drawn as they are (the same on every rank)."""

    def __init__(self, seed, local):
        self.g = torch.Generator().manual_seed(seed)
        self.local, self.world, self.rank = local, world_size(), rank()

    def _draw(self, fn, shape, dtype):
        shape = tuple(shape)
        if not shape or shape[0] != self.local:
            return fn(shape, generator=self.g, dtype=dtype)
        full = fn((shape[0] * self.world,) + shape[1:], generator=self.g, dtype=dtype)
        return full[self.rank * shape[0]:(self.rank + 1) * shape[0]]

    def normal(self, shape, dtype=D64):
        return self._draw(torch.randn, shape, dtype)

    def uniform(self, shape, dtype=D64):
        return self._draw(torch.rand, shape, dtype)


DRAWS = None


class SlicedNormal(dist.Normal):
    """A Normal whose reparameterized draws take their noise from ``DRAWS``."""

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(sample_shape)
        return self.loc + self.scale * DRAWS.normal(shape, self.loc.dtype)


class SlicedDSM(DSM):
    """DSM whose noise comes from ``DRAWS``."""

    def perturb(self, v, eps=None):
        return v + self.noise_scale * (DRAWS.normal(v.shape) if eps is None else eps)

    def per_item(self, score_fn, v):
        eps = DRAWS.normal(v.shape)
        x = self.perturb(v.detach(), eps).requires_grad_(True)
        s = score_fn(x)
        return 0.5 * (s + eps / self.noise_scale).pow(2).reshape(len(v), -1).sum(-1)

    def draw_noise(self, v):
        return (DRAWS.normal(v.shape),)


class MLPEnergy(PyroModule):
    """log p̃(v) = -½‖v‖² - softplus(W v + b)ᵀ a."""

    def __init__(self, dim=2, hidden=5):
        super().__init__()
        self.lin = torch.nn.Linear(dim, hidden).double()
        self.a = torch.nn.Parameter(torch.linspace(-0.5, 0.5, hidden, dtype=D64))

    def forward(self, v):
        with pyro.plate("data", v.shape[0]):
            e = 0.5 * v.pow(2).sum(-1) + torch.nn.functional.softplus(self.lin(v)) @ self.a
            pyro.factor("energy", -e)


class GaussianLatentModel(PyroModule):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Parameter(torch.tensor(0.8, dtype=D64))
        self.log_prec = torch.nn.Parameter(torch.tensor(0.3, dtype=D64))

    def forward(self, v):
        with pyro.plate("data", v.shape[0]):
            h = pyro.sample("h", dist.Normal(v.new_zeros(1), 1.0).to_event(1))
            pyro.factor("energy", -0.5 * self.log_prec.exp() * (v - self.a * h).pow(2).sum(-1))


class SlicedGuide(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(1, 2).double()

    def forward(self, v):
        pyro.module("sliced_guide", self)
        loc, raw = self.net(v).chunk(2, -1)
        with pyro.plate("data", v.shape[0]):
            pyro.sample("h", SlicedNormal(loc, torch.nn.functional.softplus(raw) + 1e-3).to_event(1))


class SlicedGEBM(GEBM):
    def sample_latent(self, num_samples):
        return DRAWS.normal((int(num_samples), self.latent_dim))


class SlicedKALE(KALE):
    def _critic_draws(self, x):
        with torch.no_grad():
            x_g = self.gebm.sample_base(len(x))
        return x_g, DRAWS.uniform((len(x),) + (1,) * (x.dim() - 1))


class Affine(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.t = torch.nn.Parameter(torch.zeros(dim, dtype=D64))
        self.s = torch.nn.Parameter(torch.ones(dim, dtype=D64))

    def forward(self, z):
        return z * self.s + self.t


class QuadEnergy(torch.nn.Module):
    def __init__(self, dim):
        super().__init__()
        self.w = torch.nn.Parameter(torch.full((dim,), 0.1, dtype=D64))
        self.q = torch.nn.Parameter(torch.tensor(0.2, dtype=D64))

    def forward(self, x):
        return x @ self.w + self.q * x.pow(2).sum(-1)


def quadratic_ebm(x):
    mu = pyro.param("mu", torch.zeros(2, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        pyro.factor("energy", -0.5 * (x - mu).pow(2).sum(-1))


def linear_vae_model(x):
    w = pyro.param("w", torch.full((2, 2), 0.5, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        z = pyro.sample("z", SlicedNormal(x.new_zeros(len(x), 2), 1.0).to_event(1))
        pyro.sample("x", dist.Normal(z @ w + 2.0, 0.5).to_event(1), obs=x)


def delta_guide(x):
    a = pyro.param("a", torch.full((2, 2), 0.1, dtype=x.dtype))
    with pyro.plate("data", len(x)):
        pyro.sample("z", dist.Delta(x @ a).to_event(1))


class SlicedDecoder(torch.nn.Module):
    """p(h) p(v | h): h ~ N(0, I), v | h ~ N(W h + c, 0.5² I), both drawn from ``DRAWS``."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 2).double()

    def forward(self, v):
        pyro.module("sliced_decoder", self)
        with pyro.plate("data", v.shape[0]):
            h = pyro.sample("h", SlicedNormal(v.new_zeros(v.shape[0], 2), 1.0).to_event(1))
            pyro.sample("v", SlicedNormal(self.lin(h), 0.5).to_event(1), obs=v)


class SlicedEncoder(torch.nn.Module):
    """q(h | v) = N(A v + b, softplus(·)²), drawn from ``DRAWS``."""

    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 4).double()

    def forward(self, v):
        pyro.module("sliced_encoder", self)
        loc, raw = self.lin(v).chunk(2, -1)
        with pyro.plate("data", v.shape[0]):
            pyro.sample("h", SlicedNormal(loc, torch.nn.functional.softplus(raw) + 1e-3).to_event(1))


def data(name):
    """``STEPS`` global batches of ``GLOBAL_BATCH`` rows."""
    g = torch.Generator().manual_seed(7)
    dim = 1 if name == "bism" else 2
    return torch.randn(STEPS, GLOBAL_BATCH, dim, generator=g, dtype=D64) * 1.2 + 0.3


def build(name):
    """A fresh trainer (same initial parameters on every call) and its SlicedDraws."""
    global DRAWS
    pyro.clear_param_store()
    torch.manual_seed(0)
    DRAWS = SlicedDraws(11, GLOBAL_BATCH // world_size())
    adam = pyro.optim.Adam({"lr": 0.05})
    if name == "exact_sm":
        return ScoreMatching(MLPEnergy(), adam, objective=ExactSM())
    if name == "dsm":
        return ScoreMatching(MLPEnergy(), adam, objective=SlicedDSM(0.3))
    if name == "bism":
        return BiSM(GaussianLatentModel(), SlicedGuide(), adam, objective=SlicedDSM(0.5), inner_steps=2,
                    unroll_steps=2)
    if name == "kale":
        gebm = SlicedGEBM(Affine(2), QuadEnergy(2), latent_dim=2)
        return SlicedKALE(gebm, adam, pyro.optim.Adam({"lr": 0.03}), critic_steps=2, warmup_critic_steps=2,
                          init_samples=32)
    if name == "teaching":
        return MCMCTeaching(quadratic_ebm, linear_vae_model, delta_guide, adam, pyro.optim.Adam({"lr": 0.05}),
                            kernel=mcmc.ULA(0.05), num_langevin_steps=3, noise=False)
    if name == "bidvl":
        return BiDVL(MLPEnergy(), SlicedDecoder(), SlicedEncoder(), adam, pyro.optim.Adam({"lr": 0.03}),
                     inner_steps=2, unroll_steps=2, obs_site="v")
    raise ValueError(name)


def parameters(trainer):
    return {f"{lv}/{n}": p.detach().clone() for lv, level in trainer.levels.items()
            for n, p in zip(level.names, level.params, strict=True)}


def train(name):
    """``[parameters after step s for s in 1..STEPS]`` on this rank's shard of every batch."""
    trainer = build(name)
    batches, size = data(name), GLOBAL_BATCH // world_size()
    out = []
    for s in range(STEPS):
        trainer.step(batches[s][rank() * size:(rank() + 1) * size])
        out.append(parameters(trainer))
    return out


def fit_run(folder, num_steps, resume=False):
    """fit of ExactSM on 16 items, batch 8, a checkpoint every 2 steps: the final parameters."""
    trainer = build("exact_sm")
    items = torch.cat(list(data("exact_sm")))[:16]
    result = fit(trainer, items, num_steps, batch_size=8, seed=3, checkpoint=folder, checkpoint_every=2,
                 resume=resume, progress=False)
    return parameters(trainer), result.num_steps


def worker(rank_, world, port, out):
    torch.distributed.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank_,
                                         world_size=world)
    results = {"trained": {name: train(name) for name in NAMES}}
    folder = f"{out}.fit"
    results["fit"] = fit_run(folder, 4)
    results["fit_resumed"] = fit_run(folder, 6, resume=True)
    try:
        fit(build("exact_sm"), torch.cat(list(data("exact_sm"))), 2, batch_size=7, progress=False)
    except ValueError as err:
        results["odd_batch"] = str(err)
    torch.distributed.destroy_process_group()
    torch.save(results, f"{out}.rank{rank_}.pt")


if __name__ == "__main__":
    torch.set_num_threads(1)
    worker(int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), sys.argv[4])
