# SPDX-License-Identifier: Apache-2.0
"""The energy view of a Pyro model.

A Pyro model with an unnormalized factor declares a density

.. math::

    \\log \\tilde p(v, h) = \\sum_{\\text{sample sites } s} \\log p_s(x_s \\mid \\cdot),

the sum of the log-probs of every sample site of one run, ``pyro.factor`` sites
included. :class:`EnergyView` traces the model once to learn its structure (its
latent sites, factor sites, plates and the plate over the data) and then
evaluates, on every later call and without re-deriving that structure:

- :meth:`EnergyView.log_density`: log p̃ for given latent values, per data item or
  summed, optionally batched over a leading chain / particle dimension;
- :meth:`EnergyView.score`: the score :math:`\\nabla_v \\log \\tilde p(v, h)`
  (never the energy gradient);
- :meth:`EnergyView.latent_potential`: the potential :math:`-\\log \\tilde p`
  over unconstrained latent values, batched over chains, for the samplers.

The same machinery scores a guide: :func:`log_density` evaluates any Pyro
callable (model or guide) at given latent values.
"""

from __future__ import annotations

import inspect
import math
import weakref
from collections.abc import Mapping
from typing import Callable, NamedTuple

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample
from torch.distributions import biject_to, constraints

__all__ = [
    "EnergyView",
    "LatentPotential",
    "SiteInfo",
    "check_data",
    "check_finite",
    "check_dtype",
    "check_guide_sites",
    "find_nonfinite",
    "is_validation_error",
    "log_density",
    "module_of",
    "nonfinite_entry",
    "require_reparameterized",
    "site_info",
]

DATA_PLATE = "data"
_CHAIN_PLATE = "_pyro_ebm_chains"


class SiteInfo(NamedTuple):
    """What one trace of a model tells about a latent sample site."""

    name: str
    shape: torch.Size  # value shape in one model run (batch + event)
    batch_ndim: int
    event_dim: int
    support: object
    is_discrete: bool
    has_rsample: bool
    dist_name: str


def _first_nonfinite(value):
    """``(kind, index, count)`` of the first NaN / Inf entry of a floating-point
    tensor (kind ``"NaN"`` or ``"Inf"``), or ``None`` when every entry is finite."""
    if not torch.is_tensor(value) or not value.is_floating_point():
        return None
    value = value.detach()
    if bool(torch.isfinite(value).all()):  # one reduction on the fast path
        return None
    bad = ~torch.isfinite(value)
    index = tuple(int(i) for i in bad.nonzero()[0])
    kind = "NaN" if bool(torch.isnan(value[index])) else "Inf"
    return kind, index, int(bad.sum())


def check_finite(name: str, value: torch.Tensor) -> None:
    """Raise a ``ValueError`` naming ``name`` and the first bad index when ``value``
    holds NaN or Inf."""
    found = _first_nonfinite(value)
    if found is not None:
        kind, index, count = found
        raise ValueError(
            f"{name} contains {count} non-finite value(s): {kind} at index {index} "
            f"(shape {tuple(value.shape)})"
        )


