# SPDX-License-Identifier: Apache-2.0
"""Batched many-chain kernels, the sampling driver and the Pyro adapter."""

import importlib

_WHERE = {
    "ULA": "kernels",
    "MALA": "kernels",
    "UnderdampedLangevin": "kernels",
    "HMC": "kernels",
    "AnnealedLangevin": "kernels",
    "sample": "run",
    "Samples": "run",
    "load_draws": "run",
    "PyroKernel": "pyro_kernel",
    "AmortizedLangevin": "amortized",
}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'pyro_ebm.mcmc' has no attribute {name!r}")
