# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm reproduce grbm-patches``: GaussianRBM(64, 16) on natural-image patches.

Grey 8×8 patches of scikit-learn's two bundled photographs
(:func:`pyro_ebm.datasets.image_patches`: standardized, split by region), the
first data set here beyond 8×8 digits. CD-1, DSM, SSM, BiDSM and BiSSM train
the same model; the test log-likelihood is given twice, with log Z exact (2^16
hidden states) and estimated by annealed importance sampling, which checks the
AIS estimate a larger model would need. The figure shows the learned filters
(the columns of ``W`` as 8×8 images). The claim is the papers' as for the other
GaussianRBM tables: each bi-level method is comparable to its plain counterpart.
"""

from __future__ import annotations

from pathlib import Path

from .. import datasets
from ._grbm_table import run_table
from ._runs import RunStore

METHODS = ("CD-1", "DSM", "SSM", "BiDSM (K=5, N=5)", "BiSSM (K=5, N=5)")


def _filter_figure(panels, size, path):
    """One row per method: its 16 filters, each scaled to its own range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    hidden = panels[0][1].hidden_dim if panels else 1
    fig, axes = plt.subplots(max(len(panels), 1), hidden, figsize=(0.75 * hidden, 0.85 * max(len(panels), 1)),
                             squeeze=False)
    for row, (name, grbm, ll) in enumerate(panels):
        w = grbm.W.detach()
        for j in range(hidden):
            ax = axes[row, j]
            ax.imshow(w[:, j].reshape(size, size).numpy(), cmap="gray")
            ax.set_xticks([])
            ax.set_yticks([])
        axes[row, 0].set_ylabel(f"{name}\nLL {ll:.1f}", fontsize=6, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=0.14, right=0.99, top=0.98, bottom=0.02, wspace=0.08, hspace=0.12)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def run(out_dir: Path, quick: bool = False, seeds=(0, 1, 2), resume: bool = False) -> str:
    seeds = tuple(seeds)[:1] if quick else tuple(seeds)
    iterations = 5 if quick else 20_000
    ais = {"num_chains": 50, "num_temperatures": 20} if quick else {"num_chains": 500,
                                                                    "num_temperatures": 2000}
    store = RunStore(out_dir, resume, {"experiment": "grbm-patches", "quick": quick,
                                       "iterations": iterations})
    size = 8
    train, test = datasets.image_patches(size, "train"), datasets.image_patches(size, "test")
    if quick:
        train, test = train[:300], test[:100]
    panels = []
    table, _ = run_table(
        f"GaussianRBM on {size}×{size} natural-image patches", train, test, visible=size * size, hidden=16,
        sigma=0.3, lr=1e-3, iterations=iterations, seeds=seeds, store=store, compile=not quick,
        methods=METHODS, ais=ais, plot=lambda grbm, name, ll: panels.append((name, grbm, ll)),
    )
    figure = Path(out_dir) / "grbm_patches.png"
    _filter_figure(panels, size, figure)
    full, diagonal = gaussian_baselines(train, test)
    return (table + f"\n{len(train)} training and {len(test)} test patches (standardized with the training "
            f"statistics; the test split is the photographs' right-most columns). Log-likelihoods in nats "
            f"per patch. AIS: {ais['num_chains']} chains, {ais['num_temperatures']} temperatures. For "
            f"scale, Gaussians fitted to the training patches score {full:.1f} (full covariance) and "
            f"{diagonal:.1f} (diagonal) on the test patches. Learned filters (seed {seeds[0]}): "
            f"`{figure.name}`.\n")


def gaussian_baselines(train, test):
    """Mean test log-likelihood of the maximum-likelihood Gaussian of ``train``,
    with a full and with a diagonal covariance (float64)."""
    import torch

    train, test = train.double(), test.double()
    loc = train.mean(0)
    full = torch.distributions.MultivariateNormal(loc, torch.cov(train.T, correction=0))
    diagonal = torch.distributions.Normal(loc, train.std(0, correction=0))
    return float(full.log_prob(test).mean()), float(diagonal.log_prob(test).sum(-1).mean())
