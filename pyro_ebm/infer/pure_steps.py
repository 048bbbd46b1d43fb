# SPDX-License-Identifier: Apache-2.0
"""The steps of BiSM and VaGES written with ``torch.func``, for ``compile=``.

A compiled graph refuses double backward, and score matching differentiates a
score, itself a gradient: so the compiled steps are written functionally, with
the model's log density as a pure function of its parameters
(:meth:`~pyro_ebm.energy.EnergyView.pure`) and the guide's draws and log
density as pure functions of its weights and of the random numbers
(:meth:`~pyro_ebm.energy.GuideView.pure`). Every random number of a step is
drawn eagerly, in the order of the eager step, and passed in, so that a
compiled step and an eager one from the same seed see the same numbers.

:class:`PureParts` holds those functions for one argument signature and maps
their parameter lists to a trainer's levels; :func:`pure_parts` builds them or
raises :class:`~pyro_ebm.energy.NotTraced` with the reason.
"""

from __future__ import annotations

import torch
from torch.func import grad, grad_and_value, vmap

from ..energy import NotTraced
from .score_matching import DSM, MDSM, ScoreObjective

__all__ = ["PureParts", "hypergradient", "lower_grad", "pure_parts", "vages_grad"]


class PureParts:
    """The pure model and guide of one signature of a trainer with ``"model"`` and
    ``"guide"`` levels, and where their parameters sit in those levels."""

    def __init__(self, algo, model, guide, model_one=None):
        self.model, self.guide, self.model_one = model, guide, model_one
        self.L = algo.num_particles
        params = model.parameters()
        level = algo.levels["model"]
        at = {id(p): i for i, p in enumerate(level.params)}
        self.theta_index = [i for i, p in enumerate(params) if id(p) in at]  # in the pure list
        self.theta_level = [at[id(params[i])] for i in self.theta_index]  # in the level
        if not self.theta_index:
            raise NotTraced("the model's traced function reads none of the model level's parameters")
        at = {id(p): i for i, p in enumerate(algo.levels["guide"].params)}
        missing = [n for n, p in zip(guide.names, guide.parameters(), strict=True) if id(p) not in at]
        if missing:
            raise NotTraced(f"the guide's parameters {missing} are not in the guide level")
        self.phi_level = [at[id(p)] for p in guide.parameters()]

    def theta(self):
        """``(all, selected)``: the model function's parameters and those of the model level."""
        params = self.model.parameters()
        return params, [params[i] for i in self.theta_index]

    def with_theta(self, params, selected):
        out = list(params)
        for i, p in zip(self.theta_index, selected, strict=True):
            out[i] = p
        return out

    def model_grads(self, grads, size):
        """Gradients in the selected parameters, aligned with the model level (``size`` entries)."""
        out = [None] * size
        for j, g in zip(self.theta_level, grads, strict=True):
            out[j] = g
        return out

    def guide_grads(self, grads, size):
        out = [None] * size
        for j, g in zip(self.phi_level, grads, strict=True):
            out[j] = g
        return out


def pure_parts(algo, v, rest, kwargs, vages=False):
    """:class:`PureParts` of ``algo`` (a BiSM or VaGES) for the batch ``v``, or raise
    :class:`~pyro_ebm.energy.NotTraced` saying why there is no pure step."""
    if vages and not isinstance(algo.objective, (DSM, MDSM)):
        raise NotTraced(f"the objective {type(algo.objective).__name__} has no pure VaGES form "
                        "(DSM and MDSM have)")
    if type(algo.objective).pure_per_item is ScoreObjective.pure_per_item:
        raise NotTraced(f"the objective {type(algo.objective).__name__} has no pure form (no pure_per_item)")
    L = algo.num_particles
    guide = algo.guide_view.pure(v, *rest, num_particles=L, **kwargs)
    with torch.random.fork_rng(), torch.no_grad():
        values = guide.sample(guide.parameters(), v, *rest, noise=guide.draw(), **kwargs)
    values = {k: x.detach() for k, x in values.items()}
    if vages:
        model = algo.view.pure(v, *rest, values=values, per_item=True, num_chains=L, **kwargs)
        one = {k: x[0] for k, x in values.items()}
        model_one = algo.view.pure(v, *rest, values=one, per_item=True, **kwargs)
        return PureParts(algo, model, guide, model_one)
    model = algo.view.pure(v, *rest, values=values, num_chains=L if L > 1 else None, **kwargs)
    return PureParts(algo, model, guide)


