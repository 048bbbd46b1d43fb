# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm demo``: four short sections, each printing a number that shows learning.

1. GaussianRBMs trained on the checkerboard by CD-1, DSM, SSM, BiDSM and BiSSM:
   exact test log-likelihoods before and after training, beside the best
   Gaussians, and the learned densities as a PNG.
2. 1024 MALA chains on an EBLVM's latent posterior, summarized by ArviZ, with a
   warning naming every coordinate whose R-hat is above 1.01.
3. A generalized EBM trained by KALE: MMD of its samples to held-out data.
4. Variational MCMC teaching: MMD of the VAE's samples and of their Langevin revision.

Everything runs on one CPU thread (toy-sized tensors run fastest that way).
"""

from __future__ import annotations

import itertools
import math
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from . import datasets, mcmc, metrics
from .infer import DSM, SSM, BiSM, ContrastiveDivergence
from .models import GaussianRBM
from .progress import progress_bar, progress_enabled

CEILING = math.log(2)  # the checkerboard's density is 2 on its support
RHAT_LIMIT = 1.01

#: The GaussianRBM recipe of the demo, chosen by measurement: on the standardized
#: checkerboard every method passes the best correlated Gaussian within 2000 steps.
GRBM_RECIPE = {"hidden_dim": 4, "steps": 2000, "batch_size": 100, "lr": 1e-2, "noise_scale": 0.2}


def _no_guide(v):
    pass


def grbm_methods(hidden_dim=4, lr=1e-2, noise_scale=0.2):
    """Name -> ``factory(grbm)`` -> a trainer with ``.step(v)``: the demo's methods.

    All share Adam(``lr``, betas (0.9, 0.95)); DSM and BiDSM noise the
    (standardized) data with :math:`\\sigma` = ``noise_scale``; BiSM uses K = 5 real
    guide steps and N = 0 unrolled steps (its guide, ``AmortizedBernoulli``, has the
    GaussianRBM posterior's linear form, and keeps up at this learning rate).
    """
    from .guides import AmortizedBernoulli

    def optim():
        return pyro.optim.Adam({"lr": lr, "betas": (0.9, 0.95)})

    def svi(loss):
        return lambda grbm: pyro.infer.SVI(grbm.marginal, _no_guide, optim(), loss=loss)

    def bism(objective):
        def make(grbm):
            guide = AmortizedBernoulli(grbm.visible_dim, hidden_dim, site="h", temperature=0.1)
            return BiSM(grbm, guide, optim(), objective=objective, inner_steps=5, unroll_steps=0)

        return make

    return {
        "CD-1": lambda grbm: ContrastiveDivergence(grbm, optim(), k=1),
        "DSM": svi(DSM(noise_scale)),
        "SSM": svi(SSM()),
        "BiDSM (K=5, N=0)": bism(DSM(noise_scale)),
        "BiSSM (K=5, N=0)": bism(SSM()),
    }


def fit_grbm(method, data, steps=GRBM_RECIPE["steps"], seed=0, hidden_dim=GRBM_RECIPE["hidden_dim"],
             batch_size=GRBM_RECIPE["batch_size"], lr=GRBM_RECIPE["lr"],
             noise_scale=GRBM_RECIPE["noise_scale"]):
    """Train a fresh ``GaussianRBM(D, hidden_dim)`` on ``data`` (already
    standardized) by ``method`` (a key of :func:`grbm_methods`) for ``steps``
    mini-batches; returns ``(grbm, seconds)``."""
    factories = grbm_methods(hidden_dim, lr, noise_scale)
    if method not in factories:
        raise ValueError(f"method must be one of {', '.join(factories)}, got {method!r}")
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    grbm = GaussianRBM(visible_dim=data.shape[1], hidden_dim=hidden_dim).to(data.dtype)
    trainer = factories[method](grbm)
    batches = datasets.batches(data, batch_size, seed=seed)
    start = time.perf_counter()
    for _ in progress_bar(range(steps), total=steps, desc=f"{method:18s}"):
        trainer.step(next(batches))
    return grbm, time.perf_counter() - start


class Standardize:
    """The affine map :math:`z = (x - m) / s` fitted to training data (per
    coordinate mean and standard deviation, as Hinton's guide recommends for
    Gaussian visible units), with the change of variables
    :math:`\\log p_x(x) = \\log p_z(z) - \\sum_i \\log s_i`."""

    def __init__(self, data):
        self.loc, self.scale = data.mean(0), data.std(0)

    def __call__(self, x):
        return (x - self.loc) / self.scale

    def log_likelihood(self, grbm, x):
        """Exact per-item log-likelihood of ``x`` (data units) under ``grbm``
        (trained on standardized data)."""
        with torch.no_grad():
            return grbm.log_likelihood(self(x)) - self.scale.log().sum()


def gaussian_log_likelihoods(train, test):
    """Mean test log-likelihood of the maximum-likelihood Gaussians fitted to
    ``train``: ``(diagonal covariance, full covariance)``."""
    loc, cov = train.mean(0), torch.cov(train.T)
    diag = dist.Normal(loc, cov.diagonal().sqrt()).to_event(1)
    full = dist.MultivariateNormal(loc, covariance_matrix=cov)
    return float(diag.log_prob(test).mean()), float(full.log_prob(test).mean())


def grbm_section(out: Path, quick: bool, seed: int = 0):
    """GaussianRBM(2, 4) on the standardized checkerboard, trained by each method."""
    recipe = dict(GRBM_RECIPE, steps=60) if quick else dict(GRBM_RECIPE)
    train = datasets.toy("checkerboard", 2000 if quick else 20000, seed=seed)
    test = datasets.toy("checkerboard", 1000 if quick else 10000, seed=seed + 1)
    standardize = Standardize(train)
    z = standardize(train)
    round_ll, full_ll = gaussian_log_likelihoods(train, test)
    panels = []
    pyro.set_rng_seed(seed)
    untrained = GaussianRBM(2, recipe["hidden_dim"], name="untrained")
    untrained_ll = float(standardize.log_likelihood(untrained, test).mean())
    panels.append(("untrained", untrained, untrained_ll))
    rows = []
    for name in grbm_methods():
        grbm, seconds = fit_grbm(name, z, seed=seed, **recipe)
        ll = float(standardize.log_likelihood(grbm, test).mean())
        panels.append((name, grbm, ll))
        rows.append((name, ll, seconds))
    figure = out / "grbm_densities.png"
    _plot_densities(panels, standardize, train, figure)
    lines = [
        f"GaussianRBM(2, {recipe['hidden_dim']}) on the checkerboard (standardized), {recipe['steps']} steps "
        f"of batch {recipe['batch_size']}, Adam(lr {recipe['lr']}, betas (0.9, 0.95)), "
        f"DSM σ = {recipe['noise_scale']} (standardized units)",
        "Exact mean test log-likelihood per point in the data's units (higher is better):",
        f"{'model':20s} {'test log-lik':>12s} {'seconds':>8s}",
        f"{'(ceiling: log 2)':20s} {CEILING:12.3f}",
        f"{'round Gaussian':20s} {round_ll:12.3f}",
        f"{'correlated Gaussian':20s} {full_ll:12.3f}",
        f"{'untrained GRBM':20s} {untrained_ll:12.3f}",
    ]
    lines += [f"{n:20s} {ll:12.3f} {s:8.1f}" for n, ll, s in rows]
    lines.append(f"figure {figure}: the training data, then the density of the untrained and of "
                 "each trained GaussianRBM (title: its test log-likelihood)")
    return lines


def _plot_densities(panels, standardize, data, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lo, hi, n = -0.25, 1.25, 120
    grid = torch.linspace(lo, hi, n, dtype=data.dtype)
    xx, yy = torch.meshgrid(grid, grid, indexing="xy")
    pts = torch.stack([xx.flatten(), yy.flatten()], -1)
    cols = 4
    rows = (len(panels) + 1 + cols - 1) // cols
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.7 * rows))
    axes = axes.flatten()
    axes[0].scatter(data[:2000, 0], data[:2000, 1], s=0.5)
    axes[0].set_title("training data", fontsize=9)
    for ax, (name, grbm, ll) in zip(axes[1:], panels, strict=False):
        dens = standardize.log_likelihood(grbm, pts).exp().reshape(n, n)
        ax.imshow(dens.numpy(), origin="lower", extent=(lo, hi, lo, hi))
        ax.set_title(f"{name}: {ll:.3f}", fontsize=9)
    for ax in axes:
        ax.set_xlim(lo, hi)
        ax.set_ylim(lo, hi)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[len(panels) + 1:]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def rhat_warnings(table, limit=RHAT_LIMIT):
    """Lines warning about every row of an ArviZ summary ``table`` whose
    ``r_hat`` is above ``limit`` (none when all are at or below it)."""
    high = table["r_hat"][table["r_hat"] > limit]
    if high.empty:
        return []
    where = ", ".join(f"{name} ({value:.3f})" for name, value in high.items())
    return [f"WARNING: R-hat above {limit} at {where}: the chains disagree; run them longer "
            "before trusting these draws"]


def chains_section(out: Path, quick: bool, seed: int = 0):
    """Latent posterior of a small EBLVM, 1024 MALA chains as one batch, ArviZ summary."""
    pyro.set_rng_seed(seed)
    weight = torch.tensor([[1.5, -0.5], [0.3, 1.2], [-1.0, 0.8]])

    def model(v):
        with pyro.plate("data", len(v)):
            h = pyro.sample("h", dist.Normal(torch.zeros(2), 1.0).to_event(1))
            pyro.factor("energy", -(v - torch.tanh(h @ weight.T)).pow(2).sum(-1) / (2 * 0.3**2))

    v = torch.tanh(torch.randn(2, 2) @ weight.T) + 0.3 * torch.randn(2, 3)
    # MALA's draws are correlated over ~20 steps: 2000 draws per chain bring
    # R-hat below 1.01 even across 1024 chains
    chains, draws, warmup = (64, 50, 50) if quick else (1024, 2000, 500)
    start = time.perf_counter()
    samples = mcmc.sample(model, mcmc.MALA(0.05), num_chains=chains, num_samples=draws,
                          warmup_steps=warmup, model_args=(v,), progress=progress_enabled())
    seconds = time.perf_counter() - start
    table = samples.summary(round_to=3)
    figure = out / "latent_chains_trace.png"
    samples.plot_trace(figure)
    lines = [f"{chains} MALA chains x {draws} draws (after {warmup} warmup steps) on the latent "
             f"posterior h | v of 2 items, prior N(0, I) ({seconds:.1f} s, acceptance "
             f"{float(samples.stats['accept_prob'].mean()):.2f}, {samples.num_divergences} divergences)"]
    lines += table[["mean", "sd", "ess_bulk", "ess_tail", "r_hat"]].to_string().splitlines()
    lines += rhat_warnings(table) or [f"all R-hat <= {RHAT_LIMIT}"]
    lines.append(f"figure {figure}: per coordinate, the posterior density and the trace of the "
                 "first 8 chains")
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
    bw = (0.05, 0.1, 0.2)
    untrained = gebm.sample_base(len(test))
    iterations = 10 if quick else 600
    stream = datasets.batches(data, 256, seed=seed)
    start = time.perf_counter()
    for _ in progress_bar(range(iterations), total=iterations, desc="KALE"):
        kale.step(next(stream))
    losses = kale.last_losses
    seconds = time.perf_counter() - start
    base = gebm.sample_base(len(test))
    rows = [("untrained G(z)", untrained), ("base G(z)", base)]
    for name, kernel in (("GEBM, latent ULA", mcmc.ULA(0.01)),
                         ("GEBM, latent underdamped", mcmc.UnderdampedLangevin(0.1, friction=1.0))):
        rows.append((name, gebm.sample(len(test), kernel, num_steps=20 if quick else 200)))
    figure = out / "gebm_samples.png"
    _plot_samples([("held-out data", test)] + rows, figure)
    lines = [f"GEBM(MLP 1->2, MLP 2->1) by KALE, {iterations} iterations ({seconds:.1f} s, "
             f"KALE estimate {losses['kale']:.3f}); lower MMD² is closer to the data",
             f"{'samples':26s} {'MMD² to held-out x 1e3':>22s}"]
    lines += [f"{n:26s} {1e3 * float(metrics.mmd(x, test, bandwidths=bw)):22.2f}" for n, x in rows]
    lines.append(f"figure {figure}: held-out data, then samples of the untrained generator, the trained "
                 "generator, and the GEBM by each latent sampler")
    return lines


def _plot_samples(panels, path, lim=2.0):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(2.6 * len(panels), 2.7))
    for ax, (name, x) in zip(axes, panels, strict=True):
        x = x.detach()
        ax.scatter(x[:, 0], x[:, 1], s=1)
        ax.set_title(name, fontsize=9)
        ax.set_xlim(-lim, lim)
        ax.set_ylim(-lim, lim)
        ax.set_aspect("equal")
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def _toy_teaching(seed, train, iterations):
    """MCMC teaching on 2-D points from the library's pieces: an MLP energy with a
    N(0, 3² I) base term, a VAE of a Gaussian decoder and encoder (2-d latent),
    K = 20 ULA steps of size 0.01, batch 200 (the networks and settings of
    ``pyro-ebm reproduce teaching-toy``)."""
    from .guides import AmortizedNormal
    from .infer import MCMCTeaching
    from .models import VAE, GaussianDecoder, MLPEnergy
    from .models.nets import MLP, GaussianEncoder

    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    energy = MLPEnergy(2, (128, 128), base_scale=3.0)
    decoder = GaussianDecoder(MLP(2, 2, (128, 128)), 2, scale=0.1, output=None, latent_site="z", obs_site="x")
    vae = VAE(decoder, AmortizedNormal(GaussianEncoder(2, 2, (128,), min_scale=1e-4), site="z"))
    ebm_optim = pyro.optim.Adam({"lr": 1e-3, "betas": (0.5, 0.999)})
    teaching = MCMCTeaching(energy, vae.model, vae.guide, ebm_optim, pyro.optim.Adam({"lr": 1e-3}),
                            kernel=mcmc.ULA(1e-2), num_langevin_steps=20, energy_penalty=0.01)
    for batch in itertools.islice(datasets.batches(train, 200, seed=seed, drop_last=True), iterations):
        teaching.step(batch)
    return teaching


def teaching_section(out: Path, quick: bool, seed: int = 0):
    """MCMC teaching on eight Gaussians: the VAE's samples and their Langevin revision."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    iterations = 10 if quick else 300
    train = datasets.toy("8gaussians", 4000, seed=seed)
    test = datasets.toy("8gaussians", 1000, seed=seed + 1)
    start = time.perf_counter()
    teaching = _toy_teaching(seed, train, iterations)
    seconds = time.perf_counter() - start
    revised, trajectory = teaching.sample(len(test), return_trajectory=True)
    rows = [("teaching, VAE (x0)", trajectory[:, 0].detach()), ("teaching, revised (x~)", revised.detach())]
    figure = out / "teaching_samples.png"
    _plot_samples([("held-out data", test)] + rows, figure, lim=3.0)
    lines = [f"VAE-amortized Langevin on eight Gaussians, {iterations} iterations ({seconds:.1f} s); "
             "lower MMD² is closer to the data",
             f"{'samples':24s} {'MMD² x 1e3':>11s} {'modes (of 8)':>13s} {'off-mode':>9s}"]
    centers = datasets.toy_centers("8gaussians")
    for name, x in rows:
        mmd2 = 1000 * float(metrics.mmd(x, test, bandwidths=(0.1, 0.2, 0.5, 1.0)))
        modes, off = metrics.mode_coverage(x, centers, radius=0.6)   # 3 sd of a mode
        lines.append(f"{name:24s} {mmd2:11.1f} {modes:13d} {100 * off:8.1f}%")
    lines.append(f"figure {figure}: held-out data, the taught VAE's samples x0, and the same samples "
                 "after the EBM's Langevin steps")
    return lines


SECTIONS = [
    ("Score matching, CD and BiSM on a GaussianRBM", grbm_section),
    ("Many latent chains with ArviZ diagnostics", chains_section),
    ("A generalized EBM trained by KALE", gebm_section),
    ("Variational MCMC teaching", teaching_section),
]


def run_demo(out: Path, quick: bool = False):
    """Run every section on one CPU thread and print how long the demo took."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        out.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        for title, section in SECTIONS:
            print(f"\n== {title} ==", flush=True)
            for line in section(out, quick):
                print(line, flush=True)
        print(f"\nThe demo took {time.perf_counter() - start:.0f} s on one CPU thread; figures in {out}/")
    finally:
        torch.set_num_threads(threads)