def check_data(v, name: str = "data", *, min_dim: int = 2, finite: bool = True) -> torch.Tensor:
    """Validate a batch of data and return it: a floating-point ``torch.Tensor``
    with a non-empty leading batch dimension, finite, and small enough that
    squared terms of an energy do not overflow its dtype.

    Raises a ``TypeError`` (not a tensor, not floating point) or a ``ValueError``
    (no batch dim, an empty batch, NaN/Inf with its index, overflow) that names
    ``name``. One reduction (``abs().max()``) and one host sync on the fast path;
    ``finite=False`` skips them (type and shape only, no sync), for code that
    runs many times on data a trainer has checked already (e.g. a guide).
    """
    if not torch.is_tensor(v):
        kind = type(v).__name__
        if hasattr(v, "__array__"):  # numpy.ndarray rather than just ndarray
            kind = type(v).__module__.split(".")[0] + "." + kind
        raise TypeError(
            f"{name} must be a torch.Tensor, got {kind}; convert it first, e.g. "
            f"torch.as_tensor({name if name.isidentifier() else 'x'}, dtype=torch.float32)"
        )
    if not v.is_floating_point():
        raise TypeError(f"{name} must be a floating point tensor, got dtype {v.dtype}; "
                        f"convert it with .float() (or .to(the model's dtype))")
    if v.dim() < min_dim:
        raise ValueError(
            f"{name} of shape {tuple(v.shape)} has no batch dimension: pass a batch of "
            f"shape (batch, *event), e.g. v.unsqueeze(0) for one item"
        )
    if v.shape[0] == 0:
        raise ValueError(f"{name} is an empty batch (shape {tuple(v.shape)}): pass at least one item")
    if not finite:
        return v
    limit = math.sqrt(torch.finfo(v.dtype).max)
    # one reduction and one host sync: the max of |v| is NaN when v holds a NaN
    # and above the limit when it holds an Inf or overflows
    peak = v.detach().abs().max()
    if not bool(peak <= limit):
        check_finite(name, v)  # NaN / Inf: name the first bad index
        raise ValueError(
            f"{name} overflows {v.dtype}: its largest magnitude is {float(peak):.3g}, above "
            f"{limit:.3g} (the square root of the dtype's largest value), so squared terms of "
            "an energy become Inf; rescale or standardize the data"
        )
    return v


def require_reparameterized(sites, why: str) -> None:
    """Raise a ``ValueError`` naming every discrete or non-reparameterized site in
    ``sites`` (an iterable of :class:`SiteInfo` or trace-site dicts)."""
    bad = []
    for site in sites:
        if isinstance(site, SiteInfo):
            name, discrete, rsample, dname = site.name, site.is_discrete, site.has_rsample, site.dist_name
        else:
            fn = site["fn"]
            name, discrete = site["name"], fn.support.is_discrete
            rsample, dname = fn.has_rsample, type(_base(fn)).__name__
        if discrete or not rsample:
            kind = "discrete" if discrete else "not reparameterized"
            bad.append(f"'{name}' ({dname}, {kind})")
    if bad:
        raise ValueError(
            f"{why} needs a gradient through the latent values, but site(s) {', '.join(bad)} "
            "cannot carry one; use a reparameterized distribution (e.g. a relaxed Bernoulli "
            "for binary latents) or an algorithm that does not differentiate through them"
        )


def site_info(name: str, site) -> SiteInfo | None:
    """A :class:`SiteInfo` from a :class:`SiteInfo` (returned as is) or a Pyro
    trace-site dict; ``None`` for anything else (e.g. a bare site name)."""
    if isinstance(site, SiteInfo):
        return site
    if not (isinstance(site, dict) and "fn" in site and "value" in site):
        return None
    fn, value = site["fn"], site["value"]
    return SiteInfo(
        name=name,
        shape=value.shape if torch.is_tensor(value) else torch.Size(),
        batch_ndim=len(fn.batch_shape),
        event_dim=fn.event_dim,
        support=fn.support,
        is_discrete=bool(fn.support.is_discrete),
        has_rsample=bool(fn.has_rsample),
        dist_name=type(_base(fn)).__name__,
    )