def _lower_loss(kind, parts, theta, phi, x, noise, rest, kwargs):
    """The lower-level loss of :func:`~pyro_ebm.infer.bism.lower_loss`, purely."""
    model, guide = parts.model, parts.guide
    scale = x.shape[0] * parts.L
    values = guide.sample(phi, x, *rest, noise=noise, **kwargs)
    if kind == "kl":
        lq = guide.log_density(phi, x, *rest, values=values, **kwargs)
        return (lq - model(theta, x, *rest, values=values, **kwargs).sum()) / scale
    names = guide.value_names

    def log_ratio(vals):
        vals = dict(zip(names, vals, strict=True))
        return (model(theta, x, *rest, values=vals, **kwargs).sum()
                - guide.log_density(phi, x, *rest, values=vals, **kwargs))

    grads = grad(log_ratio)(tuple(values[n] for n in names))
    return 0.5 * sum(g.pow(2).sum() for g in grads) / scale


def lower_grad(algo, parts, rest, kwargs):
    """``fn(theta, phi, x, noise) -> (loss, grads in phi)``: one lower-level loss
    at the lower level's data ``x`` (the batch, noised for DSM / MDSM) and its
    gradient in the guide's weights."""
    kind = algo.lower

    def fn(theta, phi, x, noise):
        g, loss = grad_and_value(lambda w: _lower_loss(kind, parts, theta, w, x, noise, rest, kwargs))(phi)
        return loss, g

    return fn


def hypergradient(algo, parts, unrolled, rest, kwargs):
    """``fn(selected, theta, phi, state, v, unroll_noise, score_noise, noise) -> (J,
    grads, unrolled losses)``: BiSM's upper loss :math:`J(\\theta, \\phi_N(\\theta))`
    after the unrolled Adam steps (``unrolled``: an
    :class:`~pyro_ebm.infer.unroll.UnrolledAdam`; ``unroll_noise`` holds each
    step's lower-level data and guide noise) and its total derivative in the model
    level's parameters ``selected``. The objective's random numbers ``score_noise``
    (:meth:`~pyro_ebm.infer.ScoreObjective.draw_noise`) fix where the score is
    evaluated; the guide's draw ``noise`` is taken there and held fixed in ``x``."""
    kind, objective, names = algo.lower, algo.objective, parts.guide.names
    model, guide, L = parts.model, parts.guide, parts.L

    def fn(selected, theta_all, phi, state, v, unroll_noise, score_noise, noise):
        def upper(selected):
            theta = parts.with_theta(theta_all, selected)
            w, st, losses = dict(zip(names, phi, strict=True)), state, []
            for x, n_n in unroll_noise:

                def lower(w, x=x, n_n=n_n):
                    return _lower_loss(kind, parts, theta, [w[k] for k in names], x, n_n, rest, kwargs)

                g, loss = grad_and_value(lower)(w)
                w, st = unrolled.update(w, g, st)
                losses.append(loss)
            phi_n = [w[k] for k in names]
            at = objective.evaluation_point(v, score_noise)
            values = guide.sample(phi_n, at, *rest, noise=noise, **kwargs)

            def log_ratio(x):
                return (model(theta, x, *rest, values=values, **kwargs).sum()
                        - guide.log_density(phi_n, x, *rest, values=values, **kwargs)) / L

            J = objective.pure_per_item(log_ratio, v, score_noise).mean()
            return J, (J, losses)

        g, (J, losses) = grad(upper, has_aux=True)(selected)
        return J, g, losses

    return fn


def vages_grad(algo, parts, rest, kwargs):
    """``fn(selected, theta, v, eps, h_a, h_b) -> (J, grads)``: VaGES's objective with
    the VaES of the particles ``h_a`` and its VaGES gradient by the independent
    particles ``h_b`` (see :class:`~pyro_ebm.infer.VaGES`), in the model level's
    parameters ``selected``. The particles are drawn eagerly (they are detached)."""
    objective, model, one, L = algo.objective, parts.model, parts.model_one, parts.L

    def fn(selected, theta_all, v, eps, h_a, h_b):
        x = objective.perturb(v, eps)
        s_a = grad(lambda x: parts.model(theta_all, x, *rest, values=h_a, **kwargs).sum())(x) / L

        def loss(selected):
            theta = parts.with_theta(theta_all, selected)

            def per_particle(h):
                return grad(lambda x: one(theta, x, *rest, values=h, **kwargs).sum())(x)

            g = vmap(per_particle)(h_b)  # (L, N, *event)
            lp = model(theta, x, *rest, values=h_b, **kwargs)  # (L, N)
            mean = g.mean(0)
            weights = ((g - mean) / (L - 1)).detach()
            cov = (weights * lp.reshape(lp.shape + (1,) * (g.dim() - 2))).sum(0)
            t = mean + cov
            s = s_a + (t - t.detach())
            J = objective.residual(s, v, eps).mean()
            return J, J

        g, J = grad(loss, has_aux=True)(selected)
        return J, g

    return fn
