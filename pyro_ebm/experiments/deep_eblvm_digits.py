# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm reproduce deep-eblvm-digits``: a deep EBLVM on scikit-learn's 8×8
digits, learned by bi-level multiscale denoising score matching (BiMDSM).

The model is :class:`~pyro_ebm.models.deep.DeepEBLVM` (64 visible, 16 latent,
width 128): :math:`E(v, h) = \\|\\operatorname{ELU}(A[f(v) + h; h] + b)\\|^2` with
an MLP :math:`f` and the base measure :math:`h \\sim \\mathcal N(0, I)`. The guide is
an :class:`~pyro_ebm.guides.AmortizedNormal` with an MLP encoder 64-128-2·16.
Training: :class:`~pyro_ebm.infer.BiSM` with ``objective=MDSM(0.05, 0.5, 0.1)``,
``lower="fisher"``, K = 5 inner steps, N = 0 unrolled steps (the reference
setting for deep models), Adam, batch 100 of the TRAIN split in [0, 1].

Noise levels. Pixels lie in [0, 1], so σ_max = 0.5 blurs a digit into a smudge
(half the pixel range) while σ_min = 0.05 is below the gap between the 17 grey
levels of the data (1/16); σ0 = 0.1 is the reference scale at which the energy
is read, a level between the two. The MDSM minimizer is
:math:`s = (\\sigma^2/\\sigma_0^2)\\nabla\\log p_\\sigma`: the one energy acts as
:math:`p_\\sigma` at temperature :math:`T = \\sigma^2/\\sigma_0^2`, which sets the
annealing schedule of the sampler, :math:`T` from :math:`(\\sigma_{max}/\\sigma_0)^2 = 25`
down to 1 on a geometric grid.

Two kinds of sample, both by :class:`~pyro_ebm.mcmc.AnnealedLangevin` started
from uniform noise on [0, 1] (latents from N(0, I)):

- **joint**: unconditional samples, chains on :math:`(v, h)` with the potential
  :math:`U(v, h) = E(v, h) + \\tfrac12\\|h\\|^2 = -\\log \\tilde p(v, h)`;
- **conditional**: chains on :math:`v` alone with :math:`h` held at the guide's mean
  :math:`\\mu_\\phi(v_i)` of a training image :math:`v_i`, potential :math:`E(v, h)`
  (the kind of sample shown by the reference BiSM code).

Both potentials are the model's unnormalized log joint read through its energy
view. The metric is the Fréchet distance (FD) between
:func:`~pyro_ebm.features.digits_features` of 360 samples (clamped to [0, 1]) and
of the 360 TEST images; for scale, the FD of 360 TRAIN images and of uniform noise
to the TEST images.

The sampler's step size γ = 1e-4 is the best FD of a sweep on seed 0 after 3000
iterations (joint / conditional FD): γ = 1e-4: 41.5 / 44.6; 3e-4: 54.9 / 54.5;
1e-3: 117 / 120; 3e-3: 144 / 145; 1e-2 diverged. Larger steps leave more of the
Langevin noise (√(2γ) per step at T = 1) in the final images.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import pyro
import torch

from .. import datasets, mcmc
from ..energy import energy_view
from ..features import digits_classifier, digits_features
from ..guides import AmortizedNormal
from ..infer import MDSM, BiSM
from ..metrics import frechet_distance
from ..models.deep import DeepEBLVM
from ..models.nets import GaussianEncoder
from ._runs import RunStore, at_milestones, mean_sd, split_milestones

LATENT = 16
WIDTH = 128
BATCH = 100
LR = 1e-3
SIGMA_MIN, SIGMA_MAX, SIGMA0 = 0.05, 0.5, 0.1
ITERATIONS = 20_000
#: training lengths at which the samples' FD is measured (the last is ITERATIONS)
MILESTONES = (2500, 5000, 10_000, 20_000)
STEP_SIZE = 1e-4
LEVELS = 10
STEPS_PER_LEVEL = 50


