# SPDX-License-Identifier: Apache-2.0
"""Ready-made EBLVMs as PyroModules."""

import importlib

_WHERE = {"GaussianRBM": "grbm", "GEBM": "gebm", "DeepEBLVM": "deep", "GaussianDecoder": "decoders",
          "MLPEnergy": "energies", "ConvEnergy": "energies", "GaussianEncoder": "nets", "MLP": "nets",
          "VAE": "vae", "train_vae": "vae"}
__all__ = sorted(_WHERE)


def __getattr__(name):
    if name in _WHERE:
        return getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    raise AttributeError(f"module 'pyro_ebm.models' has no attribute {name!r}")
