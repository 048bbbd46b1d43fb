# SPDX-License-Identifier: Apache-2.0
"""pyro_ebm: energy-based latent variable models as first-class citizens of Pyro."""

import importlib

from .energy import EnergyView

__version__ = "0.1.0"
__all__ = [
    "EnergyView", "datasets", "diagnostics", "energy", "features",
    "guides", "infer", "mcmc", "metrics", "models",
]


def __getattr__(name):
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pyro_ebm' has no attribute {name!r}")