def build(seed, width=WIDTH, lr=LR, compile=False):
    """A fresh model, guide and BiSM trainer under ``seed`` (the param store is cleared)."""
    pyro.clear_param_store()
    torch.manual_seed(seed)
    model = DeepEBLVM(64, LATENT, width)
    guide = AmortizedNormal(GaussianEncoder(64, LATENT, (width,)), site="h")
    bism = BiSM(model, guide, pyro.optim.Adam({"lr": lr}), objective=MDSM(SIGMA_MIN, SIGMA_MAX, SIGMA0),
                inner_steps=5, unroll_steps=0, lower="fisher", compile=compile)
    return model, guide, bism


def train(seed, x_train, iterations, width=WIDTH, store=None, evaluate=None, milestones=(), compile=False):
    """Train for ``iterations`` steps; returns model, guide, the upper losses and
    ``{milestone: evaluate(model, guide)}``: ``evaluate`` runs after the step that
    completes each of ``milestones`` steps, on a random stream of its own (the
    training's is left as it was). With ``store`` (a
    :class:`~pyro_ebm.experiments._runs.RunStore`, inside one of its runs) the
    training is checkpointed and resumable, the evaluations made so far included."""
    model, guide, bism = build(seed, width, compile=compile)
    stream = datasets.batches(x_train, BATCH, seed=seed, drop_last=True)

    def step(i, v):
        return bism.step(v)

    if evaluate is not None:
        step = at_milestones(step, milestones, lambda: evaluate(model, guide), 1000 + seed)
    if store is None:
        values = [step(i, v) for i, v in zip(range(iterations), stream, strict=False)]
    else:
        values, _ = store.train("bism", bism, stream, iterations, step=step, modules=(model, guide),
                                desc=f"BiMDSM seed {seed}")
    losses, evaluations = split_milestones(values)
    return model, guide, losses, evaluations


def schedule(levels=LEVELS):
    """Temperatures from (σ_max/σ0)² down to 1, geometric."""
    top = (SIGMA_MAX / SIGMA0) ** 2
    return torch.logspace(math.log10(top), 0.0, levels).tolist()


def _kernel(step_size, levels, steps_per_level):
    return mcmc.AnnealedLangevin(step_size, temperatures=schedule(levels), steps_per_level=steps_per_level)


def sample_joint(model, n, step_size=STEP_SIZE, levels=LEVELS, steps_per_level=STEPS_PER_LEVEL, like=None):
    """Unconditional samples: annealed Langevin on (v, h) with potential
    −log p̃(v, h) = E(v, h) + ½‖h‖² (+ const), from v ~ U(0, 1), h ~ N(0, I)."""
    energy = energy_view(model).data_potential()
    like = torch.zeros(()) if like is None else like

    def potential(x):
        return energy(x[:, :64], values={"h": x[:, 64:]})

    init = torch.cat([torch.rand(n, 64, dtype=like.dtype), torch.randn(n, LATENT, dtype=like.dtype)], -1)
    kernel = _kernel(step_size, levels, steps_per_level)
    out = mcmc.sample(potential_fn=potential, kernel=kernel, num_chains=n, num_samples=1,
                      warmup_steps=kernel.num_steps, initial=init, progress=False)
    return out.get_samples()["x"][:, -1, :64]


def sample_conditional(model, guide, x_cond, step_size=STEP_SIZE, levels=LEVELS,
                       steps_per_level=STEPS_PER_LEVEL):
    """Samples of v given h = the guide's mean at the images ``x_cond``:
    annealed Langevin on v with potential E(v, h) (+ const), from v ~ U(0, 1)."""
    with torch.no_grad():
        h, _ = guide.params(x_cond)
    potential = energy_view(model).data_potential(values={"h": h})
    kernel = _kernel(step_size, levels, steps_per_level)
    out = mcmc.sample(potential_fn=potential, kernel=kernel, num_chains=len(x_cond), num_samples=1,
                      warmup_steps=kernel.num_steps, initial=torch.rand_like(x_cond), progress=False)
    return out.get_samples()["x"][:, -1]


