# SPDX-License-Identifier: Apache-2.0
"""Generalized energy-based models: a generator's base measure reweighted by an energy."""

from __future__ import annotations

import math
import warnings

import pyro
import pyro.distributions as dist
import torch
from pyro.nn import PyroModule

from ..energy import check_finite, energy_view
from ..progress import progress_bar

__all__ = ["GEBM"]


class GEBM(PyroModule):
    r"""A generalized energy-based model (GEBM): a base distribution :math:`G`, the
    pushforward of :math:`\eta = \mathcal N(0, I)` through a generator
    :math:`G_\theta`, reweighted by an energy :math:`E`:

    .. math::

        Q(dx) = \frac{\exp(-E(x) / T)}{Z}\, G(dx), \qquad
        Z = \mathbb E_{z \sim \eta}\big[\exp(-E(G_\theta(z)) / T)\big].

    The base may live on a low-dimensional manifold (no density needed): one
    samples :math:`Q` by drawing the latent from

    .. math::

        \nu(z) \propto \eta(z)\, \exp(-E(G_\theta(z)) / T)

    and pushing it through :math:`G_\theta`. Calling the module, ``gebm(n)``, is
    that latent model as a Pyro model: ``z ~ Normal(0, I)`` in a plate of ``n``
    draws, ``x = pyro.deterministic("x", G(z))`` and
    ``pyro.factor("energy", -E(x) / T)``. Its latent posterior is :math:`\nu`,
    so :func:`pyro_ebm.mcmc.sample` or Pyro's NUTS sample it directly.

    :param torch.nn.Module generator: maps latents ``(..., latent_dim)`` to
        samples ``(..., *event_shape)``.
    :param torch.nn.Module energy: maps samples ``(..., *event_shape)`` to one
        energy per item, shape ``(...)`` or ``(..., 1)``.
    :param int latent_dim: dimension of the latent :math:`z`.
    :param float temperature: the temperature :math:`T > 0` of the energy
        (1 is the model; other values sharpen (``T < 1``) or flatten it and
        are the user's choice).

    >>> gebm = GEBM(MLP(2, 2), MLP(2, 1), latent_dim=2)
    >>> x = gebm.sample(1000, mcmc.UnderdampedLangevin(0.1, friction=1.0), num_steps=200)
    >>> log_z, stderr = gebm.log_partition_estimate(10000)

    **References:** M. Arbel, L. Zhou, A. Gretton, "Generalized Energy Based
    Models", ICLR 2021.
    """

    def __init__(self, generator: torch.nn.Module, energy: torch.nn.Module, latent_dim: int,
                 temperature: float = 1.0):
        super().__init__()
        if not callable(generator) or not callable(energy):
            raise TypeError("generator and energy must be callables (torch.nn.Module)")
        if int(latent_dim) != latent_dim or latent_dim < 1:
            raise ValueError(f"latent_dim must be a positive integer, got {latent_dim}")
        if not (temperature > 0 and math.isfinite(temperature)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
        self.generator = generator
        self.energy = energy
        self.latent_dim = int(latent_dim)
        self.temperature = float(temperature)

    # -- the Pyro model ---------------------------------------------------

    def forward(self, num_samples: int = 1):
        """The latent model: ``num_samples`` draws of ``z`` in the plate
        ``"samples"``, the generated ``x`` as a deterministic site and the
        energy factor. Returns ``x``."""
        # The networks are fetched from _modules, not by attribute: PyroModule's
        # attribute access would issue a pyro.module statement (one pyro.param per
        # weight) on every run, which dominates a sampler's potential evaluations
        # at small sizes; KALE and the samplers reach the weights directly.
        generator = self._modules["generator"]
        loc = self._zeros(self.latent_dim)
        with pyro.plate("samples", num_samples):
            z = pyro.sample("z", dist.Normal(loc, torch.ones_like(loc)).to_event(1))
            x = generator(z)
            energy = self.energy_values(x, batch_shape=z.shape[:-1])
            pyro.deterministic("x", x, event_dim=x.dim() - z.dim() + 1)
            pyro.factor("energy", -energy / self.temperature)
        return x

    # -- pieces used by trainers and samplers ------------------------------

    def energy_values(self, x, batch_shape=None, params=None):
        """The energy :math:`E(x)`, one value per item: shape ``batch_shape``
        (by default ``x.shape[:1]``). An energy network's trailing unit output
        dim is dropped. ``params`` (``{name: tensor}``, names of the energy
        network's ``named_parameters``) stand in for the network's own
        parameters (``torch.func.functional_call``), for a pure function of them."""
        batch_shape = torch.Size(x.shape[:1] if batch_shape is None else batch_shape)
        energy = self._modules["energy"]
        e = energy(x) if params is None else torch.func.functional_call(energy, params, (x,))
        if e.shape == batch_shape + (1,):
            e = e.squeeze(-1)
        if e.shape != batch_shape:
            raise ValueError(
                f"the energy must return one value per item, shape {tuple(batch_shape)} or "
                f"{tuple(batch_shape) + (1,)}, but returned shape {tuple(e.shape)} for input of "
                f"shape {tuple(x.shape)}"
            )
        return e

    def sample_latent(self, num_samples: int):
        """Draws :math:`z \\sim \\mathcal N(0, I)`, shape ``(num_samples, latent_dim)``."""
        return torch.randn((int(num_samples), self.latent_dim), **self._like())

    def sample_base(self, num_samples: int):
        """Draws of the base :math:`G`: :math:`G_\\theta(z)` with
        :math:`z \\sim \\mathcal N(0, I)` (no gradient)."""
        with torch.no_grad():
            return self.generator(self.sample_latent(num_samples))

    def latent_potential(self):
        """The potential :math:`U(z) = -\\log \\nu(z)` (up to a constant) on
        latents ``(C, latent_dim)`` with one chain per draw, the form the
        kernels of :mod:`pyro_ebm.mcmc` take. It is the energy view of this
        model (:meth:`pyro_ebm.energy.EnergyView.latent_potential`) with one
        draw per run."""
        return energy_view(self).latent_potential(1)

    def sample(self, num_samples: int, kernel, num_steps: int, initial=None, return_latent: bool = False,
               progress: bool = False):
        """Samples of :math:`Q`: ``num_samples`` independent chains of ``kernel``
        on the latent posterior :math:`\\nu`, started at base draws
        :math:`z \\sim \\mathcal N(0, I)` (or at ``initial``, shape
        ``(num_samples, latent_dim)``) and run for ``num_steps`` steps; returns
        :math:`G_\\theta(z)` at the last step, shape ``(num_samples, *event_shape)``
        (and the latents if ``return_latent``).

        The chains run through the kernel's own interface,
        ``state = kernel.init(z, U)`` and ``state, info = kernel.step(state)`` on
        :math:`U = -\\log\\nu` (:meth:`latent_potential`), at the kernel's step
        size: there is no warmup adaptation. For step sizes adapted toward a
        target acceptance rate, diagnostics or many draws per chain, run the
        driver on the same potential,
        ``mcmc.sample(potential_fn=gebm.latent_potential(), kernel=kernel, ...,
        initial=z)``. Chains with a divergent (non-finite) step stay where they
        were for that step, and a ``RuntimeWarning`` says how many.

        :param kernel: a kernel of :mod:`pyro_ebm.mcmc` (``ULA``, ``MALA``,
            ``UnderdampedLangevin``, ``HMC``), or any object with
            ``init(position, potential) -> state`` and
            ``step(state) -> (state, info)``.
        :param int num_steps: kernel steps per chain (0 returns base draws).
        :param bool progress: show a progress bar over the steps.
        """
        if int(num_samples) != num_samples or num_samples < 1:
            raise ValueError(f"num_samples must be a positive integer, got {num_samples}")
        if int(num_steps) != num_steps or num_steps < 0:
            raise ValueError(f"num_steps must be a non-negative integer, got {num_steps}")
        if not all(callable(getattr(kernel, attr, None)) for attr in ("init", "step")):
            raise TypeError(f"kernel must have init(position, potential) -> state and "
                            f"step(state) -> (state, info), got {kernel!r}")
        num_samples, num_steps = int(num_samples), int(num_steps)
        if initial is None:
            z = self.sample_latent(num_samples)
        else:
            z = initial.detach()
            if z.shape != (num_samples, self.latent_dim):
                raise ValueError(
                    f"initial latents must have shape ({num_samples}, {self.latent_dim}), "
                    f"got {tuple(z.shape)}"
                )
            check_finite("initial latents", z)
        if num_steps > 0:
            z = self._run_chains(z, kernel, num_steps, progress)
        with torch.no_grad():
            x = self.generator(z)
        check_finite(f"GEBM samples after {num_steps} {type(kernel).__name__} steps", x)
        return (x, z) if return_latent else x

    def _run_chains(self, z, kernel, num_steps, progress):
        """``num_steps`` steps of ``kernel`` from ``z`` on :math:`-\\log\\nu`; the last positions."""
        with torch.no_grad():  # the kernels take their gradients themselves, detached
            state = kernel.init(z, self.latent_potential())
            diverged = torch.zeros(z.shape[0], dtype=torch.bool, device=z.device)
            for _ in progress_bar(range(num_steps), desc="GEBM chains", progress=progress):
                state, info = kernel.step(state)
                diverged |= info.diverging
        num_bad = int(diverged.sum())
        if num_bad:
            warnings.warn(
                f"{num_bad} of {len(diverged)} GEBM latent chains had a non-finite {type(kernel).__name__} "
                "step (they stayed put for that step); lower the kernel's step size",
                RuntimeWarning,
            )
        return state.position

    def log_partition_estimate(self, num_samples: int, batch_size: int = 65536):
        """Monte Carlo estimate of :math:`\\log Z = \\log \\mathbb E_{z\\sim\\eta}
        [\\exp(-E(G_\\theta(z)) / T)]` from ``num_samples`` base draws, by
        logsumexp, with its delta-method standard error
        :math:`\\hat\\sigma_w / (\\sqrt n\\, \\bar w)` over the weights
        :math:`w = \\exp(-E/T)`.

        :returns: ``(log_z, stderr)`` as floats.
        """
        if int(num_samples) != num_samples or num_samples < 2:
            raise ValueError(f"num_samples must be an integer >= 2, got {num_samples}")
        parts = []
        with torch.no_grad():
            left = int(num_samples)
            while left > 0:
                n = min(left, int(batch_size))
                z = self.sample_latent(n)
                parts.append(-self.energy_values(self.generator(z)) / self.temperature)
                left -= n
        log_w = torch.cat(parts)
        check_finite("log-weights -E(G(z))/T of the log-partition estimate", log_w)
        n = log_w.numel()
        log_z = torch.logsumexp(log_w, 0) - math.log(n)
        w = torch.exp(log_w - log_w.max())  # the ratio sd / mean is scale-free
        stderr = w.std() / (math.sqrt(n) * w.mean())
        return float(log_z), float(stderr)

    # -- helpers -----------------------------------------------------------

    def _like(self):
        for tensor in _tensors(self):
            if tensor.is_floating_point():
                return {"dtype": tensor.dtype, "device": tensor.device}
        return {"dtype": torch.get_default_dtype()}

    def _zeros(self, *shape):
        return torch.zeros(shape, **self._like())


def _tensors(module):
    yield from module.parameters()
    yield from module.buffers()
