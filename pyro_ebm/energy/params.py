# SPDX-License-Identifier: Apache-2.0
"""The parameters of a Pyro callable: the ones it owns, the ones a run touched,
and the callable run with other weights swapped in.

An ``nn.Module`` (a :class:`~pyro.nn.PyroModule` or a module that calls
``pyro.module`` on itself) owns its trainable parameters; a plain function's
parameters are its ``pyro.param`` statements, found by running it.
:func:`functional` runs a module with fast weights through
``torch.func.functional_call`` (``poutine.substitute`` does not reach a
PyroModule's parameters).
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from pyro import poutine
from torch.func import functional_call

from .sites import param_tensors

__all__ = ["collect_params", "functional", "trainable_parameters"]


def trainable_parameters(module: torch.nn.Module) -> dict:
    """The module's parameters that require a gradient, by name."""
    return {name: p for name, p in module.named_parameters() if p.requires_grad}


def functional(module: torch.nn.Module, weights: dict | None):
    """``module`` as a function of its fast ``weights`` (``None``: its own parameters)."""
    if weights is None:
        return module

    def call(*args, **kwargs):
        return functional_call(module, weights, args, kwargs)

    return call


@contextmanager
def collect_params(found: set):
    """Add the unconstrained leaf tensor of every ``pyro.param`` site run inside
    the block (a PyroModule's parameters included) to the set ``found``.

    >>> params = set()
    >>> with collect_params(params):
    ...     loss = -energy_view(model).log_density(v)
    >>> loss.backward(); optim(params)
    """
    with poutine.trace(param_only=True) as tracer:
        yield found
    param_tensors(tracer.trace, found)
