# SPDX-License-Identifier: Apache-2.0
"""Amortized variational posteriors :math:`q_\\phi(h \\mid v)` for EBLVMs.

Each guide is a :class:`~pyro.nn.PyroModule` that draws its latent site inside
``pyro.plate("data", len(v))`` with parameters computed from ``v`` by an encoder,
so it is an ordinary Pyro guide (``pyro.infer.SVI`` with ``Trace_ELBO`` trains
it) and, being an ``nn.Module``, it supports the unrolled guide steps of
:class:`~pyro_ebm.infer.BiSM`.
"""

from __future__ import annotations

import pyro
import pyro.distributions as dist
import torch
import torch.nn.functional as F
from pyro.distributions.torch_distribution import TorchDistribution
from pyro.nn import PyroModule
from torch.distributions import constraints
from torch.distributions.utils import broadcast_all

from .energy import check_data

__all__ = ["AmortizedBernoulli", "AmortizedNormal", "ConcreteBernoulli"]


class ConcreteBernoulli(TorchDistribution):
    r"""A relaxed Bernoulli variable drawn by the binary Concrete (Gumbel-softmax)
    reparameterization and scored by the Bernoulli formula.

    A draw is

    .. math::

        h = \operatorname{sigmoid}\big((\ell + \log u - \log(1 - u)) / \tau\big),
        \qquad u \sim \mathcal U(0, 1),

    a differentiable function of the logits :math:`\ell`; as :math:`\tau \to 0` it
    tends to a Bernoulli(:math:`\pi = \operatorname{sigmoid}(\ell)`) draw. Its
    ``log_prob`` is *not* the Concrete density but the Bernoulli log-mass at the
    relaxed value,

    .. math::

        \log q(h) = h \log \pi + (1 - h) \log(1 - \pi) = h\,\ell - \operatorname{softplus}(\ell),

    which is what the bi-level score-matching papers use for binary latents.

    :param torch.Tensor logits: the logits :math:`\ell`.
    :param float temperature: :math:`\tau > 0`.

    >>> d = ConcreteBernoulli(torch.zeros(3), temperature=0.1)
    >>> h = d.rsample()                      # values in (0, 1), close to 0 or 1
    >>> d.log_prob(h).shape
    torch.Size([3])

    **References:** C. J. Maddison, A. Mnih, Y. W. Teh, "The Concrete
    distribution", ICLR 2017; E. Jang, S. Gu, B. Poole, "Categorical
    reparameterization with Gumbel-softmax", ICLR 2017.
    """

    arg_constraints = {"logits": constraints.real}
    support = constraints.unit_interval
    has_rsample = True

    def __init__(self, logits, temperature, validate_args=None):
        if not float(temperature) > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        (self.logits,) = broadcast_all(logits)
        self.temperature = float(temperature)
        super().__init__(self.logits.shape, validate_args=validate_args)

    @property
    def probs(self):
        return torch.sigmoid(self.logits)

    def expand(self, batch_shape, _instance=None):
        new = self._get_checked_instance(ConcreteBernoulli, _instance)
        batch_shape = torch.Size(batch_shape)
        new.logits = self.logits.expand(batch_shape)
        new.temperature = self.temperature
        super(ConcreteBernoulli, new).__init__(batch_shape, validate_args=False)
        new._validate_args = self._validate_args
        return new

    def rsample(self, sample_shape=()):
        shape = self._extended_shape(torch.Size(sample_shape))
        info = torch.finfo(self.logits.dtype)
        u = torch.rand(shape, dtype=self.logits.dtype, device=self.logits.device)
        u = u.clamp(info.tiny, 1 - info.eps)
        noise = torch.log(u) - torch.log1p(-u)
        return torch.sigmoid((self.logits + noise) / self.temperature)

    def log_prob(self, value):
        if self._validate_args:
            self._validate_sample(value)
        return value * self.logits - F.softplus(self.logits)


def _check_module(encoder, what):
    if not isinstance(encoder, torch.nn.Module):
        raise TypeError(f"{what} must be a torch.nn.Module, got {type(encoder).__name__}")
    return encoder