def check_guide_sites(model_latents, guide_sites) -> None:
    """Raise a ``ValueError`` naming the sites by which a guide's sample sites differ
    from the model's latent sites.

    Both arguments are iterables of site names or, for the full check, mappings
    from name to :class:`SiteInfo` or trace-site dict (one run each, on the same
    data). With mappings, each shared site must also have the same shape in the
    guide as in the model, and the guide's draws must lie where the model's
    log-density is defined: within the model's support for a continuous site;
    for a discrete model site, either a discrete guide or a continuous
    relaxation whose support lies within the convex hull of the model's (binary
    sites: values in [0, 1], as :class:`~pyro_ebm.guides.ConcreteBernoulli`
    draws them). A ``ValueError`` names the site, both shapes or both supports.
    """
    names_m, names_g = set(model_latents), set(guide_sites)
    missing = sorted(names_m - names_g)
    extra = sorted(names_g - names_m)
    if missing or extra:
        parts = []
        if missing:
            parts.append(f"missing the model's latent site(s) {missing}")
        if extra:
            parts.append(f"has site(s) {extra} that are not latent sites of the model")
        raise ValueError(
            "the guide does not match the model: it is " + " and ".join(parts)
            + f" (model latent sites: {sorted(names_m)})"
        )
    if not (isinstance(model_latents, Mapping) and isinstance(guide_sites, Mapping)):
        return
    for name in sorted(names_m):
        m, g = site_info(name, model_latents[name]), site_info(name, guide_sites[name])
        if m is None or g is None:
            continue
        if m.shape != g.shape:
            raise ValueError(
                f"guide site '{name}' has shape {tuple(g.shape)}, but the model's latent site '{name}' "
                f"has shape {tuple(m.shape)} on the same data: the guide must draw values of the "
                "model's site shape (check the guide's latent dimension)"
            )
        _check_supports(m, g)


def _check_supports(m: SiteInfo, g: SiteInfo) -> None:
    """The support rule of :func:`check_guide_sites` for one site."""
    m_hull, g_hull = _hull(m.support), _hull(g.support)
    known = m_hull is not None and g_hull is not None
    if m.is_discrete:
        if g.is_discrete or (known and _within(g_hull, m_hull)):
            return  # a discrete guide, or a continuous relaxation of the site
        raise ValueError(
            f"the model's latent site '{m.name}' is discrete ({m.dist_name}, support "
            f"{_support_name(m.support)}), but the guide draws it from a continuous {g.dist_name} "
            f"(support {_support_name(g.support)}): the model's log-density is not defined at those "
            "values. Use a discrete guide, or a continuous relaxation whose support lies within "
            f"the hull of the model's (for a binary site, values in [0, 1], e.g. AmortizedBernoulli)"
        )
    if not g.is_discrete and known and not _within(g_hull, m_hull):
        raise ValueError(
            f"guide site '{g.name}' draws from {g.dist_name} with support {_support_name(g.support)}, "
            f"which is not within the support {_support_name(m.support)} of the model's latent site "
            f"'{m.name}' ({m.dist_name}): the model's log-density is -inf outside it; use a guide "
            "distribution on the model's support (e.g. a LogNormal for a positive site)"
        )


def _unwrap_support(c):
    while isinstance(c, constraints.independent):
        c = c.base_constraint
    return c


def _support_name(c) -> str:
    return repr(_unwrap_support(c))


def _hull(c):
    """The convex hull of a support: ``(low, high)`` for interval-like supports,
    ``"simplex"`` for the simplex and one-hot vectors, ``None`` when unknown."""
    c = _unwrap_support(c)
    if isinstance(c, type(constraints.boolean)):
        return (0.0, 1.0)
    if isinstance(c, (type(constraints.simplex), type(constraints.one_hot))):
        return "simplex"
    if isinstance(c, type(constraints.real)):
        return (-math.inf, math.inf)
    low, high = getattr(c, "lower_bound", None), getattr(c, "upper_bound", None)
    if low is None and high is None:
        return None
    try:  # tensor-valued bounds with several entries: unknown
        return (-math.inf if low is None else float(low), math.inf if high is None else float(high))
    except (TypeError, ValueError, RuntimeError):
        return None


def _within(inner, outer) -> bool:
    if inner == "simplex" or outer == "simplex":
        return inner == outer
    return inner[0] >= outer[0] and inner[1] <= outer[1]


