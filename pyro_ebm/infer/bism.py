# SPDX-License-Identifier: Apache-2.0
"""Bi-level score matching (BiSM) for energy-based latent variable models."""

from __future__ import annotations

import math
import warnings

import pyro
import torch

from ..energy import (
    GuideView,
    NotTraced,
    check_dtype,
    check_guide_sites,
    energy_view,
    require_reparameterized,
    trace_run,
    trainable_parameters,
)
from .checks import ALL_FINITE, at_step, check_batch, describe_nonfinite
from .distributed import world_size
from .pure_steps import hypergradient, lower_grad, pure_parts
from .score_matching import SSM, ScoreObjective
from .trainer import Trainer, collect_parameters, require_adam
from .unroll import UnrolledAdam, check_unrollable

__all__ = ["BiSM", "lower_loss"]

LOWER = ("kl", "fisher")


def lower_loss(kind, model_view, guide, v, args=(), kwargs=None, num_particles=1):
    r"""The lower-level loss of the guide at data ``v`` (treated as constant), per
    item and particle:

    - ``"kl"``: :math:`\mathbb E_{q_\phi(h|v)}[\log q_\phi(h \mid v) - \log \tilde p_\theta(v, h)]`,
      the KL divergence to the posterior up to :math:`\log p_\theta(v)`;
    - ``"fisher"``: :math:`\mathbb E_{q_\phi}\big[\tfrac12\|\nabla_h \log \tilde p_\theta(v, h)
      - \nabla_h \log q_\phi(h \mid v)\|^2\big]`, the Fisher divergence to the posterior.

    ``h`` is reparameterized, so the loss is differentiable in the guide's
    parameters (and, through them, in anything they depend on).

    :param str kind: ``"kl"`` or ``"fisher"``.
    :param model_view: the model's :class:`~pyro_ebm.energy.EnergyView`.
    :param guide: the guide's :class:`~pyro_ebm.guides.GuideView`.
    """
    kwargs = kwargs or {}
    v = v.detach()
    L = num_particles
    chains = L if L > 1 else None
    if kind == "kl":
        values, lq = guide.sample_and_log_density(v, *args, num_particles=L, **kwargs)
        lp = model_view.log_density(v, *args, values=values, num_chains=chains, **kwargs).sum()
        return (lq - lp) / (v.shape[0] * L)
    values = guide.sample(v, *args, num_particles=L, **kwargs)
    lq = guide.log_density(v, *args, values=values, num_particles=L, **kwargs)
    lp = model_view.log_density(v, *args, values=values, num_chains=chains, **kwargs).sum()
    names = list(values)
    grads = torch.autograd.grad(lp - lq, [values[n] for n in names], create_graph=True, allow_unused=True)
    total = sum(g.pow(2).sum() for g in grads if g is not None)
    return 0.5 * total / (v.shape[0] * L)


def check_lower(kind, model_latents, guide_sites, why):
    """Validate a guide for the lower level ``kind`` with clear errors."""
    if kind not in LOWER:
        raise ValueError(f"lower must be one of {LOWER}, got {kind!r}")
    check_guide_sites(model_latents, guide_sites)
    require_reparameterized(guide_sites.values(), why)
    if kind == "fisher":
        discrete = [f"'{s.name}' ({s.dist_name})" for s in model_latents.values() if s.is_discrete]
        if discrete:
            raise ValueError(
                f"lower='fisher' needs ∇_h log p̃(v, h), but the model's latent site(s) {', '.join(discrete)} "
                "are discrete; use lower='kl'"
            )


def model_and_guide_parameters(algo, v, args, kwargs):
    """``{"model": ..., "guide": ...}``: the parameters of ``algo.model`` and
    ``algo.guide`` (see :func:`~pyro_ebm.infer.trainer.collect_parameters`), the
    model's ``pyro.param`` sites read from a run at the guide's draws."""
    values = {k: x.detach() for k, x in algo.guide_view.sample(v.detach(), *args, **kwargs).items()}
    found = collect_parameters({
        "model": [(algo.model, lambda: trace_run(algo.model, v, *args, values=values, **kwargs))],
        "guide": [(algo.guide, lambda: algo.guide(v, *args, **kwargs))],
    })
    if not found["model"]:
        raise ValueError(f"{algo.algorithm} found no parameters in the model: make it an nn.Module or "
                         "PyroModule, or declare them with pyro.param / pyro.module")
    return found


