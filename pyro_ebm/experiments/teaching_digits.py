# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm reproduce teaching-digits``: variational MCMC teaching on
scikit-learn's 8×8 digits.

The claim (Xie, Zheng, Li, AAAI 2021): an EBM learned with a VAE as its
amortized sampler gives better samples (the VAE's proposals revised by K
Langevin steps) than short-run Langevin from noise with the same K, and the
VAE taught by the EBM beats the same VAE trained alone by its ELBO. And in the
supervised conditional setting, class-conditional samples are of the asked
class.

Methods, all with the networks of :func:`build` (energy MLP 64-256-256-1 with
SiLU plus the reference term ½‖x − ½‖²; Gaussian VAE with a 16-d latent,
decoder 16-256-64 with sigmoid mean and σ = 0.1, encoder 64-256-2·16), batch
100, 1200 iterations, the same K = 20 ULA steps of size 1e-3 (noise on) and the
same optimizers (EBM: Adam, learning rate 1e-3, betas (0.5, 0.999), with the
squared-energy penalty α = 0.01 that keeps short-run training from diverging;
VAE: Adam, 1e-3):

- **VAE alone**: Pyro's SVI with Trace_ELBO on the data; samples are decoder
  means at prior draws;
- **short-run EBM**: the EBM trained on E_data[E] − E_x̃[E] with x̃ from K ULA
  steps started at uniform noise; samples are such x̃;
- **teaching, VAE**: decoder means of the taught VAE (x0);
- **teaching, revised**: x0 revised by the K steps (x̃).

