# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm demo``: GaussianRBMs trained on the checkerboard toy by each method,
their exact test log-likelihoods, and the learned densities as PNGs."""

from __future__ import annotations

import math
import re
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch
from tqdm.auto import tqdm

from . import datasets, mcmc, metrics
from .infer import DSM, SSM, ContrastiveDivergence
from .models import GaussianRBM

CEILING = 0.6931  # log 2: the checkerboard's density is 2 on its support


def _optim():
    return pyro.optim.Adam({"lr": 1e-3, "betas": (0.9, 0.95)})


def _trainers():
    """Name -> (model, guide) -> object with .step(v); the demo's methods."""
    methods = {
        "CD-1": lambda grbm: ContrastiveDivergence(grbm, _optim(), k=1),
        "DSM (σ=0.05)": lambda grbm: pyro.infer.SVI(grbm.marginal, _no_guide, _optim(), loss=DSM(0.05)),
        "SSM": lambda grbm: pyro.infer.SVI(grbm.marginal, _no_guide, _optim(), loss=SSM()),
    }
    try:
        from .guides import AmortizedBernoulli
        from .infer import BiSM
    except ImportError:
        return methods

    def bism(objective):
        def make(grbm):
            guide = AmortizedBernoulli(2, 4, site="h", temperature=0.1)
            return BiSM(grbm, guide, _optim(), objective=objective, inner_steps=5, unroll_steps=0)

        return make

    methods["BiDSM (K=5, N=0)"] = bism(DSM(0.05))
    methods["BiSSM (K=5, N=0)"] = bism(SSM())
    return methods


def _no_guide(v):
    pass


def grbm_section(out: Path, quick: bool, seed: int = 0):
    steps = 60 if quick else 3000
    train = datasets.toy("checkerboard", 2000 if quick else 20000, seed=seed)
    test = datasets.toy("checkerboard", 1000 if quick else 10000, seed=seed + 1)
    rows = []
    for name, make in _trainers().items():
        pyro.clear_param_store()
        pyro.set_rng_seed(seed)
        grbm = GaussianRBM(visible_dim=2, hidden_dim=4)
        trainer = make(grbm)
        start = time.perf_counter()
        batches = datasets.batches(train, 100, seed=seed)
        for _ in tqdm(range(steps), desc=f"{name:18s}", leave=False):
            trainer.step(next(batches))
        seconds = time.perf_counter() - start
        with torch.no_grad():
            ll = float(grbm.log_likelihood(test).mean())
        _plot_density(grbm, train, out / f"grbm_{_slug(name)}.png", f"{name}: test LL {ll:.3f}")
        rows.append((name, ll, seconds))
    lines = [
        f"GaussianRBM(2, 4) on the checkerboard, {steps} steps of batch 100, Adam(1e-3, (0.9, 0.95))",
        f"{'method':20s} {'test log-lik':>12s} {'seconds':>8s}",
    ]
    lines += [f"{n:20s} {ll:12.3f} {s:8.1f}" for n, ll, s in rows]
    lines.append(f"(ceiling: log 2 = {CEILING:.3f}; figures in {out}/grbm_*.png)")
    return lines


def _slug(name):
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


