# SPDX-License-Identifier: Apache-2.0
"""Score-matching objectives as Pyro losses.

Each objective is a callable ``loss(model, guide, *args)`` that SVI accepts for a
model with no latent sites (``pyro.infer.SVI(grbm.marginal, lambda v: None,
optim, loss=DSM(0.05))``), and exposes :meth:`ScoreObjective.per_item`, which
takes any score function ``score_fn(x) -> s(x)``; BiSM and VaGES plug their
estimated scores in there. The score is :math:`s(v) = \\nabla_v \\log \\tilde p(v)
= -\\nabla_v E(v)` everywhere.
"""

from __future__ import annotations

import math

import pyro
import torch

from ..energy import (
    basis_vectors,
    check_data,
    check_dtype,
    energy_view,
    exact_trace,
    find_nonfinite,
    hutchinson_trace,
    projection_vectors,
    vjp_trace,
)
from .checks import at_step, check_batch
from .trainer import Trainer, collect_parameters

__all__ = ["DSM", "MDSM", "SSM", "ExactSM", "ScoreMatching", "ScoreObjective", "noise_grid"]


def _flat(x):
    return x.reshape(x.shape[0], -1)


def noise_grid(batch_size, sigma_min, sigma_max, like):
    """Noise levels on a geometric grid from ``sigma_max`` down to ``sigma_min``,
    one per batch position, shaped to broadcast against ``like``."""
    if batch_size == 1:
        sig = torch.full((1,), sigma_max, dtype=like.dtype, device=like.device)
    else:
        sig = torch.exp(torch.linspace(math.log(sigma_max), math.log(sigma_min), batch_size,
                                       dtype=like.dtype, device=like.device))
    return sig.reshape((batch_size,) + (1,) * (like.dim() - 1))


def _pure_score(log_density):
    """``x -> ∇_x Σ_n log p̃(x_n)`` with ``torch.func.grad`` (the items are independent)."""
    return torch.func.grad(lambda x: log_density(x).sum())


class ScoreObjective:
    """Base class: a score-matching objective over the score of a model.

    Subclasses implement :meth:`per_item`. Calling the objective as a Pyro loss
    evaluates ``per_item`` on the model's exact score (no latent sites allowed)
    and averages over the batch. The call turns gradients on inside, since the
    score is a gradient w.r.t. the data: so ``SVI.evaluate_loss``, which runs
    the loss under ``torch.no_grad()``, works and returns the value ``SVI.step``
    would for the same data and random state.
    """

    #: whether the objective evaluates the score at noised data
    noised = False

    def per_item(self, score_fn, v):
        """Objective per data item, shape ``(len(v),)``, given ``score_fn(x) ->
        ∇_x log p̃(x)`` (built with a graph w.r.t. ``x``)."""
        raise NotImplementedError

    def perturb(self, v):
        """The data the objective evaluates scores at (noised for DSM / MDSM)."""
        return v

    def evaluation_point(self, v, noise):
        """Where :meth:`pure_per_item` with the random numbers ``noise`` evaluates
        the score: ``v``, or the noised data for DSM / MDSM."""
        return v

    def draw_noise(self, v):
        """The random numbers one evaluation of :meth:`per_item` on ``v`` draws, drawn
        here, from the same stream and in the same order, as a tuple of tensors
        (for :meth:`pure_per_item`)."""
        return ()

    def pure_per_item(self, log_density, v, noise):
        """:meth:`per_item` written with ``torch.func`` for a pure ``log_density(x) ->
        (N,)`` (e.g. built on :meth:`~pyro_ebm.energy.EnergyView.pure`), with the
        random numbers ``noise`` of :meth:`draw_noise`: the same value, and
        differentiable in ``log_density``'s parameters by ``torch.func.grad``
        (and compilable, which a double backward is not)."""
        raise NotImplementedError(f"{type(self).__name__} has no torch.func form")

    def __call__(self, model, guide, *args, **kwargs):
        if not args:
            raise ValueError(f"{type(self).__name__} needs the data as the model's first argument")
        v, rest = args[0], args[1:]
        check_data(v, "data")  # every batch: one reduction
        view = energy_view(model)
        with torch.enable_grad():  # the score needs ∇_v even under SVI.evaluate_loss's no_grad
            return self._loss(view, model, v, rest, kwargs)

    def _loss(self, view, model, v, rest, kwargs):
        self.check_model(view, model, v, rest, kwargs)

        def score_fn(x):
            return view.score(x, *rest, validate=False, **kwargs)

        return self.per_item(score_fn, v).mean()

    def check_model(self, view, model, v, args=(), kwargs=None):
        """Raise a clear error unless ``model`` (seen through its energy ``view``)
        fits a score-matching loss on the batch ``v``: the data's dtype matches
        the model's parameters, the model has no latent site, and it has a
        ``pyro.factor`` or an observed site that defines an energy."""
        kwargs = kwargs or {}
        rest = args
        check_dtype(v, model, "model")
        st = view.structure(v, *rest, **kwargs)
        if st.latents:
            raise ValueError(
                f"{type(self).__name__} as a Pyro loss needs a model with no latent sites, but the "
                f"model has latent site(s) {sorted(st.latents)}: marginalize them (e.g. "
                "GaussianRBM.marginal) or train with BiSM / VaGES"
            )
        if not st.factors and not st.observed:
            raise ValueError(
                "the model has no pyro.factor or observed sample site, so it defines no energy; "
                "add pyro.factor('energy', -E(v))"
            )

    def evaluate(self, model, v, *args, **kwargs):
        """The objective's value as a float (gradients through the data only)."""
        with torch.enable_grad():
            return float(self(model, None, v, *args, **kwargs).detach())


