# SPDX-License-Identifier: Apache-2.0
"""Warmup adaptation of per-chain step sizes, shared by :func:`~pyro_ebm.mcmc.sample`
and :class:`~pyro_ebm.mcmc.PyroKernel`."""

from __future__ import annotations

import torch
from pyro.ops.dual_averaging import DualAveraging

from .kernels import KernelInfo, KernelState

__all__ = ["StepSizeAdaptation"]


class StepSizeAdaptation:
    r"""Dual averaging of the log step size of every chain toward a target
    acceptance probability δ (Hoffman & Gelman 2014, Algorithm 5), by Pyro's
    :class:`~pyro.ops.dual_averaging.DualAveraging` run once over the ``(C,)``
    tensor of all chains' log step sizes (its arithmetic is elementwise, so each
    chain adapts on its own acceptance probabilities):

    .. math::

        \bar H_t &= \big(1 - \tfrac{1}{t + t_0}\big)\bar H_{t-1} + \tfrac{1}{t + t_0}(\delta - \alpha_t)\\
        \log\epsilon_t &= \mu - \tfrac{\sqrt t}{\gamma}\bar H_t,\qquad
        \log\bar\epsilon_t = t^{-\kappa}\log\epsilon_t + (1 - t^{-\kappa})\log\bar\epsilon_{t-1}

    with the prox center :math:`\mu = \log(10\,\epsilon_0)` per chain and Pyro's
    defaults :math:`t_0 = 10`, :math:`\kappa = 0.75`, :math:`\gamma = 0.05`.
    Warmup steps run at :math:`\epsilon_t`; the last warmup step switches every
    chain to its averaged :math:`\bar\epsilon_t`, which sampling then keeps.

    :param torch.Tensor step_size: ``(C,)`` initial step sizes :math:`\epsilon_0`.
    :param float target_accept_prob: δ in (0, 1).

    >>> adaptation = StepSizeAdaptation(state.step_size, target_accept_prob=0.57)
    >>> for t in range(warmup_steps):
    ...     state, info = kernel.step(state)
    ...     state = adaptation.step(state, info, final=t + 1 == warmup_steps)

    **References:** M. D. Hoffman, A. Gelman, "The No-U-Turn Sampler: adaptively
    setting path lengths in Hamiltonian Monte Carlo", JMLR 2014.
    """

    def __init__(self, step_size: torch.Tensor, target_accept_prob: float, t0=10.0, kappa=0.75, gamma=0.05):
        self.target_accept_prob = float(target_accept_prob)
        self.scheme = DualAveraging(prox_center=torch.log(10 * step_size), t0=t0, kappa=kappa, gamma=gamma)

    @classmethod
    def for_kernel(cls, kernel, state: KernelState, warmup_steps: int):
        """The adaptation of ``kernel``'s chains in ``state``, or ``None`` when there
        is no warmup or the kernel does not adapt (``adapt_step_size`` false)."""
        if not warmup_steps or not getattr(kernel, "adapt_step_size", False):
            return None
        return cls(state.step_size, kernel.target_accept_prob)

    def step(self, state: KernelState, info: KernelInfo, final: bool = False) -> KernelState:
        """Update on ``info.accept_prob`` (of the step that led to ``state``) and
        return the state with the step sizes of the next step: :math:`\\epsilon_t`,
        or the averaged :math:`\\bar\\epsilon_t` when ``final`` (the last warmup
        step)."""
        self.scheme.step(self.target_accept_prob - info.accept_prob)
        log_step_size, log_step_size_avg = self.scheme.get_state()
        return state._replace(step_size=(log_step_size_avg if final else log_step_size).exp())
