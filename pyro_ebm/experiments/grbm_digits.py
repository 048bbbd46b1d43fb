# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm reproduce grbm-digits``: GaussianRBM(64, 16) on scikit-learn digits.

Sixteen hidden units keep log Z exact (2^16 states). Same methods and claim as
``grbm-checkerboard``, with DSM σ = 0.3 and learning rate 2e-4.
"""

from __future__ import annotations

from pathlib import Path

from .. import datasets
from ._grbm_table import run_table
from ._runs import RunStore


def _bar_figure(results, path):
    import math
    import statistics

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(results)
    means, sds = [], []
    for n in names:
        lls = [r["ll"] for r in results[n] if math.isfinite(r["ll"])]
        means.append(statistics.fmean(lls) if lls else float("nan"))
        sds.append(statistics.stdev(lls) if len(lls) > 1 else 0.0)
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.bar(range(len(names)), means, yerr=sds, capsize=3)
    ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
    ax.set_ylabel("test log-likelihood")
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)


def run(out_dir: Path, quick: bool = False, seeds=(0, 1, 2), resume: bool = False) -> str:
    seeds = tuple(seeds)[:1] if quick else tuple(seeds)
    iterations = 5 if quick else 5000
    store = RunStore(out_dir, resume, {"experiment": "grbm-digits", "quick": quick, "iterations": iterations})
    train, test = datasets.digits("train"), datasets.digits("test")
    if quick:
        train, test = train[:300], test[:100]
    table, results = run_table(
        "GaussianRBM on scikit-learn digits", train, test, visible=64, hidden=16, sigma=0.3, lr=2e-4,
        iterations=iterations, seeds=seeds, store=store,
    )
    figure = Path(out_dir) / "grbm_digits.png"
    _bar_figure(results, figure)
    return table + f"\nLog-likelihoods in nats per image (64 pixels in [0, 1]); figure: `{figure.name}`.\n"
