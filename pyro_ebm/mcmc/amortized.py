# SPDX-License-Identifier: Apache-2.0
"""An amortized sampler: a learned (or fixed) initializer followed by a few
Langevin steps on an energy-based model of the data."""

from __future__ import annotations

import warnings

import torch

from ..energy import check_data, energy_view
from .kernels import ULA, _column, _langevin_move

__all__ = ["AmortizedLangevin"]


class _NoiselessULA(ULA):
    """ULA with the noise switched off: gradient descent
    :math:`x' = x - \\gamma\\nabla U(x)` on the potential (the reference code's
    choice for MCMC teaching; it no longer samples :math:`e^{-U}`)."""

    def step_inputs(self, state):
        return ()

    def move(self, potential_and_grad_fn, x, u, g, step_size, momentum):
        proposal = x - _column(step_size, x) * g
        u_new, g_new = potential_and_grad_fn(proposal)
        return _langevin_move(x, u, g, momentum, proposal, u_new, g_new)


class AmortizedLangevin:
    r"""Draw from an energy-based model by revising an initializer's proposals
    with a fixed, small number of Langevin steps.

    The initializer proposes :math:`x_0 \sim g(\cdot)` (a VAE's decoder, a GEBM's
    base, noise); ``num_steps`` steps of ``kernel`` on the potential
    :math:`U(x) = E(x) = -\log \tilde p(x)` of the Pyro model ``energy_model``
    revise them. With the unadjusted Langevin kernel each step is

    .. math::

        x_{k+1} = x_k - \gamma\,\nabla_x E(x_k) + \sqrt{2\gamma}\,\xi_k,
        \qquad \xi_k \sim \mathcal N(0, I),

    and the draws are :math:`\tilde x = x_K`: a short-run chain whose quality
    rests on the initializer being close to the model (which is what
    :class:`~pyro_ebm.infer.MCMCTeaching` trains it to be). Each item is a chain:
    the potential of ``(C, *event)`` positions is the per-item energy
    ``-EnergyView(energy_model).log_density(x, *args, per_item=True)``.

    :param callable initializer: ``initializer(n, *args, **kwargs)`` returns ``n``
        proposals, a tensor ``(n, *event)``; its output is detached.
    :param callable energy_model: a Pyro model ``energy_model(x, *args, **kwargs)``
        of the data alone (no latent sites), e.g. ``pyro.factor("energy", -E(x))``
        inside ``pyro.plate("data", len(x))``.
    :param kernel: a kernel of :mod:`pyro_ebm.mcmc.kernels` (``ULA``, ``MALA``,
        ``UnderdampedLangevin``, ...).
    :param int num_steps: K ≥ 0 kernel steps per draw.
    :param bool noise: with ``False`` (ULA only) the steps are plain gradient
        descent :math:`x_{k+1} = x_k - \gamma\nabla_x E(x_k)`, the choice of the
        published teaching code; the draws then collapse toward energy minima.

    >>> sampler = AmortizedLangevin(lambda n: torch.rand(n, 64), ebm, mcmc.ULA(0.01), 20)
    >>> x = sampler.sample(100)                           # (100, 64)
    >>> x, path = sampler.sample(100, return_trajectory=True)   # path: (100, 21, 64)

    **References:** J. Xie, Z. Zheng, P. Li, "Learning energy-based model with
    variational auto-encoder as amortized sampler", AAAI 2021; E. Nijkamp, M. Hill,
    S.-C. Zhu, Y. N. Wu, "Learning non-convergent non-persistent short-run MCMC
    toward energy-based model", NeurIPS 2019.
    """

    def __init__(self, initializer, energy_model, kernel, num_steps, noise=True):
        if not callable(initializer):
            raise TypeError(f"initializer must be callable as initializer(n, *args), got "
                            f"{type(initializer).__name__}")
        if not callable(energy_model):
            raise TypeError(f"energy_model must be a Pyro model, got {type(energy_model).__name__}")
        if not (hasattr(kernel, "init") and hasattr(kernel, "step")):
            raise TypeError("kernel must have init(position, potential) -> state and "
                            f"step(state) -> (state, info), got {kernel!r}")
        if not isinstance(num_steps, int) or num_steps < 0:
            raise ValueError(f"num_steps must be an int >= 0, got {num_steps!r}")
        if not noise:
            if type(kernel) not in (ULA, _NoiselessULA):
                raise ValueError(
                    f"noise=False turns unadjusted Langevin into gradient descent and is defined "
                    f"for the ULA kernel only, got {type(kernel).__name__}"
                )
            kernel = _NoiselessULA(kernel.step_size)
        self.initializer = initializer
        self.energy_model = energy_model
        self.kernel = kernel
        self.num_steps = num_steps
        self.noise = bool(noise)
        self._view = energy_view(energy_model)

    def energy(self, x, *args, **kwargs):
        """Per-item energy :math:`E(x) = -\\log \\tilde p(x)`, shape ``(len(x),)``,
        differentiable w.r.t. ``x`` and the model's parameters."""
        return self.potential(*args, **kwargs)(x)

    def potential(self, *args, **kwargs):
        """The kernel's potential :math:`U(x) = E(x)` over positions ``(C, *event)``: the
        energy model's :class:`~pyro_ebm.energy.DataPotential`."""
        return self._view.data_potential(*args, purpose="Langevin revision", **kwargs)

    def revise(self, x0, *args, return_trajectory=False, **kwargs):
        """Run the K kernel steps from the given proposals ``x0`` ``(C, *event)``.

        :returns: the revised draws ``(C, *event)``, and with
            ``return_trajectory=True`` also every state ``(C, K + 1, *event)``
            (chain, step: the ArviZ layout), ``x0`` first.
        """
        check_data(x0, "initial points")
        state = self.kernel.init(x0.detach(), self.potential(*args, **kwargs))
        path = [state.position] if return_trajectory else None
        diverged = torch.zeros(x0.shape[0], dtype=torch.bool, device=x0.device)
        for _ in range(self.num_steps):
            state, info = self.kernel.step(state)
            diverged = diverged | info.diverging
            if return_trajectory:
                path.append(state.position)
        num_bad = int(diverged.sum())
        if num_bad:
            warnings.warn(
                f"{num_bad} of {len(diverged)} chains had a non-finite Langevin step (they stayed "
                f"put for that step); lower the kernel's step size ({self.kernel.step_size})",
                RuntimeWarning,
            )
        x = state.position.detach()
        if return_trajectory:
            return x, torch.stack(path, 1).detach()
        return x

    def sample(self, n, *args, return_trajectory=False, **kwargs):
        """``n`` draws: ``n`` proposals of the initializer revised by K kernel steps.

        ``args`` and ``kwargs`` go to both the initializer and the energy model
        (e.g. class labels ``y`` of shape ``(n,)`` for a conditional model).

        :returns: ``(n, *event)``, and the trajectory ``(n, K + 1, *event)`` when
            ``return_trajectory=True``.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        with torch.no_grad():
            x0 = self.initializer(n, *args, **kwargs)
        if not torch.is_tensor(x0) or x0.dim() < 2 or x0.shape[0] != n:
            got = f"shape {tuple(x0.shape)}" if torch.is_tensor(x0) else type(x0).__name__
            raise ValueError(f"the initializer must return a tensor of shape ({n}, *event), got {got}")
        return self.revise(x0.detach(), *args, return_trajectory=return_trajectory, **kwargs)
