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

__all__ = ["MLP", "GaussianEncoder", "RealNVP"]

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


class GaussianEncoder(nn.Module):
    r"""An encoder :math:`v \mapsto (\mu_\phi(v), \sigma_\phi(v))` of a diagonal Gaussian
    posterior, the ``encoder`` of :class:`~pyro_ebm.guides.AmortizedNormal`:

    .. math::

        (\mu, r) = g_\phi(v), \qquad \sigma = \operatorname{softplus}(r) + \sigma_\text{min},

    with :math:`g_\phi` an :class:`MLP` with :math:`2d` outputs split in two halves
    (``net``) and :math:`\sigma_\text{min} > 0` keeping the scale away from 0.
    With ``num_classes`` the encoder is class-conditional: the one-hot label is
    appended to :math:`v`, :math:`g_\phi([v; \operatorname{onehot}(y)])`, and
    ``forward(v, y)`` takes the labels (use
    ``AmortizedNormal(encoder, conditional=True)`` so the guide passes them on).

    :param int in_features: D, size of one (flattened) data item.
    :param int latent_dim: d, size of the latent.
    :param tuple hidden_features: hidden widths of :math:`g_\phi`.
    :param str activation: the :class:`MLP`'s activation.
    :param float min_scale: :math:`\sigma_\text{min} > 0`.
    :param int num_classes: number of classes of a conditional encoder, or ``None``.

    >>> encoder = GaussianEncoder(64, latent_dim=16, hidden_features=(128,))
    >>> loc, scale = encoder(torch.rand(10, 64))
    >>> loc.shape, bool((scale > 0).all())
    (torch.Size([10, 16]), True)
    >>> guide = AmortizedNormal(encoder, site="h")      # from pyro_ebm.guides
    """

    def __init__(self, in_features: int, latent_dim: int, hidden_features=(128,), activation: str = "silu",
                 min_scale: float = 1e-3, num_classes: int | None = None):
        super().__init__()
        for name, value in (("in_features", in_features), ("latent_dim", latent_dim)):
            if int(value) != value or value < 1:
                raise ValueError(f"GaussianEncoder: {name} must be a positive integer, got {value!r}")
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
            raise ValueError(f"GaussianEncoder: num_classes must be a positive integer or None, "
                             f"got {num_classes!r}")
        if not float(min_scale) > 0:
            raise ValueError(f"GaussianEncoder: min_scale must be > 0, got {min_scale}")
        self.in_features, self.latent_dim = int(in_features), int(latent_dim)
        self.num_classes, self.min_scale = num_classes, float(min_scale)
        extra = num_classes or 0
        self.net = MLP(self.in_features + extra, 2 * self.latent_dim, hidden_features, activation)

    def forward(self, v, y=None):
        if v.shape[-1] != self.in_features:
            raise ValueError(f"GaussianEncoder expects data of shape (N, {self.in_features}), "
                             f"got {tuple(v.shape)}")
        loc, raw = self.net(with_label(v, y, self.num_classes, "GaussianEncoder")).chunk(2, -1)
        return loc, torch.nn.functional.softplus(raw) + self.min_scale


def with_label(a, y, num_classes, who):
    """``a`` with the one-hot label ``y`` appended to its last dim (``a`` itself when
    ``num_classes`` is None); the conditioning of class-conditional encoders and
    decoders."""
    if num_classes is None:
        if y is not None:
            raise ValueError(f"{who} got labels y but has num_classes=None")
        return a
    if y is None:
        raise ValueError(f"{who} has num_classes={num_classes} and needs the labels y")
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        got = getattr(y, "dtype", type(y).__name__)
        raise TypeError(f"{who}: labels y must be an integer tensor, got {got}")
    one_hot = torch.nn.functional.one_hot(y.long(), num_classes).to(a.dtype)
    try:
        # leading (particle or chain) dims of ``a`` broadcast over the labels
        one_hot = one_hot.expand(*a.shape[:-1], num_classes)
    except RuntimeError:
        raise ValueError(f"{who}: labels y of shape {tuple(y.shape)} do not match inputs of shape "
                         f"{tuple(a.shape)}") from None
    return torch.cat([a, one_hot], -1)


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
