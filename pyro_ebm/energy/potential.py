# SPDX-License-Identifier: Apache-2.0
"""Potentials for the samplers: :math:`U = -\\log \\tilde p` as a plain function
of a batch of positions, one value per chain.

- :class:`LatentPotential`: over the latent sites of one model run, as a flat
  unconstrained vector per chain (the model's data and arguments fixed);
- :class:`DataPotential`: over data items, each item a chain, for a model of
  the data alone or at given latent values.

Both are built by an :class:`~pyro_ebm.energy.EnergyView`
(:meth:`~pyro_ebm.energy.EnergyView.latent_potential`,
:meth:`~pyro_ebm.energy.EnergyView.data_potential`) and evaluate through it.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro
import torch
from torch.distributions import Transform, biject_to

from .density import with_chain_plate
from .sites import SiteInfo, trace_run

__all__ = ["DataPotential", "LatentPotential", "LatentSite"]


class LatentSite(NamedTuple):
    """One latent site's block of the flat unconstrained vector ``z`` of a
    :class:`LatentPotential`."""

    #: what the model's trace tells about the site (name, shape, support, ...)
    info: SiteInfo
    #: maps the unconstrained space onto the site's support (``biject_to``)
    transform: Transform
    #: the shape of the site's unconstrained value in one run
    unconstrained_shape: torch.Size
    #: where the site's entries lie in a row of ``z``
    slice: slice

    @property
    def name(self) -> str:
        return self.info.name


class LatentPotential:
    """The latent sites of one model run as a flat unconstrained vector per chain.

    Calling it on ``z`` of shape ``(C, dim)`` returns the potential, shape ``(C,)``:

    .. math::

        U(z) = -\\log \\tilde p(v, T(z)) - \\log|\\det J_T(z)|,

    where ``T`` maps each site's unconstrained space onto its support.
    ``unpack(z)`` returns the constrained values by site, each ``(C, *site_shape)``;
    :attr:`sites` lists the sites as :class:`LatentSite` tuples, in ``z``'s order.
    """

    def __init__(self, view, args, kwargs):
        self.view, self.args, self.kwargs = view, args, kwargs
        # a cached view holds its model weakly; the potential (kept in every kernel
        # state) holds it strongly, so chains can go on after the caller drops it
        self.model = view.model
        st = view.structure(*args, **kwargs)
        if not st.latents:
            raise ValueError("the model has no latent sample sites to sample")
        discrete = [s for s in st.latents.values() if s.is_discrete]
        if discrete:
            names = ", ".join(f"'{s.name}' ({s.dist_name})" for s in discrete)
            raise ValueError(
                f"latent site(s) {names} are discrete; gradient-based samplers need "
                "continuous latents (sum them out in the model, or use Gibbs / CD)"
            )
        self.structure = st
        self.sites: list[LatentSite] = []
        self._identity = []  # real-support sites need no transform or log-det
        offset = 0
        for info in st.latents.values():
            transform = biject_to(info.support)
            ushape = torch.Size(transform.inverse_shape(info.shape))
            size = math.prod(ushape)
            self.sites.append(LatentSite(info, transform, ushape, slice(offset, offset + size)))
            self._identity.append(_is_identity(transform))
            offset += size
        self.dim = offset

    def unpack(self, z, with_log_det=False):
        chains = z.shape[0]
        values, log_det = {}, 0.0
        for site, identity in zip(self.sites, self._identity, strict=True):
            # one site is all of z: no slice (its backward would copy into a zero tensor)
            part = z if len(self.sites) == 1 else z[:, site.slice]
            u = part.reshape((chains,) + tuple(site.unconstrained_shape))
            x = u if identity else site.transform(u)
            values[site.name] = x
            if with_log_det and not identity:
                ld = site.transform.log_abs_det_jacobian(u, x)
                log_det = log_det + ld.reshape(chains, -1).sum(-1)
        return (values, log_det) if with_log_det else values

    def pack(self, values):
        """Inverse of :meth:`unpack`: constrained values by site -> ``(C, dim)``."""
        parts = []
        for site in self.sites:
            x = values[site.name]
            parts.append(site.transform.inv(x).reshape(x.shape[0], -1))
        return torch.cat(parts, -1)

    def __call__(self, z):
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"positions must have shape (chains, {self.dim}), got {tuple(z.shape)}")
        values, log_det = self.unpack(z, with_log_det=True)
        # the view's fast path at the structure found once for these fixed arguments
        # (what view.log_density would look up again on every call)
        lp = self.view._fast.log_density(self.structure, self.args, self.kwargs, values, False, z.shape[0])
        # real-support sites only: no log-det term, and no op to add a zero on every call
        return -lp if isinstance(log_det, float) else -(lp + log_det)

    def sample_prior(self, num_chains):
        """Latent draws from the model's own sampling statements, packed to ``(C, dim)``."""
        total = self.structure.nesting + 1
        model = with_chain_plate(self.view.model, num_chains, -total)
        try:
            with pyro.validation_enabled(False), torch.no_grad():
                trace = trace_run(model, *self.args, **self.kwargs)
            values = {}
            for site in self.sites:
                info = site.info
                x = trace.nodes[info.name]["value"]
                values[info.name] = x.expand((num_chains,) + (1,) * (total - 1 - info.batch_ndim) + info.shape
                                             ).reshape((num_chains,) + info.shape)
        except (RuntimeError, ValueError, IndexError, TypeError) as err:
            # a model written for one draw: run once per chain
            from .traced import prior_draws

            values = prior_draws(self.view.model, self.args, self.kwargs,
                                 [site.info for site in self.sites], num_chains, err)
        return self.pack(values)


