# SPDX-License-Identifier: Apache-2.0
"""The Gaussian–Bernoulli restricted Boltzmann machine as a Pyro model."""

from __future__ import annotations

import math
from typing import NamedTuple

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.nn import PyroModule, pyro_method

from ..energy import check_finite

__all__ = ["GaussianRBM", "GibbsInfo", "GibbsSampler", "GibbsState"]

MAX_EXACT_HIDDEN = 20
_CHUNK = 1 << 14  # hidden states enumerated per chunk by log_partition


class GaussianRBM(PyroModule):
    r"""Gaussian–Bernoulli RBM with real visible units ``v`` and binary hidden units ``h``.

    .. math::

        E(v, h) = \tfrac12 \big\|(v - b) / \sigma\big\|^2 - c^\top h - v^\top W h,
        \qquad p(v, h) = \exp(-E(v, h)) / Z

    Summing out ``h`` gives the free energy, :math:`p(v) = \exp(-F(v)) / Z`, with

    .. math::

        F(v) = \tfrac12 \big\|(v - b) / \sigma\big\|^2
            - \sum_j \operatorname{softplus}\big(c_j + (v^\top W)_j\big).

    Calling ``grbm(v)`` runs the joint Pyro model: inside ``pyro.plate("data", N)``
    it draws ``h ~ Bernoulli(1/2)`` and adds ``pyro.factor("energy", -E(v, h))``
    (the base measure is a constant). :meth:`marginal` is the latent-free model
    with the factor ``-F(v)``. The conditionals are
    :math:`p(h_j = 1 \mid v) = \operatorname{sigmoid}(c_j + (v^\top W)_j)` and
    :math:`p(v \mid h) = \mathcal N(b + \sigma^2 \odot W h, \operatorname{diag}\sigma^2)`,
    which give block Gibbs sampling. ``log_std`` holds :math:`\log\sigma`.

    ``W`` starts with entries drawn from :math:`\mathcal N(0, s^2)`, ``s = init_scale`` (0.01 as in Hinton's
    practical guide: small enough for the model to start near the Gaussian
    :math:`\mathcal N(b, \sigma^2)`, nonzero to break the symmetry between hidden
    units); ``b``, ``c`` and ``log_std`` start at zero. Parameters register in
    Pyro's param store by their names (``W``, ``b``, ``c``, ``log_std``, prefixed
    by ``name``): give two models in one process different names.

    :param int visible_dim: number of visible units D.
    :param int hidden_dim: number of hidden units H.
    :param float init_scale: standard deviation of the initial weights.
    :param str name: prefix of the parameter names in the param store.

    >>> grbm = GaussianRBM(visible_dim=2, hidden_dim=8).double()
    >>> v = torch.randn(100, 2, dtype=torch.float64)
    >>> grbm.log_likelihood(v).shape
    torch.Size([100])
    >>> from pyro_ebm.infer import DSM
    >>> svi = pyro.infer.SVI(grbm.marginal, lambda v: None, pyro.optim.Adam({"lr": 1e-2}), loss=DSM(0.05))

    **References**

    - G. E. Hinton, "A practical guide to training restricted Boltzmann
      machines", UTML TR 2010-003.
    - R. M. Neal, "Annealed importance sampling", Statistics and Computing 2001;
      R. Salakhutdinov and I. Murray, "On the quantitative analysis of deep
      belief networks", ICML 2008 (AIS for RBMs).
    """

    def __init__(self, visible_dim: int, hidden_dim: int, init_scale: float = 0.01, name: str = ""):
        if visible_dim < 1 or hidden_dim < 1:
            raise ValueError(f"visible_dim and hidden_dim must be >= 1, got {visible_dim} and {hidden_dim}")
        if not init_scale >= 0:
            raise ValueError(f"init_scale must be >= 0, got {init_scale}")
        super().__init__(name)
        self.visible_dim, self.hidden_dim = int(visible_dim), int(hidden_dim)
        self.W = torch.nn.Parameter(init_scale * torch.randn(visible_dim, hidden_dim))
        self.b = torch.nn.Parameter(torch.zeros(visible_dim))
        self.c = torch.nn.Parameter(torch.zeros(hidden_dim))
        self.log_std = torch.nn.Parameter(torch.zeros(visible_dim))

    # -- energies ----------------------------------------------------------

    def _quadratic(self, v):
        if v.shape[-1:] != (self.visible_dim,):  # a Python compare, no sync
            raise ValueError(
                f"GaussianRBM has visible_dim={self.visible_dim}, so data must have shape "
                f"(batch, {self.visible_dim}), but got data of shape {tuple(v.shape)}"
            )
        return 0.5 * ((v - self.b) / self.log_std.exp()).pow(2).sum(-1)

    def energy(self, v, h):
        """E(v, h) per item; ``h`` may carry leading dims, e.g. ``(C, N, H)`` with
        ``v`` of shape ``(N, D)``, giving ``(C, N)``."""
        return self._quadratic(v) - (h * self.c).sum(-1) - (h * (v @ self.W)).sum(-1)

    def free_energy(self, v, beta=1.0):
        """F(v) per item (``h`` summed out). ``beta`` scales the interaction
        ``W`` (the AIS path; 1 is the model)."""
        return self._quadratic(v) - F.softplus(self.c + beta * (v @ self.W)).sum(-1)

    def forward(self, v):
        """The joint Pyro model: ``h ~ Bernoulli(1/2)`` per item and the factor
        ``-E(v, h)`` inside ``pyro.plate("data", N)``; returns ``h``."""
        ones = self.c.new_ones(self.hidden_dim)
        with pyro.plate("data", v.shape[0]):
            h = pyro.sample("h", dist.Bernoulli(0.5 * ones).to_event(1))
            pyro.factor("energy", -self.energy(v, h))
        return h

    @pyro_method
    def marginal(self, v):
        """The latent-free Pyro model with factor ``-F(v)``, for score matching."""
        with pyro.plate("data", v.shape[0]):
            pyro.factor("free_energy", -self.free_energy(v))

    # -- block Gibbs -------------------------------------------------------

    def hidden_probs(self, v, beta=1.0):
        """:math:`p(h = 1 \\mid v) = \\operatorname{sigmoid}(c + \\beta v^\\top W)`."""
        return torch.sigmoid(self.c + beta * (v @ self.W))

    def sample_hidden(self, v, beta=1.0):
        return torch.bernoulli(self.hidden_probs(v, beta))

    def visible_mean(self, h, beta=1.0):
        """:math:`\\mathbb E[v \\mid h] = b + \\sigma^2 \\odot (\\beta W h)`."""
        return self.b + (2 * self.log_std).exp() * (beta * (h @ self.W.transpose(-1, -2)))

    def sample_visible(self, h, beta=1.0):
        mean = self.visible_mean(h, beta)
        return mean + self.log_std.exp() * torch.randn_like(mean)

    @torch.no_grad()
    def gibbs_step(self, v, beta=1.0):
        """One block Gibbs sweep v → h → v; returns the new ``v`` (no graph).
        ``beta`` scales ``W`` (the AIS path; 1 is the model)."""
        return self.sample_visible(self.sample_hidden(v, beta), beta)

    def gibbs_sampler(self, beta=1.0) -> GibbsSampler:
        """Block Gibbs sweeps as a sampler with the kernel interface
        (``init(position) -> state``, ``step(state) -> (state, info)``), leaving the
        marginal :math:`p(v) \\propto e^{-F(v)}` invariant; what
        :class:`~pyro_ebm.infer.ContrastiveDivergence` uses for this model."""
        return GibbsSampler(self, beta)

    @torch.no_grad()
    def sample(self, n, num_steps, init=None):
        """``n`` draws after ``num_steps`` Gibbs sweeps from ``init`` (default: the
        Gaussian :math:`\\mathcal N(b, \\sigma^2)`, the model with ``W = 0``)."""
        if num_steps < 0:
            raise ValueError(f"num_steps must be >= 0, got {num_steps}")
        if init is None:
            v = self._sample_base(n)
        else:
            if init.shape != (n, self.visible_dim):
                raise ValueError(f"init must have shape ({n}, {self.visible_dim}), got {tuple(init.shape)}")
            check_finite("init", init)
            v = init.to(self.W)
        for _ in range(num_steps):
            v = self.gibbs_step(v)
        return v

    def _sample_base(self, n):
        return self.b + self.log_std.exp() * torch.randn(n, self.visible_dim, dtype=self.W.dtype,
                                                        device=self.W.device)

    # -- partition function ------------------------------------------------

    def _log_gaussian_normalizer(self):
        return self.log_std.sum() + 0.5 * self.visible_dim * math.log(2 * math.pi)

    def log_partition(self):
        """Exact :math:`\\log Z` by enumerating all :math:`2^H` hidden states:

        .. math::

            \\log Z = \\operatorname{logsumexp}_h\\big[c^\\top h + b^\\top W h
                + \\tfrac12 \\textstyle\\sum_i \\sigma_i^2 (W h)_i^2\\big]
                + \\textstyle\\sum_i \\log \\sigma_i + \\tfrac D2 \\log 2\\pi

        Differentiable in the parameters; allowed for ``hidden_dim`` ≤ 20.
        """
        H = self.hidden_dim
        if H > MAX_EXACT_HIDDEN:
            raise ValueError(
                f"exact log_partition enumerates 2^hidden_dim states; hidden_dim={H} is above "
                f"{MAX_EXACT_HIDDEN}: use ais_log_partition"
            )
        bits = 2 ** torch.arange(H, device=self.W.device)
        var = (2 * self.log_std).exp()
        parts = []
        for start in range(0, 2**H, _CHUNK):
            codes = torch.arange(start, min(start + _CHUNK, 2**H), device=self.W.device)
            h = (codes[:, None] & bits).ne(0).to(self.W.dtype)  # (S, H)
            wh = h @ self.W.T  # (S, D)
            terms = h @ self.c + wh @ self.b + 0.5 * (var * wh.pow(2)).sum(-1)
            parts.append(torch.logsumexp(terms, 0))
        return torch.logsumexp(torch.stack(parts), 0) + self._log_gaussian_normalizer()

    @torch.no_grad()
    def ais_log_partition(self, num_chains=1000, num_temperatures=1000, return_stderr=False):
        """Annealed importance sampling estimate of :math:`\\log Z`.

        The path :math:`p_\\beta(v) \\propto \\exp(-F_\\beta(v))` scales ``W`` by
        :math:`\\beta` from 0 to 1 on a linear grid. At :math:`\\beta = 0` the model is
        :math:`\\mathcal N(b, \\sigma^2)` times independent hidden units, with
        :math:`\\log Z_0 = \\sum_j \\operatorname{softplus}(c_j) + \\sum_i\\log\\sigma_i
        + \\tfrac D2 \\log 2\\pi`, sampled exactly; each chain accumulates
        :math:`\\log w \\mathrel{+}= F_{\\beta_{k-1}}(v) - F_{\\beta_k}(v)` and then takes one
        Gibbs sweep that leaves :math:`p_{\\beta_k}` invariant. The estimate is
        :math:`\\log Z_0 + \\log \\frac1C\\sum_c w_c` (unbiased in Z, biased low in
        log Z when the chains are too few or the path too short).

        :param int num_chains: number of independent AIS runs C.
        :param int num_temperatures: number of intermediate distributions K.
        :param bool return_stderr: also return the delta-method standard error of
            the estimate, :math:`\\operatorname{sd}(w) / (\\sqrt C\\, \\bar w)`.
        :returns: a 0-d tensor, or ``(estimate, stderr)``.
        """
        if num_chains < 1 or num_temperatures < 1:
            raise ValueError(
                f"num_chains and num_temperatures must be >= 1, got {num_chains} and {num_temperatures}"
            )
        betas = torch.linspace(0, 1, num_temperatures + 1, dtype=torch.float64).tolist()
        v = self._sample_base(num_chains)
        log_w = torch.zeros(num_chains, dtype=self.W.dtype, device=self.W.device)
        for prev, beta in zip(betas[:-1], betas[1:], strict=True):
            log_w += self.free_energy(v, prev) - self.free_energy(v, beta)
            v = self.gibbs_step(v, beta)
        log_z0 = F.softplus(self.c).sum() + self._log_gaussian_normalizer()
        log_mean_w = torch.logsumexp(log_w, 0) - math.log(num_chains)
        estimate = log_z0 + log_mean_w
        if not return_stderr:
            return estimate
        w = (log_w - log_mean_w).exp()  # weights relative to their mean
        stderr = w.std() / math.sqrt(num_chains) if num_chains > 1 else torch.full_like(estimate, math.inf)
        return estimate, stderr

    def log_likelihood(self, v, log_partition=None):
        """Exact :math:`\\log p(v) = -F(v) - \\log Z` per item; pass ``log_partition``
        (e.g. an AIS estimate) to reuse or replace the exact one."""
        if v.dim() != 2 or v.shape[-1] != self.visible_dim:
            raise ValueError(f"v must have shape (N, {self.visible_dim}), got {tuple(v.shape)}")
        check_finite("data", v)
        log_z = self.log_partition() if log_partition is None else log_partition
        return -self.free_energy(v) - log_z