def inner_steps(alg, data_fn, args, kwargs):
    """``alg.inner_steps`` real steps of the guide's optimizer on the guide's
    parameters with the model frozen, each on fresh data ``data_fn()``; returns
    the losses as 0-d tensors (checked at the end of the step). ``alg`` is a
    trainer with ``lower``, ``view``, ``guide_view``, ``num_particles`` and a
    ``"guide"`` level."""
    losses = []
    for k in range(alg.inner_steps):
        loss = lower_loss(alg.lower, alg.view, alg.guide_view, data_fn(), args, kwargs, alg.num_particles)
        alg._watch("guide", f"the lower-level (inner step {k + 1}) loss", loss)
        alg._minimize("guide", loss, f"inner step {k + 1}")
        losses.append(loss.detach())
    return losses


def loss_and_grads_by_name(algo, level, loss_fn):
    """Evaluate ``loss_fn()`` and return it as a float with its gradients in the
    parameters of ``algo``'s ``level``, ``{name: gradient}`` (param-store names)."""
    params = algo.levels[level]
    with torch.enable_grad():
        loss = loss_fn()
        grads = torch.autograd.grad(loss, params.params, allow_unused=True)
    named = zip(params.names, grads, strict=True)
    return float(loss.detach()), {name: g for name, g in named if g is not None}


def mean_or_nan(losses):
    """The mean of a list of 0-d tensors (``nan`` for none), a 0-d tensor or a float."""
    return torch.stack(losses).mean() if losses else math.nan


def check_model_and_guide(algo, v, args, kwargs, lower=None, why="the guide", where=None):
    """Validate data, model and guide for an algorithm that holds ``algorithm``,
    ``num_steps``, ``model``, ``guide``, ``view``, ``guide_view`` and a
    ``_checked`` set. Every batch: :func:`~pyro_ebm.infer.checks.check_batch`
    (one reduction), naming ``where`` (default: the coming step). Once per
    batch shape: the data's dtype against the model's and guide's parameters,
    the guide's sites equal to the model's latent sites in name, shape and
    support (and fit for the ``lower`` level, when given), and a model energy
    that depends on the data; errors name the algorithm and ``where``."""
    where = where or f"step {algo.num_steps + 1}"
    check_batch(v, where)
    key = (tuple(v.shape), v.dtype, v.device.type, len(args))
    if key in algo._checked:
        return False
    with at_step(algo.algorithm, where):
        check_dtype(v, algo.model, "model")
        check_dtype(v, algo.guide, "guide")
        guide_sites = algo.guide_view.sites(v, *args, **kwargs)
        model_latents = algo.view.structure(v, *args, **kwargs).latents
        if lower is None:
            check_guide_sites(model_latents, guide_sites)
        else:
            check_lower(lower, model_latents, guide_sites, why)
        values = {k: x.detach() for k, x in algo.guide_view.sample(v.detach(), *args, **kwargs).items()}
        algo.view.check_model(v, *args, values=values, **kwargs)
    algo._checked.add(key)
    return True


def signature_key(v, args, kwargs):
    """A batch's signature for the compiled steps' caches (shapes, dtypes, devices, static arguments)."""
    def key(a):
        return (tuple(a.shape), a.dtype, a.device) if torch.is_tensor(a) else (type(a), repr(a))

    return tuple(key(a) for a in (v,) + tuple(args)) + tuple((k, key(a)) for k, a in sorted(kwargs.items()))


