# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm reproduce teaching-toy``: variational MCMC teaching on eight
well-separated Gaussians in 2-D.

The claim (Xie, Zheng, Li, AAAI 2021), on a density whose modes short Langevin
chains cannot cross: the VAE-proposed, Langevin-revised samples of MCMC
teaching match the data better than short-run Langevin from noise with the same
K, and the taught VAE beats the VAE trained alone.

Data: ``datasets.toy("8gaussians")`` (modes at radius 2, σ = 0.2), 5000
training points, 1000 held-out points. Networks: energy MLP 2-128-128-1 (SiLU)
plus the reference term ‖x‖²/18; VAE with a 2-d latent, decoder 2-128-128-2
(identity mean, σ = 0.1), encoder 2-128-2·2. Batch 200, 1000 iterations, K = 20
ULA steps of size 0.01 (noise on) for both EBMs, the same optimizers (EBM: Adam,
learning rate 1e-3, betas (0.5, 0.999), energy penalty α = 0.01; VAE: Adam,
1e-3). Metrics on 1000 samples against the held-out points: MMD² (×1000) with
RBF bandwidths 0.1, 0.2, 0.5 and 1; the number of modes that receive at least
5% of the samples (of 8; 12.5% each under the data), and the share of samples
farther than 3σ from every mode.
"""

from __future__ import annotations

import itertools
import statistics
import time
from pathlib import Path

import pyro
import torch

from .. import datasets, mcmc
from ..guides import AmortizedNormal
from ..infer import MCMCTeaching
from ..metrics import mmd, mode_coverage
from ..models import VAE, GaussianDecoder, MLPEnergy
from ..models import train_vae as fit_vae
from ..models.nets import MLP, GaussianEncoder
from ._runs import OptimState, RunStore, cell, mean_sd
from .teaching_digits import ROWS, _loop, draw_rows, short_run_ebm

LATENT = 2
HIDDEN = 128
DECODER_SCALE = 0.1
BATCH = 200
LANGEVIN_STEPS = 20
STEP_SIZE = 1e-2
ITERATIONS = 1000
ENERGY_PENALTY = 0.01
BANDWIDTHS = (0.1, 0.2, 0.5, 1.0)
CENTERS = datasets.toy_centers("8gaussians")


def toy_energy():
    """``pyro.factor("energy", -E(x))`` with :math:`E(x) = f(x) + \\|x\\|^2/18`, ``f`` an MLP."""
    return MLPEnergy(2, (HIDDEN, HIDDEN), base_scale=3.0)


def build(seed):
    """Energy and VAE, freshly initialized under ``seed`` (the param store is cleared):
    the library's :class:`~pyro_ebm.models.MLPEnergy` with the base term
    ‖x‖²/18 (a N(0, 3² I) base measure) and a :class:`~pyro_ebm.models.VAE` of a
    :class:`~pyro_ebm.models.GaussianDecoder` with identity mean (sites ``"z"``,
    ``"x"``) and a :class:`~pyro_ebm.models.nets.GaussianEncoder`."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    energy = toy_energy()
    # decoder before encoder: the parameter creation order fixes the random stream
    decoder = GaussianDecoder(MLP(LATENT, 2, (HIDDEN, HIDDEN)), LATENT, scale=DECODER_SCALE, output=None,
                              latent_site="z", obs_site="x")
    encoder = AmortizedNormal(GaussianEncoder(2, LATENT, (HIDDEN,), min_scale=1e-4), site="z")
    return energy, VAE(decoder, encoder)


def ebm_optim():
    return pyro.optim.Adam({"lr": 1e-3, "betas": (0.5, 0.999)})


def vae_optim():
    return pyro.optim.Adam({"lr": 1e-3})


def noise(n):
    """Uniform on [-3, 3]², the short-run chains' start."""
    return 6 * torch.rand(n, 2) - 3


def _batches(x, seed, iterations):
    return itertools.islice(datasets.batches(x, BATCH, seed=seed, drop_last=True), iterations)