Metrics on the 360-image test split, against 360 samples clamped to the pixel
range [0, 1]: **FD**, the Fréchet distance on
:func:`pyro_ebm.features.digits_features`, and **MMD**, the unbiased MMD² of
:func:`pyro_ebm.metrics.mmd` on pixels (×1000). The conditional variant
reports the accuracy of :func:`pyro_ebm.features.digits_classifier` on 36
samples per class (chance: 10%), for the first seed.
"""

from __future__ import annotations

import itertools
import math
import statistics
import time
from pathlib import Path

import pyro
import torch
from pyro.infer.util import zero_grads

from .. import datasets, mcmc
from ..energy import collect_params
from ..features import digits_classifier, digits_features
from ..guides import AmortizedNormal
from ..infer import MCMCTeaching
from ..metrics import frechet_distance, mmd
from ..models import VAE, GaussianDecoder, MLPEnergy
from ..models import train_vae as fit_vae
from ..models.nets import MLP, GaussianEncoder
from ._runs import OptimState, RunStore, at_milestones, cell, split_milestones

LATENT = 16
HIDDEN = 256
DECODER_SCALE = 0.1
BATCH = 100
LANGEVIN_STEPS = 20
STEP_SIZE = 1e-3
ITERATIONS = 1200
ENERGY_PENALTY = 0.01


def build(seed, num_classes=None):
    """Energy and VAE, freshly initialized under ``seed`` (the param store is cleared):
    the library's :class:`~pyro_ebm.models.MLPEnergy` (with the reference term
    ½‖x − ½‖²) and a :class:`~pyro_ebm.models.VAE` of a
    :class:`~pyro_ebm.models.GaussianDecoder` (sites ``"z"``, ``"x"``) and a
    :class:`~pyro_ebm.models.nets.GaussianEncoder`, class-conditional when
    ``num_classes`` is set (the one-hot label is appended to the decoder's and
    the encoder's input)."""
    pyro.clear_param_store()
    pyro.set_rng_seed(seed)
    energy = MLPEnergy(64, (HIDDEN, HIDDEN), num_classes=num_classes, base_loc=0.5, base_scale=1.0)
    extra = num_classes or 0
    # decoder before encoder: the parameter creation order fixes the random stream
    decoder = GaussianDecoder(MLP(LATENT + extra, 64, (HIDDEN,)), LATENT, scale=DECODER_SCALE,
                              latent_site="z", obs_site="x", num_classes=num_classes)
    encoder = GaussianEncoder(64, LATENT, (HIDDEN,), min_scale=1e-4, num_classes=num_classes)
    guide = AmortizedNormal(encoder, site="z", conditional=num_classes is not None)
    return energy, VAE(decoder, guide)


def ebm_optim():
    return pyro.optim.Adam({"lr": 1e-3, "betas": (0.5, 0.999)})


def vae_optim():
    return pyro.optim.Adam({"lr": 1e-3})


def kernel():
    return mcmc.ULA(STEP_SIZE)


# -- the four methods --------------------------------------------------------------


def _batches(data, seed, iterations):
    return itertools.islice(datasets.batches(data, BATCH, seed=seed, drop_last=True), iterations)



def train_teaching(seed, x_train, iterations, y_train=None, progress=None, store=None, name="teaching",
                   evaluate=None, evaluations=None, noise=True):
    """MCMC teaching of a fresh energy and VAE; with ``store`` (a
    :class:`~pyro_ebm.experiments._runs.RunStore`, inside one of its runs) the
    training is checkpointed under ``name`` and resumable. ``evaluate`` and
    ``evaluations``: see :func:`_loop`; ``noise=False`` switches the Langevin
    noise of the revisions off (gradient descent, as the reference code ran)."""
    energy, vae = build(seed, 10 if y_train is not None else None)
    teaching = MCMCTeaching(energy, vae.model, vae.guide, ebm_optim(), vae_optim(), kernel=kernel(),
                            num_langevin_steps=LANGEVIN_STEPS, energy_penalty=ENERGY_PENALTY, noise=noise)
    data = x_train if y_train is None else (x_train, y_train)

    def step(i, batch):
        teaching.step(*(batch if y_train is not None else (batch,)))
        if progress is not None:
            progress(i, teaching.last_losses)

    _loop(store, name, teaching, _batches(data, seed, iterations), iterations, step, (energy, vae),
          None if evaluate is None else (lambda: evaluate(teaching)), evaluations, seed)
    return teaching


def _loop(store, name, state, batches, iterations, step, modules, evaluate=None, evaluations=None, seed=0):
    """``step(i, batch)`` over ``batches``: plainly, or checkpointed in ``store``.

    With ``evaluate`` and a dict ``evaluations``, ``evaluations[m] = evaluate()``
    after each step ``m`` (counted from 1) that is a key of ``evaluations`` (the
    milestones, with the value ``None`` until then); see
    :func:`~pyro_ebm.experiments._runs.at_milestones`."""
    if evaluate is not None and evaluations is not None:
        step = at_milestones(step, evaluations, evaluate, 2000 + seed)
    if store is None:
        values = [step(i, batch) for i, batch in enumerate(batches)]
    else:
        values, _ = store.train(name, state, batches, iterations, step=step, modules=modules,
                                desc=f"{name}")
    if evaluations is not None:
        evaluations.update(split_milestones(values)[1])


def train_vae(seed, x_train, iterations, store=None, evaluate=None, evaluations=None):
    """The VAE alone, trained by Pyro's SVI with Trace_ELBO
    (:func:`pyro_ebm.models.train_vae`); checkpointed in ``store`` when given.
    ``evaluate(vae)`` and ``evaluations``: see :func:`_loop`."""
    _, vae = build(seed)
    fit_vae(vae, _batches(x_train, seed, iterations), iterations, vae_optim(),
            loop=lambda svi, step, batches: _loop(store, "VAE alone", OptimState(svi.optim), batches,
                                                  iterations, step, (vae,),
                                                  None if evaluate is None else (lambda: evaluate(vae)),
                                                  evaluations, seed))
    return vae


def train_short_run(seed, x_train, iterations, store=None):
    """The EBM learned from K-step ULA chains started at uniform noise."""
    energy, _ = build(seed)
    sampler = mcmc.AmortizedLangevin(lambda n: torch.rand(n, 64), energy, kernel(), LANGEVIN_STEPS)
    return short_run_ebm(sampler, ebm_optim(), x_train, iterations, seed, BATCH, ENERGY_PENALTY, store=store)


def short_run_ebm(sampler, optim, x_train, iterations, seed, batch_size, energy_penalty=0.0, store=None):
    """Maximum likelihood with the K-step chains of ``sampler`` (an
    :class:`~pyro_ebm.mcmc.AmortizedLangevin` from noise: Nijkamp et al.'s
    short-run EBM), one step of the pyro.optim ``optim`` per batch; checkpointed
    in ``store`` when given."""
    stream = datasets.batches(x_train, batch_size, seed=seed, drop_last=True)

    def step(i, batch):
        x_rev = sampler.sample(len(batch))
        params = set()
        with collect_params(params):
            e_data, e_rev = sampler.energy(batch), sampler.energy(x_rev)
            penalty = energy_penalty * (e_data.pow(2).mean() + e_rev.pow(2).mean())
            loss = e_data.mean() - e_rev.mean() + penalty
        if not torch.isfinite(loss):
            raise ValueError(f"short-run EBM loss is {float(loss)} at step {i}")
        loss.backward()
        optim(params)
        zero_grads(params)

    _loop(store, "short-run EBM", OptimState(optim), itertools.islice(stream, iterations), iterations, step,
          (sampler.energy_model,))
    return sampler


# -- evaluation ---------------------------------------------------------------------


def sample_quality(samples, x_test):
    samples = samples.clamp(0, 1)
    return {
        "fd": frechet_distance(digits_features(samples), digits_features(x_test)),
        "mmd": 1000 * float(mmd(samples, x_test)),
    }


def conditional_samples(teaching, per_class):
    y = torch.arange(10).repeat_interleave(per_class)
    x, path = teaching.sample(len(y), y, return_trajectory=True)
    return y, path[:, 0], x


def class_accuracy(x, y):
    with torch.no_grad():
        return float((digits_classifier()(x.clamp(0, 1).float()).argmax(-1) == y).float().mean())


def _timed(fn, *args):
    start = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - start


# -- report -------------------------------------------------------------------------

ROWS = ("VAE alone", "short-run EBM", "teaching, VAE (x0)", "teaching, revised (x̃)")


def draw_rows(vae, short, teaching, n, seed):
    """``n`` samples of each row of :data:`ROWS` after training (the VAE alone, the
    short-run EBM, the taught VAE's decoder means x0 and their revisions x̃),
    from the seed ``1000 + seed``."""
    torch.manual_seed(1000 + seed)
    with torch.no_grad():
        drawn = {"VAE alone": vae.sample(n)}
    drawn["short-run EBM"] = short.sample(n)
    x_rev, path = teaching.sample(n, return_trajectory=True)
    drawn["teaching, VAE (x0)"], drawn["teaching, revised (x̃)"] = path[:, 0], x_rev
    return drawn


def _grid(ax, x, title, rows=4, cols=10):
    n = rows * cols
    img = x[:n].clamp(0, 1).reshape(rows, cols, 8, 8).permute(0, 2, 1, 3).reshape(rows * 8, cols * 8)
    ax.imshow(img.cpu().numpy(), cmap="gray_r", vmin=0, vmax=1)
    ax.set_title(title, fontsize=9)
    ax.axis("off")


def _figures(samples, x_test, cond, out_dir):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("test data", x_test)] + list(samples.items())
    fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 1.6))
    for ax, (name, x) in zip(axes, panels, strict=True):
        _grid(ax, x, name)
    fig.tight_layout()
    fig.savefig(out_dir / "teaching_digits_samples.png", dpi=90)
    plt.close(fig)
    if cond is not None:
        y, x0, x = cond
        per_class = len(y) // 10
        fig, axes = plt.subplots(1, 2, figsize=(7, 6))
        for ax, (name, v) in zip(axes, (("conditional VAE (x0)", x0), ("revised (x̃)", x)), strict=True):
            order = torch.cat([torch.nonzero(y == c).flatten()[: min(10, per_class)] for c in range(10)])
            _grid(ax, v[order], name + "; row = class", rows=10, cols=min(10, per_class))
        fig.tight_layout()
        fig.savefig(out_dir / "teaching_digits_conditional.png", dpi=90)
        plt.close(fig)


