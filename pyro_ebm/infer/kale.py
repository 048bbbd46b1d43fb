# SPDX-License-Identifier: Apache-2.0
"""KALE: adversarial training of a generalized energy-based model."""

from __future__ import annotations

import math

import torch
from pyro.optim import PyroOptim

from ..energy import check_dtype, check_finite, nonfinite_entry
from .checks import at_step, check_batch
from .distributed import log_mean_exp as global_log_mean_exp
from .distributed import world_size
from .trainer import Trainer, module_parameters

__all__ = ["KALE"]


def _log_mean_exp(t):
    return torch.logsumexp(t, 0) - math.log(t.shape[0])


def _autograd_input_grad(energy, x):
    """:math:`\\nabla_x \\sum_i E(x_i)` by autograd, with its graph (the eager penalty)."""
    x = x.detach().requires_grad_(True)
    with torch.enable_grad():
        (grad,) = torch.autograd.grad(energy(x).sum(), x, create_graph=True)
    return grad


def _func_input_grad(energy, x):
    """The same gradient by ``torch.func.grad``: compiled graphs refuse double backward."""
    return torch.func.grad(lambda v: energy(v).sum())(x)


def _names(module, params):
    """The names in ``module.named_parameters()`` of ``params``, for ``functional_call``."""
    by_id = {id(p): name for name, p in module.named_parameters()}
    return [by_id[id(p)] for p in params]


