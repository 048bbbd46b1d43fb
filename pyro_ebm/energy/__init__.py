# SPDX-License-Identifier: Apache-2.0
"""The energy core: every way a Pyro model or guide becomes numbers.

A Pyro model with an unnormalized factor declares a density

.. math::

    \\log \\tilde p(v, h) = \\sum_{\\text{sample sites } s} \\log p_s(x_s \\mid \\cdot),

the sum of the log-probs of every sample site of one run, ``pyro.factor`` sites
included. This package is the only code in pyro_ebm that runs a Pyro callable to
read its densities or its sites; every trainer, sampler and metric consumes
what it returns:

- :mod:`~pyro_ebm.energy.view`: :class:`EnergyView` (log p̃ per item or summed,
  batched over chains; the score :math:`\\nabla_v \\log \\tilde p`; the
  potentials) and :func:`energy_view`, the one cached view of a model;
- :mod:`~pyro_ebm.energy.potential`: :class:`LatentPotential` over latent sites
  (its :class:`LatentSite` blocks) and :class:`DataPotential` over data items;
- :mod:`~pyro_ebm.energy.traced` and :mod:`~pyro_ebm.energy.functional`: the
  traced pure function of each signature, and that function with its
  parameters passed in (:class:`PureDensity`, for ``torch.func`` and
  ``torch.compile``);
- :mod:`~pyro_ebm.energy.guide`: :class:`GuideView`, a guide as a sampler and a
  density over particles, with fast weights, and :class:`PureGuide`, its draws
  and density as pure functions of (weights, data, random numbers);
- :mod:`~pyro_ebm.energy.density`: :func:`log_density` of one run of any Pyro
  callable at given latent values;
- :mod:`~pyro_ebm.energy.sites`: :class:`SiteInfo` and the site helpers
  (latent sites, the observed site, parameter sites, one traced run);
- :mod:`~pyro_ebm.energy.params`: a module's trainable parameters, the module
  run with fast weights, the parameters a run touched;
- :mod:`~pyro_ebm.energy.jacobian`: per-item traces of Jacobians (Hutchinson
  and exact);
- :mod:`~pyro_ebm.energy.validation`: checks with clear errors, and
  :class:`DivergenceError`.
"""

from .density import CHAIN_PLATE, DATA_PLATE, log_density
from .functional import NotTraced, PureDensity
from .guide import GuideView, PureGuide
from .jacobian import basis_vectors, exact_trace, hutchinson_trace, projection_vectors, vjp_trace
from .params import collect_params, functional, trainable_parameters
from .potential import DataPotential, LatentPotential, LatentSite
from .sites import (
    SiteInfo,
    is_factor,
    latent_sites,
    observed_site,
    param_tensors,
    site_info,
    trace_run,
)
from .validation import (
    DivergenceError,
    check_data,
    check_dtype,
    check_finite,
    check_guide_sites,
    find_nonfinite,
    is_validation_error,
    module_of,
    nonfinite_entry,
    require_reparameterized,
)
from .view import EnergyView, energy_view

__all__ = [
    "CHAIN_PLATE",
    "DATA_PLATE",
    "DataPotential",
    "DivergenceError",
    "EnergyView",
    "GuideView",
    "LatentPotential",
    "LatentSite",
    "NotTraced",
    "PureDensity",
    "PureGuide",
    "SiteInfo",
    "check_data",
    "check_dtype",
    "check_finite",
    "check_guide_sites",
    "collect_params",
    "energy_view",
    "basis_vectors",
    "exact_trace",
    "find_nonfinite",
    "functional",
    "hutchinson_trace",
    "projection_vectors",
    "is_factor",
    "is_validation_error",
    "latent_sites",
    "log_density",
    "module_of",
    "nonfinite_entry",
    "observed_site",
    "param_tensors",
    "require_reparameterized",
    "site_info",
    "trainable_parameters",
    "trace_run",
    "vjp_trace",
]
