# SPDX-License-Identifier: Apache-2.0
import numpy as np
import pytest
import torch

from pyro_ebm.metrics import auroc


def test_auroc_counts_pairs_with_ties_as_half():
    # pairs (in, out): 1>0, 1<2, 2>0, 2=2 (half), 3>0, 3>2 -> 4.5 of 6
    assert auroc(torch.tensor([1.0, 2.0, 3.0]), np.array([0.0, 2.0])) == pytest.approx(0.75)
    assert auroc([5.0, 6.0], [1.0, 2.0]) == 1.0
    assert auroc([1.0, 2.0], [5.0, 6.0]) == 0.0
    assert auroc([1.0, 1.0], [1.0]) == 0.5


def test_auroc_matches_the_pair_count_on_random_scores():
    g = torch.Generator().manual_seed(0)
    pos = torch.randn(300, generator=g).round(decimals=1) + 0.5  # rounded: many ties
    neg = torch.randn(200, generator=g).round(decimals=1)
    diff = pos[:, None] - neg[None, :]
    expected = float(((diff > 0).double() + 0.5 * (diff == 0).double()).mean())
    assert auroc(pos, neg) == pytest.approx(expected, abs=1e-12)


def test_auroc_errors_name_the_fault():
    with pytest.raises(ValueError, match="at least one"):
        auroc([], [1.0])
    with pytest.raises(ValueError, match="out_scores contain NaN or Inf \\(first at index 1\\)"):
        auroc([1.0], [0.0, float("nan")])
