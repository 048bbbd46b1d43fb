# SPDX-License-Identifier: Apache-2.0
"""The density benchmarks' data and base: the breast_cancer splits (log1p,
standardized, clipped), the whitened flow, and the shared report."""

import re

import pytest
import torch
from sklearn.datasets import load_breast_cancer

from pyro_ebm import cli
from pyro_ebm.experiments._density import Whitened, clip_splits, standardized_splits
from pyro_ebm.experiments.gebm_density_breast_cancer import BREAST_CANCER, breast_cancer_splits


def test_breast_cancer_splits_standardized_clipped_and_fixed_by_seed():
    raw = breast_cancer_splits(clip=None)
    assert [tuple(t.shape) for t in raw] == [(341, 30), (113, 30), (115, 30)]
    train = raw[0]
    # standardized with the training statistics, before clipping
    assert train.mean(0).abs().max() < 1e-5
    assert (train.std(0) - 1).abs().max() < 1e-5
    # the other splits use the training statistics, not their own
    assert raw[2].mean(0).abs().max() > 0.05
    # the three splits are the 569 rows of log1p(data), each once, under one affine map per
    # column; standardizing both over all rows takes that map out
    x = torch.log1p(torch.tensor(load_breast_cancer().data, dtype=torch.float64))
    matched = _rows(_standardize(x), _standardize(torch.cat(raw).double()))
    assert sorted(matched.tolist()) == list(range(569))

    clipped = breast_cancer_splits()
    assert all(bool((t.abs() <= BREAST_CANCER.clip).all()) for t in clipped)
    beyond = [int((t.abs() > 5).sum()) for t in raw]
    assert beyond[0] > 0 and beyond[2] > 0  # the clip does move training and test coordinates
    for r, c in zip(raw, clipped, strict=True):
        assert torch.equal(c, r.clamp(-5, 5))
    assert clip_splits(raw, 5.0)[1] == beyond

    again = breast_cancer_splits()
    assert all(torch.equal(a, b) for a, b in zip(clipped, again, strict=True))
    other = breast_cancer_splits(split_seed=1)
    assert not torch.equal(other[2], clipped[2])


def _standardize(t):
    return (t - t.mean(0)) / t.std(0)


def _rows(table, rows):
    """Index in ``table`` of each of ``rows`` (an exact match up to rounding)."""
    dist, index = torch.cdist(rows, table).min(1)
    assert dist.max() < 1e-4
    return index


def test_standardized_splits_reject_bad_tables():
    with pytest.raises(ValueError, match="non-negative"):
        standardized_splits(-torch.ones(20, 3))
    with pytest.raises(ValueError, match=r"2-D table .* shape \(20,\)"):
        standardized_splits(torch.ones(20))
    with pytest.raises(ValueError, match="bound must be positive, got 0"):
        clip_splits([torch.zeros(3, 2)], 0.0)


class StandardNormal(torch.nn.Module):
    """A 'flow' that is the identity on N(0, I)."""

    def forward(self, z):
        return z

    def log_prob(self, y):
        return torch.distributions.Normal(0.0, 1.0).log_prob(y).sum(-1)


def test_whitened_identity_flow_is_the_training_gaussian():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(3, 3, generator=g, dtype=torch.float64)
    train = torch.randn(500, 3, generator=g, dtype=torch.float64) @ a + torch.tensor([1.0, -2.0, 0.5],
                                                                                     dtype=torch.float64)
    base = Whitened(StandardNormal(), train)
    gaussian = torch.distributions.MultivariateNormal(train.mean(0), torch.cov(train.T))
    x = torch.randn(50, 3, generator=g, dtype=torch.float64) * 2
    torch.testing.assert_close(base.log_prob(x), gaussian.log_prob(x))
    # calling it maps latent draws to data: the inverse of the whitening
    z = torch.randn(7, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close((base(z) - train.mean(0)) @ base.whiten, z)


def test_whitened_rejects_a_singular_covariance():
    train = torch.randn(50, 3)
    train[:, 1] = 2.0
    with pytest.raises(ValueError, match=r"singular .* shape \(50, 3\)"):
        Whitened(StandardNormal(), train)


def test_breast_cancer_report_names_the_data_and_the_clipped_coordinates(tmp_path, capsys):
    report = cli.reproduce("gebm-density-breast-cancer", out=tmp_path, quick=True)
    capsys.readouterr()
    assert report.startswith("## GEBM density estimation on breast_cancer "
                             "(`pyro-ebm reproduce gebm-density-breast-cancer`)")
    test_beyond = int((breast_cancer_splits(clip=None)[2].abs() > 5).sum())
    found = re.search(r"; (\d+) of the 3450 test coordinates were clipped", report)
    assert found and int(found.group(1)) == test_beyond
    assert "whitened" in report and "(4 affine couplings, 64-64)" in report
    assert (tmp_path / "gebm_density_breast_cancer.png").stat().st_size > 1000