class ExactSM(ScoreObjective):
    """Exact score matching (Hyvärinen, 2005).

    .. math::

        J(\\theta) = \\mathbb E_{p_\\text{data}}\\Big[\\tfrac12\\|s_\\theta(v)\\|^2
            + \\operatorname{tr}\\nabla_v s_\\theta(v)\\Big]

    The trace is exact (one backward pass per coordinate) up to ``max_exact_dim``
    coordinates and a Hutchinson estimate with ``num_projections`` Rademacher
    vectors above.

    :param int max_exact_dim: largest data dimension with an exact trace.
    :param int num_projections: projections of the Hutchinson estimate otherwise.

    >>> svi = pyro.infer.SVI(grbm.marginal, lambda v: None, optim, loss=ExactSM())

    **References:** A. Hyvärinen, "Estimation of non-normalized statistical models
    by score matching", JMLR 2005.
    """

    def __init__(self, max_exact_dim=64, num_projections=1):
        if max_exact_dim < 0 or num_projections < 1:
            raise ValueError("max_exact_dim must be >= 0 and num_projections >= 1")
        self.max_exact_dim = max_exact_dim
        self.num_projections = num_projections

    def per_item(self, score_fn, v):
        x = v.detach().requires_grad_(True)
        s = score_fn(x)
        if _flat(s).shape[1] <= self.max_exact_dim:
            trace = exact_trace(s, x)
        else:
            trace = hutchinson_trace(s, x, self.num_projections)
        return 0.5 * _flat(s).pow(2).sum(-1) + trace

    def draw_noise(self, v):
        if _flat(v).shape[1] <= self.max_exact_dim:
            return ()
        return projection_vectors(v, self.num_projections)

    def pure_per_item(self, log_density, v, noise):
        s, vjp = torch.func.vjp(_pure_score(log_density), v)
        if noise:
            trace = vjp_trace(vjp, noise)
        else:  # one vector-Jacobian product per coordinate, vectorized
            trace = vjp_trace(vjp, basis_vectors(v), average=False, vectorized=True)
        return 0.5 * _flat(s).pow(2).sum(-1) + trace


