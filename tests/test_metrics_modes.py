# SPDX-License-Identifier: Apache-2.0
import pytest
import torch

from pyro_ebm import datasets
from pyro_ebm.metrics import mode_coverage


def test_mode_coverage_counts_modes_and_off_mode_share():
    centers = datasets.toy_centers("8gaussians")
    data = datasets.toy("8gaussians", 4000, seed=0)
    covered, off = mode_coverage(data, centers, radius=0.6)
    assert covered == 8 and off < 0.02                  # 3 sd holds ~99% of a 2-D Gaussian
    # samples from two modes plus a share between the modes
    x = torch.cat([centers[0] + 0.01 * torch.randn(60, 2), centers[3] + 0.01 * torch.randn(30, 2),
                   torch.zeros(10, 2)])
    covered, off = mode_coverage(x, centers, radius=0.6)
    assert covered == 2 and off == pytest.approx(0.1)
    assert mode_coverage(x, centers, radius=0.6, min_share=0.5)[0] == 1
    with pytest.raises(ValueError, match="radius"):
        mode_coverage(x, centers, radius=0.0)
    with pytest.raises(ValueError, match=r"\(m, d\) and centers \(K, d\)"):
        mode_coverage(x, centers[:, :1], radius=0.6)
