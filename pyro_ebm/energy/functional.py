# SPDX-License-Identifier: Apache-2.0
"""A model's log density as a plain function of tensors, for ``torch.func`` and
``torch.compile``.

:meth:`~pyro_ebm.energy.EnergyView.pure` returns, for one argument signature
(shapes, dtypes, devices, static arguments; see :mod:`~pyro_ebm.energy.traced`),
a :class:`PureDensity`: the traced graph of that signature as the function

.. math::

    (\\theta, v, \\text{further tensor arguments}, h) \\mapsto \\log \\tilde p_\\theta(v, h),

with the parameters :math:`\\theta` passed in explicitly. It reads no global
state (no Pyro message, no module attribute, no param store), so
``torch.func.grad``, ``torch.func.vmap`` and ``torch.compile`` take it as it is:
a score is ``torch.func.grad(lambda x: pure(params, x).sum())(v)``, and a loss
built from it can be differentiated in ``params`` functionally, twice if need be.

A signature that runs on the Pyro path (a model that cannot be traced, see the
fallbacks in :mod:`~pyro_ebm.energy.traced`) has no pure function:
:meth:`~pyro_ebm.energy.EnergyView.pure` raises :class:`NotTraced`, whose
message says why, and callers that compile fall back to their eager step.
"""

from __future__ import annotations

import torch

from .traced import NotTraced, _Stale, _tensor_leaves

__all__ = ["NotTraced", "PureDensity"]


class PureDensity:
    """log p̃ of one traced signature as a function of (parameters, tensors, latents).

    :ivar tuple value_names: the latent sites whose values it takes, in order.
    :ivar bool vmapped: whether chains are vectorized with ``torch.func.vmap``
        over a function written for one draw (``num_chains`` with a model that
        does not broadcast over a chain plate).

    >>> pure = energy_view(grbm.marginal).pure(v, per_item=True)
    >>> params = pure.parameters()              # the live tensors, in the graph's order
    >>> pure(params, v)                          # == view.log_density(v, per_item=True)
    >>> score = torch.func.grad(lambda x: pure(params, x).sum())(v)
    """

    def __init__(self, entry, num_args, vmapped=False):
        self._entry = entry
        self._num_pre = len(entry.pre)
        self._num_args = num_args
        self.value_names = tuple(entry.value_names)
        self.vmapped = vmapped

    def parameters(self) -> list:
        """The tensors the function takes as ``params``, looked up now: the model's
        parameters and buffers (its module's and its submodules'), the
        param-store tensors it reads (unconstrained), and tensors it reaches
        outside its module, in the graph's order. Raises :class:`NotTraced` when
        one of them changed shape or dtype, or is gone (trace again with
        :meth:`~pyro_ebm.energy.EnergyView.pure`)."""
        try:
            return [o.live() for o in self._entry.pre] + [o.live() for o in self._entry.post]
        except _Stale:
            raise NotTraced("a parameter of the traced signature changed shape or dtype, or is gone; "
                            "call EnergyView.pure again") from None

    def __call__(self, params, *args, values=None, **kwargs):
        """log p̃ at ``params`` (aligned with :meth:`parameters`) for arguments of the
        traced signature (the same shapes and static values)."""
        tensors = _tensor_leaves(args, kwargs)
        if len(tensors) != self._num_args:
            raise ValueError(f"the pure density was traced with {self._num_args} tensor argument(s), "
                             f"got {len(tensors)}")
        values = values or {}
        missing = [k for k in self.value_names if k not in values]
        if missing:
            raise ValueError(f"the pure density needs values for the latent site(s) {missing}")
        params = list(params)
        pre, post = params[:self._num_pre], params[self._num_pre:]
        forward = self._entry.forward
        if not self.vmapped:
            return forward(*pre, *tensors, *[values[k] for k in self.value_names], *post)

        def one(*vals):
            return forward(*pre, *tensors, *vals, *post)

        return torch.func.vmap(one, randomness="different")(*[values[k] for k in self.value_names])