class SSM(ScoreObjective):
    """Sliced score matching.

    .. math::

        J(\\theta) = \\mathbb E_{p_\\text{data}}\\mathbb E_u\\Big[\\tfrac12\\|s_\\theta(v)\\|^2
            + u^\\top \\nabla_v\\big(s_\\theta(v)^\\top u\\big)\\Big],
            \\quad u \\sim \\text{Rademacher}

    (the variance-reduced form, with the first term exact).

    :param int num_projections: projection vectors per data item.

    **References:** Y. Song, S. Garg, J. Shi, S. Ermon, "Sliced score matching: a
    scalable approach to density and score estimation", UAI 2019.
    """

    def __init__(self, num_projections=1):
        if num_projections < 1:
            raise ValueError(f"num_projections must be >= 1, got {num_projections}")
        self.num_projections = num_projections

    def per_item(self, score_fn, v):
        x = v.detach().requires_grad_(True)
        s = score_fn(x)
        return 0.5 * _flat(s).pow(2).sum(-1) + hutchinson_trace(s, x, self.num_projections)

    def draw_noise(self, v):
        return projection_vectors(v, self.num_projections)

    def pure_per_item(self, log_density, v, noise):
        s, vjp = torch.func.vjp(_pure_score(log_density), v)
        return 0.5 * _flat(s).pow(2).sum(-1) + vjp_trace(vjp, noise)


class _Denoising(ScoreObjective):
    """What DSM and MDSM share: the score is read at the data noised by
    :meth:`perturb` with one standard normal draw ε per item, and the objective
    per item is :meth:`residual` of that score."""

    noised = True

    def perturb(self, v, eps=None):
        raise NotImplementedError

    def residual(self, s, v, eps):
        """The objective per item given the score ``s`` at ``perturb(v, eps)``."""
        raise NotImplementedError

    def per_item(self, score_fn, v):
        eps = torch.randn_like(v)
        x = self.perturb(v.detach(), eps).requires_grad_(True)
        return self.residual(score_fn(x), v, eps)

    def draw_noise(self, v):
        return (torch.randn_like(v),)

    def evaluation_point(self, v, noise):
        return self.perturb(v, noise[0])

    def pure_per_item(self, log_density, v, noise):
        (eps,) = noise
        return self.residual(_pure_score(log_density)(self.perturb(v, eps)), v, eps)


class DSM(_Denoising):
    """Denoising score matching.

    .. math::

        J(\\theta) = \\mathbb E_{p_\\text{data}(v)}\\mathbb E_{\\epsilon\\sim\\mathcal N(0, I)}
            \\Big[\\tfrac12\\big\\|s_\\theta(v + \\sigma\\epsilon) + \\epsilon/\\sigma\\big\\|^2\\Big]

    Its minimizer is the score of the data convolved with :math:`\\mathcal N(0, \\sigma^2 I)`.

    :param float noise_scale: σ > 0.

    >>> svi = pyro.infer.SVI(grbm.marginal, lambda v: None, optim, loss=DSM(0.05))

    **References:** P. Vincent, "A connection between score matching and denoising
    autoencoders", Neural Computation 2011.
    """

    def __init__(self, noise_scale):
        if not noise_scale > 0:
            raise ValueError(f"noise_scale must be > 0, got {noise_scale}")
        self.noise_scale = float(noise_scale)

    def perturb(self, v, eps=None):
        eps = torch.randn_like(v) if eps is None else eps
        return v + self.noise_scale * eps

    def residual(self, s, v, eps):
        """The objective per item given the score ``s`` at ``perturb(v, eps)``."""
        return 0.5 * _flat(s + eps / self.noise_scale).pow(2).sum(-1)


