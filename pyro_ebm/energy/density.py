# SPDX-License-Identifier: Apache-2.0
"""The unnormalized log density of one run of a Pyro callable.

.. math::

    \\log \\tilde p(v, h) = \\sum_{\\text{sample sites } s} \\log p_s(x_s \\mid \\cdot),

the sum of the log-probs of every sample site of the run, ``pyro.factor``
sites included, with the latent sites set to given values. One light handler
substitutes the values and reduces each site's log-prob to the batch dims kept
(a chain / particle dim, the data plate's dim) as the run goes.
"""

from __future__ import annotations

import pyro
import torch
from pyro.distributions.util import scale_and_mask
from pyro.poutine.messenger import Messenger
from pyro.poutine.util import site_is_subsample

__all__ = ["CHAIN_PLATE", "DATA_PLATE", "log_density", "with_chain_plate"]

#: the name of the plate over the data's batch dim (the models' convention)
DATA_PLATE = "data"
#: the plate a view adds around a model to batch it over chains or particles
CHAIN_PLATE = "_pyro_ebm_chains"


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


def with_chain_plate(model, size, dim, name=CHAIN_PLATE):
    """``model`` run inside an outer plate of ``size`` at ``dim``: one run batched
    over chains (or particles), each drawing and scoring its own values."""

    def chained(*args, **kwargs):
        with pyro.plate(name, size, dim=dim):
            return model(*args, **kwargs)

    return chained