def pure_or_none(algo, v, args, kwargs, vages=False):
    """The :class:`~pyro_ebm.infer.pure_steps.PureParts` of ``algo``'s compiled step for
    this batch's signature, or ``None`` (``compile=False``, or no pure step: then
    one ``UserWarning`` per signature says why and the eager step runs)."""
    if algo.compile_options is None:
        return None
    key = signature_key(v, args, kwargs)
    found = algo._pure_parts.get(key)
    if found is None:
        try:
            found = pure_parts(algo, v, args, kwargs, vages=vages)
        except Exception as err:  # noqa: BLE001 - whatever has no pure form, the eager step runs
            found = False
            why = str(err) if isinstance(err, NotTraced) else f"{type(err).__name__}: {err}"
            warnings.warn(f"{algo.algorithm}'s step could not be compiled and runs eagerly: {why}",
                          UserWarning, stacklevel=4)
        algo._pure_parts[key] = found
    return found or None


def compiled_inner_steps(alg, parts, v, args, kwargs):
    """:func:`inner_steps` with the loss and its gradient from a compiled pure
    function (the real optimizer step stays eager); ``None`` after the compiler
    refused it (then the eager :func:`inner_steps` runs)."""
    fn = alg._compiled(("inner", signature_key(v, args, kwargs)),
                       lambda: lower_grad(alg, parts, args, kwargs), f"{alg.algorithm}'s lower-level step")
    if fn is None:
        return None
    size = len(alg.levels["guide"].params)
    v = v.detach()
    theta = [p.detach() for p in parts.theta()[0]]
    losses = []
    for k in range(alg.inner_steps):
        x = alg._lower_data(v)  # the eager step's order: the data's noise, then the guide's
        noise = parts.guide.draw()
        phi = [p.detach() for p in parts.guide.parameters()]
        loss, g = fn(theta, phi, x, noise)
        alg._watch("guide", f"the lower-level (inner step {k + 1}) loss", loss)
        alg._apply("guide", parts.guide_grads(g, size), f"inner step {k + 1}")
        losses.append(loss.detach())
    return losses


def diagnose(algo, v, args, kwargs):
    """Which site of ``algo.guide`` or ``algo.model`` is NaN / Inf on the batch
    ``v`` (a sentence, for a divergence message)."""
    v = v.detach()

    def values():
        return {k: x.detach() for k, x in algo.guide_view.sample(v, *args, **kwargs).items()}

    found = describe_nonfinite(v, args, kwargs, guide=algo.guide, model=algo.model, values=values)
    return found or ALL_FINITE


