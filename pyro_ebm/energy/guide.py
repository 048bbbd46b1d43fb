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
from .functional import NotTraced
from .params import functional, trainable_parameters
from .sites import trace_run
from .traced import _close, _rebuild, _tensor_leaves
from .view import EnergyView, _shape_key

__all__ = ["GuideView", "PureGuide"]

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
        self._pure = {}

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

    def _direct_log_density(self, v, args, kwargs, values):
        with pyro.validation_enabled(False):
            conditionals = self.conditionals(v, *args, **kwargs)
            return sum(q.log_prob(values[name]).sum() for name, q in conditionals.items())

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
            return self._direct_log_density(v, args, kwargs, values)
        lq = self.view.log_density(v, *args, values=values,
                                   num_chains=num_particles if num_particles > 1 else None, **kwargs)
        return lq.sum()

    def pure(self, v, *args, num_particles=1, **kwargs) -> PureGuide:
        """The guide's draws and log density for this argument signature as plain
        functions of (weights, tensors, noise): a :class:`PureGuide`, for
        ``torch.func`` and ``torch.compile``. Traced once per signature.

        :raises ~pyro_ebm.energy.NotTraced: the guide has no ``conditionals``
            (a general Pyro guide), or its draws could not be traced (the
            message says why).
        """
        key = (tuple(_shape_key(a) for a in (v,) + args)
               + tuple((k, _shape_key(a)) for k, a in sorted(kwargs.items())) + (num_particles,))
        found = self._pure.get(key)
        if found is None:
            try:
                found = PureGuide(self, v, args, kwargs, num_particles)
            except NotTraced as err:
                found = err
            self._pure[key] = found
        if isinstance(found, NotTraced):
            raise found
        return found


def _is_random(node):
    target = node.target
    return (node.op == "call_function" and isinstance(target, torch._ops.OpOverload)
            and torch.Tag.nondeterministic_seeded in target.tags)


