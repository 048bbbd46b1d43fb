# SPDX-License-Identifier: Apache-2.0
"""Variational estimates of the score (VaES) and of its parameter gradient (VaGES)
for energy-based latent variable models, and a critic-based Fisher divergence."""

from __future__ import annotations

import math

import pyro
import torch

from .. import metrics
from ..energy import GuideView, check_data, check_guide_sites, energy_view
from .bism import (
    LOWER,
    check_model_and_guide,
    compiled_inner_steps,
    diagnose,
    inner_steps,
    loss_and_grads_by_name,
    mean_or_nan,
    model_and_guide_parameters,
    pure_or_none,
    signature_key,
)
from .pure_steps import vages_grad
from .score_matching import DSM, MDSM
from .trainer import Trainer

__all__ = ["VaGES", "fisher_divergence", "ksd_halves", "vaes_score"]


def _vaes(view, guide, v, args, kwargs, num_particles, create_graph):
    """E_q[∇_v log p̃(v, h)] by ``num_particles`` detached draws h ~ q(h | v)."""
    L = num_particles
    with torch.no_grad():
        values = guide.sample(v.detach(), *args, num_particles=L, **kwargs)
    x = v if v.requires_grad else v.detach().requires_grad_(True)
    lp = view.log_density(x, *args, values=values, num_chains=L if L > 1 else None, **kwargs).sum()
    (g,) = torch.autograd.grad(lp, x, create_graph=create_graph)
    return g / L


def vaes_score(model, guide, v, num_particles=1, args=(), kwargs=None, create_graph=False):
    r"""The variational estimate of the marginal score (VaES) of an EBLVM:

    .. math::

        \nabla_v \log p_\theta(v)
        = \mathbb E_{p_\theta(h \mid v)}\big[\nabla_v \log \tilde p_\theta(v, h)\big]
        \approx \frac1L \sum_{l=1}^L \nabla_v \log \tilde p_\theta(v, h_l),
        \qquad h_l \sim q_\phi(h \mid v),

    the Fisher identity with the posterior replaced by the guide. The draws are
    detached (no gradient flows into the guide), so the guide's sites may be
    discrete.

    :param callable model: Pyro model ``model(v, *args)`` with latent sites.
    :param callable guide: Pyro guide over exactly the model's latent sites.
    :param torch.Tensor v: data of shape ``(N, *event)``.
    :param int num_particles: L, draws per data item.
    :param tuple args: further model / guide arguments.
    :param dict kwargs: further model / guide keyword arguments.
    :param bool create_graph: keep the graph (for gradients w.r.t. the model's
        parameters or ``v``, when ``v`` requires grad).
    :returns: the estimated score, shape of ``v``.

    >>> s = vaes_score(grbm, guide, v, num_particles=10)

    **References:** F. Bao, K. Xu, C. Li, L. Hong, J. Zhu, B. Zhang, "Variational
    (gradient) estimate of the score function in energy-based latent variable
    models", ICML 2021.
    """
    kwargs = kwargs or {}
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
    check_data(v, "v")
    view, gview = energy_view(model), GuideView(guide)
    check_guide_sites(view.structure(v, *args, **kwargs).latents, gview.sites(v, *args, **kwargs))
    with torch.enable_grad():
        s = _vaes(view, gview, v, args, kwargs, num_particles, create_graph)
    return s if create_graph else s.detach()


def _flat(x):
    return x.reshape(x.shape[0], -1)


def ksd_halves(score_fn, v, bandwidth=None):
    r"""Kernelized Stein discrepancy :math:`\mathrm{KSD}^2` with an RBF kernel, by the
    cross pairs of the two batch halves :math:`A, B` (independent, so unbiased):

    .. math::

        \widehat{\mathrm{KSD}}^2 = \frac{1}{|A||B|} \sum_{i \in A, j \in B} k_{ij}\Big[s_i^\top s_j
            + \frac{(s_i - s_j)^\top (x_i - x_j)}{h^2} + \frac{D}{h^2} - \frac{\|x_i - x_j\|^2}{h^4}\Big],
        \quad k_{ij} = e^{-\|x_i - x_j\|^2 / (2h^2)},

    with the bandwidth :math:`h` given or the median distance between the halves.
    ``score_fn(x)`` returns the scores at ``x``; the estimate is differentiable
    through them. The Stein kernel is :func:`pyro_ebm.metrics.ksd`'s: the cross
    sum comes from its V-statistics over :math:`A \cup B`, :math:`A` and
    :math:`B`, as :math:`\sum_{A \times B} = \tfrac12\big(\sum_{(A \cup B)^2} -
    \sum_{A^2} - \sum_{B^2}\big)` (the Stein kernel is symmetric). Returns NaN
    when a score is not finite (a trainer reports it with the step).
    """
    n = v.shape[0] // 2
    if n < 1:
        raise ValueError(f"the KSD objective needs a batch of at least 2 items, got {v.shape[0]}")
    x = v.detach()[: 2 * n]
    s = score_fn(v.detach())[: 2 * n]
    if not bool(torch.isfinite(s).all()):
        return s.new_full((), math.nan)
    if bandwidth is None:  # the median distance between the halves
        r2 = (_flat(x[:n])[:, None, :] - _flat(x[n:])[None, :, :]).pow(2).sum(-1)
        bandwidth = r2.median().clamp_min(torch.finfo(r2.dtype).tiny).sqrt()
    else:  # a tensor in the data's dtype: metrics.ksd would make a float a float32 tensor
        bandwidth = torch.as_tensor(float(bandwidth), dtype=x.dtype, device=x.device)

    def v_statistic(rows):
        return metrics.ksd(x[rows], s[rows], kernel="rbf", u_statistic=False, bandwidth=bandwidth)

    both, a, b = v_statistic(slice(None)), v_statistic(slice(0, n)), v_statistic(slice(n, None))
    # means: both = (ΣAA + ΣBB + 2ΣAB) / 4n², a = ΣAA / n², b = ΣBB / n²
    return (4 * both - a - b) / 2