def fd_to(samples, ref_features):
    return frechet_distance(digits_features(samples.clamp(0, 1)), ref_features)


def _grid(images, path, rows=10, title=None):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = images[: rows * rows].clamp(0, 1).reshape(-1, 8, 8).cpu()
    fig, axes = plt.subplots(rows, rows, figsize=(rows * 0.6, rows * 0.6 + 0.3))
    for ax, k in zip(axes.flat, range(rows * rows), strict=True):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k], cmap="gray_r", vmin=0, vmax=1)
    if title:
        fig.suptitle(title, fontsize=8)
    fig.savefig(path, dpi=80)
    plt.close(fig)


def class_agreement(samples, labels):
    """How often :func:`~pyro_ebm.features.digits_classifier` labels ``samples[i]``
    as ``labels[i]``, and the agreement expected by chance, :math:`\\sum_c \\hat
    p_\\text{samples}(c)\\, \\hat p_\\text{labels}(c)` (the two label sets independent)."""
    with torch.no_grad():
        predicted = digits_classifier()(samples.clamp(0, 1).float()).argmax(-1)
    agree = float((predicted == labels).float().mean())
    p_s = torch.bincount(predicted, minlength=10).double() / len(predicted)
    p_l = torch.bincount(labels, minlength=10).double() / len(labels)
    return agree, float((p_s * p_l).sum())


def probe_accuracy(train_codes, y_train, test_codes, y_test):
    """Test accuracy of a logistic regression trained on ``train_codes`` to predict
    the digit: how much of the class a code (e.g. the guide's mean) carries."""
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(max_iter=3000).fit(train_codes.double().numpy(), y_train.numpy())
    return float(clf.score(test_codes.double().numpy(), y_test.numpy()))


def run(out_dir: Path, quick: bool = False, seeds=(0, 1, 2), resume: bool = False) -> str:
    torch.set_num_threads(1)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = tuple(seeds)[:1] if quick else tuple(seeds)
    x_train, y_train = datasets.digits("train", with_labels=True)
    x_test, y_test = datasets.digits("test", with_labels=True)
    iterations = 20 if quick else ITERATIONS
    milestones = (10, 20) if quick else MILESTONES
    width = 32 if quick else WIDTH
    steps_per_level = 5 if quick else STEPS_PER_LEVEL
    n = 100 if quick else len(x_test)
    test_features = digits_features(x_test)
    g = torch.Generator().manual_seed(0)
    reference = {
        "TRAIN images (reference)": frechet_distance(digits_features(x_train[torch.randperm(len(x_train),
                                                                                            generator=g)[:n]]),
                                                     test_features),
        "uniform noise (reference)": frechet_distance(
            digits_features(torch.rand(n, 64, generator=g, dtype=x_test.dtype)), test_features),
    }
    pixels_probe = probe_accuracy(x_train, y_train, x_test, y_test)
    store = RunStore(out_dir, resume, {"experiment": "deep-eblvm-digits", "quick": quick,
                                       "iterations": iterations, "milestones": list(milestones)})
    rows = []
    for seed in seeds:
        row, shown = store.run(f"seed {seed}", _one_seed,
            seed, (x_train, y_train, x_test, y_test), iterations, milestones, width, n, steps_per_level,
            test_features, store, not quick)
        rows.append(row)
        if seed == seeds[0]:
            _grid(shown["joint"], out_dir / "deep_eblvm_joint.png", title="joint (v, h) annealed Langevin")
            _grid(shown["cond"], out_dir / "deep_eblvm_conditional.png",
                  title="v | h = q-mean of a TRAIN image")
            _grid(x_train[shown["cond_idx"]], out_dir / "deep_eblvm_conditioning_images.png",
                  title="TRAIN images")
    _curve_figure(rows, reference, out_dir / "deep_eblvm_fd.png")
    return _markdown(rows, reference, pixels_probe, iterations, steps_per_level, n, quick)