def _register(guide):
    # the encoder stays a plain nn.Module (cheap to call from ``conditionals``);
    # a Pyro run registers its parameters in the param store, where SVI finds them
    pyro.module(guide._pyro_get_fullname("encoder"), guide.encoder)


class AmortizedNormal(PyroModule):
    r"""A diagonal Gaussian posterior whose mean and scale an encoder computes from the data:

    .. math::

        q_\phi(h \mid v) = \mathcal N\big(h;\ \mu_\phi(v),\ \operatorname{diag} \sigma_\phi(v)^2\big),
        \qquad h = \mu_\phi(v) + \sigma_\phi(v) \odot \epsilon,\ \epsilon \sim \mathcal N(0, I).

    The site is reparameterized, so algorithms may differentiate through ``h``.

    :param torch.nn.Module encoder: maps data ``v`` of shape ``(N, *event)`` to a pair
        ``(loc, scale)`` of tensors of equal shape ``(N, *latent_shape)`` with
        ``scale > 0`` (e.g. a softplus output); every dim after the first is an
        event dim of the site. Each Pyro run of the guide registers its
        parameters in Pyro's param store (``pyro.module``).
    :param str site: name of the model's latent site this guide proposes.
    :param bool conditional: call the encoder as ``encoder(v, *args)`` with the
        guide's extra arguments (e.g. class labels for a class-conditional
        :class:`~pyro_ebm.models.nets.GaussianEncoder`); by default the encoder sees
        ``v`` only and extra arguments are ignored.

    :class:`~pyro_ebm.models.nets.GaussianEncoder` is a ready encoder (an MLP with a
    softplus scale); any module of the same contract works:

    >>> class Encoder(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.net = torch.nn.Linear(2, 2 * 3)
    ...     def forward(self, v):
    ...         loc, raw = self.net(v).chunk(2, -1)
    ...         return loc, torch.nn.functional.softplus(raw) + 1e-3
    >>> guide = AmortizedNormal(Encoder(), site="h")
    >>> guide(torch.randn(5, 2)).shape
    torch.Size([5, 3])

    **References:** D. P. Kingma, M. Welling, "Auto-encoding variational Bayes",
    ICLR 2014; F. Bao, C. Li, K. Xu, H. Su, J. Zhu, B. Zhang, "Bi-level score
    matching for learning energy-based latent variable models", NeurIPS 2020.
    """

    def __init__(self, encoder: torch.nn.Module, site: str = "h", conditional: bool = False):
        super().__init__()
        self.encoder = _check_module(encoder, "encoder")
        self.site = str(site)
        self.conditional = bool(conditional)

    def params(self, v, *args):
        """The encoder's ``(loc, scale)`` at ``v`` (given ``args`` when conditional), validated."""
        # type and shape only: trainers check the values once per batch, and this runs per step
        check_data(v, f"the data of AmortizedNormal('{self.site}')", finite=False)
        out = self.encoder(v, *args) if self.conditional else self.encoder(v)
        if not (isinstance(out, (tuple, list)) and len(out) == 2):
            raise ValueError(f"the encoder of site '{self.site}' must return a pair (loc, scale)")
        loc, scale = out
        if loc.shape != scale.shape or loc.dim() < 2 or loc.shape[0] != v.shape[0]:
            raise ValueError(
                f"the encoder of site '{self.site}' must return loc and scale of equal shape "
                f"({v.shape[0]}, *latent_shape); got {tuple(loc.shape)} and {tuple(scale.shape)}"
            )
        return loc, scale

    def conditionals(self, v, *args, **kwargs) -> dict:
        """``{site: q(h | v)}``, a distribution of batch shape ``(N,)``."""
        loc, scale = self.params(v, *args)
        return {self.site: dist.Normal(loc, scale).to_event(loc.dim() - 1)}

    def forward(self, v, *args, **kwargs):
        _register(self)
        (q,) = self.conditionals(v, *args).values()
        with pyro.plate("data", v.shape[0]):
            return pyro.sample(self.site, q)