class KALE(Trainer):
    r"""Trains a :class:`~pyro_ebm.models.GEBM` by the KL Approximate Lower-bound
    Estimate (KALE): the energy and a scalar :math:`c` form a critic that
    maximizes a lower bound on :math:`\mathrm{KL}(P \,\|\, G)` between the data
    :math:`P` and the base :math:`G`, and the generator minimizes that bound.

    Critic (energy :math:`E` and scalar :math:`c`), ascend

    .. math::

        \mathcal F(E, c) = 1 - \mathbb E_{x \sim P}[E(x) + c]
            - \mathbb E_{z \sim \eta}\big[\exp(-E(G_\theta(z)) - c)\big]
            - \lambda\, \mathbb E_{\hat x}\big[\|\nabla_{\hat x} E(\hat x)\|^2\big],

    where :math:`\hat x = \alpha x + (1 - \alpha) G_\theta(z)`,
    :math:`\alpha \sim U(0, 1)`, are random interpolates of data and base
    draws. Without the penalty, :math:`\sup_{E, c} \mathcal F` is
    :math:`\mathrm{KL}(P \| G)` when :math:`-\log(dP/dG)` is in the energy
    family, reached at :math:`E = -\log(dP/dG) + \text{const}` and
    :math:`c = \log \mathbb E_G[e^{-E}]`; then the GEBM
    :math:`Q \propto e^{-E} G` equals :math:`P`. The reported ``kale`` is
    :math:`\mathcal F` without the penalty, on the current batch. Generator,
    descend

    .. math::

        \mathcal L(\theta) = -\mathbb E_{x \sim P}[E(x)]
            - \log \mathbb E_{z \sim \eta}\big[\exp(-E(G_\theta(z)))\big],

    the KALE with :math:`c` at its optimum. Every expectation of an exponential
    is a log-mean-exp (``torch.logsumexp``). One :meth:`step` makes
    ``critic_steps`` critic updates (``warmup_critic_steps`` on the first call),
    each on the given batch and fresh base draws, then one generator update.

    Safeguards: :math:`c` starts at the Monte Carlo estimate
    :math:`\log \frac1n \sum_i e^{-E(G_\theta(z_i))}` over ``init_samples`` base
    draws; with ``energy_floor`` set, both objectives see
    :math:`\max(E, E_\text{floor})` so a runaway low energy cannot blow up
    :math:`e^{-E}` (and gets no gradient below the floor); with
    ``c_grad_clip`` set, the gradient of :math:`c` is soft-clipped to
    :math:`\kappa \tanh(g / \kappa)`, which leaves small gradients unchanged and
    bounds large ones (they occur while :math:`c` is far below
    :math:`\log \mathbb E_G[e^{-E}]`). A non-finite loss, gradient or update
    raises :class:`~pyro_ebm.infer.trainer.DivergenceError` naming the step and
    the level (``"critic"`` or ``"generator"``), with every parameter, :math:`c`
    and the optimizer states as before the step. The energy is trained at
    temperature 1; the model's temperature only changes sampling and
    :meth:`GEBM.log_partition_estimate`.

    :param GEBM gebm: the model; its ``energy`` and ``generator`` are trained.
    :param pyro.optim.PyroOptim optim: optimizer of the critic level, the
        energy's parameters and :math:`c`, e.g. ``pyro.optim.Adam({"lr": 1e-4})``.
    :param generator_optim: optimizer of the generator's parameters, or
        ``None`` to keep the base fixed (e.g. a flow trained by maximum
        likelihood) and train the energy alone. A generator without trainable
        parameters (``torch.nn.Identity()``: a plain EBM on a Gaussian base) is
        fixed too; its update is skipped and its loss still reported.
    :type generator_optim: pyro.optim.PyroOptim or None
    :param int critic_steps: critic updates per generator update.
    :param int warmup_critic_steps: critic updates before the first generator
        update (0: ``critic_steps``, as for every later one).
    :param float penalty: weight :math:`\lambda \ge 0` of the gradient penalty.
    :param energy_floor: the floor :math:`E_\text{floor}` of the energy in the
        objectives, or ``None`` for none.
    :type energy_floor: float or None
    :param c_grad_clip: the soft clip :math:`\kappa > 0` of :math:`c`'s
        gradient, or ``None`` for none.
    :type c_grad_clip: float or None
    :param int init_samples: base draws for the initial value of :math:`c`.
    :param compile: ``True`` (or a dict of ``torch.compile`` arguments) runs each
        critic update and each generator update, loss and gradient, as one
        compiled pure function, with the math above unchanged: the energy and
        the generator through ``torch.func.functional_call`` with their
        parameters passed in, the penalty's :math:`\nabla_{\hat x} E` by
        ``torch.func.grad`` (compiled graphs refuse double backward), the
        gradient in the level's parameters by ``torch.func.grad_and_value`` and
        the soft clip of :math:`c`'s gradient inside. The base draws and the
        interpolation weights :math:`\alpha` are drawn eagerly, in the eager
        update's order, so a compiled and an eager trainer give the same numbers
        from the same seed (to rounding); the optimizer steps and the
        divergence checks are the eager ones. An update the compiler refuses
        runs eagerly after one warning. The first step compiles (seconds on a CPU).

    >>> gebm = GEBM(MLP(1, 2), MLP(2, 1), latent_dim=1)
    >>> kale = KALE(gebm, pyro.optim.Adam({"lr": 1e-3, "betas": (0.5, 0.9)}),
    ...             pyro.optim.Adam({"lr": 1e-3, "betas": (0.5, 0.9)}))
    >>> for x in loader:
    ...     loss = kale.step(x)       # the generator loss, a float
    >>> kale.last_losses              # {"critic_loss": ..., "generator_loss": ..., "kale": ...}

    **References:** M. Arbel, L. Zhou, A. Gretton, "Generalized Energy Based
    Models", ICLR 2021.
    """

    algorithm = "KALE"
    main_loss = "generator_loss"
    advice = "lower the learning rates, raise the penalty or set energy_floor"

    def __init__(self, gebm, optim, generator_optim, critic_steps: int = 5,
                 warmup_critic_steps: int = 100, penalty: float = 1.0, energy_floor: float | None = -10.0,
                 c_grad_clip: float | None = 1.0, init_samples: int = 1024, compile=False):
        for name, opt in (("optim", optim), ("generator_optim", generator_optim)):
            if not (isinstance(opt, PyroOptim) or (opt is None and name == "generator_optim")):
                raise TypeError(
                    f"{name} must be a pyro.optim optimizer (e.g. pyro.optim.Adam({{'lr': 1e-3}}))"
                    + (" or None to keep the generator fixed" if name == "generator_optim" else "")
                    + f", got {type(opt).__name__}"
                )
        if int(critic_steps) != critic_steps or critic_steps < 1:
            raise ValueError(f"critic_steps must be an integer >= 1, got {critic_steps}")
        if int(warmup_critic_steps) != warmup_critic_steps or warmup_critic_steps < 0:
            raise ValueError(f"warmup_critic_steps must be an integer >= 0, got {warmup_critic_steps}")
        if not (penalty >= 0 and math.isfinite(penalty)):
            raise ValueError(f"penalty must be a finite number >= 0, got {penalty}")
        if energy_floor is not None and not math.isfinite(energy_floor):
            raise ValueError(f"energy_floor must be finite or None, got {energy_floor}")
        if c_grad_clip is not None and not (c_grad_clip > 0 and math.isfinite(c_grad_clip)):
            raise ValueError(f"c_grad_clip must be a finite number > 0 or None, got {c_grad_clip}")
        if int(init_samples) != init_samples or init_samples < 2:
            raise ValueError(f"init_samples must be an integer >= 2, got {init_samples}")
        self.gebm = gebm
        self.optim = optim
        self.generator_optim = generator_optim
        self.critic_steps = int(critic_steps)
        self.warmup_critic_steps = int(warmup_critic_steps)
        self.penalty = float(penalty)
        self.energy_floor = energy_floor
        self.c_grad_clip = c_grad_clip
        self.init_samples = int(init_samples)
        #: the learned scalar :math:`c` (an estimate of :math:`\log \mathbb E_G[e^{-E}]`)
        self.c = None
        #: generator updates made so far: ``num_steps``
        super().__init__({"critic": "optim", "generator": "generator_optim"}, compile=compile)

    # -- the trainer contract ------------------------------------------------

    def _validate(self, args, kwargs, where):
        if len(args) > 1 or kwargs:
            raise TypeError(f"KALE.{where.split()[0]} takes the data batch only, got {len(args) - 1} more "
                            f"argument(s) and keyword(s) {sorted(kwargs)}")
        self._check_data(args[0], where)

    def _setup(self, args, kwargs):
        if self.c is None:
            self._init_c()

    def _parameters(self, args, kwargs):
        generator = module_parameters(self.gebm.generator, "generator") if self.generator_optim else []
        return {"critic": module_parameters(self.gebm.energy, "energy") + [("c", self.c)],
                "generator": generator}

    def _step(self, args, kwargs):
        """One generator iteration: the critic updates, then the generator update.
        ``last_losses`` holds ``{"critic_loss", "generator_loss", "kale"}``: the
        last critic update's loss (penalty included) and KALE estimate, and the
        generator loss (evaluated, with no update, when the generator is fixed:
        ``generator_optim=None`` or a generator without trainable parameters,
        e.g. ``torch.nn.Identity()`` for a plain EBM on a Gaussian base)."""
        x = args[0].detach()
        warmup = self.num_steps == 0 and self.warmup_critic_steps > 0
        updates = self.warmup_critic_steps if warmup else self.critic_steps
        for k in range(updates):
            critic_loss, kale = self._critic_update(x, k)
        generator_loss = self._generator_update(x)
        return {"critic_loss": critic_loss, "generator_loss": generator_loss, "kale": kale}

    def _losses(self, args, kwargs):
        x = args[0].detach()
        if self.c is None:
            self._init_c()
        x_g, alpha = self._critic_draws(x)
        critic_loss, kale = self._critic_objective(x, x_g, alpha, self.c, self.gebm.energy_values,
                                                   _autograd_input_grad)
        with torch.no_grad():
            generator_loss = self._generator_loss(x, x_g)
        return {"critic_loss": critic_loss.detach(), "generator_loss": generator_loss.detach(),
                "kale": kale.detach()}

    def _diagnose(self, args, kwargs):
        return self._diagnose_terms(args[0].detach(), None)

    # -- public ------------------------------------------------------------

    def critic_step(self, x) -> float:
        """One critic update on ``x`` (no generator update, not counted in
        ``num_steps``); returns the critic loss and keeps ``{"critic_loss",
        "kale"}`` in ``last_losses``."""
        def body(args, kwargs):
            loss, kale = self._critic_update(args[0].detach(), 0)
            return {"critic_loss": loss, "kale": kale}

        self.last_losses = self._run(body, (x,), {}, "critic_step")
        return self.last_losses["critic_loss"]

    # -- the two updates ---------------------------------------------------

    def _compiled(self, key, build, what):
        # a refusal (e.g. a backend that does not exist) stands for both updates: one warning
        if any(getattr(c, "fell_back", False) for c in self._compiled_steps.values()):
            return None
        if world_size() > 1:  # the global log-mean-exp's all_reduce runs eagerly
            return None
        return super()._compiled(key, build, what)

    def _energy(self, x, params=None):
        e = self.gebm.energy_values(x, params=params)
        return e if self.energy_floor is None else e.clamp(min=self.energy_floor)

    def _critic_draws(self, x):
        """A critic update's random numbers, in this order: the base draws
        :math:`G_\\theta(z)`, then (with a penalty) the interpolation weights
        :math:`\\alpha`, one per item."""
        with torch.no_grad():
            x_g = self.gebm.sample_base(len(x))
        if self.penalty == 0:
            return x_g, None
        return x_g, torch.rand((len(x),) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)

    def _critic_objective(self, x, x_g, alpha, c, energy, input_grad):
        """The critic loss :math:`-\\mathcal F + \\lambda\\,\\text{penalty}` and the KALE
        :math:`\\mathcal F`, from ``energy(v)`` (per item, no floor) and
        ``input_grad(energy, v)`` :math:`= \\nabla_v \\sum_i E(v_i)` (autograd
        eagerly, ``torch.func`` when compiled)."""
        e_p = energy(x)
        e_g = energy(x_g)
        if self.energy_floor is not None:
            e_p, e_g = e_p.clamp(min=self.energy_floor), e_g.clamp(min=self.energy_floor)
        kale = 1.0 - (e_p + c).mean() - torch.exp(global_log_mean_exp(-e_g - c))
        if alpha is None:
            return -kale, kale
        grad = input_grad(energy, alpha * x + (1 - alpha) * x_g)
        penalty = grad.reshape(len(x), -1).pow(2).sum(-1).mean()
        return -kale + self.penalty * penalty, kale

    def _clip_last(self, grads):
        grads[-1] = self._clip_c(grads[-1])
        return grads

    def _clip_c(self, grad):
        """The soft clip :math:`\\kappa\\tanh(g / \\kappa)` of :math:`c`'s gradient."""
        if self.c_grad_clip is None or grad is None:
            return grad
        return self.c_grad_clip * torch.tanh(grad / self.c_grad_clip)

    def _critic_update(self, x, k):
        x_g, alpha = self._critic_draws(x)
        where = f"critic update {k}"

        def diagnose():
            return self._diagnose_terms(x, x_g)

        done = self._compiled_critic_update(x, x_g, alpha, where, diagnose)
        if done is not None:
            return done
        loss, kale = self._critic_objective(x, x_g, alpha, self.c, self.gebm.energy_values,
                                            _autograd_input_grad)
        self._watch("critic", "the critic loss", loss, where, diagnose=diagnose)
        critic = self.levels["critic"]
        grads = list(torch.autograd.grad(loss, critic.params, allow_unused=True))
        # c is the level's last parameter; its gradient is clipped after the ranks' mean (a clip is
        # not linear)
        self._apply("critic", grads, where, then=self._clip_last)
        return loss.detach(), kale.detach()

    def _compiled_critic_update(self, x, x_g, alpha, where, diagnose):
        """The critic update through one compiled pure function of (energy
        parameters, c, x, base draws, alpha) returning the loss, the KALE and the
        (clipped) gradients; ``None`` for the eager update (compiling off or refused)."""
        if self.compile_options is None:
            return None
        critic = self.levels["critic"]

        def build():
            names = _names(self.gebm.energy, critic.params[:-1])

            def fn(theta, x, x_g, alpha):
                def loss(theta):
                    params = dict(zip(names, theta[:-1], strict=True))

                    def energy(v):
                        return self.gebm.energy_values(v, params=params)

                    return self._critic_objective(x, x_g, alpha, theta[-1], energy, _func_input_grad)

                grads, (value, kale) = torch.func.grad_and_value(loss, has_aux=True)(theta)
                grads = list(grads)
                grads[-1] = self._clip_c(grads[-1])
                return value, kale, grads

            return fn

        step = self._compiled(("critic", alpha is None), build, f"the critic update of {self.algorithm}")
        if step is None:
            return None
        value, kale, grads = step([p.detach() for p in critic.params], x, x_g, alpha)
        self._watch("critic", "the critic loss", value, where, diagnose=diagnose)
        self._apply("critic", grads, where)
        return value, kale

    def _generator_loss(self, x, x_g, params=None):
        with torch.no_grad():
            data_term = self._energy(x, params).mean()
        return -data_term - global_log_mean_exp(-self._energy(x_g, params))

    def _generator_update(self, x):
        where = "generator update"
        if "generator" not in self.levels:  # a fixed base: evaluate only
            x_g = self.gebm.sample_base(len(x))
            with torch.no_grad():
                loss = self._generator_loss(x, x_g)
            self._watch("generator", "the generator loss", loss, where,
                        diagnose=lambda: self._diagnose_terms(x, x_g))
            return loss
        z = self.gebm.sample_latent(len(x))

        def diagnose():
            with torch.no_grad():
                return self._diagnose_terms(x, self.gebm.generator(z))

        done = self._compiled_generator_update(x, z, where, diagnose)
        if done is not None:
            return done
        loss = self._generator_loss(x, self.gebm.generator(z))
        self._watch("generator", "the generator loss", loss, where, diagnose=diagnose)
        self._minimize("generator", loss, where)
        return loss.detach()

    def _compiled_generator_update(self, x, z, where, diagnose):
        """The generator update through one compiled pure function of (generator
        parameters, energy parameters held fixed, x, z) returning the loss and
        its gradient; ``None`` for the eager update."""
        if self.compile_options is None:
            return None
        generator = self.levels["generator"]
        energy_names = [name for name, _ in self.gebm.energy.named_parameters()]

        def build():
            names = _names(self.gebm.generator, generator.params)

            def fn(theta, energy_params, x, z):
                params = dict(zip(energy_names, energy_params, strict=True))

                def loss(theta):
                    weights = dict(zip(names, theta, strict=True))
                    x_g = torch.func.functional_call(self.gebm.generator, weights, (z,))
                    return self._generator_loss(x, x_g, params)

                grads, value = torch.func.grad_and_value(loss)(theta)
                return value, grads

            return fn

        step = self._compiled("generator", build, f"the generator update of {self.algorithm}")
        if step is None:
            return None
        value, grads = step([p.detach() for p in generator.params],
                            [p.detach() for _, p in self.gebm.energy.named_parameters()], x, z)
        self._watch("generator", "the generator loss", value, where, diagnose=diagnose)
        self._apply("generator", grads, where)
        return value

    # -- checks and set-up -------------------------------------------------

    def _init_c(self):
        """c = log (1/n) sum_i exp(-E(G(z_i))): the optimal c for the current energy."""
        with torch.no_grad():
            x_g = self.gebm.sample_base(self.init_samples)
            c = _log_mean_exp(-self._energy(x_g))
        check_finite("initial c (log-mean-exp of -E over base draws)", c)
        self.c = c.detach().clone().requires_grad_(True)

    def _check_data(self, x, where):
        check_batch(x, where)  # every batch: one reduction
        key = (tuple(x.shape), x.dtype, x.device)
        if key not in self._checked:
            with at_step("KALE", where):
                check_dtype(x, self.gebm, "gebm")
                with torch.no_grad():
                    event = self.gebm.sample_base(1).shape[1:]
                if x.shape[1:] != event:
                    raise ValueError(
                        f"data of shape {tuple(x.shape)} has event shape {tuple(x.shape[1:])}, but the "
                        f"generator outputs samples of event shape {tuple(event)} (latent_dim="
                        f"{self.gebm.latent_dim}); the data and the generator's output must match"
                    )
            self._checked.add(key)
        return x.detach()

    def _diagnose_terms(self, x, x_g):
        """Which term went non-finite: the generator's draws, the energy (the GEBM's
        factor 'energy') on the data or on the draws, or c (fresh base draws when
        ``x_g`` is ``None``)."""
        with torch.no_grad():
            if x_g is None:
                x_g = self.gebm.sample_base(len(x))
            terms = [("the generator's draws G(z)", lambda: x_g),
                     ("the energy (GEBM factor 'energy') on the data", lambda: self.gebm.energy_values(x)),
                     ("the energy (GEBM factor 'energy') on the base draws",
                      lambda: self.gebm.energy_values(x_g)),
                     ("c", lambda: self.c)]
            for what, value in terms:
                found = nonfinite_entry(value())
                if found:
                    return f"{what} is {found}"
        return "the energies and c are finite, so the loss overflowed (e.g. exp(-E - c))"
