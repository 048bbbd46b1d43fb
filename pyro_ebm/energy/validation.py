# SPDX-License-Identifier: Apache-2.0
"""Validation: clear errors for bad data, mismatched guides and non-finite runs.

Every check names what is at fault (the argument, the site, the shape, the
dtype, the first bad index) and says what fixes it. The checks on data are one
reduction and one host sync on the fast path, so trainers run them on every
batch. :class:`DivergenceError` is what a trainer raises when a step turns
non-finite.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import pyro
import torch
from pyro.poutine.util import site_is_subsample
from torch.distributions import constraints

from .sites import SiteInfo, base_dist, is_factor, site_info, trace_run

__all__ = [
    "DivergenceError",
    "check_data",
    "check_dtype",
    "check_finite",
    "check_guide_sites",
    "find_nonfinite",
    "is_validation_error",
    "module_of",
    "nonfinite_entry",
    "require_reparameterized",
]


class DivergenceError(ValueError):
    """Training diverged: a loss, a gradient or an updated parameter is NaN or Inf.

    When a trainer raises it, every parameter and optimizer state is as it was
    before the step that diverged. The message names the trainer, the step and
    what went non-finite (with the site, where known). It is a ``ValueError``, so
    code that caught the earlier ``ValueError`` keeps working.

    :ivar int step: the step being taken (1-based).
    :ivar str level: the level whose loss, gradient or update went non-finite
        (``"model"``, ``"guide"``, ``"critic"``, ``"generator"``, ``"energy"``, ``"vae"``).
    """

    def __init__(self, message, step=None, level=None):
        super().__init__(message)
        self.step, self.level = step, level

    def __reduce__(self):
        return type(self), (str(self), self.step, self.level)


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
            rsample, dname = fn.has_rsample, type(base_dist(fn)).__name__
        if discrete or not rsample:
            kind = "discrete" if discrete else "not reparameterized"
            bad.append(f"'{name}' ({dname}, {kind})")
    if bad:
        raise ValueError(
            f"{why} needs a gradient through the latent values, but site(s) {', '.join(bad)} "
            "cannot carry one; use a reparameterized distribution (e.g. a relaxed Bernoulli "
            "for binary latents) or an algorithm that does not differentiate through them"
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
    try:
        with torch.no_grad(), pyro.validation_enabled(False):
            trace = trace_run(fn, *args, values=values, **(kwargs or {}))
    except Exception as err:  # noqa: BLE001 - a diagnosis reports whatever failed
        return f"running the {role} raised {type(err).__name__}: {str(err).splitlines()[0]}"
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site) or site["infer"].get("_deterministic"):
            continue
        fn_, base = site["fn"], base_dist(site["fn"])
        if is_factor(site):
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