def _plot_density(grbm, data, path, title):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    grid = torch.linspace(-0.25, 1.25, 120)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], -1)
    with torch.no_grad():
        dens = grbm.log_likelihood(pts).exp().reshape(120, 120)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    axes[0].scatter(data[:2000, 0], data[:2000, 1], s=1)
    axes[0].set_title("data")
    axes[1].imshow(dens.numpy(), origin="lower", extent=(-0.25, 1.25, -0.25, 1.25))
    axes[1].set_title(title)
    for ax in axes:
        ax.set_xlim(-0.25, 1.25)
        ax.set_ylim(-0.25, 1.25)
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def chains_section(out: Path, quick: bool, seed: int = 0):
    """Latent posterior of a small EBLVM, 1024 MALA chains as one batch, ArviZ summary."""
    pyro.set_rng_seed(seed)
    weight = torch.tensor([[1.5, -0.5], [0.3, 1.2], [-1.0, 0.8]])

    def model(v):
        with pyro.plate("data", len(v)):
            h = pyro.sample("h", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.factor("energy", -(v - torch.tanh(h @ weight.T)).pow(2).sum(-1) / (2 * 0.3**2))

    v = torch.tanh(torch.randn(2, 2) @ weight.T) + 0.3 * torch.randn(2, 3)
    chains, draws = (64, 50) if quick else (1024, 300)
    start = time.perf_counter()
    samples = mcmc.sample(model, mcmc.MALA(0.05), num_chains=chains, num_samples=draws,
                          warmup_steps=draws, model_args=(v,), progress=True)
    seconds = time.perf_counter() - start
    table = samples.summary(kind="diagnostics")
    samples.plot_trace(out / "latent_chains_trace.png")
    lines = [f"{chains} MALA chains x {draws} draws on the latent posterior h | v of 2 items "
             f"({seconds:.1f} s, acceptance {float(samples.stats['accept_prob'].mean()):.2f}, "
             f"{samples.num_divergences} divergences)"]
    lines += table.to_string().splitlines()
    lines.append(f"(trace plot: {out}/latent_chains_trace.png)")
    return lines


def gebm_section(out: Path, quick: bool, seed: int = 0):
    """A GEBM trained by KALE on a curve with two dense arcs; MMD of base vs GEBM samples."""
    from .infer import KALE
    from .models import GEBM
    from .models.nets import MLP

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    g = torch.Generator().manual_seed(seed)

    def curve(n):
        t = (0.8 * (torch.randint(0, 2, (n,), generator=g) * 2 - 1) + 0.3 * torch.randn(n, generator=g))
        t = t.clamp(-1.6, 1.6)
        return torch.stack([t, 0.6 * torch.sin(math.pi * t)], -1) + 0.01 * torch.randn(n, 2, generator=g)

    data, test = curve(20000), curve(1000)
    gebm = GEBM(MLP(1, 2, (64, 64)), MLP(2, 1, (64, 64)), latent_dim=1)
    kale = KALE(gebm, optim=pyro.optim.Adam({"lr": 1e-3, "betas": (0.5, 0.9)}),
                generator_optim=pyro.optim.Adam({"lr": 1e-3, "betas": (0.5, 0.9)}),
                critic_steps=5, warmup_critic_steps=10 if quick else 100, penalty=1e-2)
    iterations = 10 if quick else 600
    stream = datasets.batches(data, 256, seed=seed)
    for _ in tqdm(range(iterations), desc="KALE", leave=False):
        kale.step(next(stream))
    losses = kale.last_losses
    bw = (0.05, 0.1, 0.2)
    base = gebm.sample_base(len(test))
    rows = [("base G(z)", float(metrics.mmd(base, test, bandwidths=bw)))]
    for name, kernel in (("GEBM, latent ULA", mcmc.ULA(0.01)),
                         ("GEBM, latent underdamped", mcmc.UnderdampedLangevin(0.1, friction=1.0))):
        x = gebm.sample(len(test), kernel, num_steps=20 if quick else 200)
        rows.append((name, float(metrics.mmd(x, test, bandwidths=bw))))
    lines = [f"GEBM(MLP 1->2, MLP 2->1) by KALE, {iterations} iterations "
             f"(KALE estimate {losses['kale']:.3f})",
             f"{'samples':26s} {'MMD² to held-out x 1e3':>22s}"]
    lines += [f"{n:26s} {1e3 * m:22.2f}" for n, m in rows]
    return lines


def teaching_section(out: Path, quick: bool, seed: int = 0):
    """MCMC teaching on eight Gaussians: the VAE's samples and their Langevin revision."""
    from .experiments import teaching_toy

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    iterations = 10 if quick else 300
    train = datasets.toy("8gaussians", 4000, seed=seed)
    test = datasets.toy("8gaussians", 1000, seed=seed + 1)
    start = time.perf_counter()
    teaching, _ = teaching_toy.train_teaching(seed, train, iterations)
    seconds = time.perf_counter() - start
    revised, trajectory = teaching.sample(len(test), return_trajectory=True)
    rows = [("teaching, VAE (x0)", teaching_toy.quality(trajectory[:, 0].detach(), test)),
            ("teaching, revised (x~)", teaching_toy.quality(revised.detach(), test))]
    lines = [f"VAE-amortized Langevin on eight Gaussians, {iterations} iterations ({seconds:.1f} s)",
             f"{'samples':24s} {'MMD² x 1e3':>11s} {'modes (of 8)':>13s} {'off-mode':>9s}"]
    lines += [f"{n:24s} {q['mmd']:11.1f} {q['modes']:13d} {100 * q['off']:8.1f}%" for n, q in rows]
    return lines


SECTIONS = [
    ("Score matching, CD and BiSM on a GaussianRBM", grbm_section),
    ("Many latent chains with ArviZ diagnostics", chains_section),
    ("A generalized EBM trained by KALE", gebm_section),
    ("Variational MCMC teaching", teaching_section),
]


def run_demo(out: Path, quick: bool = False):
    """Run every section. Toy-sized tensors run fastest on one CPU thread."""
    torch.set_num_threads(1)
    out.mkdir(parents=True, exist_ok=True)
    for title, section in SECTIONS:
        print(f"\n== {title} ==")
        for line in section(out, quick):
            print(line)