def _one_seed(seed, data, iterations, milestones, width, n, steps_per_level, test_features, store, compile):
    """One seed's run: train (FD at the milestones), sample, score, and ask whether
    the guide carries the digit's class; its numbers and its samples."""
    x_train, y_train, x_test, y_test = data
    cond_idx = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))[:n]

    def evaluate(model, guide):
        joint = sample_joint(model, n, steps_per_level=steps_per_level, like=x_train)
        cond = sample_conditional(model, guide, x_train[cond_idx], steps_per_level=steps_per_level)
        return {"joint": fd_to(joint, test_features), "cond": fd_to(cond, test_features)}

    start = time.perf_counter()
    model, guide, losses, curve = train(seed, x_train, iterations, width, store, evaluate, milestones,
                                        compile=compile)
    train_s = time.perf_counter() - start
    torch.manual_seed(1000 + seed)
    start = time.perf_counter()
    joint = sample_joint(model, n, steps_per_level=steps_per_level, like=x_train)
    cond = sample_conditional(model, guide, x_train[cond_idx], steps_per_level=steps_per_level)
    sample_s = time.perf_counter() - start
    agree, chance = class_agreement(cond, y_train[cond_idx])
    with torch.no_grad():
        codes = [guide.params(x)[0] for x in (x_train, x_test)]
    row = {"seed": seed, "joint": fd_to(joint, test_features), "cond": fd_to(cond, test_features),
           "first": sum(losses[:50]) / len(losses[:50]), "last": sum(losses[-50:]) / len(losses[-50:]),
           "train_s": train_s, "sample_s": sample_s, "curve": {str(k): v for k, v in curve.items()},
           "agree": agree, "chance": chance, "probe": probe_accuracy(codes[0], y_train, codes[1], y_test)}
    return row, {"joint": joint, "cond": cond, "cond_idx": cond_idx}


def _curve_figure(rows, reference, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.2))
    for r in rows:
        its = sorted(int(k) for k in r["curve"])
        for kind, style in (("joint", "-"), ("cond", "--")):
            ax.plot(its, [r["curve"][str(k)][kind] for k in its], style, marker="o", ms=3,
                    label=f"seed {r['seed']}, {'joint' if kind == 'joint' else 'conditional'}")
    ax.axhline(reference["TRAIN images (reference)"], color="k", lw=0.8, ls=":", label="TRAIN images")
    ax.set_xscale("log")
    ticks = sorted(int(k) for k in rows[0]["curve"])
    ax.set_xticks(ticks, [str(t) for t in ticks])
    ax.minorticks_off()
    ax.set_xlabel("training iterations")
    ax.set_ylabel("FD to TEST")
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _markdown(rows, reference, pixels_probe, iterations, steps_per_level, n, quick):
    def fmt(key, digits=1, scale=1.0):
        mean, sd = mean_sd([scale * r[key] for r in rows])
        return f"{mean:.{digits}f} ± {sd:.{digits}f}"

    seeds = ", ".join(str(r["seed"]) for r in rows)
    temps = schedule()
    milestones = sorted(int(k) for k in rows[0]["curve"])
    lines = [
        "## Deep EBLVM on digits (BiMDSM, fisher lower level)" + (" — quick run" if quick else ""),
        "",
        f"DeepEBLVM(64, {LATENT}, {WIDTH if not quick else 32}) trained by BiSM(MDSM(σ_min {SIGMA_MIN}, "
        f"σ_max {SIGMA_MAX}, σ0 {SIGMA0}), lower='fisher', K 5, N 0"
        f"{', compiled steps' if not quick else ''}), "
        f"Adam lr {LR}, batch {BATCH}, {iterations} iterations on the TRAIN split, seeds {seeds}. Samples "
        f"by annealed Langevin (γ {STEP_SIZE}, {len(temps)} temperatures {temps[0]:.0f} → 1 geometric, "
        f"{steps_per_level} steps each) from uniform noise; FD on `digits_features` of {n} samples "
        f"(clamped to [0, 1]) against the {n if quick else 360} TEST images. Mean ± sd over seeds.",
        "",
        "| sample kind | FD to TEST |",
        "|---|---|",
        f"| joint (v, h) annealed Langevin, potential E(v,h) + ½‖h‖², from noise (unconditional) | "
        f"{fmt('joint')} |",
        f"| v given h = q-mean of a TRAIN image, potential E(v,h), from noise (conditional) | "
        f"{fmt('cond')} |",
    ]
    lines += [f"| {name} | {value:.1f} |" for name, value in reference.items()]
    lines += ["", "FD during training (mean ± sd over seeds; `deep_eblvm_fd.png`):", "",
              "| iterations | joint | conditional |", "|---|---|---|"]
    curve = {}
    for m in milestones:
        joint = mean_sd([r["curve"][str(m)]["joint"] for r in rows])
        cond = mean_sd([r["curve"][str(m)]["cond"] for r in rows])
        curve[m] = (joint, cond)
        lines.append(f"| {m} | {joint[0]:.1f} ± {joint[1]:.1f} | {cond[0]:.1f} ± {cond[1]:.1f} |")
    lines += [
        "",
        "Does the guide carry the digit's class? A logistic regression on the guide's means of the TRAIN "
        f"images labels the TEST images' means correctly {fmt('probe', 1, 100)} % of the time (on the "
        f"raw pixels: {100 * pixels_probe:.1f} %; chance 10 %). The digits classifier labels a conditional "
        f"sample as its conditioning image's class {fmt('agree', 1, 100)} % of the time, against "
        f"{fmt('chance', 1, 100)} % expected by chance from the two label distributions.",
        "",
        "Upper (MDSM) loss, mean of the first / last 50 steps: "
        f"{mean_sd([r['first'] for r in rows])[0]:.4g} / {mean_sd([r['last'] for r in rows])[0]:.4g}; "
        f"training {fmt('train_s', 0)} s (with the "
        f"milestones' sampling), sampling {fmt('sample_s', 0)} s per seed (one CPU thread).",
        "",
    ]
    lines.append(_verdict(rows, reference, curve, pixels_probe))
    return "\n".join(lines) + "\n"


