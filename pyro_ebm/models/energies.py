# SPDX-License-Identifier: Apache-2.0
"""Latent-free energy models :math:`p_\\theta(v) \\propto e^{-E_\\theta(v)}` as Pyro models:
an MLP energy for vectors and a small convolutional energy for grey images."""

from __future__ import annotations

import math

import pyro
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_
from torch import nn

from .nets import _ACTIVATIONS, MLP

__all__ = ["ConvEnergy", "MLPEnergy"]


def _check_base(base_loc, base_scale, who):
    if base_scale is not None and not float(base_scale) > 0:
        raise ValueError(f"{who}: base_scale must be > 0 or None, got {base_scale}")
    if not math.isfinite(float(base_loc)):
        raise ValueError(f"{who}: base_loc must be a finite number, got {base_loc}")


class _EnergyModel(PyroModule):
    """The Pyro model and the Gaussian base term shared by the energies below."""

    def _base(self, v):
        # a Python-float divisor: /2.0 and /18.0 round exactly as a hand-written 0.5 * ... or ... / 18
        centred = v if self.base_loc == 0.0 else v - self.base_loc
        return centred.pow(2).sum(-1) / (2 * self.base_scale ** 2)

    def forward(self, v, y=None):
        """The Pyro model: ``pyro.factor("energy", -E(v[, y]))`` inside
        ``pyro.plate("data", N)``."""
        with pyro.plate("data", v.shape[0]):
            pyro.factor("energy", -self.energy(v, y))


class MLPEnergy(_EnergyModel):
    r"""An energy model with an MLP energy, as a Pyro model of the data:

    .. math::

        E_\theta(v) = f_\theta(v) + \frac{\|v - \mu_0\|^2}{2 s_0^2},
        \qquad p_\theta(v) \propto e^{-E_\theta(v)},

    with :math:`f_\theta: \mathbb R^D \to \mathbb R` an :class:`~pyro_ebm.models.nets.MLP`
    (attribute ``net``) and an optional Gaussian base measure
    :math:`\mathcal N(\mu_0, s_0^2 I)` (``base_scale=None`` drops the quadratic
    term) that keeps :math:`e^{-E}` integrable however :math:`f` grows. With
    ``num_classes`` the MLP has one output per class and
    :math:`E_\theta(v, y) = f_\theta(v)_y + \|v - \mu_0\|^2 / 2 s_0^2`, a
    class-conditional energy.

    ``model(v)`` (or ``model(v, y)``) adds ``pyro.factor("energy", -E(v))`` inside
    ``pyro.plate("data", N)``: the Pyro model that score matching, contrastive
    divergence, :class:`~pyro_ebm.infer.MCMCTeaching` and
    :class:`~pyro_ebm.infer.BiDVL` train. :meth:`energy` works on any leading
    batch shape ``(..., D)``.

    :param int in_features: D, size of one (flattened) data item.
    :param tuple hidden_features: hidden widths of :math:`f_\theta`.
    :param str activation: the MLP's activation.
    :param int num_classes: number of classes of a conditional energy, or ``None``.
    :param float base_loc: :math:`\mu_0` (a scalar, the same in every coordinate).
    :param float base_scale: :math:`s_0 > 0`, or ``None`` for no base term.

    >>> model = MLPEnergy(64, hidden_features=(128, 128), base_loc=0.5, base_scale=1.0)
    >>> v = torch.rand(10, 64)
    >>> model.energy(v).shape
    torch.Size([10])
    >>> svi = pyro.infer.SVI(model, lambda v: None, pyro.optim.Adam({"lr": 1e-3}), loss=DSM(0.1))
    """

    def __init__(self, in_features: int, hidden_features=(128, 128), activation: str = "silu",
                 num_classes: int | None = None, base_loc: float = 0.0, base_scale: float | None = None):
        super().__init__()
        if num_classes is not None and (int(num_classes) != num_classes or num_classes < 1):
            raise ValueError(f"MLPEnergy: num_classes must be a positive integer or None, "
                             f"got {num_classes!r}")
        _check_base(base_loc, base_scale, "MLPEnergy")
        self.in_features, self.num_classes = int(in_features), num_classes
        self.base_loc = float(base_loc)
        self.base_scale = None if base_scale is None else float(base_scale)
        self.net = MLP(in_features, num_classes or 1, hidden_features, activation)
        to_pyro_module_(self.net)

    def energy(self, v, y=None):
        """:math:`E(v)` (or :math:`E(v, y)`) per item: shape ``(...)`` for ``v`` of shape
        ``(..., D)`` (and integer labels ``y`` of shape ``(...)``)."""
        if v.shape[-1] != self.in_features:
            raise ValueError(f"MLPEnergy expects data of shape (..., {self.in_features}), "
                             f"got {tuple(v.shape)}")
        out = self.net(v)
        if self.num_classes is None:
            if y is not None:
                raise ValueError("MLPEnergy got labels y but has num_classes=None")
            f = out.squeeze(-1)
        else:
            if y is None:
                raise ValueError(f"MLPEnergy has num_classes={self.num_classes} and needs the labels y")
            # leading (chain) dims of v broadcast over the labels
            f = out.gather(-1, y.unsqueeze(-1).expand(*out.shape[:-1], 1)).squeeze(-1)
        return f if self.base_scale is None else f + self._base(v)


