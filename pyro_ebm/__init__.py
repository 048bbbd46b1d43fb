# SPDX-License-Identifier: Apache-2.0
"""pyro_ebm: energy-based latent variable models as first-class citizens of Pyro."""

import importlib

__version__ = "0.1.0"
__all__ = [
    "EnergyView", "datasets", "fit", "diagnostics", "energy", "features",
    "guides", "infer", "mcmc", "metrics", "models",
]


def __getattr__(name):
    # submodules load on first use, so `import pyro_ebm` (and `pyro-ebm --help`)
    # does not import torch and Pyro
    if name == "EnergyView":
        return importlib.import_module(".energy", __name__).EnergyView
    if name == "fit":  # the training loop of long runs, pyro_ebm.infer.fit (in infer/loop.py)
        return importlib.import_module(".infer.loop", __name__).fit
    if name in __all__:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'pyro_ebm' has no attribute {name!r}")