def train_teaching(seed, x_train, iterations, store=None):
    energy, vae = build(seed)
    teaching = MCMCTeaching(energy, vae.model, vae.guide, ebm_optim(), vae_optim(),
                            kernel=mcmc.ULA(STEP_SIZE), num_langevin_steps=LANGEVIN_STEPS,
                            energy_penalty=ENERGY_PENALTY)
    _loop(store, "teaching", teaching, _batches(x_train, seed, iterations), iterations,
          lambda i, batch: teaching.step(batch), (energy, vae))
    return teaching, energy


def train_vae(seed, x_train, iterations, store=None):
    """The VAE alone, trained by Pyro's SVI with Trace_ELBO
    (:func:`pyro_ebm.models.train_vae`); checkpointed in ``store`` when given."""
    _, vae = build(seed)
    fit_vae(vae, _batches(x_train, seed, iterations), iterations, vae_optim(),
            loop=lambda svi, step, batches: _loop(store, "VAE alone", OptimState(svi.optim), batches,
                                                  iterations, step, (vae,)))
    return vae


def train_short_run(seed, x_train, iterations, store=None):
    energy, _ = build(seed)
    sampler = mcmc.AmortizedLangevin(noise, energy, mcmc.ULA(STEP_SIZE), LANGEVIN_STEPS)
    trained = short_run_ebm(sampler, ebm_optim(), x_train, iterations, seed, BATCH, ENERGY_PENALTY, store)
    return trained, energy


def mode_stats(x):
    """Modes holding at least 5% of the samples, and the share of samples farther
    than 3σ = 0.6 from every mode."""
    return mode_coverage(x, CENTERS, radius=0.6, min_share=0.05)


def quality(samples, x_test):
    modes, off = mode_stats(samples)
    return {"mmd": 1000 * float(mmd(samples, x_test, bandwidths=BANDWIDTHS)), "modes": modes, "off": off}