class ConvEnergy(_EnergyModel):
    r"""A small convolutional energy for grey images, as a Pyro model of the data:

    .. math::

        E_\theta(v) = w^\top \sigma\big(W\, \operatorname{flatten}(c_L(\cdots c_1(v)))
            + b\big) + b_0 + \frac{\|v - \mu_0\|^2}{2 s_0^2},

    where each :math:`c_l` is a 3×3 convolution with stride 2 (padding 1)
    followed by the activation :math:`\sigma`, halving the image side (rounding
    up), and the quadratic base term is optional as in :class:`MLPEnergy`. Data
    are images ``(..., 1, H, W)`` or flat rows ``(..., H * W)`` (as
    :func:`~pyro_ebm.datasets.digits` and
    :func:`~pyro_ebm.datasets.image_patches` return them); the energy has the
    leading shape ``(...)``. ``model(v)`` adds ``pyro.factor("energy", -E(v))``
    inside ``pyro.plate("data", N)``.

    :param image_size: ``H`` (square images) or ``(H, W)``.
    :param tuple channels: output channels of the convolutions :math:`c_1, \dots, c_L`.
    :param int hidden: width of the dense layer.
    :param str activation: the activation :math:`\sigma`.
    :param float base_loc: :math:`\mu_0`.
    :param float base_scale: :math:`s_0 > 0`, or ``None`` for no base term.

    >>> model = ConvEnergy(8, channels=(16, 32), hidden=64, base_scale=3.0)
    >>> model.energy(torch.randn(10, 64)).shape          # flat 8x8 images
    torch.Size([10])
    >>> model.energy(torch.randn(10, 1, 8, 8)).shape
    torch.Size([10])
    """

    def __init__(self, image_size=8, channels=(32, 64), hidden: int = 128, activation: str = "silu",
                 base_loc: float = 0.0, base_scale: float | None = None):
        super().__init__()
        size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
        if len(size) != 2 or any(int(s) != s or s < 1 for s in size):
            raise ValueError(f"ConvEnergy: image_size must be a positive int or a pair (H, W), "
                             f"got {image_size!r}")
        if activation not in _ACTIVATIONS:
            raise ValueError(f"ConvEnergy: unknown activation '{activation}'; "
                             f"choose from {sorted(_ACTIVATIONS)}")
        channels = tuple(int(c) for c in channels)
        if not channels or min(channels) < 1 or int(hidden) < 1:
            raise ValueError(f"ConvEnergy: channels must be positive ints (at least one) and hidden >= 1, "
                             f"got channels={channels}, hidden={hidden}")
        _check_base(base_loc, base_scale, "ConvEnergy")
        self.image_size = (int(size[0]), int(size[1]))
        self.base_loc = float(base_loc)
        self.base_scale = None if base_scale is None else float(base_scale)
        layers, c_in, (h, w) = [], 1, self.image_size
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), _ACTIVATIONS[activation]()]
            c_in, h, w = c, (h + 1) // 2, (w + 1) // 2
        layers += [nn.Flatten(), nn.Linear(c_in * h * w, int(hidden)), _ACTIVATIONS[activation](),
                   nn.Linear(int(hidden), 1)]
        self.net = nn.Sequential(*layers)
        to_pyro_module_(self.net)

    def energy(self, v, y=None):
        """:math:`E(v)` per image: shape ``(...)`` for ``v`` of shape ``(..., 1, H, W)``
        or ``(..., H * W)``."""
        if y is not None:
            raise ValueError("ConvEnergy is not class-conditional; it got labels y")
        h, w = self.image_size
        if v.dim() >= 3 and tuple(v.shape[-3:]) == (1, h, w):
            lead, flat = v.shape[:-3], v.reshape(*v.shape[:-3], h * w)
        elif v.dim() >= 1 and v.shape[-1] == h * w:
            lead, flat = v.shape[:-1], v
        else:
            raise ValueError(f"ConvEnergy expects images of shape (..., 1, {h}, {w}) or flat rows "
                             f"(..., {h * w}), got {tuple(v.shape)}")
        out = self.net(flat.reshape(-1, 1, h, w)).reshape(lead)
        return out if self.base_scale is None else out + self._base(flat)