def run(out_dir: Path, quick: bool = False, seeds=(0, 1, 2), resume: bool = False) -> str:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = tuple(seeds)[:1] if quick else tuple(seeds)
    iterations = 5 if quick else ITERATIONS
    x_train, y_train = datasets.digits("train", with_labels=True)
    x_test = datasets.digits("test")
    if quick:
        x_test = x_test[:100]
    n = len(x_test)
    per_class = 4 if quick else 36
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: threads only contend on a shared CPU
    store = RunStore(out_dir, resume, {"experiment": "teaching-digits", "quick": quick,
                                       "iterations": iterations})
    try:
        results = {r: [] for r in ROWS}
        seconds = {"VAE alone": [], "short-run EBM": [], "teaching": [], "conditional teaching": []}
        shown = None
        for seed in seeds:
            numbers, drawn = store.run(f"seed {seed}", _one_seed,
                seed, x_train, x_test, iterations, store)
            for row in ROWS:
                results[row].append(numbers["quality"][row])
            for key, t in numbers["seconds"].items():
                seconds[key].append(t)
            if shown is None:
                shown = drawn
        # the conditional variant: the first seed only (it costs as much as teaching)
        numbers, cond_shown = store.run(f"conditional seed {seeds[0]}", _conditional,
            seeds[0], x_train, y_train, iterations, per_class, store)
        seconds["conditional teaching"].append(numbers["seconds"])
        accuracy = {"x0": [numbers["x0"]], "x̃": [numbers["x̃"]]}
        cond_shown = (cond_shown["y"], cond_shown["x0"], cond_shown["x"])
        with torch.no_grad():
            reference = sample_quality(x_train[:n], x_test)
    finally:
        torch.set_num_threads(threads)
    _figures(shown, x_test, cond_shown, out_dir)
    return _report(results, accuracy, seconds, reference, seeds, iterations, n, per_class)


