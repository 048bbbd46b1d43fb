# SPDX-License-Identifier: Apache-2.0
"""The energy view of a Pyro model: log p̃, its score, potentials; traced once.

:class:`EnergyView` traces the model once per argument shapes to learn its
structure (its latent sites, factor sites, plates and the plate over the
data) and then evaluates, without re-deriving that structure, log p̃ for given
latent values (per item or summed, batched over chains), the score
:math:`\\nabla_v \\log \\tilde p(v, h)` and the potentials of the samplers.
:func:`energy_view` returns the one cached view of a model.
"""

from __future__ import annotations

import inspect
import weakref
from typing import Callable, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

from . import traced as _traced
from .density import DATA_PLATE, log_density, with_chain_plate
from .potential import DataPotential, LatentPotential
from .sites import is_factor, site_info
from .validation import check_data, check_finite, find_nonfinite, is_validation_error

__all__ = ["EnergyView", "energy_view"]

_VIEWS = weakref.WeakKeyDictionary()
_METHOD_VIEWS = weakref.WeakKeyDictionary()  # owner -> {function: view}


def energy_view(model) -> EnergyView:
    """The one cached :class:`EnergyView` of ``model``.

    A bound method (e.g. ``grbm.marginal``, a new object at every attribute access)
    is keyed by its owner and function, so every access finds the same view. The
    cache holds models weakly: it never keeps one alive.
    """
    if inspect.ismethod(model):
        try:
            per_owner = _METHOD_VIEWS.setdefault(model.__self__, {})
        except TypeError:  # owner not weak-referenceable
            return EnergyView(model)
        view = per_owner.get(model.__func__)
        if view is None:
            view = per_owner[model.__func__] = EnergyView(model, weak=True)
        return view
    try:
        view = _VIEWS.get(model)
    except TypeError:  # not weak-referenceable
        return EnergyView(model)
    if view is None:
        view = _VIEWS[model] = EnergyView(model, weak=True)
    return view


class _Structure(NamedTuple):
    latents: dict  # name -> SiteInfo
    factors: tuple
    observed: tuple
    nesting: int  # max plate nesting of the model
    data_dim: int | None  # the data plate's dim, if any
    global_sites: tuple  # sites outside the data plate that carry log-prob


