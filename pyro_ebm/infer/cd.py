# SPDX-License-Identifier: Apache-2.0
"""Contrastive divergence (CD-k) and persistent contrastive divergence (PCD-k)."""

from __future__ import annotations

import torch

from ..energy import check_dtype, check_finite, energy_view, find_nonfinite, module_of
from ..mcmc.kernels import ULA
from .checks import at_step, check_batch
from .trainer import DivergenceError, Trainer, collect_parameters

__all__ = ["ContrastiveDivergence"]


def offered_sampler(model):
    """The sampler a model offers for its data, ``model.gibbs_sampler()`` (or that
    of the module whose method ``model`` is, e.g. ``grbm.marginal``), else ``None``."""
    offer = getattr(module_of(model), "gibbs_sampler", None)
    return offer() if callable(offer) else None


def _cd_loss(fns, v, negatives):
    """The CD loss from pure log densities: mean F(v) - mean F(v⁻), F = -log p̃."""
    return fns[-1](negatives).mean() - fns[0](v).mean(), {}


class ContrastiveDivergence(Trainer):
    r"""Maximum-likelihood training of an energy-based model with short-run MCMC
    negatives, shaped like ``pyro.infer.SVI``.

    With the free energy :math:`F_\theta(v) = -\log \tilde p_\theta(v)` (the model's
    unnormalized log density, per item, through the energy view), the
    log-likelihood gradient is
    :math:`-\nabla_\theta F_\theta(v) + \mathbb E_{p_\theta}[\nabla_\theta F_\theta]`.
    CD replaces the model expectation by negatives :math:`v^-` from ``k`` MCMC
    steps and descends

    .. math::

        L(\theta) = \frac1N \sum_{n} F_\theta(v_n) - \frac1C \sum_{c} F_\theta(\operatorname{sg}(v^-_c)),

    with the negatives detached (sg). CD-k starts the chains at the data batch;
    PCD-k (``persistent=True``) keeps ``num_chains`` chains across steps, started
    at rows of the first batch.

    The sampler of the negatives is ``sampler``, any object with the kernel
    interface ``init(position, potential) -> state`` and ``step(state) -> (state,
    info)`` whose state has a ``position``, run ``k`` steps on the potential
    ``F`` (:meth:`~pyro_ebm.energy.EnergyView.data_potential`; chains hold the data
    flattened to ``(C, D)``; persistent chains restart the kernel each step, since
    the potential changed). By default it is the sampler the model offers,
    ``model.gibbs_sampler()`` (a :class:`~pyro_ebm.models.GaussianRBM`, the module
    or its ``.marginal``, offers block Gibbs sweeps ``v → h → v``, and its
    ``F`` is then the analytic free energy of the sampler's ``marginal`` model), else
    ``ULA(step_size=0.01)`` from :mod:`pyro_ebm.mcmc`.

    :param model: a Pyro model ``model(v)`` with a ``pyro.factor`` inside
        ``pyro.plate("data", len(v))`` and no latent sites, or a model that offers a
        sampler (a GaussianRBM or its ``.marginal``).
    :param pyro.optim.PyroOptim optim: optimizer of the model's parameters (param store).
    :param int k: MCMC steps per parameter step (≥ 1).
    :param sampler: a kernel with ``init(position, potential) -> state`` and
        ``step(state) -> (state, info)``; ``None`` for the model's own or ULA.
    :param bool persistent: keep the chains across steps (PCD).
    :param int num_chains: persistent chains (default: the first batch's size).
    :param compile: ``True`` (or a dict of ``torch.compile`` arguments) computes
        :math:`L(\theta)` and its gradient in the parameters as one compiled pure
        function of the model's traced log density
        (:meth:`~pyro_ebm.energy.EnergyView.pure`, ``torch.func.grad_and_value``);
        the negatives are drawn by the sampler as without it, so a compiled and an
        eager trainer give the same numbers from the same seed (to rounding). A
        model that runs on the Pyro path, or a loss the compiler refuses, trains
        eagerly after one warning.

    >>> grbm = GaussianRBM(visible_dim=2, hidden_dim=8)
    >>> cd = ContrastiveDivergence(grbm, pyro.optim.Adam({"lr": 1e-2}), k=1, persistent=True)
    >>> for v in batches(toy("checkerboard", 4096), 128, seed=0, epochs=5):
    ...     loss = cd.step(v)                 # a float; cd.last_losses == {"loss": loss}

    One level, ``"model"`` (``optim``). A divergence raises
    :class:`~pyro_ebm.infer.trainer.DivergenceError` and leaves the parameters,
    the optimizer state and the persistent chains as before the step.

    **References**

    - G. E. Hinton, "Training products of experts by minimizing contrastive
      divergence", Neural Computation 2002.
    - T. Tieleman, "Training restricted Boltzmann machines using approximations
      to the likelihood gradient", ICML 2008 (PCD).
    """

    algorithm = "ContrastiveDivergence"

    def __init__(self, model, optim, k=1, sampler=None, persistent=False, num_chains=None, compile=False):
        if not callable(model):
            raise TypeError(f"model must be callable, got {type(model).__name__}")
        if not isinstance(k, int) or k < 1:
            raise ValueError(f"k (MCMC steps per update) must be an int >= 1, got {k!r}")
        if num_chains is not None:
            if not persistent:
                raise ValueError("num_chains sets the persistent chains: pass persistent=True or drop it")
            if not isinstance(num_chains, int) or num_chains < 1:
                raise ValueError(f"num_chains must be an int >= 1, got {num_chains!r}")
        if sampler is not None and not (hasattr(sampler, "init") and hasattr(sampler, "step")):
            raise TypeError(f"sampler must have init(position, potential) and step(state), got {sampler!r}")
        offered = offered_sampler(model)
        # a model that offers a sampler names the latent-free model it samples (its free energy)
        self.model = getattr(offered, "marginal", model)
        self.view = energy_view(self.model)
        self.free_energy = self.view.data_potential(purpose="ContrastiveDivergence")
        if sampler is None:
            sampler = offered if offered is not None else ULA(step_size=0.01)
        self.optim, self.k, self.persistent = optim, k, persistent
        self.sampler, self.num_chains = sampler, num_chains
        self.chains = None  # persistent chains, (num_chains, *event)
        super().__init__({"model": "optim"}, compile=compile)

    # -- negatives -----------------------------------------------------------

    def _validate(self, args, kwargs, where):
        if len(args) > 1 or kwargs:
            raise TypeError(f"ContrastiveDivergence.{where.split()[0]} takes the data batch only, got "
                            f"{len(args) - 1} more argument(s) and keyword(s) {sorted(kwargs)}")
        self._check(args[0], where)

    def _check(self, v, where):
        check_batch(v, where)  # every batch: one reduction
        key = (tuple(v.shape), v.dtype, v.device)
        if key in self._checked:
            return
        with at_step("ContrastiveDivergence", where):
            self._check_model(v)
        self._checked.add(key)

    def _check_model(self, v):
        check_dtype(v, self.model, "model")
        st = self.view.structure(v)
        if st.latents:
            discrete = sorted(n for n, s in st.latents.items() if s.is_discrete)
            what = (f"discrete latent site(s) {discrete}" if discrete
                    else f"latent site(s) {sorted(st.latents)}")
            raise ValueError(
                f"ContrastiveDivergence needs the model's free energy, but the model has {what}; "
                "sum them out in the model (as GaussianRBM.marginal does), pass a GaussianRBM, "
                "or train with BiSM / VaGES"
            )
        self.view.check_model(v)

    def _diagnose_batches(self, *batches):
        """Which site of the model is NaN / Inf on the first of the named batches
        where one is (for a divergence message)."""
        for what, x in batches:
            found = find_nonfinite(self.model, (x.detach(),))
            if found:
                return f"{found} on the {what}"
        return "the model's sites are finite on the data and the negatives"

    def _start(self, v):
        if not self.persistent:
            return v.detach()
        if self.chains is not None:
            return self.chains
        n = self.num_chains or v.shape[0]
        idx = torch.randint(v.shape[0], (n,), device=v.device) if n > v.shape[0] else (
            torch.randperm(v.shape[0], device=v.device)[:n])
        return v.detach()[idx]

    def negatives(self, v, update=True):
        """Negatives after ``k`` MCMC steps from the data (CD) or the persistent
        chains (PCD, advanced in place when ``update``); detached."""
        x = self._draws(v)
        check_finite("the negatives", x)
        if self.persistent and update:
            self.chains = x
        return x

    def _draws(self, v):
        x = self._start(v)
        event = tuple(x.shape[1:])
        potential = self.view.data_potential(event_shape=event, purpose="ContrastiveDivergence")
        try:
            state = self.sampler.init(x.reshape(x.shape[0], -1), potential)
            for _ in range(self.k):
                state, _ = self.sampler.step(state)
        except RuntimeError as err:  # e.g. NaN hidden probabilities of a Gibbs sweep
            raise DivergenceError(
                f"ContrastiveDivergence diverged at step {self.num_steps + 1}: {type(self.sampler).__name__} "
                f"failed ({err}); {self._diagnose_batches(('data', v))}; lower the learning rate",
                step=self.num_steps + 1, level="model",
            ) from err
        return state.position.reshape((-1,) + event).detach()

    # -- loss and steps --------------------------------------------------------

    def loss(self, v, negatives):
        """:math:`\\overline{F(v)} - \\overline{F(v^-)}` with a graph to the parameters."""
        return self.free_energy(v).mean() - self.free_energy(negatives.detach()).mean()

    def _parameters(self, args, kwargs):
        v = args[0]
        found = collect_parameters({"model": [(self.model, lambda: self.model(v))]})
        if not found["model"]:
            raise ValueError("ContrastiveDivergence found no parameters in the model: make it an nn.Module "
                             "or PyroModule, or declare them with pyro.param / pyro.module")
        return found

    def _save_extra(self):
        return self.chains

    def _load_extra(self, saved):
        self.chains = saved

    def _diagnose(self, args, kwargs):
        batches = [("data", args[0])]
        if self._negatives is not None:
            batches.append(("negatives", self._negatives))
        return self._diagnose_batches(*batches)

    def _step(self, args, kwargs):
        v = args[0]
        self._level_now = "model"
        self._negatives = negatives = self._draws(v)
        self._watch_value("model", "the negatives", negatives)
        if self.persistent:
            self.chains = negatives  # put back if the step diverges
        if self.compile_options is not None:
            done = self._compiled_loss(v, negatives)
            if done is not None:
                return {"loss": done[0]}
        loss = self.loss(v, negatives)
        self._watch("model", "loss", loss)
        self._minimize("model", loss)
        return {"loss": loss.detach()}

    def _compiled_loss(self, v, negatives):
        densities = [self._pure(self.view, v, per_item=True)]
        if negatives.shape != v.shape:
            densities.append(self._pure(self.view, negatives, per_item=True))
        return self._compiled_minimize("model", "cd", densities, _cd_loss, (v.detach(), negatives),
                                       f"the loss of {self.algorithm}", label="loss")

    def _losses(self, args, kwargs):
        v = args[0]
        negatives = self.negatives(v, update=False)
        with torch.no_grad():
            return {"loss": self.loss(v, negatives)}

    _negatives = None
