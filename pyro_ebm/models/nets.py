# SPDX-License-Identifier: Apache-2.0
"""Small network building blocks for energies, generators and flow bases.

Everything here is a plain :class:`torch.nn.Module` that works on any leading
batch shape (``(..., in_features) -> (..., out_features)``), so the same
network serves a data batch ``(N, D)`` and a chain-batched run ``(C, N, D)``.
"""

from __future__ import annotations

import pyro.distributions as dist
import torch
from pyro.distributions.transforms import AffineCoupling, Permute
from pyro.nn import DenseNN
from torch import nn
from torch.nn.utils.parametrizations import spectral_norm as _spectral_norm

__all__ = ["MLP", "RealNVP"]

_ACTIVATIONS = {"silu": nn.SiLU, "relu": nn.ReLU, "elu": nn.ELU, "tanh": nn.Tanh, "softplus": nn.Softplus,
                "leaky_relu": nn.LeakyReLU}


class MLP(nn.Sequential):
    r"""A fully connected network :math:`\mathbb R^{d_\text{in}} \to \mathbb R^{d_\text{out}}`.

    .. math::

        f(x) = W_L\,\sigma(\cdots \sigma(W_1 x + b_1) \cdots) + b_L

    Used as an energy (``out_features=1``; :class:`~pyro_ebm.models.GEBM`
    drops the trailing unit dim) or as a generator.

    :param int in_features: input dimension.
    :param int out_features: output dimension.
    :param tuple hidden_features: widths of the hidden layers.
    :param str activation: one of ``silu``, ``relu``, ``elu``, ``tanh``,
        ``softplus``, ``leaky_relu``.
    :param bool spectral_norm: wrap every linear layer in spectral
        normalization (``torch.nn.utils.parametrizations.spectral_norm``), a
        Lipschitz control often used for critics.

    >>> energy = MLP(2, 1, hidden_features=(64, 64))
    >>> energy(torch.randn(10, 2)).shape
    torch.Size([10, 1])
    """

    def __init__(self, in_features: int, out_features: int, hidden_features=(64, 64),
                 activation: str = "silu", spectral_norm: bool = False):
        if activation not in _ACTIVATIONS:
            raise ValueError(f"unknown activation '{activation}'; choose from {sorted(_ACTIVATIONS)}")
        widths = [int(in_features), *[int(h) for h in hidden_features], int(out_features)]
        if min(widths) < 1:
            raise ValueError(f"layer widths must be >= 1, got {widths}")
        layers = []
        for i, (a, b) in enumerate(zip(widths[:-1], widths[1:], strict=True)):
            linear = nn.Linear(a, b)
            layers.append(_spectral_norm(linear) if spectral_norm else linear)
            if i < len(widths) - 2:
                layers.append(_ACTIVATIONS[activation]())
        super().__init__(*layers)
        self.in_features, self.out_features = widths[0], widths[-1]


class RealNVP(nn.Module):
    r"""A RealNVP normalizing flow :math:`x = T(z)`, :math:`z \sim \mathcal N(0, I)`,
    built from Pyro's :class:`~pyro.distributions.transforms.AffineCoupling`
    layers with the coordinates reversed between layers.

    .. math::

        \log g(x) = \log \mathcal N(T^{-1}(x); 0, I) + \log\left|\det
            \frac{\partial T^{-1}(x)}{\partial x}\right|

    Calling the module maps latent draws to data space, so it serves as the
    generator of a :class:`~pyro_ebm.models.GEBM` whose base has a density;
    :meth:`log_prob` gives that density and :meth:`distribution` the
    ``TransformedDistribution``.

    :param int dim: data (and latent) dimension, at least 2.
    :param int num_layers: number of coupling layers.
    :param tuple hidden_features: hidden widths of each coupling's network.

    >>> flow = RealNVP(4, num_layers=4)
    >>> x = flow(torch.randn(100, 4))
    >>> flow.log_prob(x).shape
    torch.Size([100])

    **References:** L. Dinh, J. Sohl-Dickstein, S. Bengio, "Density estimation
    using Real NVP", ICLR 2017.
    """

    def __init__(self, dim: int, num_layers: int = 4, hidden_features=(64, 64)):
        super().__init__()
        if dim < 2:
            raise ValueError(f"RealNVP needs dim >= 2 to split coordinates, got {dim}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.dim = int(dim)
        split = self.dim // 2
        couplings = []
        for _ in range(num_layers):
            net = DenseNN(split, list(hidden_features), param_dims=[self.dim - split, self.dim - split])
            couplings.append(AffineCoupling(split, net))
        self.couplings = nn.ModuleList(couplings)
        self.register_buffer("_zero", torch.zeros(()))
        # reversing the coordinates between couplings (a volume-preserving permutation)
        # makes successive couplings condition on alternating halves
        self.register_buffer("_reverse", torch.arange(self.dim - 1, -1, -1))

    def transforms(self):
        """The flow's transforms, latent side first."""
        parts = []
        for i, coupling in enumerate(self.couplings):
            if i:
                parts.append(Permute(self._reverse))
            parts.append(coupling)
        return parts

    def distribution(self):
        """The flow's distribution :math:`g` as a ``TransformedDistribution``."""
        zero = self._zero.expand(self.dim)
        base = dist.Normal(zero, torch.ones_like(zero)).to_event(1)
        return dist.TransformedDistribution(base, self.transforms())

    def forward(self, z):
        x = z
        for t in self.transforms():
            x = t(x)
        return x

    def log_prob(self, x):
        """:math:`\\log g(x)`, one value per row of ``x``."""
        if x.shape[-1] != self.dim:
            raise ValueError(f"RealNVP of dim {self.dim} got data of shape {tuple(x.shape)}")
        return self.distribution().log_prob(x)
