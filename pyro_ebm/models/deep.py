# SPDX-License-Identifier: Apache-2.0
"""A deep energy-based latent variable model with a Gaussian latent base measure."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule
from torch import nn

from .nets import MLP

__all__ = ["DeepEBLVM"]


class DeepEBLVM(PyroModule):
    r"""The deep EBLVM of bi-level score matching: a network :math:`f` embeds the
    data in the latent space, the latent :math:`h` shifts that embedding, and a
    learned affine map followed by ELU scores the pair,

    .. math::

        E_\theta(v, h) = \big\|\operatorname{ELU}\big(A\,[f(v) + h;\ h] + b\big)\big\|^2,
        \qquad
        \tilde p_\theta(v, h) = \mathcal N(h; 0, I)\, e^{-E_\theta(v, h)},

    with :math:`f: \mathbb R^{D} \to \mathbb R^{d}` an MLP, :math:`[\cdot;\cdot]`
    concatenation (:math:`2d` entries), :math:`A \in \mathbb R^{H \times 2d}` and
    :math:`b \in \mathbb R^H`. Calling ``model(v)`` runs the Pyro model: inside
    ``pyro.plate("data", N)`` it draws the latent site ``"h"`` from the base
    measure :math:`\mathcal N(0, I)` and adds ``pyro.factor("energy", -E(v, h))``,
    so the unnormalized log joint is :math:`-E(v, h) - \tfrac12\|h\|^2` up to a
    constant. The latent is continuous and reparameterizable, so
    :class:`~pyro_ebm.infer.BiSM` with ``lower="fisher"`` applies.

    :param int visible_dim: D, size of one (flattened) data item.
    :param int latent_dim: d, size of the latent :math:`h`.
    :param int hidden: H, the width of :math:`f`'s two hidden layers and the
        output size of :math:`A`.

    >>> model = DeepEBLVM(visible_dim=64, latent_dim=16, hidden=128)
    >>> v, h = torch.rand(10, 64), torch.randn(3, 10, 16)
    >>> model.energy(v, h).shape                 # a leading chain dim on h
    torch.Size([3, 10])
    >>> model(v).shape                           # the Pyro model returns h
    torch.Size([10, 16])

    **References:** F. Bao, C. Li, K. Xu, H. Su, J. Zhu, B. Zhang, "Bi-level score
    matching for learning energy-based latent variable models", NeurIPS 2020.
    """

    def __init__(self, visible_dim: int, latent_dim: int, hidden: int = 128):
        for name, value in (("visible_dim", visible_dim), ("latent_dim", latent_dim), ("hidden", hidden)):
            if int(value) != value or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        super().__init__()
        self.visible_dim, self.latent_dim, self.hidden = int(visible_dim), int(latent_dim), int(hidden)
        self.f = MLP(self.visible_dim, self.latent_dim, (self.hidden, self.hidden), activation="elu")
        self.A = nn.Parameter(torch.randn(self.hidden, 2 * self.latent_dim) / (2 * self.latent_dim) ** 0.5)
        self.b = nn.Parameter(torch.zeros(self.hidden))

    def energy(self, v, h):
        r""":math:`E(v, h)` per item. ``v`` has shape ``(N, D)``; ``h`` has shape
        ``(..., N, d)`` with any leading (chain or particle) dims, and the result
        has shape ``(..., N)``."""
        if v.shape[-1] != self.visible_dim:
            raise ValueError(f"DeepEBLVM expects data of shape (N, {self.visible_dim}), got {tuple(v.shape)}")
        if h.shape[-1] != self.latent_dim or h.shape[-2:-1] != v.shape[:1]:
            raise ValueError(
                f"DeepEBLVM expects h of shape (..., {v.shape[0]}, {self.latent_dim}) for data of shape "
                f"{tuple(v.shape)}, got {tuple(h.shape)}"
            )
        shifted = self.f(v) + h
        pair = torch.cat([shifted, h.expand_as(shifted)], dim=-1)
        return F.elu(pair @ self.A.T + self.b).pow(2).sum(-1)

    def forward(self, v):
        """The joint Pyro model: ``h ~ Normal(0, I)`` per item and the factor
        ``-E(v, h)`` inside ``pyro.plate("data", N)``; returns ``h``."""
        loc = v.new_zeros(self.latent_dim)
        with pyro.plate("data", v.shape[0]):
            h = pyro.sample("h", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            pyro.factor("energy", -self.energy(v, h))
        return h
