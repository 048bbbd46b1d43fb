# SPDX-License-Identifier: Apache-2.0
"""The guide view: a Pyro guide :math:`q_\\phi(h \\mid v)` as a sampler and a
density over particles, with fast weights swapped in where an algorithm unrolls
the guide's optimizer."""

from __future__ import annotations

from contextlib import contextmanager

import pyro
import torch
from pyro import poutine
from torch.func import functional_call

from .density import log_density, with_chain_plate
from .params import functional
from .sites import trace_run
from .view import EnergyView

__all__ = ["GuideView"]

_PARTICLE_PLATE = "_pyro_ebm_particles"


class _Conditionals(torch.nn.Module):
    """Runs ``guide.conditionals`` under ``functional_call`` (fast weights)."""

    def __init__(self, guide):
        super().__init__()
        self.guide = guide

    def forward(self, *args, **kwargs):
        return self.guide.conditionals(*args, **kwargs)


class GuideView:
    """A Pyro guide ``guide(v, *args)`` seen as a sampler and a density over
    particles, optionally with fast weights swapped in.

    Particles are a leading dim ``L``; values come back as ``(L, *site_shape)``
    (or ``site_shape`` when ``L = 1``), the layout that
    :meth:`pyro_ebm.energy.EnergyView.log_density` takes with ``num_chains=L``.
    A general guide runs once under an extra outer plate of size ``L`` and is
    scored with :func:`pyro_ebm.energy.log_density`. A guide that describes
    itself, with a method ``conditionals(v, *args) -> {site: distribution of
    batch shape (N,)}`` whose ``forward`` samples exactly those distributions
    inside ``pyro.plate("data", N)`` (as :class:`AmortizedNormal` and
    :class:`AmortizedBernoulli` do), is sampled and scored through those
    distributions directly, without the cost of a Pyro run.

    :param callable guide: any Pyro guide over the model's latent sites.
    """

    def __init__(self, guide):
        if not callable(guide):
            raise TypeError(f"guide must be callable, got {type(guide).__name__}")
        self.guide = guide
        self.weights = None
        # the Pyro path: fast weights swapped in by `using` are out of reach of a
        # traced graph (the guide's own parameters would be looked up instead)
        self.view = EnergyView(self._call, role="guide", traced=False)
        self.direct = isinstance(guide, torch.nn.Module) and callable(getattr(guide, "conditionals", None))
        self._conditionals = _Conditionals(guide) if self.direct else None

    def _call(self, *args, **kwargs):
        return functional(self.guide, self.weights)(*args, **kwargs)

    def conditionals(self, v, *args, **kwargs) -> dict:
        """``guide.conditionals`` with the current (fast) weights."""
        if self.weights is None:
            return self.guide.conditionals(v, *args, **kwargs)
        weights = {"guide." + k: w for k, w in self.weights.items()}
        return functional_call(self._conditionals, weights, (v,) + args, kwargs)

    @contextmanager
    def using(self, weights):
        """Run the guide with fast ``weights`` (a dict name -> tensor; ``None``
        for its own parameters) inside the block."""
        saved, self.weights = self.weights, weights
        try:
            yield self
        finally:
            self.weights = saved

    def sites(self, v, *args, **kwargs) -> dict:
        """The guide's sample sites (name -> :class:`~pyro_ebm.energy.SiteInfo`)."""
        return self.view.structure(v, *args, **kwargs).latents

    def _particles(self, v, args, kwargs, num_particles):
        st = self.view.structure(v, *args, **kwargs)
        if num_particles == 1:
            return self._call, st, st.nesting

        particles = with_chain_plate(self._call, num_particles, -(st.nesting + 1), name=_PARTICLE_PLATE)
        return particles, st, st.nesting + 1

    def _values(self, trace, st, num_particles):
        values = {}
        for name, info in st.latents.items():
            x = trace.nodes[name]["value"]
            if num_particles > 1:
                x = x.expand((num_particles,) + (1,) * (st.nesting - info.batch_ndim) + info.shape)
                x = x.reshape((num_particles,) + info.shape)
            values[name] = x
        return values

    def _direct_sample(self, v, args, kwargs, num_particles, with_log_density):
        shape = (num_particles,) if num_particles > 1 else ()
        values, lq = {}, 0.0
        with pyro.validation_enabled(False):  # checked once, by the structure trace
            for name, q in self.conditionals(v, *args, **kwargs).items():
                x = q.rsample(shape) if q.has_rsample else q.sample(shape)
                values[name] = x
                if with_log_density:
                    lq = lq + q.log_prob(x).sum()
        return values, lq

    def sample(self, v, *args, num_particles=1, **kwargs) -> dict:
        """Draws from the guide by site; reparameterized sites keep their graph to
        the guide's parameters (detach ``v`` to draw from a detached ``v``)."""
        if self.direct:
            return self._direct_sample(v, args, kwargs, num_particles, False)[0]
        fn, st, _ = self._particles(v, args, kwargs, num_particles)
        with pyro.validation_enabled(False):
            trace = trace_run(fn, v, *args, **kwargs)
        return self._values(trace, st, num_particles)

    def sample_and_log_density(self, v, *args, num_particles=1, **kwargs):
        """Draws (as :meth:`sample`) and their total :math:`\\sum \\log q` from one run."""
        if self.direct:
            return self._direct_sample(v, args, kwargs, num_particles, True)
        fn, st, total_dims = self._particles(v, args, kwargs, num_particles)
        with pyro.validation_enabled(False), poutine.trace() as tracer:
            lq = log_density(fn, {}, (v,) + args, kwargs, (), total_dims, strict=False)
        return self._values(tracer.trace, st, num_particles), lq

    def log_density(self, v, *args, values, num_particles=1, **kwargs) -> torch.Tensor:
        """:math:`\\sum \\log q(h \\mid v)` over items and particles at the given values."""
        if self.direct:
            with pyro.validation_enabled(False):
                conditionals = self.conditionals(v, *args, **kwargs)
                return sum(q.log_prob(values[name]).sum() for name, q in conditionals.items())
        lq = self.view.log_density(v, *args, values=values,
                                   num_chains=num_particles if num_particles > 1 else None, **kwargs)
        return lq.sum()
