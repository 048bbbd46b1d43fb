# SPDX-License-Identifier: Apache-2.0
"""The trace of the Jacobian of a vector field per item,
:math:`\\operatorname{tr}\\nabla_x f(x)`: the term of score matching and of
Stein-type critics that integration by parts brings in."""

from __future__ import annotations

import torch

__all__ = ["exact_trace", "hutchinson_trace"]


def _flat(x):
    return x.reshape(x.shape[0], -1)


def hutchinson_trace(s, x, num_projections=1, noise="rademacher"):
    """Unbiased per-item estimate of :math:`\\operatorname{tr}(\\nabla_x s(x))`:
    :math:`\\frac1M\\sum_m u_m^\\top \\nabla_x (s(x)^\\top u_m)` with Rademacher
    (or Gaussian) ``u``. ``s`` must be built from ``x`` with a graph."""
    total = 0.0
    for _ in range(num_projections):
        u = torch.randn_like(s) if noise == "gaussian" else torch.randint_like(s, 2) * 2 - 1
        (g,) = torch.autograd.grad((s * u).sum(), x, create_graph=True, retain_graph=True)
        total = total + _flat(g * u).sum(-1)
    return total / num_projections


def exact_trace(s, x):
    """Per-item :math:`\\operatorname{tr}(\\nabla_x s(x))` by one backward pass per
    coordinate (for small dimension)."""
    sf = _flat(s)
    total = 0.0
    for d in range(sf.shape[1]):
        (g,) = torch.autograd.grad(sf[:, d].sum(), x, create_graph=True, retain_graph=True)
        total = total + _flat(g)[:, d]
    return total