class EnergyView:
    """The energy view of a Pyro model ``model(v, *args)``: log p̃, its score w.r.t.
    the data, per-item log p̃, and the latent and data potentials of the
    samplers, traced once and reused. :func:`energy_view` returns the one
    cached view of a model; build one directly only for a private, strongly
    held view.

    The structure (sites, plates) is learned from one validated trace the first
    time the view is used with arguments of given shapes and cached; later calls
    run the model under one light handler, with Pyro's argument validation off.

    **The cache key.** Tensor arguments are keyed by shape, dtype and device;
    every other argument by value: numbers, strings, ``None`` and any hashable
    object (a frozen dataclass, a named tuple, an enum) by its hash and
    equality, together with its type; tuples, lists and dicts entry by entry.
    So two configuration objects that differ get their own structures, and an
    object whose class keeps the default identity hash is keyed by identity
    (the key holds it, so its id is never reused; changed in place, it keeps
    its first structure: pass a new object instead). An argument that is neither
    (an unhashable object, e.g. a mutable dataclass) is refused with a
    ``TypeError``: it could change between calls without the view noticing.

    If the first (validated) run fails inside torch, the error is re-raised
    naming the data's shape and dtype and the last site the model reached: a
    ``ValueError`` for a shape mismatch, a ``TypeError`` for a dtype mismatch.

    :param callable model: a Pyro model whose first argument is the data ``v``
        (inside ``pyro.plate("data", len(v))``), or any Pyro model for
        :meth:`latent_potential`.
    :param bool weak: hold the model by a weak reference (for cached views).
    :param str role: what the callable is, for error messages (``"model"`` or
        ``"guide"``).
    :param bool traced: run a traced pure function of (parameters, data, latent
        values) made on the second call of each signature, falling back to the
        Pyro path where the model cannot be traced (``True``), or always the Pyro
        path (``False``); ``None`` (default): ``True`` unless the environment
        variable ``PYRO_EBM_TRACE`` is ``0``. Settable later as ``view.traced``;
        :meth:`path` says which path runs (see ``docs/energy.rst``, "The traced
        path").

    >>> view = EnergyView(grbm)
    >>> s = view.score(v, values={"h": h})          # ∇_v log p̃(v, h), shape of v
    >>> lp = view.log_density(v, values={"h": h}, per_item=True)   # shape (len(v),)
    """

    def __init__(self, model: Callable, weak: bool = False, role: str = "model", traced: bool | None = None):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.role = role
        self.traced = _traced.default_traced() if traced is None else bool(traced)
        self._fast = _traced.FastPath(self)
        if weak:  # a cached view must not keep its model (the cache's key) alive
            self._model_ref = weakref.WeakMethod(model) if inspect.ismethod(model) else weakref.ref(model)
        else:
            self._model_ref = lambda: model
        self._structures = {}
        self._data_checked = set()

    @property
    def model(self):
        model = self._model_ref()
        if model is None:
            raise ReferenceError("the model of this EnergyView no longer exists")
        return model

    # -- structure -------------------------------------------------------

    def structure(self, *args, **kwargs) -> _Structure:
        """The model's structure for arguments of these shapes (traced once)."""
        key = tuple(_shape_key(a, f"argument {i}") for i, a in enumerate(args)) + tuple(
            (k, _shape_key(a, f"argument '{k}'")) for k, a in sorted(kwargs.items())
        )
        found = self._structures.get(key)
        if found is None:
            # the tracing run draws the latent sites: leave the caller's random stream as it was
            # (a resumed run must draw what the uninterrupted run drew)
            devices = [a.device for a in args if torch.is_tensor(a) and a.device.type == "cuda"][:1]
            with torch.random.fork_rng(devices=devices):
                found = self._structures[key] = self._trace_structure(args, kwargs)
        return found

    def _trace_structure(self, args, kwargs) -> _Structure:
        for i, a in enumerate(args):
            check_finite(f"{self.role} argument {i}" if i else "data", a)
        tracer = poutine.trace(self.model)
        try:
            with pyro.validation_enabled(True):
                trace = tracer.get_trace(*args, **kwargs)
        except (RuntimeError, ValueError) as err:
            explained = self._explain_failure(err, tracer.trace, args, kwargs)
            if explained is None:
                raise
            raise explained from err
        latents, factors, observed, nesting = {}, [], [], 0
        plate_dims = {}
        for name, site in trace.nodes.items():
            if site["type"] != "sample" or site_is_subsample(site):
                continue
            for frame in site["cond_indep_stack"]:
                if frame.vectorized:
                    plate_dims[frame.name] = (frame.dim, frame.size)
                    nesting = max(nesting, -frame.dim)
            fn = site["fn"]
            nesting = max(nesting, len(fn.batch_shape))
            if site["is_observed"]:
                if is_factor(site):
                    factors.append(name)
                elif not site["infer"].get("_deterministic"):
                    observed.append(name)
                continue
            latents[name] = site_info(name, site)
        data_dim = None
        if DATA_PLATE in plate_dims:
            data_dim = plate_dims[DATA_PLATE][0]
        elif args and torch.is_tensor(args[0]) and args[0].dim() > 0:
            sized = [d for d, n in plate_dims.values() if n == args[0].shape[0]]
            if len(sized) == 1:
                data_dim = sized[0]
        global_sites = []
        if data_dim is not None:
            for name, site in trace.nodes.items():
                if (site["type"] == "sample" and not site_is_subsample(site)
                        and not site["infer"].get("_deterministic")):
                    dims = {f.dim for f in site["cond_indep_stack"] if f.vectorized}
                    if data_dim not in dims:
                        global_sites.append(name)
        return _Structure(latents, tuple(factors), tuple(observed), nesting, data_dim, tuple(global_sites))

    def _explain_failure(self, err, partial, args, kwargs):
        """A clearer error for a first run that failed inside torch (shapes,
        dtypes, invalid distribution parameters), or ``None`` to re-raise as is."""
        original = err.__cause__ if isinstance(err.__cause__, type(err)) else err  # Pyro appends shapes
        message = str(original).splitlines()[0] if str(original) else type(original).__name__
        validation = is_validation_error(err)
        if isinstance(err, ValueError) and not validation:
            return None  # the model's or guide's own ValueError says what it means
        v = args[0] if args and torch.is_tensor(args[0]) else None
        data = f"data of shape {tuple(v.shape)} and dtype {v.dtype}" if v is not None else "its arguments"
        reached = [name for name, site in partial.nodes.items()
                   if site["type"] == "sample" and not site_is_subsample(site)]
        if reached:
            last = partial.nodes[reached[-1]]["value"]
            shape = f", shape {tuple(last.shape)}" if torch.is_tensor(last) else ""
            where = f"after its site '{reached[-1]}'{shape} (the last site it reached)"
        else:
            where = "before its first sample site"
        if validation:
            found = find_nonfinite(self.model, args, kwargs, role=self.role)
            if found is not None:
                return ValueError(f"{found} (on {data})")
            return ValueError(f"the {self.role} built an invalid distribution {where} on {data}: {message}")
        if "dtype" in message or "scalar type" in message:
            return TypeError(
                f"the {self.role} failed on {data} {where}: {message}. Its tensors have another dtype "
                f"than the data: convert the {self.role} (e.g. .double() / .float()) or the data so "
                "they match"
            )
        return ValueError(
            f"the {self.role} failed on {data} {where}: {message}. Check that the data's shape "
            f"(its feature dimension) is the one the {self.role} expects"
        )

    # -- densities -------------------------------------------------------

    def log_density(self, *args, values=None, per_item=False, num_chains=None, **kwargs):
        """log p̃ of one run with latent sites set to ``values``.

        :param dict values: latent values by site name; with ``num_chains=C`` each
            carries a leading dim of size C (chains or particles).
        :param bool per_item: keep the data plate's dim (shape ``(N,)`` or
            ``(C, N)``); otherwise sum over it.
        :returns: a scalar, ``(N,)``, ``(C,)`` or ``(C, N)`` tensor.
        """
        st = self.structure(*args, **kwargs)
        values = values or {}
        if per_item:
            self._check_per_item(st)
        # the traced function, or _pyro_log_density; with num_chains, a chain plate
        # or vmap over one draw (energy/traced.py)
        return self._fast.log_density(st, args, kwargs, values, per_item, num_chains)

    def path(self, *args, values=None, per_item=False, num_chains=None, **kwargs) -> _traced.Path:
        """Which path :meth:`log_density` runs for these arguments: ``"traced"`` (the
        traced pure function) or ``"pyro"`` (a Pyro run), a string with the
        attributes ``chains`` (``"plate"`` or ``"vmap"`` for ``num_chains``) and
        ``reason`` (why the Pyro path runs, or why the chain plate does not).
        Traces now for a signature not traced yet, so the answer holds for the
        calls that follow."""
        st = self.structure(*args, **kwargs)
        return self._fast.path(st, args, kwargs, values or {}, per_item, num_chains)

    def pure(self, *args, values=None, per_item=False, num_chains=None, **kwargs):
        """:meth:`log_density` for these arguments' signature as a plain function of
        (parameters, tensor arguments, latent values): a
        :class:`~pyro_ebm.energy.functional.PureDensity`, for ``torch.func`` and
        ``torch.compile``. Traces now if need be.

        :raises ~pyro_ebm.energy.NotTraced: the signature runs on the
            Pyro path (the message says why).
        """
        from .functional import PureDensity

        st = self.structure(*args, **kwargs)
        if per_item:
            self._check_per_item(st)
        entry, vmapped = self._fast.pure(st, args, kwargs, values or {}, per_item, num_chains)
        return PureDensity(entry, len(_traced._tensor_leaves(args, kwargs)), vmapped=vmapped)

    def _pyro_log_density(self, st, args, kwargs, values, per_item, num_chains):
        """log p̃ by one Pyro run (the path that is traced, and the fallback)."""
        total = st.nesting + (1 if num_chains else 0)
        keep = []
        if num_chains:
            keep.append(-total)
        if per_item:
            keep.append(st.data_dim)
        model = self.model
        if num_chains:
            values = {k: _pad_chain_value(v, st.latents.get(k), st.nesting) for k, v in values.items()}
            model = with_chain_plate(model, num_chains, -total)
        with pyro.validation_enabled(False):
            return log_density(model, values, args, kwargs, keep, total, strict=True)

    def score(self, v, *args, values=None, create_graph=True, validate=True, **kwargs):
        """The score :math:`\\nabla_v \\log \\tilde p(v, h)` at the given latent values,
        one row per data item (the items are independent given h).

        ``create_graph=True`` keeps the graph so losses built on the score can be
        differentiated w.r.t. the model's parameters and ``v``. ``validate=False``
        skips the data checks (for callers that checked the data already).
        """
        if validate:
            self._check_data(v)
        with torch.enable_grad():  # a gradient w.r.t. the data, whatever the caller's grad mode
            if not v.requires_grad:
                v = v.detach().requires_grad_(True)
            lp = self.log_density(v, *args, values=values, **kwargs)
            return self._grad_v(lp, v, create_graph)

    def _grad_v(self, lp, v, create_graph):
        grad = None
        if lp.requires_grad:
            total = lp if lp.dim() == 0 else lp.sum()  # a 0-d sum would cost a node each way
            (grad,) = torch.autograd.grad(total, v, create_graph=create_graph, allow_unused=True)
        if grad is None:
            raise ValueError(
                "the model's log density does not depend on the data: it needs a "
                "pyro.factor or observed sample site that uses its first argument"
            )
        return grad

    def check_model(self, v, *args, values=None, **kwargs) -> None:
        """Validate data and model once: finite data with a batch dim, a data
        plate, and a log density that depends on the data."""
        self._check_data(v)
        st = self.structure(v, *args, **kwargs)
        if not st.factors and not st.observed:
            raise ValueError(
                "the model has no pyro.factor or observed sample site, so it defines no "
                "energy over the data; add pyro.factor('energy', -E(v, h))"
            )
        if st.data_dim is None:
            raise ValueError(
                f"the model has no plate over the data's batch dim (size {v.shape[0]}); "
                f"wrap its sites in pyro.plate('{DATA_PLATE}', len(v))"
            )
        self.score(v, *args, values=values, create_graph=False, **kwargs)

    def _check_data(self, v):
        check_data(v, "data")

    def _check_per_item(self, st):
        if st.data_dim is None:
            raise ValueError(f"per-item log density needs a pyro.plate('{DATA_PLATE}', ...) in the model")
        if st.global_sites:
            raise ValueError(
                f"per-item log density is undefined: site(s) {list(st.global_sites)} lie "
                f"outside the '{DATA_PLATE}' plate"
            )

    # -- potential for samplers -----------------------------------------

    def latent_potential(self, *args, **kwargs) -> LatentPotential:
        """The potential :math:`U(z) = -\\log \\tilde p(v, T(z)) - \\log|\\det J_T(z)|`
        over unconstrained latent values ``z`` of shape ``(chains, dim)``, where
        ``T`` maps each site's unconstrained space onto its support
        (``torch.distributions.biject_to``)."""
        return LatentPotential(self, args, kwargs)

    def data_potential(self, *args, values=None, event_shape=None, purpose="the potential", **kwargs):
        """The potential :math:`U(x) = -\\log \\tilde p(x, h)` of data items ``x``,
        one chain per item, for a model of the data alone or at the latent values
        ``values`` (see :class:`~pyro_ebm.energy.DataPotential`). ``args`` and
        ``kwargs`` are the model's arguments after the data."""
        return DataPotential(self, args, kwargs, values=values, event_shape=event_shape, purpose=purpose)

    def check_data_potential(self, x, *args, values=None, purpose="the potential", **kwargs) -> None:
        """The check a :class:`~pyro_ebm.energy.DataPotential` runs once per
        structure (shapes of ``x`` and the arguments) and set of given sites:
        every latent site has a value, and :meth:`check_model` passes on ``x``."""
        st = self.structure(x, *args, **kwargs)
        given = tuple(sorted(values or ()))
        key = (id(st), given)  # a structure lives as long as the view: its id is not reused
        if key in self._data_checked:
            return
        missing = sorted(name for name in st.latents if name not in given)
        if missing:
            discrete = all(st.latents[name].is_discrete for name in missing)
            raise ValueError(
                f"{purpose} needs the energy of the data alone, but the {self.role} has "
                f"{'discrete ' if discrete else ''}latent site(s) {missing}; sum them out in the "
                f"{self.role} (its free energy, as GaussianRBM.marginal does) or give their values"
            )
        with torch.enable_grad():  # the check differentiates, also when called under no_grad
            self.check_model(x.detach(), *args, values=values, **kwargs)
        self._data_checked.add(key)


def _shape_key(a, where="argument"):
    """The cache key of one model argument (see :class:`EnergyView`)."""
    if torch.is_tensor(a):
        return ("tensor", tuple(a.shape), a.dtype, a.device.type)
    if isinstance(a, (tuple, list)):
        return (type(a), tuple(_shape_key(x, where) for x in a))
    if isinstance(a, dict):
        items = sorted(a.items(), key=lambda kv: repr(kv[0]))
        return (dict, tuple((k, _shape_key(x, where)) for k, x in items))
    try:
        hash(a)
    except TypeError:
        raise TypeError(
            f"model {where} of type {type(a).__name__} is not hashable, so the energy view cannot "
            "tell whether two calls with it share one model structure; pass a hashable value "
            "(e.g. a @dataclass(frozen=True) or a tuple) or tensors"
        ) from None
    # the type too: 1, 1.0 and True are equal but may build different models
    return (type(a), a)


def _pad_chain_value(value, info, nesting):
    """Reshape a chain-batched value ``(C, *site_shape)`` so that the chain dim
    lands on the chain plate's dim, left of every model plate."""
    if info is None:
        return value
    pad = nesting - info.batch_ndim
    return value.reshape(value.shape[:1] + (1,) * pad + info.shape)