class DataPotential:
    """The potential of data items, one chain per item:

    .. math::

        U(x_n) = -\\log \\tilde p(x_n, h_n) = E(x_n, h_n) \\;(+\\,\\text{const}),

    the model's per-item unnormalized log density with the data as the
    position, for a model of the data alone (no latent sites: a free energy)
    or at given latent values ``h`` (a dict by site, one row per item).
    Calling it on positions ``x`` of shape ``(C, *event)`` returns ``(C,)``,
    differentiable in ``x``, in the latent values and in the model's
    parameters; that is the form the kernels of :mod:`pyro_ebm.mcmc` take.

    With ``event_shape``, positions come flattened, ``(C, D)``, and are
    reshaped to ``(C, *event_shape)`` for the model. ``values`` passed at a
    call replace the ones given here (e.g. a joint potential over ``(v, h)``).

    The first call for positions of a new shape checks the model once: every
    latent site has a value (a ``ValueError`` names the others, and
    ``purpose`` says what needed the energy), and
    :meth:`~pyro_ebm.energy.EnergyView.check_model` passes.

    :param view: the model's :class:`~pyro_ebm.energy.EnergyView`.
    :param tuple args: the model's further arguments (after the data).
    :param dict kwargs: its keyword arguments.
    :param dict values: latent values by site, each ``(N, *site_shape)``.
    :param tuple event_shape: the shape of one item, for flattened positions.
    :param str purpose: what needs the potential, for error messages.

    >>> energy = energy_view(ebm).data_potential()
    >>> energy(x)                                   # E(x) per item, shape (len(x),)
    >>> state = mcmc.ULA(0.01).init(x0, energy)     # Langevin on the data space
    """

    def __init__(self, view, args=(), kwargs=None, values=None, event_shape=None, purpose="the potential"):
        self.view, self.args, self.kwargs = view, tuple(args), dict(kwargs or {})
        self.model = view.model  # held strongly, as LatentPotential does
        self.values = values
        self.event_shape = None if event_shape is None else tuple(event_shape)
        self.purpose = purpose

    def __call__(self, x, values=None):
        values = self.values if values is None else values
        if self.event_shape is not None:
            x = x.reshape((x.shape[0],) + self.event_shape)
        self.view.check_data_potential(x, *self.args, values=values, purpose=self.purpose, **self.kwargs)
        return -self.view.log_density(x, *self.args, values=values, per_item=True, **self.kwargs)


def _is_identity(transform):
    while isinstance(transform, torch.distributions.transforms.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, torch.distributions.transforms.ComposeTransform) and not transform.parts