class MDSM(_Denoising):
    """Multiscale denoising score matching.

    The noise level :math:`\\sigma_i` is fixed per batch position on a geometric
    grid from ``sigma_max`` down to ``sigma_min``:

    .. math::

        J(\\theta) = \\mathbb E\\Big[\\tfrac12\\big\\|s_\\theta(v_i + \\sigma_i\\epsilon)/\\sigma_i
            + \\epsilon/\\sigma_0^2\\big\\|^2\\Big]

    whose minimizer is :math:`s = (\\sigma_i^2/\\sigma_0^2)\\,\\nabla\\log p_{\\sigma_i}`.

    :param float sigma_min: smallest noise level (> 0).
    :param float sigma_max: largest noise level (≥ sigma_min).
    :param float sigma0: the reference scale σ0 > 0.

    **References:** Z. Li, Y. Chen, F. T. Sommer, "Learning energy-based models in
    high-dimensional spaces with multi-scale denoising score matching", 2019.
    """

    def __init__(self, sigma_min=0.05, sigma_max=1.0, sigma0=0.1):
        if not (sigma_min > 0 and sigma_max >= sigma_min and sigma0 > 0):
            raise ValueError(
                f"need 0 < sigma_min <= sigma_max and sigma0 > 0, got sigma_min={sigma_min}, "
                f"sigma_max={sigma_max}, sigma0={sigma0}"
            )
        self.sigma_min, self.sigma_max, self.sigma0 = float(sigma_min), float(sigma_max), float(sigma0)

    def sigmas(self, v):
        return noise_grid(v.shape[0], self.sigma_min, self.sigma_max, v)

    def perturb(self, v, eps=None):
        eps = torch.randn_like(v) if eps is None else eps
        return v + self.sigmas(v) * eps

    def residual(self, s, v, eps):
        """The objective per item given the score ``s`` at ``perturb(v, eps)``."""
        return 0.5 * _flat(s / self.sigmas(v) + eps / self.sigma0**2).pow(2).sum(-1)


