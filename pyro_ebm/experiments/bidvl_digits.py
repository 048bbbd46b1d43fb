# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm reproduce bidvl-digits``: BiDVL against variational MCMC teaching
and a VAE alone on scikit-learn's 8×8 digits.

The claim (Kan et al., CVPR 2022): a decoupled EBLVM learned by BiDVL, with no
MCMC at all, generates samples of quality comparable to MCMC-based learning,
reconstructs test images through its encoder/decoder pair, and its energy
tells in-distribution images from out-of-distribution ones.

All three methods share the networks of :func:`build`: an energy MLP
64-128-128-1 (SiLU), a Gaussian decoder 16-128-64 (sigmoid mean, σ fixed) and an
amortized Gaussian encoder 64-128-2·16. Metrics, on the 360-image test split:

- **FD**: Fréchet distance between :func:`pyro_ebm.features.digits_features`
  of 360 generated images (clamped to [0, 1]) and of the test images (BiDVL:
  its decoder draws :math:`\\hat v`, the decoder mean plus σ-noise, as in
  training; teaching: decoder means revised by its K = 15 Langevin steps; VAE:
  decoder means at :math:`h \\sim p(h)`);
- **recon**: mean per-image squared error of encode-then-decode (decoder mean at
  the encoder mean), summed over the 64 pixels;
- **AUROC** of the score :math:`-E` (the VAE: its ELBO, 8 particles) for test
  digits against (a) uniform noise, (b) test digits flipped upside down,
  (c) test digits blurred by a Gaussian kernel (σ = 1 pixel).

The teaching baseline's Langevin step size (γ = 0.03, noise on) is the best FD
of a sweep on seed 0 with 1500 iterations: γ = 1e-4, 1e-3, 3e-3, 1e-2, 3e-2,
0.1 gave FD 346, 114, 64, 47, 30, 37; with the noise off (γ = 1e-3) it gave 591.
"""

from __future__ import annotations

import math
import statistics
import time
from pathlib import Path

import pyro
import pyro.distributions as dist
import torch

from .. import datasets, mcmc
from ..features import digits_features
from ..guides import AmortizedNormal
from ..infer import BiDVL, MCMCTeaching
from ..metrics import auroc, frechet_distance
from ..models import GaussianDecoder, MLPEnergy
from ..models.nets import MLP, GaussianEncoder
from ._runs import OptimState, RunStore

LATENT = 16
DECODER_SCALE = 0.1
BATCH = 100
LANGEVIN_STEPS = 15
LANGEVIN_STEP_SIZE = 3e-2
ENERGY_LR = 1e-4
VAE_LR = 1e-3


def build(seed, width=128):
    """The energy model, decoder model and encoder guide shared by every method,
    freshly initialized under ``seed`` (the param store is cleared); ``width`` is
    the hidden width of all three networks."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    energy = MLPEnergy(64, (width, width))
    decoder = GaussianDecoder(MLP(LATENT, 64, (width,)), LATENT, scale=DECODER_SCALE)
    encoder = AmortizedNormal(GaussianEncoder(64, LATENT, (width,)), site="h")
    return energy, decoder, encoder


def _optims():
    return pyro.optim.Adam({"lr": ENERGY_LR, "betas": (0.5, 0.999)}), pyro.optim.Adam({"lr": VAE_LR})


def make_bidvl(seed, width=128, **kwargs):
    energy, decoder, encoder = build(seed, width)
    energy_optim, vae_optim = _optims()
    args = dict(inner_steps=1, vae_weight=1.0)
    args.update(kwargs)
    return BiDVL(energy, decoder, encoder, energy_optim, vae_optim, **args)


def make_teaching(seed, width=128, **kwargs):
    energy, decoder, encoder = build(seed, width)
    energy_optim, vae_optim = _optims()
    args = dict(kernel=mcmc.ULA(LANGEVIN_STEP_SIZE), num_langevin_steps=LANGEVIN_STEPS)
    args.update(kwargs)
    return MCMCTeaching(energy, decoder, encoder, energy_optim, vae_optim, **args)


def make_vae(seed):
    energy, decoder, encoder = build(seed)
    svi = pyro.infer.SVI(decoder, encoder, pyro.optim.Adam({"lr": VAE_LR}), loss=pyro.infer.Trace_ELBO())
    return svi


# -- metrics --------------------------------------------------------------------


def _blur(x, sigma=1.0):
    r = torch.arange(-2, 3, dtype=x.dtype)
    k = torch.exp(-0.5 * (r / sigma) ** 2)
    k = k / k.sum()
    kernel = (k[:, None] * k[None, :])[None, None]
    img = x.reshape(-1, 1, 8, 8)
    return torch.nn.functional.conv2d(img, kernel, padding=2).reshape(-1, 64)