def module_of(fn) -> torch.nn.Module | None:
    """The ``nn.Module`` behind a Pyro callable: the module itself or the owner of
    a bound method (e.g. ``grbm.marginal``); ``None`` for a plain function."""
    if isinstance(fn, torch.nn.Module):
        return fn
    owner = getattr(fn, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def check_dtype(v: torch.Tensor, fn, role: str = "model", name: str = "data") -> None:
    """Raise a ``TypeError`` when ``fn`` is (or is a method of) an ``nn.Module``
    whose floating-point parameters all have a dtype other than the data's,
    naming both dtypes and the conversion that fixes it."""
    module = module_of(fn)
    if module is None or not torch.is_tensor(v):
        return
    dtypes = {p.dtype for p in module.parameters() if p.is_floating_point()}
    if not dtypes or v.dtype in dtypes:
        return
    theirs = sorted(dtypes, key=str)[0]
    to_module = {torch.float64: ".double()", torch.float32: ".float()", torch.float16: ".half()"}.get(
        v.dtype, f".to({v.dtype})")
    to_data = {torch.float64: ".double()", torch.float32: ".float()", torch.float16: ".half()"}.get(
        theirs, f".to({theirs})")
    raise TypeError(
        f"{name} has dtype {v.dtype}, but the {role}'s parameters ({type(module).__name__}) have dtype "
        f"{theirs}: convert one to match the other, e.g. {role}{to_module} or {name}{to_data}"
    )


_VALIDATION = ("Expected parameter", "Expected value argument")  # torch.distributions' messages


def is_validation_error(err: BaseException) -> bool:
    """Whether ``err`` is torch's distribution validation error (a distribution
    built with invalid parameters, e.g. a NaN ``loc``), which names no site."""
    causes = (err, err.__cause__)  # Pyro, and pyro_ebm's clearer errors, re-raise it from itself
    return any(isinstance(e, ValueError) and str(e).startswith(_VALIDATION) for e in causes)


def find_nonfinite(fn, args=(), kwargs=None, values=None, role: str = "model") -> str | None:
    """Run the Pyro callable ``fn`` once (no gradient, validation off), with its
    sample sites named in ``values`` set to those values, and describe the first
    site whose distribution parameters, value or log-density hold NaN or Inf,
    e.g. ``"guide site 'h': the loc of its Normal is NaN at index (0, 0)"`` or
    ``"model factor 'energy': NaN at index (3,)"``; ``None`` if every site is finite.

    For diagnosing a non-finite loss after the fact: it is not on any fast path.
    """
    run = poutine.condition(fn, data=values) if values else fn
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            trace = poutine.trace(run).get_trace(*args, **(kwargs or {}))
    except Exception as err:  # noqa: BLE001 - a diagnosis reports whatever failed
        return f"running the {role} raised {type(err).__name__}: {str(err).splitlines()[0]}"
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic"):
            continue
        fn_, base = site["fn"], _base(site["fn"])
        if site["is_observed"] and site["infer"].get("is_auxiliary") and isinstance(base, dist.Unit):
            found = _first_nonfinite(fn_.log_prob(site["value"]))
            if found:
                return f"{role} factor '{name}': {_describe(found)}"
            continue
        label = f"{role} site '{name}'"
        for param in getattr(base, "arg_constraints", {}):
            found = _first_nonfinite(vars(base).get(param))  # only parameters set, not derived
            if found:
                return f"{label}: the {param} of its {type(base).__name__} is {_describe(found)}"
        found = _first_nonfinite(site["value"])
        if found:
            return f"{label}: its value is {_describe(found)}"
        found = _first_nonfinite(fn_.log_prob(site["value"]))
        if found:
            return f"{label}: its log-density is {_describe(found)}"
    return None


def _describe(found) -> str:
    kind, index, count = found
    more = f" ({count} non-finite entries in all)" if count > 1 else ""
    return f"{kind} at index {index}{more}"


def nonfinite_entry(value) -> str | None:
    """``"NaN at index (i, j)"`` (or Inf, with the count when several) for the
    first non-finite entry of a floating-point tensor; ``None`` when all are finite."""
    found = _first_nonfinite(value)
    return _describe(found) if found else None


def _base(fn):
    while isinstance(fn, (dist.MaskedDistribution, dist.ExpandedDistribution, dist.Independent)):
        fn = fn.base_dist
    return fn


class _LogDensity(Messenger):
    """Substitutes latent values and collects every sample site's log-prob, reduced
    to the kept plate dims (chain dim and / or data dim) as it goes."""

    def __init__(self, values, keep_dims, total_dims, strict):
        super().__init__()
        self.values = values
        self.keep_dims = keep_dims  # negative dims to keep, e.g. (-2, -1)
        self.total_dims = total_dims  # number of batch dims of the result frame
        self.strict = strict
        self.terms = []
        self.outside = []

    def _pyro_sample(self, msg):
        if msg["is_observed"] or site_is_subsample(msg):
            return
        value = self.values.get(msg["name"])
        if value is None:
            if self.strict:
                raise ValueError(
                    f"no value given for latent site '{msg['name']}'; "
                    f"given: {sorted(self.values)}"
                )
            return
        msg["value"] = value
        msg["done"] = True

    def _pyro_post_sample(self, msg):
        if site_is_subsample(msg):
            return
        fn = msg["fn"]
        if msg["infer"].get("_deterministic"):
            return  # pyro.deterministic: no density
        lp = fn.log_prob(msg["value"])
        lp = scale_and_mask(lp, msg["scale"], msg["mask"])
        if not torch.is_tensor(lp):
            return
        if lp.dim() > self.total_dims:
            raise ValueError(
                f"site '{msg['name']}' has log-prob shape {tuple(lp.shape)} with more batch dims "
                f"than the model's plates ({self.total_dims}); declare its batch dims with "
                "pyro.plate or .to_event()"
            )
        lp = lp.reshape((1,) * (self.total_dims - lp.dim()) + lp.shape)
        drop = [d for d in range(-self.total_dims, 0) if d not in self.keep_dims]
        if drop:
            lp = lp.sum(drop, keepdim=True)
        self.terms.append(lp)


def log_density(fn, values, args=(), kwargs=None, keep_dims=(), total_dims=0, strict=True):
    """Evaluate the unnormalized log density of the Pyro callable ``fn`` (a model or
    a guide) with its latent sites set to ``values``.

    The result keeps the batch dims named in ``keep_dims`` (negative, counted in a
    frame of ``total_dims`` batch dims) and sums all others; with ``keep_dims=()``
    it is a scalar.
    """
    handler = _LogDensity(values, tuple(keep_dims), total_dims, strict)
    with handler:
        fn(*args, **(kwargs or {}))
    if not handler.terms:
        return torch.zeros(())
    total = handler.terms[0]
    for term in handler.terms[1:]:
        total = total + term
    drop = tuple(d for d in range(-total_dims, 0) if d not in keep_dims)
    if drop:  # every term was padded to total_dims batch dims by the handler
        total = total.squeeze(drop)
    return total


class _Structure(NamedTuple):
    latents: dict  # name -> SiteInfo
    factors: tuple
    observed: tuple
    nesting: int  # max plate nesting of the model
    data_dim: int | None  # the data plate's dim, if any
    global_sites: tuple  # sites outside the data plate that carry log-prob


class EnergyView:
    """The energy view of a Pyro model ``model(v, *args)``: log p̃, its score w.r.t.
    the data, per-item log p̃ and the latent potential, traced once and reused.

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

    >>> view = EnergyView(grbm)
    >>> s = view.score(v, values={"h": h})          # ∇_v log p̃(v, h), shape of v
    >>> lp = view.log_density(v, values={"h": h}, per_item=True)   # shape (len(v),)
    """

    def __init__(self, model: Callable, weak: bool = False, role: str = "model"):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        self.role = role
        if weak:  # a cached view must not keep its model (the cache's key) alive
            self._model_ref = weakref.WeakMethod(model) if inspect.ismethod(model) else weakref.ref(model)
        else:
            self._model_ref = lambda: model
        self._structures = {}

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
                if site["infer"].get("is_auxiliary") and isinstance(_base(fn), dist.Unit):
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
        total = st.nesting + (1 if num_chains else 0)
        keep = []
        if num_chains:
            keep.append(-total)
        if per_item:
            keep.append(st.data_dim)
        model = self.model
        if num_chains:
            values = {k: _pad_chain_value(v, st.latents.get(k), st.nesting) for k, v in values.items()}
            model = _with_chain_plate(model, num_chains, -total)
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
            (grad,) = torch.autograd.grad(lp.sum(), v, create_graph=create_graph, allow_unused=True)
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

    def latent_potential(self, *args, **kwargs) -> "LatentPotential":
        """The potential :math:`U(z) = -\\log \\tilde p(v, T(z)) - \\log|\\det J_T(z)|`
        over unconstrained latent values ``z`` of shape ``(chains, dim)``, where
        ``T`` maps each site's unconstrained space onto its support
        (``torch.distributions.biject_to``)."""
        return LatentPotential(self, args, kwargs)


class LatentPotential:
    """The latent sites of one model run as a flat unconstrained vector per chain.

    Calling it on ``z`` of shape ``(C, dim)`` returns the potential, shape ``(C,)``.
    ``unpack(z)`` returns the constrained values by site, each ``(C, *site_shape)``.
    """

    def __init__(self, view: EnergyView, args, kwargs):
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
        self.sites = []  # (SiteInfo, transform, unconstrained shape, slice of z)
        self._identity = []  # real-support sites need no transform or log-det
        offset = 0
        for info in st.latents.values():
            transform = biject_to(info.support)
            ushape = transform.inverse_shape(info.shape)
            size = math.prod(ushape)
            self.sites.append((info, transform, ushape, slice(offset, offset + size)))
            self._identity.append(_is_identity(transform))
            offset += size
        self.dim = offset

    def unpack(self, z, with_log_det=False):
        chains = z.shape[0]
        values, log_det = {}, 0.0
        for (info, transform, ushape, sl), identity in zip(self.sites, self._identity, strict=True):
            u = z[:, sl].reshape((chains,) + tuple(ushape))
            x = u if identity else transform(u)
            values[info.name] = x
            if with_log_det and not identity:
                ld = transform.log_abs_det_jacobian(u, x)
                log_det = log_det + ld.reshape(chains, -1).sum(-1)
        return (values, log_det) if with_log_det else values

    def pack(self, values):
        """Inverse of :meth:`unpack`: constrained values by site -> ``(C, dim)``."""
        parts = []
        for info, transform, _, _ in self.sites:
            x = values[info.name]
            parts.append(transform.inv(x).reshape(x.shape[0], -1))
        return torch.cat(parts, -1)

    def __call__(self, z):
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"positions must have shape (chains, {self.dim}), got {tuple(z.shape)}")
        values, log_det = self.unpack(z, with_log_det=True)
        lp = self.view.log_density(*self.args, values=values, num_chains=z.shape[0], **self.kwargs)
        return -(lp + log_det)

    def sample_prior(self, num_chains):
        """Latent draws from the model's own sampling statements, packed to ``(C, dim)``."""
        total = self.structure.nesting + 1
        model = _with_chain_plate(self.view.model, num_chains, -total)
        with pyro.validation_enabled(False), torch.no_grad():
            trace = poutine.trace(model).get_trace(*self.args, **self.kwargs)
        values = {}
        for info, *_ in self.sites:
            x = trace.nodes[info.name]["value"]
            values[info.name] = x.expand((num_chains,) + (1,) * (total - 1 - info.batch_ndim) + info.shape
                                         ).reshape((num_chains,) + info.shape)
        return self.pack(values)


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


def _is_identity(transform):
    while isinstance(transform, torch.distributions.transforms.IndependentTransform):
        transform = transform.base_transform
    return isinstance(transform, torch.distributions.transforms.ComposeTransform) and not transform.parts


def _with_chain_plate(model, size, dim):
    def chained(*args, **kwargs):
        with pyro.plate(_CHAIN_PLATE, size, dim=dim):
            return model(*args, **kwargs)

    return chained
