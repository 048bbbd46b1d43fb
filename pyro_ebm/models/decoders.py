# SPDX-License-Identifier: Apache-2.0
"""Decoders: the model :math:`p(h)\\, q_\\psi(v \\mid h)` of a VAE as a Pyro model,
the variational joint of :class:`~pyro_ebm.infer.BiDVL`."""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule
from pyro.nn.module import to_pyro_module_

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

    :param torch.nn.Module net: maps ``(N, latent_dim)`` to ``(N, *event)``; it is
        converted in place to a :class:`~pyro.nn.PyroModule` so that its
        parameters live in Pyro's param store (as ``decoder.*``).
    :param int latent_dim: dimension of ``h``.
    :param float scale: :math:`\sigma > 0`.
    :param str output: ``"sigmoid"`` or ``None``.
    :param str latent_site: name of the latent site.
    :param str obs_site: name of the observed site.

    >>> decoder = GaussianDecoder(MLP(16, 64), latent_dim=16, scale=0.1)
    >>> pyro.infer.Trace_ELBO().loss(decoder, encoder_guide, x)      # a VAE's -ELBO

    **References:** D. P. Kingma, M. Welling, "Auto-encoding variational Bayes",
    ICLR 2014.
    """

    def __init__(self, net, latent_dim, scale=0.1, output="sigmoid", latent_site="h", obs_site="v"):
        super().__init__()
        if not isinstance(net, torch.nn.Module):
            raise TypeError(f"net must be a torch.nn.Module, got {type(net).__name__}")
        if not isinstance(latent_dim, int) or latent_dim < 1:
            raise ValueError(f"latent_dim must be an int >= 1, got {latent_dim!r}")
        if not float(scale) > 0:
            raise ValueError(f"scale must be > 0, got {scale}")
        if output not in ("sigmoid", None):
            raise ValueError(f"output must be 'sigmoid' or None, got {output!r}")
        to_pyro_module_(net)
        self.decoder = net
        self.latent_dim, self.scale, self.output = latent_dim, float(scale), output
        self.latent_site, self.obs_site = str(latent_site), str(obs_site)

    def decode(self, h):
        """The decoder mean :math:`m(g_\\psi(h))`."""
        out = self.decoder(h)
        return torch.sigmoid(out) if self.output == "sigmoid" else out

    def forward(self, v, *args, **kwargs):
        n = v.shape[0]
        zeros = v.new_zeros((n, self.latent_dim))
        with pyro.plate("data", n):
            h = pyro.sample(self.latent_site, dist.Normal(zeros, 1.0).to_event(1))
            loc = self.decode(h)
            pyro.sample(self.obs_site, dist.Normal(loc, self.scale).to_event(loc.dim() - 1), obs=v)