class ScoreMatching(Trainer):
    r"""Score matching of an energy-based model with no latent sites: the fast
    path for plain score matching, with the trainer contract of
    :mod:`pyro_ebm.infer.trainer`.

    Each :meth:`step` takes one step of ``optim`` on the model's parameters
    along the gradient of the objective, e.g. for ``DSM(σ)``

    .. math::

        J(\theta) = \frac1N \sum_{n} \tfrac12\big\|s_\theta(v_n + \sigma\epsilon_n)
            + \epsilon_n / \sigma\big\|^2, \qquad s_\theta = \nabla_v \log \tilde p_\theta,

    the same loss as ``pyro.infer.SVI(model, lambda v: None, optim, loss=DSM(σ))``,
    with the model's parameters (``pyro.param`` sites and the parameters of an
    ``nn.Module`` model, plain ``nn.Module`` children included) collected once
    and one torch optimizer over all of them.

    :param callable model: Pyro model ``model(v, *args)`` with a ``pyro.factor``
        (or observed site) inside ``pyro.plate("data", len(v))`` and no latent
        sites, e.g. ``GaussianRBM.marginal``.
    :param pyro.optim.PyroOptim optim: optimizer of the model's parameters.
    :param ScoreObjective objective: ``DSM(0.1)`` (default), ``MDSM()``, ``SSM()`` or ``ExactSM()``.
    :param compile: ``True`` (or a dict of ``torch.compile`` arguments) runs the
        loss and its gradient in the parameters as one compiled pure function:
        the model's traced log density with explicit parameters
        (:meth:`~pyro_ebm.energy.EnergyView.pure`), the score by
        ``torch.func.grad``, the objective's :meth:`~ScoreObjective.pure_per_item`
        and ``torch.func.grad_and_value`` in the parameters; the random numbers
        are drawn eagerly as the eager step draws them, so a compiled and an eager
        trainer give the same numbers from the same seed (to rounding). A model
        that runs on the Pyro path, or a step the compiler refuses, trains
        eagerly after one warning. The first step compiles (seconds on a CPU).

    >>> grbm = GaussianRBM(visible_dim=64, hidden_dim=16)
    >>> sm = ScoreMatching(grbm.marginal, pyro.optim.Adam({"lr": 1e-3}), objective=DSM(0.1))
    >>> loss = sm.step(torch.rand(100, 64))     # a float; sm.last_losses == {"loss": loss}

    **References:** A. Hyvärinen, "Estimation of non-normalized statistical models
    by score matching", JMLR 2005; P. Vincent, "A connection between score matching
    and denoising autoencoders", Neural Computation 2011.
    """

    algorithm = "ScoreMatching"

    def __init__(self, model, optim, objective=None, compile=False):
        if not callable(model):
            raise TypeError(f"model must be a Pyro model (a callable), got {type(model).__name__}")
        objective = DSM(0.1) if objective is None else objective
        if not isinstance(objective, ScoreObjective):
            raise TypeError(
                "objective must be a ScoreObjective such as DSM(0.1), MDSM(), SSM() or ExactSM(), "
                f"got {objective!r}"
            )
        if not isinstance(optim, pyro.optim.PyroOptim):
            raise TypeError(f"optim must be a pyro.optim optimizer (e.g. pyro.optim.Adam({{'lr': 1e-3}})), "
                            f"got {type(optim).__name__}")
        self.model, self.optim, self.objective = model, optim, objective
        self.view = energy_view(model)
        super().__init__({"model": "optim"}, compile=compile)

    def _validate(self, args, kwargs, where):
        v, rest = args[0], args[1:]
        check_batch(v, where)  # every batch: one reduction
        key = (tuple(v.shape), v.dtype, v.device, len(rest), tuple(sorted(kwargs)))
        if key in self._checked:
            return
        with at_step(self.algorithm, where):
            self.objective.check_model(self.view, self.model, v, rest, kwargs)
            self.view.check_model(v, *rest, **kwargs)
        self._checked.add(key)

    def _parameters(self, args, kwargs):
        v, rest = args[0], args[1:]
        found = collect_parameters({"model": [(self.model, lambda: self.model(v, *rest, **kwargs))]})
        if not found["model"]:
            raise ValueError(f"{self.algorithm} found no parameters in the model: make it an nn.Module or "
                             "PyroModule, or declare them with pyro.param / pyro.module")
        return found

    def _loss(self, args, kwargs):
        v, rest = args[0], args[1:]
        view = self.view

        def score_fn(x):
            return view.score(x, *rest, validate=False, **kwargs)

        return self.objective.per_item(score_fn, v).mean()

    def _step(self, args, kwargs):
        if self.compile_options is not None:
            done = self._compiled_step(args, kwargs)
            if done is not None:
                return done
        loss = self._loss(args, kwargs)
        self._watch("model", "the loss", loss)
        self._minimize("model", loss)
        return {"loss": loss}

    def _compiled_step(self, args, kwargs):
        """The step through the compiled pure loss-and-gradient; ``None`` when the
        model has no pure density for this signature (one warning) or the
        compiler refused the step, for the eager step to run."""
        v, rest = args[0], args[1:]
        pure = self._pure(self.view, v, *rest, per_item=True, **kwargs)
        if pure is None:
            return None
        objective = self.objective

        def loss_fn(fns, v, rest, kwargs, noise):
            def log_density(x):
                return fns[0](x, *rest, **kwargs)

            return objective.pure_per_item(log_density, v, noise).mean(), {}

        done = self._compiled_minimize("model", "loss", [pure], loss_fn,
                                       lambda: (v.detach(), rest, kwargs, objective.draw_noise(v)),
                                       f"the {type(objective).__name__} step of {self.algorithm}")
        return None if done is None else {"loss": done[0]}

    def _losses(self, args, kwargs):
        with torch.enable_grad():  # the score is a gradient in the data
            return {"loss": self._loss(args, kwargs).detach()}

    def _diagnose(self, args, kwargs):
        found = find_nonfinite(self.model, (args[0].detach(),) + tuple(args[1:]), kwargs)
        return found or "the model's sites are finite on this batch, so the NaN / Inf arises in the score"
