# SPDX-License-Identifier: Apache-2.0
"""``pyro-ebm reproduce gebm-density``: density estimation on scikit-learn's wine
data, a RealNVP base by maximum likelihood versus a GEBM with that base and an
energy trained by KALE.

The GEBM's density is :math:`q(x) = g(x)\\, e^{-E(x)} / Z` with :math:`g` the
flow's density and :math:`\\log Z = \\log \\mathbb E_{x \\sim g}[e^{-E(x)}]`
estimated by importance sampling from the base, with its standard error. The
paper's claim: the GEBM is comparable to maximum likelihood. The training and
the report are :func:`~._density.run_density`'s, shared with
``gebm-density-breast-cancer``.
"""

from __future__ import annotations

from pathlib import Path

from ._density import DensityData, run_density, standardized_splits


def _wine():
    from sklearn.datasets import load_wine

    return load_wine().data


WINE = DensityData("gebm-density", "wine", _wine)


def wine_splits(split_seed: int = 0):
    """scikit-learn's wine data (178 × 13), log1p of the (positive) features,
    standardized with the training statistics; a fixed 60 / 20 / 20 split."""
    return standardized_splits(_wine(), split_seed)


def run(out_dir: Path, quick: bool = False, seeds=(0, 1, 2), resume: bool = False) -> str:
    return run_density(WINE, out_dir, quick, seeds, resume)