class AmortizedBernoulli(PyroModule):
    r"""A posterior over binary latents, relaxed for reparameterization:

    .. math::

        \pi_\phi(v) = \operatorname{sigmoid}(\text{encoder}(v)), \qquad
        h \sim \operatorname{ConcreteBernoulli}(\pi_\phi(v), \tau), \qquad
        \log q_\phi(h \mid v) = \textstyle\sum_j h_j \log \pi_j + (1 - h_j)\log(1 - \pi_j).

    Draws are relaxed values in (0, 1) made by the binary Concrete
    (Gumbel-softmax) trick at temperature :math:`\tau`; their log-probability is
    the Bernoulli formula at the relaxed value (see :class:`ConcreteBernoulli`).
    The default encoder is linear, :math:`\ell = A v + a`, the form of a
    Gaussian RBM's exact posterior.

    :param int visible_dim: size of one data item (flattened).
    :param int hidden_dim: number of binary latents H.
    :param str site: name of the model's latent site.
    :param float temperature: relaxation temperature :math:`\tau > 0`.
    :param torch.nn.Module encoder: optional map from ``v`` of shape ``(N, *event)`` to
        logits of shape ``(N, H)``; default ``Linear(visible_dim, hidden_dim)`` on the
        flattened data.

    >>> guide = AmortizedBernoulli(visible_dim=2, hidden_dim=4, site="h", temperature=0.1)
    >>> guide(torch.randn(5, 2)).shape
    torch.Size([5, 4])

    **References:** F. Bao, C. Li, K. Xu, H. Su, J. Zhu, B. Zhang, "Bi-level score
    matching for learning energy-based latent variable models", NeurIPS 2020;
    E. Jang, S. Gu, B. Poole, "Categorical reparameterization with Gumbel-softmax",
    ICLR 2017.
    """

    def __init__(self, visible_dim: int, hidden_dim: int, site: str = "h", temperature: float = 0.1,
                 encoder: torch.nn.Module | None = None):
        if visible_dim < 1 or hidden_dim < 1:
            raise ValueError(f"visible_dim and hidden_dim must be >= 1, got {visible_dim} and {hidden_dim}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        super().__init__()
        self.visible_dim, self.hidden_dim = int(visible_dim), int(hidden_dim)
        self.site = str(site)
        self.temperature = float(temperature)
        if encoder is None:
            encoder = torch.nn.Linear(visible_dim, hidden_dim)
            self._flatten = True
        else:
            self._flatten = False
        self.encoder = _check_module(encoder, "encoder")

    def logits(self, v):
        """Logits :math:`\\ell = \\text{encoder}(v)`, shape ``(N, H)``."""
        check_data(v, f"the data of AmortizedBernoulli('{self.site}')", finite=False)
        x = v.reshape(v.shape[0], -1) if self._flatten else v
        if self._flatten and x.shape[1] != self.visible_dim:
            raise ValueError(
                f"AmortizedBernoulli('{self.site}') has visible_dim={self.visible_dim}, but the data "
                f"items have {x.shape[1]} entries (data shape {tuple(v.shape)})"
            )
        logits = self.encoder(x)
        if logits.shape != (v.shape[0], self.hidden_dim):
            raise ValueError(
                f"the encoder of site '{self.site}' must return logits of shape "
                f"({v.shape[0]}, {self.hidden_dim}), got {tuple(logits.shape)}"
            )
        return logits

    def probs(self, v):
        """:math:`\\pi_\\phi(v)`, the posterior probabilities of ``h = 1``."""
        return torch.sigmoid(self.logits(v))

    def conditionals(self, v, *args, **kwargs) -> dict:
        """``{site: q(h | v)}``, a distribution of batch shape ``(N,)``."""
        return {self.site: ConcreteBernoulli(self.logits(v), self.temperature).to_event(1)}

    def forward(self, v, *args, **kwargs):
        _register(self)
        (q,) = self.conditionals(v).values()
        with pyro.plate("data", v.shape[0]):
            return pyro.sample(self.site, q)