class GibbsState(NamedTuple):
    """The state of C chains of block Gibbs sampling: the visible units ``(C, D)``."""

    position: torch.Tensor


class GibbsInfo(NamedTuple):
    """What one sweep reports: the hidden units ``(C, H)`` it drew on the way."""

    hidden: torch.Tensor


class GibbsSampler:
    r"""Block Gibbs sampling of a :class:`GaussianRBM`'s visible units, one sweep
    :math:`v \to h \sim p(h \mid v) \to v' \sim p(v \mid h)` per step
    (:meth:`GaussianRBM.gibbs_step`), for C chains at once.

    It has the interface of the kernels of :mod:`pyro_ebm.mcmc`: ``init(position,
    potential=None) -> state`` (the potential is not needed: the conditionals are
    exact) and ``step(state) -> (state, info)``, so a trainer that takes a kernel
    (e.g. :class:`~pyro_ebm.infer.ContrastiveDivergence`) takes it too. Each sweep
    leaves :math:`p_\beta(v) \propto e^{-F_\beta(v)}` invariant, whose Pyro model
    (for ``beta = 1``) is :attr:`marginal`.

    :param GaussianRBM grbm: the model.
    :param float beta: the scale of ``W`` (the AIS path; 1 is the model).

    >>> sampler = grbm.gibbs_sampler()
    >>> state = sampler.init(v)
    >>> for _ in range(10):
    ...     state, info = sampler.step(state)
    >>> state.position.shape, info.hidden.shape      # (C, D), (C, H)
    """

    def __init__(self, grbm: GaussianRBM, beta: float = 1.0):
        if not isinstance(grbm, GaussianRBM):
            raise TypeError(f"grbm must be a GaussianRBM, got {type(grbm).__name__}")
        self.grbm, self.beta = grbm, float(beta)

    @property
    def marginal(self):
        """The latent-free Pyro model of :math:`p(v)` (``grbm.marginal``) that the sweeps sample."""
        return self.grbm.marginal

    def init(self, position, potential=None) -> GibbsState:
        d = self.grbm.visible_dim
        if not torch.is_tensor(position) or position.dim() != 2 or position.shape[1] != d:
            got = tuple(position.shape) if torch.is_tensor(position) else type(position).__name__
            raise ValueError(f"positions must be visible units of shape (chains, {d}), got {got}")
        return GibbsState(position.detach())

    @torch.no_grad()
    def step(self, state: GibbsState) -> tuple[GibbsState, GibbsInfo]:
        h = self.grbm.sample_hidden(state.position, self.beta)
        return GibbsState(self.grbm.sample_visible(h, self.beta)), GibbsInfo(h)