class VaGES(Trainer):
    r"""Score matching for EBLVMs with the variational gradient estimate (VaGES) of
    the marginal score's parameter gradient.

    The marginal score :math:`s_\theta(v) = \mathbb E_{p_\theta(h|v)}[\nabla_v \log
    \tilde p_\theta(v, h)]` has the parameter gradient

    .. math::

        \nabla_\theta s_\theta(v)
            = \mathbb E_{p_\theta(h|v)}\big[\nabla_\theta \nabla_v \log \tilde p_\theta(v, h)\big]
            + \operatorname{Cov}_{p_\theta(h|v)}\big(\nabla_v \log \tilde p_\theta(v, h),
            \nabla_\theta \log \tilde p_\theta(v, h)\big),

    and VaGES estimates both terms with ``num_particles`` = L detached draws from
    the guide :math:`q_\phi(h \mid v)` (the covariance by its unbiased sample
    estimate, so L ≥ 2). For an objective :math:`J = \mathbb E\, j(s_\theta(v))`
    (DSM, MDSM, or KSD on batch halves), the model takes a step along

    .. math::

        \widehat{\nabla_\theta J} = \mathbb E\Big[\big(\partial_s j(\hat s_A)\big)^\top
            \widehat{\nabla_\theta s}_B\Big],

    where the upstream vector :math:`\partial_s j` is evaluated at the VaES
    :math:`\hat s_A` of one particle set and held constant, and
    :math:`\widehat{\nabla_\theta s}_B` uses an independent set, so the product is
    unbiased whenever the guide is the posterior. Before each model step,
    ``inner_steps`` = K steps of ``guide_optim`` fit the guide with the model
    frozen (``lower="kl"``: :math:`\mathbb E_q[\log q - \log \tilde p]`; ``"fisher"``
    as in :class:`~pyro_ebm.infer.BiSM`), on noised data for DSM / MDSM.

    :param callable model: Pyro model ``model(v, *args)`` with latent sites.
    :param callable guide: Pyro guide over exactly the model's latent sites
        (reparameterized when ``inner_steps > 0``).
    :param pyro.optim.PyroOptim optim: optimizer of the model's parameters.
    :param objective: ``"dsm"``, ``"mdsm"``, ``"ksd"``, or a ``DSM`` / ``MDSM`` instance.
    :param int num_particles: L ≥ 2 draws per item for each particle set.
    :param int inner_steps: K guide steps per model step.
    :param pyro.optim.PyroOptim guide_optim: the guide's optimizer (default ``optim``).
    :param float noise_scale: σ of ``"dsm"``.
    :param float sigma_min: smallest noise level of ``"mdsm"``.
    :param float sigma_max: largest noise level of ``"mdsm"``.
    :param float sigma0: reference scale of ``"mdsm"``.
    :param float bandwidth: RBF bandwidth of ``"ksd"`` (default: median heuristic).
    :param str lower: ``"kl"`` or ``"fisher"``.
    :param compile: ``False`` (default), ``True`` or a dict of ``torch.compile``
        arguments: compile the objective with its VaGES gradient given the
        particles (drawn eagerly) and the lower-level loss with its gradient,
        written with ``torch.func`` (as :class:`~pyro_ebm.infer.BiSM`'s
        ``compile=``); the KSD objective, a guide without ``conditionals`` or a
        model that is not traced run eagerly after one warning.

    >>> vages = VaGES(grbm, AmortizedBernoulli(2, 4, site="h"), pyro.optim.Adam({"lr": 1e-3}),
    ...               objective="dsm", noise_scale=0.05, num_particles=2, inner_steps=5)
    >>> loss = vages.step(torch.randn(100, 2))   # the objective, a float; vages.last_losses

    Levels: ``"model"`` (``optim``) and ``"guide"`` (``guide_optim``), as in
    :class:`~pyro_ebm.infer.BiSM`.

    **References:** F. Bao, K. Xu, C. Li, L. Hong, J. Zhu, B. Zhang, "Variational
    (gradient) estimate of the score function in energy-based latent variable
    models", ICML 2021.
    """

    algorithm = "VaGES"
    main_loss = "upper"

    def __init__(self, model, guide, optim, objective="dsm", num_particles=2, inner_steps=5, guide_optim=None,
                 noise_scale=0.1, sigma_min=0.05, sigma_max=1.0, sigma0=0.1, bandwidth=None, lower="kl",
                 compile=False):
        if isinstance(objective, (DSM, MDSM)):
            self.objective = objective
        elif objective == "dsm":
            self.objective = DSM(noise_scale)
        elif objective == "mdsm":
            self.objective = MDSM(sigma_min, sigma_max, sigma0)
        elif objective == "ksd":
            self.objective = None
        else:
            raise ValueError(
                f"objective must be 'dsm', 'mdsm', 'ksd' or a DSM / MDSM instance, got {objective!r}"
            )
        if not isinstance(num_particles, int) or num_particles < 2:
            raise ValueError(
                f"num_particles must be an integer >= 2 (VaGES's covariance term needs two draws), "
                f"got {num_particles!r}"
            )
        if not isinstance(inner_steps, int) or inner_steps < 0:
            raise ValueError(f"inner_steps must be an integer >= 0, got {inner_steps!r}")
        if bandwidth is not None and not bandwidth > 0:
            raise ValueError(f"bandwidth must be > 0, got {bandwidth}")
        if lower not in LOWER:
            raise ValueError(f"lower must be one of {LOWER}, got {lower!r}")
        guide_optim = optim if guide_optim is None else guide_optim
        for name, opt in (("optim", optim), ("guide_optim", guide_optim)):
            if not isinstance(opt, pyro.optim.PyroOptim):
                raise TypeError(f"{name} must be a pyro.optim optimizer, got {type(opt).__name__}")
        self.model, self.guide, self.optim, self.guide_optim = model, guide, optim, guide_optim
        self.num_particles, self.inner_steps, self.lower = num_particles, inner_steps, lower
        self.bandwidth = bandwidth
        self.view = energy_view(model)
        self.guide_view = GuideView(guide)
        super().__init__({"model": "optim", "guide": "guide_optim"}, compile=compile)
        self._pure_parts = {}

    # -- the trainer contract ------------------------------------------------

    def _validate(self, args, kwargs, where):
        v = args[0]
        lower = self.lower if self.inner_steps else None
        check_model_and_guide(self, v, args[1:], kwargs, lower=lower,
                              why=f"{self.algorithm}'s lower level (inner_steps > 0)", where=where)
        if self.objective is None and v.shape[0] < 2:
            raise ValueError(f"the KSD objective needs a batch of at least 2 items, got {v.shape[0]}")

    def _parameters(self, args, kwargs):
        return model_and_guide_parameters(self, args[0], args[1:], kwargs)

    def _diagnose(self, args, kwargs):
        return diagnose(self, args[0], args[1:], kwargs)

    def _step(self, args, kwargs):
        """K guide steps, then one model step on the VaGES gradient; the objective
        is evaluated with the VaES."""
        v, rest = args[0], args[1:]
        self._level_now = "guide"
        parts = pure_or_none(self, v, rest, kwargs, vages=True) if self.objective is not None else None
        lower = None
        if parts is not None and self.inner_steps:
            lower = compiled_inner_steps(self, parts, v, rest, kwargs)
        if lower is None:
            lower = inner_steps(self, lambda: self._lower_data(v), rest, kwargs)
        self._level_now = "model"
        loss = self._compiled_loss(parts, v, rest, kwargs) if parts is not None else None
        if loss is None:
            loss = self._loss(v, rest, kwargs)
            self._watch("model", "the upper-level loss", loss)
            self._minimize("model", loss, "upper-level update")
        return {"upper": loss.detach(), "lower": mean_or_nan(lower)}

    def _compiled_loss(self, parts, v, rest, kwargs):
        """The model update with the objective and its VaGES gradient from a compiled
        pure function; the objective, or ``None`` after the compiler refused it."""
        fn = self._compiled(("vages", signature_key(v, rest, kwargs)),
                            lambda: vages_grad(self, parts, rest, kwargs), f"{self.algorithm}'s gradient")
        if fn is None:
            return None
        v = v.detach()
        eps = torch.randn_like(v)  # the eager step's order: the data's noise, then particle sets A and B
        phi = parts.guide.parameters()
        with torch.no_grad():
            x = self.objective.perturb(v, eps)
            h_a = parts.guide.sample(phi, x, *rest, noise=parts.guide.draw(), **kwargs)
            h_b = parts.guide.sample(phi, x, *rest, noise=parts.guide.draw(), **kwargs)
        theta, selected = parts.theta()
        loss, grads = fn([p.detach() for p in selected], [p.detach() for p in theta], v, eps, h_a, h_b)
        self._watch("model", "the upper-level loss", loss)
        self._apply("model", parts.model_grads(grads, len(self.levels["model"].params)), "upper-level update")
        return loss

    def _losses(self, args, kwargs):
        v, rest = args[0], args[1:]
        with torch.enable_grad():
            return {"upper": self._loss(v, rest, kwargs).detach()}

    # -- the objective -------------------------------------------------------

    def _lower_data(self, v):
        v = v.detach()
        return self.objective.perturb(v).detach() if self.objective is not None else v

    def _score_fn(self, args, kwargs):
        """A surrogate score: its value is the VaES of particle set A; its gradient
        in θ, contracted with any upstream vector a, is aᵀ(VaGES of set B)."""
        L = self.num_particles
        view, guide = self.view, self.guide_view

        def score_fn(x):
            x = x.detach()
            s_a = _vaes(view, guide, x, args, kwargs, L, create_graph=False).detach()
            with torch.no_grad():
                values = guide.sample(x, *args, num_particles=L, **kwargs)
            xb = x.clone().requires_grad_(True)
            # (L, N): one row per particle
            lp = view.log_density(xb, *args, values=values, per_item=True, num_chains=L, **kwargs)
            grads = [torch.autograd.grad(lp[i].sum(), xb, create_graph=True, retain_graph=True)[0]
                     for i in range(L)]
            g = torch.stack(grads)  # (L, N, *event)
            mean = g.mean(0)
            weights = ((g - mean) / (L - 1)).detach()
            cov = (weights * lp.reshape(lp.shape + (1,) * (g.dim() - 2))).sum(0)
            t = mean + cov
            return s_a + (t - t.detach())

        return score_fn

    def _loss(self, v, args, kwargs):
        score_fn = self._score_fn(args, kwargs)
        if self.objective is None:
            return ksd_halves(score_fn, v, self.bandwidth)
        return self.objective.per_item(score_fn, v).mean()

    def gradient(self, *args, **kwargs):
        """The objective (a float) and the VaGES gradient by param-store name, at the
        current parameters; nothing is updated."""
        self._require_data(args, "gradient")
        v, rest = args[0], args[1:]
        self._validate(args, kwargs, "gradient")
        self._prepare(args, kwargs)
        return loss_and_grads_by_name(self, "model", lambda: self._loss(v, rest, kwargs))