def ood_sets(x_test, seed=0):
    """The three out-of-distribution sets of the table, each shaped like ``x_test``."""
    g = torch.Generator().manual_seed(seed)
    return {
        "noise": torch.rand(x_test.shape, generator=g, dtype=x_test.dtype),
        "flip": x_test.reshape(-1, 8, 8).flip(1).reshape(-1, 64),
        "blur": _blur(x_test),
    }


def reconstruction_error(decoder, encoder, x):
    """Mean over images of ‖x − decoder mean at the encoder mean‖²."""
    with torch.no_grad():
        loc, _ = encoder.params(x)
        return float((x - decoder.decode(loc)).pow(2).sum(-1).mean())


def elbo_per_item(decoder, encoder, x, particles=8):
    """The ELBO of each image, averaged over ``particles`` draws of q(h | x)."""
    with torch.no_grad():
        loc, scale = encoder.params(x)
        q = dist.Normal(loc, scale).to_event(1)
        h = q.sample((particles,))
        prior = dist.Normal(torch.zeros_like(loc), 1.0).to_event(1)
        lik = dist.Normal(decoder.decode(h), decoder.scale).to_event(1)
        return (lik.log_prob(x) + prior.log_prob(h) - q.log_prob(h)).mean(0)


def decoder_means(decoder, n, like):
    with torch.no_grad():
        h = torch.randn(n, decoder.latent_dim, dtype=like.dtype)
        return decoder.decode(h)


def evaluate(method, obj, x_test, ood):
    """FD, reconstruction error and the three AUROCs of one trained method."""
    n = len(x_test)
    with torch.no_grad():
        if method == "BiDVL":
            samples = obj.generate(n)
            decoder, encoder = obj.decoder_model, obj.encoder_guide
            score = lambda v: -obj.energy(v)  # noqa: E731
        elif method == "MCMC teaching":
            samples = obj.sample(n)
            decoder, encoder = obj.vae_model, obj.vae_guide
            score = lambda v: -obj.sampler.energy(v)  # noqa: E731
        else:
            decoder, encoder = obj.model, obj.guide
            samples = decoder_means(decoder, n, x_test)
            score = lambda v: elbo_per_item(decoder, encoder, v)  # noqa: E731
        s_in = score(x_test)
        out = {"fd": frechet_distance(digits_features(samples.clamp(0, 1)), digits_features(x_test)),
               "recon": reconstruction_error(decoder, encoder, x_test)}
        for name, x_out in ood.items():
            out[name] = auroc(s_in, score(x_out))
    return out, samples


def train(method, seed, x_train, iterations, store=None):
    """Train one method for ``iterations`` steps of batch 100; returns the trained
    object and the wall time per iteration in seconds (the first step, which
    validates the models, is not timed). With ``store`` (a
    :class:`~pyro_ebm.experiments._runs.RunStore`, inside one of its runs) the
    training is checkpointed and resumable."""
    obj = {"BiDVL": make_bidvl, "MCMC teaching": make_teaching, "VAE": make_vae}[method](seed)
    stream = datasets.batches(x_train, BATCH, seed=seed, drop_last=True)
    if store is not None:
        if method == "VAE":
            state, modules = OptimState(obj.optim), (obj.model, obj.guide)
        elif method == "BiDVL":
            state, modules = obj, (obj.energy_model, obj.decoder_model, obj.encoder_guide)
        else:
            state, modules = obj, (obj.energy_model, obj.vae_model, obj.vae_guide)
        _, seconds = store.train(method, state, stream, iterations, step=lambda i, v: obj.step(v),
                                 modules=modules, desc=f"{method} seed {seed}", time_from=1)
        return obj, seconds / max(iterations - 1, 1)
    obj.step(next(stream))  # the first step validates the models: not timed
    start = time.perf_counter()
    for _, v in zip(range(iterations - 1), stream, strict=False):
        obj.step(v)
    return obj, (time.perf_counter() - start) / max(iterations - 1, 1)


def _one_run(method, seed, x_train, iterations, x_test, ood, store):
    """One method and seed: train, evaluate; its numbers and the samples of the figure."""
    obj, per_iter = train(method, seed, x_train, iterations, store)
    torch.manual_seed(1000 + seed)
    metrics, drawn = evaluate(method, obj, x_test, ood)
    return {"metrics": metrics, "per_iter": per_iter}, {"samples": drawn[:16].clone()}


# -- report -----------------------------------------------------------------------

METHODS = ("BiDVL", "MCMC teaching", "VAE")
COLUMNS = (("fd", "FD ↓"), ("recon", "recon ↓"), ("noise", "AUROC noise ↑"), ("flip", "AUROC flip ↑"),
           ("blur", "AUROC blur ↑"))


