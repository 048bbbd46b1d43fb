# SPDX-License-Identifier: Apache-2.0
"""Decoders: the model :math:`p(h)\\, q_\\psi(v \\mid h)` of a VAE as a Pyro model,
the variational joint of :class:`~pyro_ebm.infer.BiDVL`."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_

from .nets import with_label

__all__ = ["GaussianDecoder"]


class GaussianDecoder(PyroModule):
    r"""The variational joint of BiDVL (and the model of a plain VAE) as a Pyro model:

    .. math::

        q_\psi(v, h) = p(h)\, q_\psi(v \mid h) = \mathcal N(h; 0, I)\;
            \mathcal N\big(v;\ m(g_\psi(h)),\ \sigma^2 I\big),

    with a decoder network :math:`g_\psi`, an optional output map ``m``
    (``"sigmoid"`` for data in [0, 1], ``None`` for the identity) and a fixed
    scale :math:`\sigma`. ``decoder(v)`` draws ``h`` (site ``latent_site``) for
    each of the ``len(v)`` items inside ``pyro.plate("data", len(v))`` and
    observes ``v`` at site ``obs_site``; both sites are reparameterized.
    With ``num_classes`` the decoder is class-conditional: ``decoder(v, y)``
    appends the one-hot label to ``h``, :math:`g_\psi([h; \operatorname{onehot}(y)])`.

    :param torch.nn.Module net: maps ``(N, latent_dim)`` to ``(N, *event)``; it is
        converted in place to a :class:`~pyro.nn.PyroModule` so that its
        parameters live in Pyro's param store (as ``decoder.*``).
    :param int latent_dim: dimension of ``h``.
    :param float scale: :math:`\sigma > 0`.
    :param str output: ``"sigmoid"`` or ``None``.
    :param str latent_site: name of the latent site.
    :param str obs_site: name of the observed site.
    :param int num_classes: number of classes of a conditional decoder (``net`` then
        takes ``latent_dim + num_classes`` inputs), or ``None``.

    >>> decoder = GaussianDecoder(MLP(16, 64), latent_dim=16, scale=0.1)
    >>> pyro.infer.Trace_ELBO().loss(decoder, encoder_guide, x)      # a VAE's -ELBO

    **References:** D. P. Kingma, M. Welling, "Auto-encoding variational Bayes",
    ICLR 2014.
    """

    def __init__(self, net, latent_dim, scale=0.1, output="sigmoid", latent_site="h", obs_site="v",
                 num_classes=None):
        super().__init__()
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be an int >= 1, got {latent_dim!r}")
        if not float(scale) > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if output not in ("sigmoid", None):
            raise ValueError(f"output must be 'sigmoid' or None, got {output!r}")
        if num_classes is not None and (not isinstance(num_classes, int) or num_classes < 1):
            raise ValueError(f"num_classes must be an int >= 1 or None, got {num_classes!r}")
        to_pyro_module_(net)
        self.decoder = net
        self.latent_dim, self.scale, self.output = latent_dim, float(scale), output
        self.latent_site, self.obs_site = str(latent_site), str(obs_site)
        self.num_classes = num_classes

    def decode(self, h, y=None):
        """The decoder mean :math:`m(g_\\psi(h))` (:math:`m(g_\\psi([h; \\operatorname{onehot}(y)]))`
        for a conditional decoder)."""
        out = self.decoder(with_label(h, y, self.num_classes, "GaussianDecoder"))
        return torch.sigmoid(out) if self.output == "sigmoid" else out

    def forward(self, v, *args, **kwargs):
        # a conditional decoder takes the labels as its second argument; others ignore extra arguments
        y = (args[0] if args else kwargs.get("y")) if self.num_classes is not None else None
        n = v.shape[0]
        zeros = v.new_zeros((n, self.latent_dim))
        with pyro.plate("data", n):
            h = pyro.sample(self.latent_site, dist.Normal(zeros, 1.0).to_event(1))
            loc = self.decode(h, y)
            pyro.sample(self.obs_site, dist.Normal(loc, self.scale).to_event(loc.dim() - 1), obs=v)
