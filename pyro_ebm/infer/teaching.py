# SPDX-License-Identifier: Apache-2.0
"""Variational MCMC teaching: an EBM and a VAE trained together, the VAE serving
as the EBM's amortized sampler."""

from __future__ import annotations

import math

import torch
from pyro.infer import Trace_ELBO
from pyro.optim import PyroOptim

from ..energy import check_dtype, check_finite, find_nonfinite, observed_site, trace_run
from ..mcmc.amortized import AmortizedLangevin
from .checks import at_step, check_batch, describe_nonfinite
from .trainer import DivergenceError, Trainer, collect_parameters

__all__ = ["MCMCTeaching"]


class MCMCTeaching(Trainer):
    r"""Learn an energy-based model :math:`p_\theta(x) \propto e^{-E_\theta(x)}` by
    maximum likelihood with a VAE as its amortized sampler, and teach the VAE to
    chase the EBM (variational MCMC teaching).

    One :meth:`step` on a data batch :math:`\{x_i\}_{i=1}^N`:

    1. draw :math:`z_j \sim p(z)` from the VAE's prior and take the decoder mean
       :math:`x_{0,j} = \mathbb E[x \mid z_j]`, :math:`j = 1..n`;
    2. revise them with K Langevin steps on the EBM (``kernel``, e.g. ULA):
       :math:`x_{k+1} = x_k - \gamma\nabla_x E_\theta(x_k) + \sqrt{2\gamma}\,\xi_k`,
       giving :math:`\tilde x_j = x_{K,j}`;
    3. one step of ``optim`` on the EBM's parameters along the gradient of

       .. math::

           L(\theta) = \frac1N\sum_i E_\theta(x_i) - \frac1n\sum_j E_\theta(\tilde x_j),

       a Monte Carlo estimate of the negative log-likelihood's gradient
       :math:`\mathbb E_\text{data}[\nabla_\theta E] - \mathbb E_{p_\theta}[\nabla_\theta E]`
       (plus, with ``energy_penalty`` :math:`\alpha > 0`, the regularizer
       :math:`\alpha\,(\overline{E_\theta(x)^2} + \overline{E_\theta(\tilde x)^2})`
       of Du and Mordatch, 2019, which keeps the energies, and so the Langevin
       steps, from running away);
    4. one step of ``vae_optim`` on the VAE's parameters along the gradient of
       Pyro's own ``Trace_ELBO`` on :math:`\tilde x` (the update that
       ``SVI(vae_model, vae_guide, vae_optim, Trace_ELBO()).step`` makes): the
       encoder infers :math:`q_\phi(z \mid \tilde x)` and the VAE maximizes

       .. math::

           \text{ELBO}(\phi; \tilde x) = \mathbb E_{q_\phi(z \mid \tilde x)}
               \big[\log p_\phi(\tilde x \mid z) + \log p(z) - \log q_\phi(z \mid \tilde x)\big],

       so the decoder moves toward where the Langevin steps took its proposals.

    The trained VAE followed by the K steps is an amortized sampler of the EBM
    (:attr:`sampler`, :meth:`sample`). **Conditional models**: extra arguments
    of :meth:`step` and :meth:`sample` (e.g. class labels ``y``) go to the energy
    model, the VAE model and the guide alike: ``energy_model(x, y)``,
    ``vae_model(x, y)``, ``vae_guide(x, y)``.

    **The VAE model's contract.** ``vae_model(x, *args)`` has an observed site
    (``obs=x``) whose distribution's ``.mean`` is the decoder mean, of the same
    shape as ``x``. To draw :math:`x_0` the model is run with a placeholder
    ``x`` of zeros of the data's shape (so it must use ``x`` only as the
    observation and for its batch size), its latent sites drawn from their
    priors, and the observed site's ``.mean`` is read off the trace. The site is
    the model's only observed site, or the one named ``obs_site``.

    **Noise.** Langevin noise is on by default, so the revision targets
    :math:`p_\theta`. ``noise=False`` runs plain gradient descent
    :math:`x_{k+1} = x_k - \gamma\nabla_x E_\theta(x_k)` (ULA only), the choice of
    the published reference code.

    :param callable energy_model: Pyro model ``energy_model(x, *args)`` of the data
        alone: ``pyro.factor("energy", -E(x))`` inside ``pyro.plate("data", len(x))``,
        its network registered with ``pyro.module`` (or a ``PyroModule``).
    :param callable vae_model: the VAE's Pyro model ``vae_model(x, *args)`` (prior and
        decoder likelihood).
    :param callable vae_guide: the VAE's amortized encoder ``vae_guide(x, *args)``.
    :param pyro.optim.PyroOptim optim: optimizer of the EBM's parameters (level ``"energy"``).
    :param pyro.optim.PyroOptim vae_optim: optimizer of the VAE's parameters (level ``"vae"``).
    :param kernel: the Langevin kernel, e.g. ``pyro_ebm.mcmc.ULA(step_size)``.
    :param int num_langevin_steps: K ≥ 0 revision steps.
    :param int num_chains: synthesized samples per step; ``None`` for the batch size.
    :param bool noise: Langevin noise on (default) or off (gradient descent).
    :param float energy_penalty: α ≥ 0, weight of the squared-energy regularizer
        (0, the paper's loss, by default).
    :param str obs_site: name of the VAE model's observed site when it has several.
    :param tuple event_shape: shape of one data item, for :meth:`sample` before any
        :meth:`step` (afterwards the last batch's shape, dtype and device are used).
    :param compile: ``True`` (or a dict of ``torch.compile`` arguments) runs the
        EBM update (step 3: :math:`L(\theta)` with the energy penalty, and its
        gradient in :math:`\theta`) as one compiled pure function, with the math
        unchanged: the energy model's traced log density with explicit
        parameters (:meth:`~pyro_ebm.energy.EnergyView.pure`) on the data and on
        :math:`\tilde x`, differentiated by ``torch.func.grad_and_value``; the
        optimizer step and the divergence checks are the eager ones, so compiled
        and eager trainers give the same numbers from the same seed (to rounding).
        The Langevin revision (step 2, the kernels of :mod:`pyro_ebm.mcmc`) and the
        VAE's ``Trace_ELBO`` update (step 4, a Pyro run of the VAE's model and
        guide) stay eager. An energy model that runs on the Pyro path, or an update
        the compiler refuses, trains eagerly after one warning.

    >>> teaching = MCMCTeaching(ebm, vae.model, vae.guide,
    ...                         pyro.optim.Adam({"lr": 1e-3}), pyro.optim.Adam({"lr": 1e-3}),
    ...                         kernel=mcmc.ULA(step_size=1e-3), num_langevin_steps=20)
    >>> for x in datasets.batches(data, 100, epochs=50):
    ...     loss = teaching.step(x)         # the EBM loss, a float
    >>> teaching.last_losses                # {"ebm_loss", "vae_elbo", "energy_data", ...}
    >>> x = teaching.sample(64)             # VAE proposals revised by 20 Langevin steps

    **References:** J. Xie, Z. Zheng, P. Li, "Learning energy-based model with
    variational auto-encoder as amortized sampler", AAAI 2021; Y. Du, I. Mordatch,
    "Implicit generation and modeling with energy-based models", NeurIPS 2019
    (the energy penalty).
    """

    algorithm = "MCMCTeaching"
    main_loss = "ebm_loss"
    advice = "lower the learning rates or the Langevin step size"

    #: the VAE's loss is Pyro's Trace_ELBO, a sum over the batch
    summed_levels = frozenset({"vae"})

    def __init__(self, energy_model, vae_model, vae_guide, optim, vae_optim, kernel,
                 num_langevin_steps=20, num_chains=None, noise=True, obs_site=None, event_shape=None,
                 energy_penalty=0.0, compile=False):
        for name, fn in (("energy_model", energy_model), ("vae_model", vae_model), ("vae_guide", vae_guide)):
            if not callable(fn):
                raise TypeError(f"{name} must be a Pyro model / guide, got {type(fn).__name__}")
        for name, opt in (("optim", optim), ("vae_optim", vae_optim)):
            if not isinstance(opt, PyroOptim):
                raise TypeError(f"{name} must be a pyro.optim optimizer, got {type(opt).__name__}")
        if num_chains is not None and (not isinstance(num_chains, int) or num_chains < 1):
            raise ValueError(f"num_chains must be None or an int >= 1, got {num_chains!r}")
        self.energy_model, self.vae_model, self.vae_guide = energy_model, vae_model, vae_guide
        self.optim, self.vae_optim = optim, vae_optim
        self.num_chains = num_chains
        self.obs_site = obs_site
        if not (isinstance(energy_penalty, (int, float)) and math.isfinite(energy_penalty)
                and energy_penalty >= 0):
            raise ValueError(f"energy_penalty must be a finite float >= 0, got {energy_penalty!r}")
        self.energy_penalty = float(energy_penalty)
        self.sampler = AmortizedLangevin(self._initial_points, energy_model, kernel, num_langevin_steps,
                                         noise=noise)
        #: the VAE's loss: Pyro's ``Trace_ELBO`` (its ``differentiable_loss``)
        self.elbo = Trace_ELBO()
        self._like = None if event_shape is None else torch.zeros((1,) + tuple(event_shape))
        #: the last step's decoder means :math:`x_0` and revised samples :math:`\tilde x`
        self.last_init = self.last_revised = None
        super().__init__({"energy": "optim", "vae": "vae_optim"}, compile=compile)

    # -- the VAE as initializer -------------------------------------------

    def decoder_mean(self, like, *args, **kwargs):
        """Decoder means :math:`\\mathbb E[x \\mid z]` at fresh prior draws
        :math:`z \\sim p(z)`, one per row of ``like`` (a tensor shaped like the data
        whose values are not used)."""
        try:
            with torch.no_grad():
                trace = trace_run(self.vae_model, like, *args, **kwargs)
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"running the VAE model on a batch shaped like the data {tuple(like.shape)} failed: {err}"
            ) from err
        site = observed_site(trace, self.obs_site, role="VAE model",
                             what="the decoder likelihood, obs=x")
        fn = site["fn"]
        try:
            mean = fn.mean
        except NotImplementedError as err:
            raise ValueError(
                f"the VAE model's observed site '{site['name']}' ({type(fn).__name__}) has no .mean "
                "to use as the decoder mean"
            ) from err
        if tuple(mean.shape) != tuple(like.shape):
            raise ValueError(
                f"the VAE model's observed site '{site['name']}' has decoder output of shape "
                f"{tuple(mean.shape)}, but the data batch has shape {tuple(like.shape)}: the decoder "
                "must produce one item of the data's shape per data item"
            )
        check_finite(f"decoder mean of site '{site['name']}'", mean)
        return mean.to(like.dtype).detach()

    def _initial_points(self, n, *args, **kwargs):
        if self._like is None:
            raise ValueError("the data shape is unknown: call step() first or pass event_shape=...")
        like = self._like.new_zeros((n,) + self._like.shape[1:])
        return self.decoder_mean(like, *args, **kwargs)

    # -- training -----------------------------------------------------------

    # -- the trainer contract ------------------------------------------------

    def _validate(self, args, kwargs, where):
        self._check(args[0], args[1:], kwargs, where)

    def _parameters(self, args, kwargs):
        x, rest = args[0], args[1:]
        found = collect_parameters({
            "energy": [(self.energy_model, lambda: self.energy_model(x, *rest, **kwargs))],
            "vae": [(self.vae_model, None),
                    (self.vae_guide, lambda: self.elbo.differentiable_loss(self.vae_model, self.vae_guide, x,
                                                                           *rest, **kwargs))],
        })
        for level, what in (("energy", "energy model"), ("vae", "VAE model and guide")):
            if not found[level]:
                raise ValueError(f"the {what} has no parameters: register its network with "
                                 "pyro.module(...) or make it a PyroModule")
        return found

    def _diagnose(self, args, kwargs):
        return self._diagnose_batches(args[0], self.last_revised, args[1:], kwargs)

    def _step(self, args, kwargs):
        """One teaching iteration: :meth:`synthesize`, then the EBM update and the
        VAE update. ``last_losses``: ``ebm_loss`` (:math:`L(\\theta)` above),
        ``vae_elbo`` (the ELBO of the revised batch as Pyro's ``Trace_ELBO``
        estimates it), and the mean energies ``energy_data``, ``energy_init``
        (of :math:`x_0`) and ``energy_revised`` (of :math:`\\tilde x`), all at the
        parameters before the update."""
        x, rest = args[0], args[1:]
        x0, x_rev = self._synthesize(x, rest, kwargs, f"step {self.num_steps + 1}", check=False)
        with torch.no_grad():
            e_init = self.sampler.energy(x0, *rest, **kwargs).mean()
        out = self._ebm_update(x, x_rev, rest, kwargs)
        out["vae_elbo"] = -self._vae_update(x_rev, rest, kwargs)
        out["energy_init"] = e_init
        return out

    def _losses(self, args, kwargs):
        x, rest = args[0], args[1:]
        x0, x_rev = self._synthesize(x, rest, kwargs, "evaluate_loss", check=False)
        with torch.no_grad():
            e_data, e_init, e_rev = (self.sampler.energy(v, *rest, **kwargs).mean() for v in (x, x0, x_rev))
            vae_loss = self.elbo.differentiable_loss(self.vae_model, self.vae_guide, x_rev, *rest, **kwargs)
        return {"ebm_loss": e_data - e_rev, "vae_elbo": -vae_loss, "energy_data": e_data,
                "energy_init": e_init, "energy_revised": e_rev}

    def synthesize(self, x, *args, **kwargs):
        """Decoder means :math:`x_0` at fresh prior draws and their Langevin
        revisions :math:`\\tilde x`, both ``(n, *event)`` with ``n = num_chains`` or
        ``len(x)``; also kept as :attr:`last_init` and :attr:`last_revised`."""
        return self._synthesize(x, args, kwargs, "synthesize")

    def _synthesize(self, x, args, kwargs, where, check=True):
        if check:
            self._check(x, args, kwargs, where)
        n = self.num_chains or x.shape[0]
        if n != x.shape[0] and (args or kwargs):
            raise ValueError(
                f"num_chains={n} differs from the batch size {x.shape[0]}, but the models take extra "
                "arguments (e.g. labels) that are per data item; leave num_chains=None"
            )
        self._like = torch.zeros_like(x[:1])
        x0 = self._initial_points(n, *args, **kwargs)
        try:
            x_rev = self.sampler.revise(x0, *args, **kwargs)
        except ValueError as err:  # e.g. a NaN potential: say which site is NaN
            found = find_nonfinite(self.energy_model, (x0,) + tuple(args), kwargs, role="energy model")
            if found is None:
                raise
            # a NaN / Inf energy: a divergence of the energy level (a ValueError)
            raise DivergenceError(f"MCMCTeaching ({where}): the Langevin revision of the decoder means "
                                  f"failed ({str(err).splitlines()[0]}): {found} on the decoder means",
                                  step=self.num_steps + 1, level="energy") from err
        self.last_init, self.last_revised = x0, x_rev
        return x0, x_rev

    def _check(self, x, args, kwargs, where):
        """Every batch: :func:`~pyro_ebm.infer.checks.check_batch`; once per shape:
        the data's dtype against the modules' parameters, the energy model run
        on the data and the VAE model's decoder mean against the data's shape
        (errors name the step)."""
        check_batch(x, where)
        key = (tuple(x.shape), x.dtype, x.device.type, len(args))
        if key in self._checked:
            return
        with at_step("MCMCTeaching", where):
            for role, fn in (("energy_model", self.energy_model), ("vae_model", self.vae_model),
                             ("vae_guide", self.vae_guide)):
                check_dtype(x, fn, role)
            with torch.no_grad():
                self.sampler.energy(x, *args, **kwargs)
            self.decoder_mean(torch.zeros_like(x), *args, **kwargs)
        self._checked.add(key)

    def ebm_step(self, x, x_revised, *args, **kwargs) -> float:
        """One step of ``optim`` on the EBM's parameters along
        :math:`\\nabla_\\theta L(\\theta)` alone (no synthesis, no VAE update, not
        counted in ``num_steps``); returns the EBM loss and keeps
        ``{"ebm_loss", "energy_data", "energy_revised"}`` (before the update) in
        ``last_losses``."""
        def body(a, k):
            return self._ebm_update(a[0], x_revised, a[1:], k)

        self.last_losses = self._run(body, (x,) + args, kwargs, "ebm_step")
        return self.last_losses["ebm_loss"]

    def vae_step(self, x_revised, *args, **kwargs) -> float:
        """One step of ``vae_optim`` on the VAE's parameters along the gradient of
        Pyro's ``Trace_ELBO`` on the revised samples alone (not counted in
        ``num_steps``); returns the ELBO estimate (minus the loss)."""
        def body(a, k):
            return {"vae_elbo": -self._vae_update(a[0], a[1:], k)}

        self.last_losses = self._run(body, (x_revised,) + args, kwargs, "vae_step")
        return self.last_losses["vae_elbo"]

    def _ebm_objective(self, e_data, e_rev):
        """:math:`L(\\theta)` and the objective minimized (with the energy penalty),
        from the per-item energies of the data and of the revised samples."""
        loss = e_data.mean() - e_rev.mean()
        objective = loss
        if self.energy_penalty:
            objective = loss + self.energy_penalty * (e_data.pow(2).mean() + e_rev.pow(2).mean())
        return loss, objective

    def _compiled_ebm_update(self, x, x_revised, args, kwargs):
        """The EBM update through one compiled pure function of the energy model's
        parameters (:meth:`Trainer._compiled_minimize`); ``None`` for the eager
        update (compiling off or refused, or no pure density: one warning)."""
        if self.compile_options is None:
            return None
        view = self.sampler._view
        pure_data = self._pure(view, x, *args, per_item=True, **kwargs)
        if pure_data is None:
            return None
        pure_rev = self._pure(view, x_revised, *args, per_item=True, **kwargs)

        def loss_fn(fns, x, x_revised, args, kwargs):
            e_data, e_rev = -fns[0](x, *args, **kwargs), -fns[1](x_revised, *args, **kwargs)
            loss, objective = self._ebm_objective(e_data, e_rev)
            return objective, {"ebm_loss": loss, "energy_data": e_data.mean(), "energy_revised": e_rev.mean()}

        done = self._compiled_minimize("energy", "ebm", [pure_data, pure_rev], loss_fn,
                                       (x.detach(), x_revised.detach(), args, kwargs),
                                       f"the EBM update of {self.algorithm}", label="the EBM loss")
        return None if done is None else done[1]

    def _ebm_update(self, x, x_revised, args, kwargs):
        self._level_now = "energy"
        done = self._compiled_ebm_update(x, x_revised, args, kwargs)
        if done is not None:
            return done
        e_data = self.sampler.energy(x, *args, **kwargs)
        e_rev = self.sampler.energy(x_revised, *args, **kwargs)
        loss, objective = self._ebm_objective(e_data, e_rev)
        self._watch("energy", "the EBM loss", objective,
                    diagnose=lambda: self._diagnose_batches(x, x_revised, args, kwargs))
        self._minimize("energy", objective)
        return {"ebm_loss": loss.detach(), "energy_data": e_data.detach().mean(),
                "energy_revised": e_rev.detach().mean()}

    def _vae_update(self, x_revised, args, kwargs):
        self._level_now = "vae"
        loss = self.elbo.differentiable_loss(self.vae_model, self.vae_guide, x_revised, *args, **kwargs)

        def diagnose():
            return describe_nonfinite(x_revised, args, kwargs, guide=self.vae_guide, model=self.vae_model,
                                      guide_role="VAE guide", model_role="VAE model")

        self._watch("vae", "the VAE loss (-ELBO)", loss, diagnose=diagnose)
        self._minimize("vae", loss)
        return loss.detach()

    def sample(self, n, *args, return_trajectory=False, **kwargs):
        """``n`` samples of the taught VAE revised by its K Langevin steps on the EBM,
        ``(n, *event)`` (and the trajectory ``(n, K + 1, *event)``, the VAE's decoder
        means first, with ``return_trajectory=True``)."""
        return self.sampler.sample(n, *args, return_trajectory=return_trajectory, **kwargs)

    # -- helpers ------------------------------------------------------------

    def _diagnose_batches(self, x, x_revised, args, kwargs):
        """Which site of the energy model is NaN / Inf, on the data or on the revised samples."""
        for what, batch in (("the data", x), ("the revised samples", x_revised)):
            if batch is None:
                continue
            found = find_nonfinite(self.energy_model, (batch.detach(),) + tuple(args), kwargs,
                                   role="energy model")
            if found:
                return f"{found} on {what}"
        return "the energy model's sites are finite on the data and the revised samples"