class BiSM(Trainer):
    r"""Bi-level score matching: learns an EBLVM :math:`p_\theta(v, h) \propto
    \exp(-E_\theta(v, h))` by score matching on its marginal, with the intractable
    posterior replaced by an amortized guide :math:`q_\phi(h \mid v)` trained at a
    lower level.

    For a latent draw :math:`h \sim q_\phi(h \mid \operatorname{sg}(v))`
    (reparameterized in :math:`\phi` only, ``sg`` = stop-gradient), the marginal
    score is estimated by

    .. math::

        s_{\theta,\phi}(v; h) = \nabla_v \log \tilde p_\theta(v, h) - \nabla_v \log q_\phi(h \mid v)
        \quad\Big(= \nabla_v \log p_\theta(v) \text{ when } q_\phi(h \mid v) = p_\theta(h \mid v)\Big),

    and plugged into a score-matching objective :math:`J(\theta, \phi)` (SSM,
    DSM or MDSM). Each :meth:`step`:

    1. *lower level*: ``inner_steps`` = K steps of the guide optimizer on
       :math:`\phi` with :math:`\theta` frozen, minimizing ``lower="kl"``,
       :math:`\mathbb E_q[\log q_\phi(h|v) - \log \tilde p_\theta(v,h)]`, or
       ``lower="fisher"``, :math:`\mathbb E_q[\tfrac12\|\nabla_h \log \tilde
       p_\theta(v,h) - \nabla_h \log q_\phi(h|v)\|^2]` (continuous latents only);
       for DSM / MDSM on freshly noised data;
    2. *unrolling*: ``unroll_steps`` = N differentiable steps of the same Adam
       (same hyperparameters and moment state) from :math:`\phi_K`, giving
       :math:`\phi_N(\theta)`;
    3. *upper level*: one step of ``optim`` on the model's parameters along

       .. math::

           \frac{d}{d\theta} J\big(\theta, \phi_N(\theta)\big)
           = \partial_\theta J + \big(\partial_\theta \phi_N\big)^\top \partial_\phi J,

       which for N = 0 is :math:`\partial_\theta J` at fixed :math:`\phi`.

    Model parameters are updated only at the upper level and guide parameters
    only by the K real lower-level steps: the unrolled weights
    :math:`\phi_N(\theta)` exist only to form the hypergradient and are then
    discarded (the guide keeps :math:`\phi_K` and its optimizer state). Particles
    (``num_particles`` = L draws per item) average the estimated score and the
    lower-level loss.

    :param callable model: Pyro model ``model(v, *args)`` with latent sites and a
        ``pyro.factor`` energy, inside ``pyro.plate("data", len(v))``.
    :param callable guide: Pyro guide over exactly the model's latent sites, with
        reparameterized sites (e.g. :class:`~pyro_ebm.guides.AmortizedBernoulli`);
        an ``nn.Module`` when ``unroll_steps > 0``.
    :param pyro.optim.PyroOptim optim: optimizer of the model's parameters.
    :param ScoreObjective objective: ``SSM()`` (default), ``DSM(sigma)`` or ``MDSM(...)``.
    :param int inner_steps: K, real lower-level steps per step.
    :param int unroll_steps: N, differentiable lower-level steps per step.
    :param str lower: ``"kl"`` or ``"fisher"``.
    :param pyro.optim.PyroOptim guide_optim: optimizer of the guide (default:
        ``optim``; each level builds its own torch optimizer from it, so the
        states stay separate); an Adam or AdamW when ``unroll_steps > 0``.
    :param int num_particles: L, latent draws per data item.
    :param compile: ``False`` (default), ``True`` or a dict of ``torch.compile``
        arguments (e.g. ``{"backend": "aot_eager"}``): compile the lower-level
        loss with its gradient and the hypergradient (unrolled steps included),
        written with ``torch.func`` on the model's traced pure function and the
        guide's (:meth:`~pyro_ebm.energy.GuideView.pure`); the random numbers are
        drawn eagerly, so a compiled step equals an eager one from the same seed
        to rounding. Every built-in objective (DSM, MDSM, SSM, ExactSM) with a
        guide that has ``conditionals`` compiles; anything else runs eagerly
        after one warning.

    >>> grbm = GaussianRBM(visible_dim=2, hidden_dim=4)
    >>> guide = AmortizedBernoulli(visible_dim=2, hidden_dim=4, site="h", temperature=0.1)
    >>> bism = BiSM(grbm, guide, pyro.optim.Adam({"lr": 1e-3, "betas": (0.9, 0.95)}),
    ...             objective=DSM(0.05), inner_steps=5, unroll_steps=5)
    >>> loss = bism.step(torch.randn(100, 2))      # the upper loss J, a float
    >>> bism.last_losses
    {'upper': ..., 'lower': ...}

    Levels: ``"model"`` (``optim``) and ``"guide"`` (``guide_optim``); a
    divergence raises :class:`~pyro_ebm.infer.trainer.DivergenceError` naming
    the step and the level, with every parameter and optimizer state as
    before the step.

    **References:** F. Bao, C. Li, K. Xu, H. Su, J. Zhu, B. Zhang, "Bi-level score
    matching for learning energy-based latent variable models", NeurIPS 2020.
    """

    algorithm = "BiSM"
    main_loss = "upper"

    def __init__(self, model, guide, optim, objective=None, inner_steps=5, unroll_steps=5, lower="kl",
                 guide_optim=None, num_particles=1, compile=False):
        objective = SSM() if objective is None else objective
        if not isinstance(objective, ScoreObjective):
            raise TypeError(
                f"objective must be a ScoreObjective such as SSM(), DSM(0.1) or MDSM(), got {objective!r}"
            )
        for name, value, least in (("inner_steps", inner_steps, 0), ("unroll_steps", unroll_steps, 0),
                                   ("num_particles", num_particles, 1)):
            if not isinstance(value, int) or value < least:
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if lower not in LOWER:
            raise ValueError(f"lower must be one of {LOWER}, got {lower!r}")
        guide_optim = optim if guide_optim is None else guide_optim
        for name, opt in (("optim", optim), ("guide_optim", guide_optim)):
            if not isinstance(opt, pyro.optim.PyroOptim):
                raise TypeError(f"{name} must be a pyro.optim optimizer, got {type(opt).__name__}")
        if unroll_steps > 0:
            check_unrollable(guide, f"{self.algorithm} with unroll_steps={unroll_steps}")
            require_adam(guide_optim, "unrolled guide steps")
        self.model, self.guide, self.optim, self.guide_optim = model, guide, optim, guide_optim
        self.objective, self.lower = objective, lower
        self.inner_steps, self.unroll_steps, self.num_particles = inner_steps, unroll_steps, num_particles
        self.view = energy_view(model)
        self.guide_view = GuideView(guide)
        super().__init__({"model": "optim", "guide": "guide_optim"}, compile=compile)
        self._pure_parts = {}

    # -- the trainer contract ------------------------------------------------

    def _validate(self, args, kwargs, where):
        check_model_and_guide(self, args[0], args[1:], kwargs, lower=self.lower,
                              why=f"{self.algorithm}'s guide", where=where)

    def _parameters(self, args, kwargs):
        return model_and_guide_parameters(self, args[0], args[1:], kwargs)

    def _diagnose(self, args, kwargs):
        return diagnose(self, args[0], args[1:], kwargs)

    def _step(self, args, kwargs):
        v, rest = args[0], args[1:]
        self._level_now = "guide"
        parts = pure_or_none(self, v, rest, kwargs)
        lower = compiled_inner_steps(self, parts, v, rest, kwargs) if parts is not None else None
        if lower is None:
            lower = inner_steps(self, lambda: self._lower_data(v), rest, kwargs)
        if parts is not None:
            out = self._compiled_upper(parts, v, rest, kwargs)
            if out is not None:
                return {"upper": out, "lower": mean_or_nan(lower)}
        unrolled = []
        loss = self._upper_loss(v, rest, kwargs, unrolled)
        for n, x in enumerate(unrolled):
            self._watch("guide", f"the unrolled lower-level (step {n + 1}) loss", x)
        self._watch("model", "the upper-level loss", loss)
        self._minimize("model", loss, "upper-level update")
        return {"upper": loss.detach(), "lower": mean_or_nan(lower)}

    def _compiled_upper(self, parts, v, rest, kwargs):
        """The upper-level update with the hypergradient of a compiled pure function;
        the upper loss, or ``None`` after the compiler refused it, or under a process
        group with unrolled steps (their gradients are averaged over the ranks by a
        collective, which a compiled graph cannot run: the eager upper level runs)."""
        if self.unroll_steps and world_size() > 1:
            return None
        fn = self._compiled(("upper", signature_key(v, rest, kwargs)),
                            lambda: hypergradient(self, parts, _Unrolled(self), rest, kwargs),
                            f"{self.algorithm}'s hypergradient")
        if fn is None:
            return None
        live = parts.guide.parameters()
        phi = [p.detach() for p in live]
        state = None
        if self.unroll_steps:
            self._unrolled = UnrolledAdam(self.levels["guide"].optimizer,
                                          dict(zip(parts.guide.names, live, strict=True)))
            state = {n: {k: torch.as_tensor(x, dtype=torch.float64) if k == "step" else x
                         for k, x in st.items()} for n, st in self._unrolled.state.items()}
        v = v.detach()
        unroll_noise = [(self._lower_data(v), parts.guide.draw()) for _ in range(self.unroll_steps)]
        # the eager step's order: DSM / MDSM draw their noise before the score's
        # guide draw, SSM its projections after it
        if self.objective.noised:
            score_noise, noise = self.objective.draw_noise(v), parts.guide.draw()
        else:
            noise, score_noise = parts.guide.draw(), self.objective.draw_noise(v)
        theta, selected = parts.theta()
        loss, grads, unrolled = fn([p.detach() for p in selected], [p.detach() for p in theta], phi, state, v,
                                   unroll_noise, score_noise, noise)
        for n, x in enumerate(unrolled):
            self._watch("guide", f"the unrolled lower-level (step {n + 1}) loss", x)
        self._watch("model", "the upper-level loss", loss)
        self._apply("model", parts.model_grads(grads, len(self.levels["model"].params)), "upper-level update")
        return loss.detach()

    def _losses(self, args, kwargs):
        v, rest = args[0], args[1:]
        with torch.enable_grad():
            upper = self.objective.per_item(self._score_fn(rest, kwargs), v).mean().detach()
            lower = self._lower_loss(v, rest, kwargs).detach()
        return {"upper": upper, "lower": lower}

    # -- the two levels ----------------------------------------------------

    def _lower_data(self, v):
        v = v.detach()
        return self.objective.perturb(v).detach() if self.objective.noised else v

    def _lower_loss(self, v, args, kwargs):
        return lower_loss(self.lower, self.view, self.guide_view, self._lower_data(v), args, kwargs,
                          self.num_particles)

    def _score_fn(self, args, kwargs):
        L = self.num_particles

        def score_fn(x):
            values = self.guide_view.sample(x.detach(), *args, num_particles=L, **kwargs)
            lp = self.view.log_density(x, *args, values=values, num_chains=L if L > 1 else None,
                                       **kwargs).sum()
            lq = self.guide_view.log_density(x, *args, values=values, num_particles=L, **kwargs)
            (g,) = torch.autograd.grad(lp - lq, x, create_graph=True)
            return g / L

        return score_fn

    def _upper_loss(self, v, args, kwargs, unrolled_losses=None):
        """J(θ, φ_N(θ)) with the unrolled guide; the unrolled lower-level losses
        are added to ``unrolled_losses``."""
        weights = None
        if self.unroll_steps:
            weights = trainable_parameters(self.guide)
            unrolled = UnrolledAdam(self.levels["guide"].optimizer, weights)
            for _ in range(self.unroll_steps):
                with self.guide_view.using(weights):
                    loss = self._lower_loss(v, args, kwargs)
                if unrolled_losses is not None:
                    unrolled_losses.append(loss.detach())
                weights = unrolled.step(loss, weights)
        with self.guide_view.using(weights):
            return self.objective.per_item(self._score_fn(args, kwargs), v).mean()

    # -- public ------------------------------------------------------------

    def score(self, *args, **kwargs) -> torch.Tensor:
        """The estimated marginal score :math:`s_{\\theta,\\phi}(v; h)` at ``v = args[0]``
        with the current guide, averaged over ``num_particles`` draws (no graph)."""
        self._require_data(args, "score")
        v, rest = args[0], args[1:]
        self._validate(args, kwargs, "score")
        with torch.enable_grad():
            x = v.detach().requires_grad_(True)
            return self._score_fn(rest, kwargs)(x).detach()

    def hypergradient(self, *args, **kwargs):
        """The upper loss :math:`J(\\theta, \\phi_N(\\theta))` (a float) and its total
        derivative in the model's parameters, ``{param-store name: gradient}``, at
        the current parameters; nothing is updated and no lower-level step is taken."""
        self._require_data(args, "hypergradient")
        v, rest = args[0], args[1:]
        self._validate(args, kwargs, "hypergradient")
        self._prepare(args, kwargs)
        return loss_and_grads_by_name(self, "model", lambda: self._upper_loss(v, rest, kwargs))


class _Unrolled:
    """The unrolled Adam of the step now (its hyperparameters), for the compiled hypergradient."""

    def __init__(self, algo):
        self.algo = algo

    def update(self, weights, grads, state):
        return self.algo._unrolled.update(weights, grads, state)