def _cell(values):
    values = [v for v in values if math.isfinite(v)]
    if not values:
        return "n/a"
    mean = statistics.fmean(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    digits = 3 if abs(mean) < 10 else 1
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def _figure(samples, x_test, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [("test data", x_test)] + list(samples.items())
    fig, axes = plt.subplots(len(rows), 1, figsize=(8, 1.3 * len(rows)))
    for ax, (name, x) in zip(axes, rows, strict=True):
        grid = x[:16].clamp(0, 1).reshape(16, 8, 8).permute(1, 0, 2).reshape(8, 16 * 8)
        ax.imshow(grid.numpy(), cmap="gray_r", vmin=0, vmax=1)
        ax.set_title(name, fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(out_dir: Path, quick: bool = False, seeds=(0, 1, 2), resume: bool = False) -> str:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = tuple(seeds)[:1] if quick else tuple(seeds)
    iterations = {"BiDVL": 1500, "MCMC teaching": 1500, "VAE": 1500}
    x_train, x_test = datasets.digits("train"), datasets.digits("test")
    if quick:
        iterations = {m: 10 for m in METHODS}
        x_test = x_test[:100]
    ood = ood_sets(x_test)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: Pyro's overhead dominates, threads only contend
    try:
        store = RunStore(out_dir, resume, {"experiment": "bidvl-digits", "quick": quick,
                                           "iterations": iterations})
        results, times, samples = {m: [] for m in METHODS}, {m: [] for m in METHODS}, {}
        for method in METHODS:
            for seed in seeds:
                numbers, drawn = store.run(f"{method} seed {seed}", _one_run,
                    method, seed, x_train, iterations[method], x_test, ood, store)
                results[method].append(numbers["metrics"])
                times[method].append(numbers["per_iter"])
                samples.setdefault(method, drawn["samples"])
        with torch.no_grad():
            ref = frechet_distance(digits_features(x_train[: len(x_test)]), digits_features(x_test))
    finally:
        torch.set_num_threads(threads)
    _figure(samples, x_test, out_dir / "bidvl_digits.png")

    lines = [
        "## BiDVL on scikit-learn digits",
        "",
        f"`pyro-ebm reproduce bidvl-digits` — seeds {list(seeds)}, {iterations['BiDVL']} iterations of batch "
        f"{BATCH} per method, mean ± half-range over seeds. Test split of {len(x_test)} images; FD against "
        f"the test features (train images vs test: {ref:.2f}).",
        "",
        "| method | " + " | ".join(title for _, title in COLUMNS) + " | ms / iteration |",
        "|---" * (len(COLUMNS) + 2) + "|",
    ]
    for method in METHODS:
        cells = [_cell([r[key] for r in results[method]]) for key, _ in COLUMNS]
        ms = 1000 * statistics.fmean(times[method])
        lines.append(f"| {method} | " + " | ".join(cells) + f" | {ms:.0f} |")
    mean = {m: {k: statistics.fmean([r[k] for r in results[m]]) for k, _ in COLUMNS} for m in METHODS}
    b, t, v = mean["BiDVL"], mean["MCMC teaching"], mean["VAE"]
    speed = statistics.fmean(times["MCMC teaching"]) / statistics.fmean(times["BiDVL"])
    verdict = (
        f"**Verdict.** BiDVL's samples reach FD {b['fd']:.2f} against {t['fd']:.2f} for MCMC teaching "
        f"(K = {LANGEVIN_STEPS} Langevin steps) and {v['fd']:.2f} for the VAE alone, with test "
        f"reconstruction error {b['recon']:.2f} (teaching {t['recon']:.2f}, VAE {v['recon']:.2f}) and a "
        f"training iteration "
        f"{speed:.1f}× cheaper than teaching's. Its energy separates test digits from uniform noise "
        f"(AUROC {b['noise']:.3f}), flipped digits ({b['flip']:.3f}) and blurred digits ({b['blur']:.3f}); "
        f"MCMC teaching's energy scores {t['noise']:.3f} / {t['flip']:.3f} / {t['blur']:.3f} and the VAE's "
        f"ELBO {v['noise']:.3f} / {v['flip']:.3f} / {v['blur']:.3f}. "
    )
    verdict += _claim(b, t, v)
    for key, label in (("flip", "flipped"), ("blur", "blurred")):
        best = max(METHODS, key=lambda m: mean[m][key])
        verdict += f" On {label} digits the best score is {best}'s ({mean[best][key]:.3f})."
    lines += ["", verdict, "", "Samples (first row: test data): `bidvl_digits.png`.", ""]
    return "\n".join(lines)


def _claim(b, t, v):
    parts = []
    if b["fd"] <= 1.25 * t["fd"]:
        parts.append("the claim that BiDVL matches MCMC-based learning on sample quality without MCMC "
                     "holds here")
    else:
        parts.append("BiDVL's samples are worse than MCMC teaching's here, so the sample-quality claim is "
                     "not reproduced at this scale")
    if b["noise"] > 0.95:
        parts.append("its energy is a usable out-of-distribution score against noise")
    text = "; ".join(parts)
    return text[0].upper() + text[1:] + "."
