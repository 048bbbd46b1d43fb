# SPDX-License-Identifier: Apache-2.0
"""Sites of one run of a Pyro callable: what they are and where to find them.

Every algorithm that needs to know a model's or a guide's sites (its latent
sites, the observed site of a decoder, the parameters a run touched) asks here,
so that the rules for what counts as a latent site (not observed, not a
subsample site, not ``pyro.deterministic``) and as a ``pyro.factor`` live once.
"""

from __future__ import annotations

from typing import NamedTuple

import pyro.distributions as dist
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample

__all__ = [
    "SiteInfo",
    "base_dist",
    "is_factor",
    "latent_sites",
    "observed_site",
    "param_tensors",
    "site_info",
    "trace_run",
]


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


def base_dist(fn):
    """The distribution under Pyro's masking, expanding and ``Independent`` wrappers."""
    while isinstance(fn, (dist.MaskedDistribution, dist.ExpandedDistribution, dist.Independent)):
        fn = fn.base_dist
    return fn


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
        dist_name=type(base_dist(fn)).__name__,
    )


def is_factor(site) -> bool:
    """Whether a trace site is a ``pyro.factor`` (an observed auxiliary ``Unit`` site)."""
    return bool(site["is_observed"] and site["infer"].get("is_auxiliary")
                and isinstance(base_dist(site["fn"]), dist.Unit))


def _is_sample(site) -> bool:
    return site["type"] == "sample" and not site_is_subsample(site)


def latent_sites(trace) -> dict:
    """The latent sample sites of a trace by name: not observed, not a plate's
    subsample site, not ``pyro.deterministic``; in the order the run reached them."""
    return {name: s for name, s in trace.nodes.items()
            if _is_sample(s) and not s["is_observed"] and not s["infer"].get("_deterministic")}


def observed_site(trace, name=None, conditioned=(), role="model", what="the likelihood of the data"):
    """The one observed sample site of a trace (a likelihood such as a decoder's
    ``pyro.sample("v", ..., obs=v)``), or the one called ``name``.

    Factors, ``pyro.deterministic`` sites and the sites named in ``conditioned``
    (latent sites set by ``poutine.condition``) do not count. A ``ValueError``
    names the site asked for or the observed sites found, and ``role`` (e.g.
    ``"decoder model"``); ``what`` says what the site should be.
    """
    observed = [s for s in trace.nodes.values() if _is_sample(s) and s["is_observed"]
                and s["name"] not in conditioned and not s["infer"].get("is_auxiliary")
                and not s["infer"].get("_deterministic") and not isinstance(s["fn"], dist.Unit)]
    names = [s["name"] for s in observed]
    if name is not None:
        if name not in names:
            raise ValueError(f"the {role} has no observed site '{name}'; observed: {names}")
        return trace.nodes[name]
    if len(observed) != 1:
        raise ValueError(
            f"the {role} must have exactly one observed site ({what}), found {names or 'none'}; "
            "name it with obs_site=..."
        )
    return observed[0]


def param_tensors(trace, found: set | None = None) -> set:
    """The leaf tensors of the ``pyro.param`` sites of ``trace`` (their
    unconstrained values, which optimizers step), added to ``found`` if given."""
    found = set() if found is None else found
    for site in trace.nodes.values():
        if site["type"] == "param":
            found.add(site["value"].unconstrained())
    return found


def trace_run(fn, *args, values=None, **kwargs):
    """Run the Pyro callable ``fn(*args, **kwargs)`` once and return its trace,
    with the sample sites named in ``values`` (a dict) conditioned on those values.

    For reading what a run draws and scores (its sites' distributions and
    values); densities come from :class:`~pyro_ebm.energy.EnergyView` and
    :class:`~pyro_ebm.energy.GuideView`, which do not keep a trace.
    """
    run = poutine.condition(fn, data=values) if values else fn
    return poutine.trace(run).get_trace(*args, **kwargs)
