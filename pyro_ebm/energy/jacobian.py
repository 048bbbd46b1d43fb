# SPDX-License-Identifier: Apache-2.0
"""The trace of the Jacobian of a vector field per item,
:math:`\\operatorname{tr}\\nabla_x f(x)`: the term of score matching and of
Stein-type critics that integration by parts brings in.

One estimator serves both ways a field is differentiated: :func:`vjp_trace`
takes any vector-Jacobian product ``vjp(u) -> (uᵀ∇f,)``, autograd's
(:func:`hutchinson_trace`, :func:`exact_trace`, with the field ``s`` built from
``x`` with a graph) or ``torch.func.vjp``'s (the compiled steps, which cannot
run a double backward)."""

from __future__ import annotations

import torch

__all__ = ["basis_vectors", "exact_trace", "hutchinson_trace", "projection_vectors", "vjp_trace"]


def _flat(x):
    return x.reshape(x.shape[0], -1)


def projection_vectors(like, num_projections=1, noise="rademacher") -> tuple:
    """Hutchinson's random vectors shaped like ``like``: Rademacher (or Gaussian)."""
    if noise == "gaussian":
        return tuple(torch.randn_like(like) for _ in range(num_projections))
    return tuple(torch.randint_like(like, 2) * 2 - 1 for _ in range(num_projections))


def basis_vectors(like) -> tuple:
    """The unit vectors :math:`e_d` of one item's coordinates, each shaped like ``like``
    (the same unit vector for every item)."""
    dim = _flat(like).shape[1]
    eye = torch.eye(dim, dtype=like.dtype, device=like.device)
    return tuple(row.expand(like.shape[0], dim).reshape(like.shape) for row in eye)


def vjp_trace(vjp, vectors, average=True, vectorized=False):
    """Per item :math:`\\sum_u u^\\top \\nabla_x (f(x)^\\top u)` over ``vectors`` (their
    mean with ``average``): the Hutchinson estimate of
    :math:`\\operatorname{tr}\\nabla_x f` for random vectors, the exact trace for
    :func:`basis_vectors` summed. ``vjp(u)`` returns the tuple ``(uᵀ∇f,)``;
    ``vectorized`` maps it over the stacked vectors with ``torch.func.vmap``."""
    if vectorized:
        stacked = torch.stack(vectors)
        (rows,) = torch.func.vmap(vjp)(stacked)
        total = (rows * stacked).reshape(len(vectors), stacked.shape[1], -1).sum(-1).sum(0)
    else:
        total = 0.0
        for u in vectors:
            (g,) = vjp(u)
            total = total + _flat(g * u).sum(-1)
    return total / len(vectors) if average else total


def _autograd_vjp(s, x):
    def vjp(u):
        return torch.autograd.grad((s * u).sum(), x, create_graph=True, retain_graph=True)

    return vjp


def hutchinson_trace(s, x, num_projections=1, noise="rademacher"):
    """Unbiased per-item estimate of :math:`\\operatorname{tr}(\\nabla_x s(x))`:
    :math:`\\frac1M\\sum_m u_m^\\top \\nabla_x (s(x)^\\top u_m)` with Rademacher
    (or Gaussian) ``u``. ``s`` must be built from ``x`` with a graph."""
    return vjp_trace(_autograd_vjp(s, x), projection_vectors(s, num_projections, noise))


def exact_trace(s, x):
    """Per-item :math:`\\operatorname{tr}(\\nabla_x s(x))` by one backward pass per
    coordinate (for small dimension)."""
    return vjp_trace(_autograd_vjp(s, x), basis_vectors(s), average=False)