class PureGuide:
    r"""A guide's reparameterized draws and its log density for one argument
    signature, as plain functions of explicit tensors:

    .. math::

        h = g_\phi(v, \xi), \qquad \log q_\phi(h \mid v) = \textstyle\sum \log q,

    with the weights :math:`\phi` (by the names of the guide's trainable
    parameters), the data and the noise :math:`\xi` passed in. The draws of
    ``guide.conditionals`` (``rsample``) are traced once with ``make_fx``; every
    random op of the trace becomes an input, and :meth:`draw` makes those random
    numbers eagerly, in the order and with the ops of an eager draw, so that a
    compiled step and an eager one given the same seed see the same numbers.
    Random ops that depend on the weights or the data (a draw that is not
    reparameterized) are refused with :class:`~pyro_ebm.energy.NotTraced`.

    >>> pg = GuideView(guide).pure(v, num_particles=2)
    >>> noise = pg.draw()
    >>> h = pg.sample(pg.parameters(), v, noise=noise)       # {"h": (2, N, H)}
    >>> lq = pg.log_density(pg.parameters(), v, values=h)    # a scalar
    """

    def __init__(self, view, v, args, kwargs, num_particles):
        from torch.fx.experimental.proxy_tensor import make_fx

        if not view.direct:
            raise NotTraced("the guide has no conditionals(v, *args) method, so its draws run through Pyro")
        guide = view.guide
        if next(guide.buffers(), None) is not None or any(not p.requires_grad for p in guide.parameters()):
            # a traced graph would hold them as constants, stale once they change
            raise NotTraced("the guide holds buffers or frozen parameters, which its traced draws would "
                            "keep as constants")
        self.names = tuple(trainable_parameters(guide))
        self._guide, self._args, self._kwargs = guide, args, kwargs
        self._places = None
        self._num_args = len(_tensor_leaves((v,) + args, kwargs))
        L = num_particles
        weights = [guide.get_parameter(n).detach() for n in self.names]
        tensors = [t.detach() for t in _tensor_leaves((v,) + args, kwargs)]
        n_w = len(weights)

        def call(flat):
            (x, *rest), kw = _rebuild((v,) + args, kwargs, flat[n_w:n_w + self._num_args])
            return dict(zip(self.names, flat[:n_w], strict=True)), x, rest, kw

        def sample(*flat):
            w, x, rest, kw = call(flat)
            with view.using(w):
                values = view._direct_sample(x, rest, kw, L, False)[0]
            return tuple(values[k] for k in sorted(values))

        try:
            with torch.random.fork_rng(), torch.no_grad():
                gm = make_fx(sample)(*weights, *tensors)
        except Exception as err:  # noqa: BLE001 - whatever tracing refuses, the eager path runs
            raise NotTraced(f"the guide's draws could not be traced: {type(err).__name__}: {err}") from None
        self._sample, self._noise = _lift_random(gm)
        with torch.random.fork_rng(), torch.no_grad():
            probe = self._sample(*weights, *tensors, *self._noise())
        self.value_names = tuple(sorted(view.sites(v, *args, **kwargs)))

        def density(*flat):
            w, x, rest, kw = call(flat)
            vals = dict(zip(self.value_names, flat[n_w + self._num_args:], strict=True))
            with view.using(w):
                return view._direct_log_density(x, rest, kw, vals)

        try:
            with torch.no_grad():
                self._density = make_fx(density)(*weights, *tensors, *probe)
        except Exception as err:  # noqa: BLE001
            raise NotTraced(f"the guide's log density could not be traced: {type(err).__name__}: "
                            f"{err}") from None
        if any(_is_random(n) for n in self._density.graph.nodes):
            raise NotTraced("the guide's log density draws random numbers")
        # the guard: the same numbers as an eager draw from the same random state
        with torch.random.fork_rng(), torch.no_grad():
            state = torch.get_rng_state()
            eager = view._direct_sample(v, args, kwargs, L, False)[0]
            eager_lq = view._direct_log_density(v, args, kwargs, eager)
            torch.set_rng_state(state)
            mine = self.sample(self.parameters(), v, *args, noise=self.draw(), **kwargs)
            mine_lq = self.log_density(self.parameters(), v, *args, values=mine, **kwargs)
        same = all(_close(mine[k], eager[k].detach()) for k in self.value_names)
        if not (same and _close(mine_lq, eager_lq)):
            raise NotTraced("the traced draws of the guide differ from its eager draws")

    def parameters(self) -> list:
        """The guide's trainable parameters, looked up now, in the order of :attr:`names`."""
        if self._places is None:  # where each sits: (its module's parameter dict, its key)
            places = []
            for name in self.names:
                owner, _, leaf = name.rpartition(".")
                places.append((self._guide.get_submodule(owner)._parameters, leaf))
            self._places = places
        return [store[key] for store, key in self._places]

    def draw(self) -> list:
        """The random numbers of one draw (eagerly, as an eager draw makes them)."""
        return list(self._noise())

    def _tensors(self, v, args, kwargs):
        tensors = _tensor_leaves((v,) + args, kwargs)
        if len(tensors) != self._num_args:
            raise ValueError(f"the pure guide was traced with {self._num_args} tensor argument(s), "
                             f"got {len(tensors)}")
        return tensors

    def sample(self, weights, v, *args, noise, **kwargs) -> dict:
        """The draws ``{site: value}`` at ``weights`` (aligned with :attr:`names`)
        from the random numbers ``noise`` (:meth:`draw`)."""
        out = self._sample(*weights, *self._tensors(v, args, kwargs), *noise)
        return dict(zip(self.value_names, out, strict=True))

    def log_density(self, weights, v, *args, values, **kwargs) -> torch.Tensor:
        r""":math:`\sum \log q_\phi(h \mid v)` over items and particles at ``values``."""
        tensors = self._tensors(v, args, kwargs)
        return self._density(*weights, *tensors, *[values[k] for k in self.value_names])


def _lift_random(gm):
    """``(main, noise)``: the graph ``gm`` with each random op an extra input (after
    the others, in the graph's order), and a function that draws those random
    numbers eagerly (a graph of the random ops and their constant inputs)."""
    graph = gm.graph
    graph.eliminate_dead_code()
    random = [n for n in graph.nodes if _is_random(n)]
    # the noise graph: the random ops and what they read, which must not be an input
    needed, stack = set(), list(random)
    while stack:
        node = stack.pop()
        if node in needed:
            continue
        if node.op == "placeholder":
            raise NotTraced("a random draw of the guide depends on its weights or data (a draw that is not "
                            "reparameterized)")
        needed.add(node)
        stack.extend(node.all_input_nodes)
    noise_graph = torch.fx.Graph()
    env = {}
    for node in graph.nodes:
        if node in needed:
            env[node] = noise_graph.node_copy(node, lambda n: env[n])
    noise_graph.output(tuple(env[n] for n in random))
    noise = torch.fx.GraphModule(gm, noise_graph)
    last = [n for n in graph.nodes if n.op == "placeholder"][-1]
    for i, node in enumerate(random):
        with graph.inserting_after(last):
            last = graph.placeholder(f"noise_{i}")
        node.replace_all_uses_with(last)
    for node in reversed(random):
        graph.erase_node(node)
    graph.eliminate_dead_code()
    gm.recompile()
    return gm, noise