def _figure(samples, energies, x_test, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("held-out data", x_test)] + list(samples.items())
    count = len(panels) + len(energies)
    fig, axes = plt.subplots(1, count, figsize=(2.6 * count, 2.7))
    edges = torch.linspace(-3, 3, 81)
    for ax, (name, x) in zip(axes, panels, strict=False):
        ax.hist2d(x[:, 0].numpy(), x[:, 1].numpy(), bins=[edges.numpy()] * 2, cmap="viridis")
        ax.set_title(name, fontsize=9)
    grid = torch.stack(torch.meshgrid(edges, edges, indexing="xy"), -1).reshape(-1, 2)
    for ax, (name, energy) in zip(axes[len(panels):], energies.items(), strict=True):
        with torch.no_grad():
            e = energy.energy(grid)
        density = torch.exp(-(e - e.min())).reshape(81, 81)
        ax.imshow(density.numpy(), origin="lower", extent=(-3, 3, -3, 3), cmap="viridis")
        ax.set_title(f"exp(-E), {name}", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_aspect("equal")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(out_dir: Path, quick: bool = False, seeds=(0, 1, 2), resume: bool = False) -> str:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = tuple(seeds)[:1] if quick else tuple(seeds)
    iterations = 5 if quick else ITERATIONS
    n = 300 if quick else 1000
    x_test = datasets.toy("8gaussians", n, seed=10_000)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    store = RunStore(out_dir, resume, {"experiment": "teaching-toy", "quick": quick,
                                       "iterations": iterations})
    try:
        results, seconds = {r: [] for r in ROWS}, {"VAE alone": [], "short-run EBM": [], "teaching": []}
        shown = None
        for seed in seeds:
            numbers, drawn = store.run(f"seed {seed}", _one_seed,
                seed, x_test, iterations, n, store)
            for row in ROWS:
                results[row].append(numbers["quality"][row])
            for key, t in numbers["seconds"].items():
                seconds[key].append(t)
            if shown is None:
                shown = drawn
        reference = quality(datasets.toy("8gaussians", n, seed=20_000), x_test)
    finally:
        torch.set_num_threads(threads)
    with torch.random.fork_rng(devices=[]):
        energies = {}
        for name in ("teaching", "short-run"):
            energies[name] = toy_energy()
            energies[name].load_state_dict(shown["energies"][name])
    _figure(shown["samples"], energies, x_test, out_dir / "teaching_toy.png")
    return _report(results, seconds, reference, seeds, iterations, n)


def _one_seed(seed, x_test, iterations, n, store):
    """One seed's run: the three methods trained and sampled; the samples' quality,
    the training times, and (for the figure) the samples and the two energies."""
    x_train = datasets.toy("8gaussians", 5000, seed=seed)
    start = time.perf_counter()
    vae = train_vae(seed, x_train, iterations, store)
    seconds = {"VAE alone": time.perf_counter() - start}
    start = time.perf_counter()
    short, short_energy = train_short_run(seed, x_train, iterations, store)
    seconds["short-run EBM"] = time.perf_counter() - start
    start = time.perf_counter()
    teaching, teach_energy = train_teaching(seed, x_train, iterations, store)
    seconds["teaching"] = time.perf_counter() - start
    drawn = draw_rows(vae, short, teaching, n, seed)
    results = {row: quality(drawn[row], x_test) for row in ROWS}
    energies = {name: {k: v.detach().clone() for k, v in e.state_dict().items()}
                for name, e in (("teaching", teach_energy), ("short-run", short_energy))}
    return ({"quality": results, "seconds": seconds},
            {"samples": {k: v.detach().clone() for k, v in drawn.items()}, "energies": energies})


def _report(results, seconds, reference, seeds, iterations, n):
    ms = {k: 1000 * statistics.fmean(v) / iterations for k, v in seconds.items()}
    lines = [
        "## Variational MCMC teaching on eight Gaussians",
        "",
        f"`pyro-ebm reproduce teaching-toy` — seeds {list(seeds)}, {iterations} iterations of batch {BATCH}, "
        f"K = {LANGEVIN_STEPS} ULA steps of size {STEP_SIZE} (noise on); mean ± sd over seeds. {n} samples "
        f"against {n} held-out points; a fresh draw of the data scores MMD {reference['mmd']:.2f}, "
        f"{reference['modes']} modes, {100 * reference['off']:.1f}% off-mode.",
        "",
        "| samples | MMD² ×1000 ↓ | modes ≥ 5% (of 8) | off-mode % ↓ |",
        "|---|---|---|---|",
    ]
    for row in ROWS:
        r = results[row]
        lines.append(f"| {row} | {cell([v['mmd'] for v in r])} | {cell([v['modes'] for v in r], 1)} | "
                     f"{cell([100 * v['off'] for v in r], 1)} |")
    lines += ["", "Training cost (ms per iteration, one thread): "
              + ", ".join(f"{k} {v:.0f}" for k, v in ms.items()) + ".", "", _verdict(results), "",
              "Sample histograms and the learned densities exp(−E) (seed 0): `teaching_toy.png`.", ""]
    return "\n".join(lines)


def _verdict(results):
    stats = {row: mean_sd(v["mmd"] for v in results[row]) for row in ROWS}
    mean, sd = {row: m for row, (m, _) in stats.items()}, {row: s for row, (_, s) in stats.items()}
    rev, x0 = mean["teaching, revised (x̃)"], mean["teaching, VAE (x0)"]
    short, vae = mean["short-run EBM"], mean["VAE alone"]
    text = (f"**Verdict.** MMD² ×1000: teaching revised {rev:.2f}, short-run EBM from noise {short:.2f}, "
            f"VAE alone {vae:.2f}, taught VAE {x0:.2f}. ")
    best = min(ROWS, key=mean.get)
    runner_up = min((r for r in ROWS if r != best), key=mean.get)
    clear = mean[runner_up] - mean[best] > sd[best] + sd[runner_up]
    if best == ROWS[3]:
        text += ("The revised samples are the best of the four, as claimed"
                 + (". " if clear else f", but ahead of the {runner_up} by less than the seeds' spread. "))
    else:
        text += (f"The revised samples are not the best here ({best} is), so that part of the claim is not "
                 "reproduced. ")
    text += ("The taught VAE beats the VAE alone." if x0 < vae else
             "The taught VAE does not beat the VAE alone on this toy: both place most samples between "
             "the modes, and the Langevin steps do the work.")
    return text