def _one_seed(seed, x_train, x_test, iterations, store):
    """One seed's run: the three methods trained and sampled; the samples' quality,
    the training cost per iteration and the samples."""
    n = len(x_test)
    vae, t_vae = _timed(train_vae, seed, x_train, iterations, store)
    short, t_short = _timed(train_short_run, seed, x_train, iterations, store)
    teaching, t_teach = _timed(train_teaching, seed, x_train, iterations, None, None, store)
    drawn = draw_rows(vae, short, teaching, n, seed)
    quality = {row: sample_quality(drawn[row], x_test) for row in ROWS}
    seconds = {"VAE alone": t_vae / iterations, "short-run EBM": t_short / iterations,
               "teaching": t_teach / iterations}
    return {"quality": quality, "seconds": seconds}, {k: v.detach().clone() for k, v in drawn.items()}


def _conditional(seed, x_train, y_train, iterations, per_class, store):
    """The conditional variant's run: its class accuracies and samples."""
    cond, t_cond = _timed(train_teaching, seed, x_train, iterations, y_train, None, store,
                          "conditional teaching")
    y, x0, x = conditional_samples(cond, per_class)
    numbers = {"x0": class_accuracy(x0, y), "x̃": class_accuracy(x, y), "seconds": t_cond / iterations}
    return numbers, {"y": y, "x0": x0.detach().clone(), "x": x.detach().clone()}