def fisher_divergence(model, guide, data, num_particles=10, args=(), kwargs=None, **options):
    r"""The critic-based estimate of the Fisher divergence between the data and an
    EBLVM, :func:`pyro_ebm.metrics.fisher_divergence`, with the model's score
    given by its VaES :math:`\hat s(v)` (:func:`vaes_score`, ``num_particles``
    draws of the guide per item); the noise of :math:`\hat s` averages out,
    because the critic depends on :math:`v` only.

    :param callable model: Pyro model with latent sites, or a latent-free model
        when ``guide`` is ``None`` (its exact score is used).
    :param callable guide: guide for the VaES, or ``None``.
    :param torch.Tensor data: samples of :math:`p_\text{data}`, shape ``(N, *event)``.
    :param int num_particles: particles of the VaES.
    :param tuple args: further model / guide arguments.
    :param dict kwargs: further model / guide keyword arguments.
    :param options: the critic's settings, passed to
        :func:`pyro_ebm.metrics.fisher_divergence` (``critic``, ``critic_steps``,
        ``batch_size``, ``lr``, ``hidden``, ``holdout``, ``validation``,
        ``eval_every``, ``max_exact_dim``, ``return_critic``).
    :returns: the estimate (a float), or ``(estimate, critic)``.

    >>> fisher_divergence(grbm, guide, test_data, num_particles=10)

    **References:** F. Bao, K. Xu, C. Li, L. Hong, J. Zhu, B. Zhang, "Variational
    (gradient) estimate of the score function in energy-based latent variable
    models", ICML 2021.
    """
    kwargs = kwargs or {}
    check_data(data, "data")
    if not isinstance(num_particles, int) or num_particles < 1:
        raise ValueError(f"num_particles must be an integer >= 1, got {num_particles!r}")
    if guide is None:
        view = energy_view(model)

        def score(x):
            return view.score(x.detach(), *args, create_graph=False, **kwargs).detach()
    else:
        def score(x):
            return vaes_score(model, guide, x, num_particles, args, kwargs)

    return metrics.fisher_divergence(data, score, **options)
