# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm reproduce teaching-digits-budget``: does the taught VAE beat the VAE
trained alone once both train longer?

``teaching-digits`` trains every method for 1200 iterations, where the VAE taught
by the EBM and the VAE trained alone are equal within the seeds' spread. This
experiment trains the two with the same networks, optimizers, K = 20 ULA steps
and seeds for four times as long, and measures the samples (FD on the digits
classifier's features and MMD² ×1000 on pixels, 360 samples against the 360 test
images) at 1200, 2400 and 4800 iterations of the same runs: the VAE alone's
decoder means, the taught VAE's decoder means (x0) and their revisions by the K
steps (x̃).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from .. import datasets
from ._runs import RunStore, mean_sd
from .teaching_digits import BATCH, LANGEVIN_STEPS, STEP_SIZE, sample_quality, train_teaching, train_vae

ITERATIONS = 4800
MILESTONES = (1200, 2400, 4800)
KINDS = ("VAE alone", "teaching, VAE (x0)", "teaching, revised (x̃)")


def run(out_dir: Path, quick: bool = False, seeds=(0, 1, 2), resume: bool = False) -> str:
    return run_budget(out_dir, quick, seeds, resume)


def run_budget(out_dir, quick=False, seeds=(0, 1, 2), resume=False, name="teaching-digits-budget",
               iterations=ITERATIONS, milestones=MILESTONES, noise=True, title="a larger budget"):
    """The experiment for ``name``: the VAE alone and MCMC teaching (Langevin
    ``noise`` on or off) trained ``iterations`` steps, measured at ``milestones``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seeds = tuple(seeds)[:1] if quick else tuple(seeds)
    iterations, milestones = (6, (3, 6)) if quick else (iterations, tuple(milestones))
    x_train = datasets.digits("train")
    x_test = datasets.digits("test")[: 100 if quick else None]
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # small networks: threads only contend on a shared CPU
    config = {"experiment": name, "quick": quick, "iterations": iterations, "milestones": list(milestones)}
    if not noise:
        config["noise"] = False
    store = RunStore(out_dir, resume, config)
    try:
        runs = [store.run(f"seed {seed}", _one_seed, seed, x_train, x_test, iterations, milestones, store,
                          noise)[0]
                for seed in seeds]
    finally:
        torch.set_num_threads(threads)
    figure = out_dir / (name.replace("-", "_") + ".png")
    _figure(runs, milestones, figure)
    return _report(runs, milestones, seeds, len(x_test), figure.name, name, noise, title)


def _one_seed(seed, x_train, x_test, iterations, milestones, store, noise=True):
    """One seed: the VAE alone and MCMC teaching, each measured at the milestones."""
    n = len(x_test)

    def vae_quality(vae):
        with torch.no_grad():
            return {"VAE alone": sample_quality(vae.sample(n), x_test)}

    def teaching_quality(teaching):
        x_rev, path = teaching.sample(n, return_trajectory=True)
        return {"teaching, VAE (x0)": sample_quality(path[:, 0], x_test),
                "teaching, revised (x̃)": sample_quality(x_rev, x_test)}

    alone = dict.fromkeys(milestones)
    taught = dict.fromkeys(milestones)
    start = time.perf_counter()
    train_vae(seed, x_train, iterations, store, evaluate=vae_quality, evaluations=alone)
    train_teaching(seed, x_train, iterations, None, None, store, evaluate=teaching_quality,
                   evaluations=taught, noise=noise)
    # the wall time of this session of the run (a resumed run counts from its resumption)
    return {**{str(m): {**alone[m], **taught[m]} for m in milestones},
            "seconds": time.perf_counter() - start}, None


def _stats(runs, m, kind, key):
    return mean_sd(r[str(m)][kind][key] for r in runs)


def _compare(runs, m, key):
    """``(taught, alone, spread)``: the taught VAE's x0 and the VAE alone's mean
    ``key`` at ``m`` iterations, and the larger of their seed spreads."""
    (a, sa), (b, sb) = _stats(runs, m, "teaching, VAE (x0)", key), _stats(runs, m, "VAE alone", key)
    return a, b, max(sa, sb)


def _figure(runs, milestones, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(8, 3))
    for ax, key, label in zip(axes, ("fd", "mmd"), ("FD ↓", "MMD² ×1000 ↓"), strict=True):
        for kind in KINDS:
            stats = [_stats(runs, m, kind, key) for m in milestones]
            ax.errorbar(milestones, [s[0] for s in stats], yerr=[s[1] for s in stats], marker="o", ms=3,
                        capsize=3, label=kind)
        ax.set_xscale("log")
        ax.set_xticks(milestones, [str(m) for m in milestones])
        ax.minorticks_off()
        ax.set_xlabel("training iterations")
        ax.set_ylabel(label)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _report(runs, milestones, seeds, n, figure, name="teaching-digits-budget", noise=True,
            title="a larger budget"):
    lines = [
        f"## Variational MCMC teaching on digits: {title}",
        "",
        f"`pyro-ebm reproduce {name}` — seeds {list(seeds)}; the VAE alone and MCMC teaching "
        f"of `teaching-digits` (batch {BATCH}, K = {LANGEVIN_STEPS} ULA steps of size {STEP_SIZE}, "
        f"noise {'on' if noise else 'off: gradient descent, as the reference code ran'}), "
        f"trained for {milestones[-1]} iterations and measured at {', '.join(map(str, milestones))}. {n} "
        "samples against the test images; FD ↓ / MMD² ×1000 ↓, mean ± sd over seeds.",
        "",
        "| iterations | " + " | ".join(KINDS) + " |",
        "|---|" + "---|" * len(KINDS),
    ]
    for m in milestones:
        cells = []
        for kind in KINDS:
            fd, mmd = _stats(runs, m, kind, "fd"), _stats(runs, m, kind, "mmd")
            cells.append(f"{fd[0]:.2f} ± {fd[1]:.2f} / {mmd[0]:.1f} ± {mmd[1]:.1f}")
        lines.append(f"| {m} | " + " | ".join(cells) + " |")
    wall = sum(r["seconds"] for r in runs)
    lines += ["", verdict(runs, milestones), "", f"Figure: `{figure}`. Wall time {wall / 60:.0f} min "
              "(one thread, the seeds one after the other).", ""]
    return "\n".join(lines)


def verdict(runs, milestones):
    """At each budget: does the taught VAE's x0 beat the VAE alone by more than the
    larger of the two seed spreads, on FD and on MMD?"""
    parts = []
    for m in milestones:
        words = []
        for key, name in (("fd", "FD"), ("mmd", "MMD")):
            a, b, spread = _compare(runs, m, key)
            if a < b - spread:
                words.append(f"{name} better ({a:.2f} vs {b:.2f})")
            elif a > b + spread:
                words.append(f"{name} worse ({a:.2f} vs {b:.2f})")
            else:
                words.append(f"{name} equal within the spread ({a:.2f} vs {b:.2f}, ±{spread:.2f})")
        parts.append(f"at {m} iterations the taught VAE is " + ", ".join(words))
    holds = all(a < b - spread for a, b, spread in (_compare(runs, milestones[-1], k) for k in ("fd", "mmd")))
    head = ("**The taught VAE beats the VAE alone at the largest budget**" if holds else
            "**The taught VAE does not beat the VAE alone beyond the seeds' spread at the largest budget**")
    return head + ": " + "; ".join(parts) + "."