def _report(results, accuracy, seconds, reference, seeds, iterations, n, per_class):
    lines = [
        "## Variational MCMC teaching on scikit-learn digits",
        "",
        f"`pyro-ebm reproduce teaching-digits` — seeds {list(seeds)}, {iterations} iterations of batch "
        f"{BATCH} per method, K = {LANGEVIN_STEPS} ULA steps of size {STEP_SIZE} (noise on); mean ± sd "
        f"over seeds. {n} samples against the {n} test images (clamped to [0, 1]); FD on the digits "
        f"classifier's features, MMD² ×1000 on pixels. {n} training images score FD "
        f"{reference['fd']:.2f}, MMD {reference['mmd']:.2f}.",
        "",
        "| samples | FD ↓ | MMD ↓ |",
        "|---|---|---|",
    ]
    for row in ROWS:
        lines.append(f"| {row} | {cell([r['fd'] for r in results[row]])} | "
                     f"{cell([r['mmd'] for r in results[row]])} |")
    ms = {k: 1000 * statistics.fmean(v) for k, v in seconds.items()}
    lines += [
        "",
        "Training cost (ms per iteration, one thread): "
        + ", ".join(f"{k} {v:.0f}" for k, v in ms.items()) + ".",
        "",
        f"Conditional teaching (label as a model argument; seed {seeds[0]}, same budget): the digits "
        f"classifier labels {per_class} samples per class correctly {100 * accuracy['x̃'][0]:.1f}% of the "
        f"time for the revised samples and {100 * accuracy['x0'][0]:.1f}% for the conditional VAE's "
        "decoder means (chance: 10%).",
        "",
        _verdict(results, accuracy),
        "",
        f"Samples (seed {seeds[0]}): `teaching_digits_samples.png`; conditional samples, one row per class: "
        "`teaching_digits_conditional.png`.",
        "",
    ]
    return "\n".join(lines)


def _verdict(results, accuracy):
    mean = {row: {k: statistics.fmean(r[k] for r in results[row]) for k in ("fd", "mmd")} for row in ROWS}
    rev, x0, vae, short = (mean[r] for r in ("teaching, revised (x̃)", "teaching, VAE (x0)", "VAE alone",
                                              "short-run EBM"))
    best_fd = min(ROWS, key=lambda r: mean[r]["fd"])
    best_mmd = min(ROWS, key=lambda r: mean[r]["mmd"])
    parts = [
        f"**Verdict.** Revised teaching samples: FD {rev['fd']:.2f}, MMD {rev['mmd']:.2f}; short-run EBM "
        f"from noise {short['fd']:.2f} / {short['mmd']:.2f}; VAE alone {vae['fd']:.2f} / {vae['mmd']:.2f}; "
        f"the taught VAE's own samples {x0['fd']:.2f} / {x0['mmd']:.2f}."
    ]
    if best_fd == best_mmd == "teaching, revised (x̃)":
        parts.append("The revised samples are the best of the four on both metrics, as claimed.")
    else:
        parts.append(f"The claim that the revised samples are best holds only partly: best FD is "
                     f"{best_fd}, best MMD {best_mmd}.")
    if x0["fd"] < vae["fd"] and x0["mmd"] < vae["mmd"]:
        parts.append("The VAE taught by the EBM beats the VAE trained alone on both metrics, as claimed.")
    elif x0["fd"] < vae["fd"] or x0["mmd"] < vae["mmd"]:
        which = "FD" if x0["fd"] < vae["fd"] else "MMD"
        parts.append(f"The taught VAE beats the VAE alone on one metric only ({which}), so that claim "
                     "holds partly at this budget.")
    else:
        parts.append("The taught VAE does not beat the VAE alone at this budget, so that claim is not "
                     "reproduced here.")
    acc = 100 * statistics.fmean(accuracy["x̃"])
    parts.append(f"Conditional samples are classified as their label {acc:.0f}% of the time "
                 f"({acc / 10:.1f}× chance)." if math.isfinite(acc) else "")
    return " ".join(p for p in parts if p)
