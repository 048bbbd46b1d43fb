# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm demo``: GaussianRBMs trained on the checkerboard toy by each method,
their exact test log-likelihoods, and the learned densities as PNGs."""

from __future__ import annotations

import time
from pathlib import Path

import pyro
import torch
from tqdm.auto import tqdm

from . import datasets
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
    steps = 60 if quick else 4000
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
    return "".join(c if c.isalnum() else "_" for c in name.lower()).strip("_")


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


SECTIONS = [("Score matching, CD and BiSM on a GaussianRBM", grbm_section)]


def run_demo(out: Path, quick: bool = False):
    out.mkdir(parents=True, exist_ok=True)
    for title, section in SECTIONS:
        print(f"\n== {title} ==")
        for line in section(out, quick):
            print(line)
