# SPDX-License-Identifier: Apache-2.0
"""A variational auto-encoder from a decoder model and an encoder guide, trained
with Pyro's ``SVI`` and ``Trace_ELBO``."""

from __future__ import annotations

import pyro
import torch
from pyro.nn import PyroModule

__all__ = ["VAE", "train_vae"]


class VAE(PyroModule):
    r"""A VAE as a Pyro model and guide pair:

    .. math::

        p_\psi(v, h) = \mathcal N(h; 0, I)\, p_\psi(v \mid h), \qquad
        q_\phi(h \mid v), \qquad
        \operatorname{ELBO}(v) = \mathbb E_{q_\phi(h \mid v)}
            \big[\log p_\psi(v, h) - \log q_\phi(h \mid v)\big].

    ``vae.model(v, *args)`` runs the ``decoder`` (a Pyro model of the data, e.g. a
    :class:`~pyro_ebm.models.GaussianDecoder`) and ``vae.guide(v, *args)`` the
    ``encoder`` (a guide over the decoder's latent site, e.g.
    ``AmortizedNormal(GaussianEncoder(...), site=decoder.latent_site)``), so
    ``pyro.infer.SVI(vae.model, vae.guide, optim, Trace_ELBO())`` trains it
    (:func:`train_vae`), and the pair is the ``vae_model`` / ``vae_guide`` of
    :class:`~pyro_ebm.infer.MCMCTeaching` and the decoder / encoder of
    :class:`~pyro_ebm.infer.BiDVL`. Both parts are created by the caller, so the
    order in which their parameters are initialized is the caller's.

    :param decoder: the Pyro model ``decoder(v, *args)``: an ``nn.Module`` with a
        ``decode(h, *args)`` method giving the decoder mean and a ``latent_dim``
        (as :class:`~pyro_ebm.models.GaussianDecoder` has).
    :param encoder: the guide ``encoder(v, *args)``, an ``nn.Module``.

    >>> decoder = GaussianDecoder(MLP(16, 64, (128,)), latent_dim=16, scale=0.1)
    >>> encoder = AmortizedNormal(GaussianEncoder(64, 16, (128,)), site="h")
    >>> vae = VAE(decoder, encoder)
    >>> losses = train_vae(vae, datasets.batches(x, 100), num_steps=1000)
    >>> vae.sample(10).shape                     # decoder means of prior draws
    torch.Size([10, 64])

    **References:** D. P. Kingma, M. Welling, "Auto-encoding variational Bayes",
    ICLR 2014.
    """

    def __init__(self, decoder, encoder):
        super().__init__()
        for name, part in (("decoder", decoder), ("encoder", encoder)):
            if not isinstance(part, torch.nn.Module):
                raise TypeError(f"VAE: {name} must be a torch.nn.Module, got {type(part).__name__}")
        if not (hasattr(decoder, "decode") and hasattr(decoder, "latent_dim")):
            raise TypeError(f"VAE: the decoder ({type(decoder).__name__}) needs a decode(h) method and a "
                            "latent_dim, as GaussianDecoder has")
        self.decoder, self.encoder = decoder, encoder

    def model(self, v, *args, **kwargs):
        """The generative model :math:`p(h)\\, p_\\psi(v \\mid h)` (the decoder's Pyro model)."""
        return self.decoder(v, *args, **kwargs)

    def guide(self, v, *args, **kwargs):
        """The variational posterior :math:`q_\\phi(h \\mid v)` (the encoder guide)."""
        return self.encoder(v, *args, **kwargs)

    @torch.no_grad()
    def sample(self, n, *args):
        """Decoder means :math:`m(g_\\psi(h))` of ``n`` prior draws :math:`h \\sim \\mathcal N(0, I)`
        (a conditional decoder takes the labels in ``args``)."""
        if int(n) != n or n < 1:
            raise ValueError(f"VAE.sample: n must be a positive integer, got {n!r}")
        ref = next(self.decoder.parameters())
        h = torch.randn(int(n), self.decoder.latent_dim, dtype=ref.dtype, device=ref.device)
        return self.decoder.decode(h, *args)


def train_vae(vae, batches, num_steps, optim=None, loss=None, loop=None):
    r"""Train ``vae`` (a :class:`VAE`, or anything with ``model`` and ``guide``) by
    stochastic variational inference: ``num_steps`` steps of
    ``pyro.infer.SVI(vae.model, vae.guide, optim, loss)``, each maximizing the ELBO

    .. math::

        \mathcal L(\psi, \phi) = \frac1N \sum_{n} \mathbb E_{q_\phi(h \mid v_n)}
            \big[\log p_\psi(v_n, h) - \log q_\phi(h \mid v_n)\big]

    on one batch (``SVI.step`` returns the batch's :math:`-\mathcal L` summed over the batch).

    :param vae: the VAE.
    :param batches: an iterable of batches: tensors ``v``, or tuples ``(v, *args)``
        spread over the model's and guide's arguments (e.g. ``(v, y)`` for a
        conditional VAE); :func:`~pyro_ebm.datasets.batches` makes them.
    :param int num_steps: number of steps (at most that many batches are drawn).
    :param optim: a ``pyro.optim`` optimizer; default ``Adam({"lr": 1e-3})``.
    :param loss: an ELBO; default ``pyro.infer.Trace_ELBO()``.
    :param loop: optional ``loop(svi, step, batches)`` that runs ``step(i, batch)``
        over the (already cut to ``num_steps``) batches itself and returns the
        steps' values, e.g. a checkpointing loop; ``svi.optim`` holds the
        optimizer state to save. Default: a plain loop.
    :returns: the list of the steps' losses.
    """
    if int(num_steps) != num_steps or num_steps < 0:
        raise ValueError(f"train_vae: num_steps must be a non-negative integer, got {num_steps!r}")
    optim = pyro.optim.Adam({"lr": 1e-3}) if optim is None else optim
    svi = pyro.infer.SVI(vae.model, vae.guide, optim, pyro.infer.Trace_ELBO() if loss is None else loss)

    def step(i, batch):
        return svi.step(*batch) if isinstance(batch, tuple) else svi.step(batch)

    # zip draws from range first, so no batch beyond num_steps is taken
    cut = (batch for _, batch in zip(range(int(num_steps)), batches, strict=False))
    if loop is None:
        return [step(i, batch) for i, batch in enumerate(cut)]
    return loop(svi, step, cut)
