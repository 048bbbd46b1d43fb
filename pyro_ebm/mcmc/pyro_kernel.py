# SPDX-License-Identifier: Apache-2.0
"""Adapter that runs a pyro_ebm kernel inside Pyro's own MCMC driver."""

from __future__ import annotations

from collections import OrderedDict

import torch
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel

from ..energy import energy_view
from .adaptation import StepSizeAdaptation

__all__ = ["PyroKernel"]


class PyroKernel(MCMCKernel):
    r"""A pyro_ebm kernel (``ULA``, ``MALA``, ``UnderdampedLangevin``, ``HMC``,
    ``AnnealedLangevin``) as a Pyro :class:`~pyro.infer.mcmc.mcmc_kernel.MCMCKernel`,
    so that ``pyro.infer.MCMC`` drives it: one chain over the latent sites of
    ``model``, in the unconstrained space of each site's support,

    .. math::

        U(z) = -\log \tilde p\big(T(z)\big) - \log\big|\det J_T(z)\big|,

    the potential of :meth:`~pyro_ebm.energy.EnergyView.latent_potential`.
    During Pyro's warmup, kernels with ``adapt_step_size`` (MALA, HMC) adapt the
    step size toward their ``target_accept_prob`` by dual averaging, with the
    same :class:`~pyro_ebm.mcmc.adaptation.StepSizeAdaptation` as
    :func:`~pyro_ebm.mcmc.sample`. ``diagnostics()`` reports ``divergences`` (the
    indices of divergent draws) and ``acceptance rate``, so ``MCMC.summary()``
    and ``arviz.from_pyro`` work as with Pyro's own kernels.

    For many chains at once use :func:`pyro_ebm.mcmc.sample`: Pyro's driver runs
    chains one at a time (or in separate processes).

    :param callable model: a Pyro model with continuous latent sites.
    :param kernel: a pyro_ebm kernel instance.

    >>> mcmc = pyro.infer.MCMC(PyroKernel(model, MALA(0.1)), num_samples=500,
    ...                        warmup_steps=200)
    >>> mcmc.run(data)
    >>> mcmc.summary()
    >>> idata = arviz.from_pyro(mcmc)

    **References:** E. Bingham et al., "Pyro: deep universal probabilistic
    programming", JMLR 2019.
    """

    def __init__(self, model, kernel):
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        for attr in ("init", "step"):
            if not callable(getattr(kernel, attr, None)):
                raise TypeError("kernel must have init(position, potential) -> state and "
                                f"step(state) -> (state, info), got {kernel!r}")
        self.model = model
        self.kernel = kernel
        self.transforms = None
        self._initial_params = None
        self._reset()

    def _reset(self):
        self._t = 0
        self._warmup_steps = 0
        self._state = None
        self._params = None
        self._adaptation = None
        self._divergences = []
        self._accept_sum = 0.0

    @property
    def initial_params(self):
        return self._initial_params

    @initial_params.setter
    def initial_params(self, params):
        self._initial_params = params

    def setup(self, warmup_steps, *args, **kwargs):
        self._reset()
        self._warmup_steps = warmup_steps
        self._potential = energy_view(self.model).latent_potential(*args, **kwargs)
        self.transforms = {site.name: site.transform.inv for site in self._potential.sites}
        if self._initial_params is None:
            z = self._potential.sample_prior(1)
        else:
            z = self._pack(self._initial_params)
        with torch.no_grad():
            self._state = self.kernel.init(z, self._potential)
        self._adaptation = StepSizeAdaptation.for_kernel(self.kernel, self._state, warmup_steps)
        self._params = self._unpack(self._state.position)
        self._initial_params = self._params

    def cleanup(self):
        self._initial_params = None
        self._reset()

    def _pack(self, params):
        missing = [site.name for site in self._potential.sites if site.name not in params]
        if missing:
            raise ValueError(f"initial params miss latent site(s) {missing}")
        parts = [params[site.name].detach().reshape(1, -1) for site in self._potential.sites]
        z = torch.cat(parts, -1)
        if z.shape[1] != self._potential.dim:
            raise ValueError(
                f"initial params hold {z.shape[1]} unconstrained values, the model's latent sites "
                f"need {self._potential.dim}"
            )
        return z

    def _unpack(self, z):
        return {site.name: z[0, site.slice].reshape(site.unconstrained_shape)
                for site in self._potential.sites}

    def sample(self, params):
        if params is not self._params:  # the caller moved the chain: restart the kernel there
            with torch.no_grad():
                self._state = self.kernel.init(self._pack(params), self._potential)._replace(
                    step_size=self._state.step_size)
        with torch.no_grad():
            state, info = self.kernel.step(self._state)
        if self._t < self._warmup_steps:
            if self._adaptation is not None:
                state = self._adaptation.step(state, info, final=self._t + 1 == self._warmup_steps)
        else:
            if bool(info.diverging[0]):
                self._divergences.append(self._t - self._warmup_steps)
            self._accept_sum += float(info.accept_prob[0])
        self._t += 1
        self._state = state
        self._params = self._unpack(state.position)
        return self._params

    def logging(self):
        draws = max(self._t - self._warmup_steps, 0)
        return OrderedDict([
            ("step size", f"{float(self._state.step_size[0]):.2e}"),
            ("acc. prob", f"{self._accept_sum / draws:.3f}" if draws else "-"),
        ])

    def diagnostics(self):
        draws = max(self._t - self._warmup_steps, 1)
        return {"divergences": list(self._divergences), "acceptance rate": self._accept_sum / draws}