def _verdict(rows, reference, curve, pixels_probe):
    """Where FD stops improving, and whether the guide keeps the class, from the numbers."""
    ms = sorted(curve)
    best = min(ms, key=lambda m: curve[m][0][0])
    last, prev = curve[ms[-1]][0], curve[ms[-2]][0] if len(ms) > 1 else curve[ms[-1]][0]
    spread = max(last[1], prev[1])
    if len(ms) > 1 and prev[0] - last[0] <= spread:
        stop = (f"FD stops improving by {ms[-2]} iterations: the last doubling moves the joint FD from "
                f"{prev[0]:.1f} to {last[0]:.1f}, within the seeds' spread (±{spread:.1f})")
    else:
        stop = (f"FD still improves at the last doubling ({prev[0]:.1f} → {last[0]:.1f}, spread "
                f"±{spread:.1f}); the best joint FD is at {best} iterations")
    probe = mean_sd([r["probe"] for r in rows])[0]
    agree = mean_sd([r["agree"] for r in rows])[0]
    chance = mean_sd([r["chance"] for r in rows])[0]
    keeps = ("the guide's mean carries much of the class" if probe >= 0.5 * pixels_probe
             else "the guide's mean carries little of the class")
    samples = ("conditional samples keep it" if agree >= 2 * chance
               else "the conditional samples do not keep it")
    return (f"**Verdict.** {stop}. Joint samples end at FD {mean_sd([r['joint'] for r in rows])[0]:.1f}, "
            f"between real TRAIN images ({reference['TRAIN images (reference)']:.1f}) and uniform noise "
            f"({reference['uniform noise (reference)']:.1f}). Class: {keeps} (probe {100 * probe:.0f} % "
            f"against {100 * pixels_probe:.0f} % on pixels), and {samples} (agreement {100 * agree:.0f} % "
            f"against {100 * chance:.0f} % by chance).")
