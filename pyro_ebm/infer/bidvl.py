# SPDX-License-Identifier: Apache-2.0
"""Bi-level doubly variational learning (BiDVL) of decoupled EBLVMs."""

from __future__ import annotations

import math

import pyro
import torch
from pyro.infer import Trace_ELBO

from ..energy import (
    GuideView,
    check_dtype,
    check_finite,
    check_guide_sites,
    energy_view,
    functional,
    latent_sites,
    observed_site,
    require_reparameterized,
    trace_run,
    trainable_parameters,
)
from ..metrics import auroc
from .bism import loss_and_grads_by_name, mean_or_nan
from .checks import at_step, check_batch, describe_nonfinite
from .trainer import Trainer, collect_parameters, require_adam
from .unroll import UnrolledAdam, check_unrollable

__all__ = ["BiDVL"]

_DECODER_SAMPLE = ("rsample", "mean")
_LATENT_LOSS = ("mse", "nll")


class BiDVL(Trainer):
    r"""Bi-level doubly variational learning of a decoupled EBLVM: a marginal
    energy-based model :math:`p_\theta(v) \propto e^{-E_\theta(v)}` with a structural
    posterior :math:`q_\phi(h \mid v)`, learned together with a variational joint
    :math:`q_\psi(v, h) = p(h)\,q_\psi(v \mid h)` (a decoder) that stands in for
    :math:`p_\theta(v)\,q_\phi(h \mid v)`, with no MCMC.

    **Lower level** (the decoder's :math:`\psi` and the encoder's :math:`\phi`,
    with :math:`\theta` frozen) fits the two variational distributions by a
    symmetric KL between :math:`q_\psi(v, h)` and :math:`p_\theta(v)q_\phi(h \mid v)`.
    The forward direction, on decoder draws :math:`\hat h \sim p(h)`,
    :math:`\hat v \sim q_\psi(v \mid \hat h)`, is

    .. math::

        \mathrm{KL}\big(q_\psi(v, h) \,\|\, p_\theta(v) q_\phi(h \mid v)\big)
        = \mathbb E_{q_\psi}\big[E_\theta(\hat v)\big]
          - \mathbb E_{p(h)} H\big[q_\psi(v \mid \hat h)\big]
          - \mathbb E_{q_\psi}\big[\log q_\phi(\hat h \mid \hat v)\big]
          + \log Z_\theta + \text{const},

    whose last expectation, for a Gaussian :math:`q_\phi` with mean
    :math:`\mu_\phi`, is the latent reconstruction
    :math:`\|\mu_\phi(\hat v) - \hat h\|^2` (``latent_loss="mse"``, up to scale;
    ``"nll"`` keeps :math:`-\log q_\phi` itself). The reverse direction needs
    draws from :math:`p_\theta(v)`; with the data standing in for them it is

    .. math::

        \mathrm{KL}\big(p_\theta(v) q_\phi(h \mid v) \,\|\, q_\psi(v, h)\big)
        \approx \mathbb E_\text{data}\big[-\text{ELBO}_{\psi,\phi}(v)\big] + \text{const},

    the negative ELBO of the decoder/encoder pair, estimated by Pyro's
    ``Trace_ELBO``. The lower-level loss, per item, is therefore

    .. math::

        \mathcal L(\psi, \phi) = \mathbb E\big[E_\theta(\hat v)\big]
            - \mathbb E\big[H[q_\psi(v \mid \hat h)]\big]
            + \mathbb E\big[\|\mu_{\bar\phi}(\hat v) - \hat h\|^2\big]
            + \lambda\, \mathbb E_\text{data}\big[-\text{ELBO}_{\psi,\phi}(v)\big],

    where :math:`\hat v` is reparameterized in :math:`\psi`, the bar means the
    encoder is frozen for that term (its gradient reaches :math:`\psi` only),
    :math:`\phi` thus learns from the ELBO alone, and :math:`\lambda` is
    ``vae_weight``. The entropy term is constant for a fixed-scale Gaussian
    decoder; it is dropped for a distribution without ``.entropy()`` or with
    ``decoder_sample="mean"``.

    **Drawing** :math:`\hat v`: the decoder model ``decoder_model(x, *args)`` is
    run on a placeholder batch of zeros shaped like the data (so it must use
    ``x`` only as the observation and for its batch size); its latent sites
    are drawn from their priors by ``rsample`` and give :math:`\hat h`, and its
    observed site's distribution :math:`q_\psi(v \mid \hat h)` gives
    :math:`\hat v` by ``rsample()`` (for a Gaussian: the decoder mean plus
    reparameterized noise, ``decoder_sample="rsample"``) or by its ``.mean``
    (``decoder_sample="mean"``).

    **Upper level** (:math:`\theta` only): one step of ``optim`` on

    .. math::

        J(\theta) = \frac1N\sum_i E_\theta(v_i) - \frac1n\sum_j E_\theta(\hat v_j),

    with fresh decoder draws :math:`\hat v_j` detached, the maximum-likelihood
    gradient with :math:`q_\psi` standing in for :math:`p_\theta`. Each
    :meth:`step` takes ``inner_steps`` = K lower-level steps, then the upper
    step. With ``unroll_steps`` = N > 0, N more lower-level steps are unrolled
    differentiably (fast weights, the same Adam state as ``vae_optim``), the
    draws :math:`\hat v` come from :math:`\psi_N(\theta)` with their graph, and
    :math:`\theta` follows the total derivative :math:`dJ(\theta, \psi_N(\theta))/d\theta`
    (needs ``nn.Module`` decoder and encoder and an Adam ``vae_optim``).

    :param callable energy_model: Pyro model ``energy_model(v, *args)`` of the data
        alone: ``pyro.factor("energy", -E(v))`` inside ``pyro.plate("data", len(v))``.
    :param callable decoder_model: Pyro model ``decoder_model(v, *args)`` of
        :math:`p(h) q_\psi(v \mid h)` with ``v`` observed (a VAE's model).
    :param callable encoder_guide: Pyro guide ``encoder_guide(v, *args)`` of
        :math:`q_\phi(h \mid v)` over the decoder's latent sites (a VAE's guide).
    :param pyro.optim.PyroOptim optim: optimizer of :math:`\theta` (level ``"energy"``).
    :param pyro.optim.PyroOptim vae_optim: optimizer of :math:`\psi` and :math:`\phi`.
    :param int inner_steps: K ≥ 0 lower-level steps per :meth:`step`.
    :param float vae_weight: :math:`\lambda \ge 0`.
    :param int unroll_steps: N ≥ 0 unrolled lower-level steps (0: the upper
        gradient with :math:`\psi` held fixed, the reference design).
    :param str latent_loss: ``"mse"`` or ``"nll"`` (see above).
    :param str decoder_sample: ``"rsample"`` or ``"mean"``.
    :param int num_samples: decoder draws per level and step; ``None`` for the
        batch size.
    :param str obs_site: the decoder's observed site when it has several.
    :param compile: ``True`` (or a dict of ``torch.compile`` arguments) runs the
        upper-level update (:math:`J(\theta)` and its gradient in :math:`\theta`)
        as one compiled pure function, with the math unchanged: the energy
        model's traced log density with explicit parameters
        (:meth:`~pyro_ebm.energy.EnergyView.pure`) on the data and on the decoder
        draws, differentiated by ``torch.func.grad_and_value``. The draws
        :math:`\hat v` are made eagerly, as the eager step makes them, and the
        optimizer step and divergence checks are the eager ones, so compiled and
        eager trainers give the same numbers from the same seed (to rounding).
        The lower level stays eager: it runs the decoder and the encoder as Pyro
        programs (reparameterized draws inside a Pyro trace, Pyro's
        ``Trace_ELBO``), which have no pure form; so does the upper update with
        ``unroll_steps > 0``, whose draws come from unrolled lower-level steps.
        An energy model that runs on the Pyro path, or an update the compiler
        refuses, trains eagerly after one warning.

    >>> decoder = GaussianDecoder(MLP(16, 64), latent_dim=16)
    >>> encoder = AmortizedNormal(Encoder(), site="h")
    >>> bidvl = BiDVL(ebm, decoder, encoder, pyro.optim.Adam({"lr": 1e-3}),
    ...               pyro.optim.Adam({"lr": 1e-3}), inner_steps=1, vae_weight=1.0)
    >>> for v in datasets.batches(x, 100, epochs=50):
    ...     losses = bidvl.step(v)          # {"upper", "lower", "energy_data", ...}
    >>> x = bidvl.generate(64)              # decoder draws
    >>> err = bidvl.reconstruction_error(x_test)       # per image
    >>> auc = bidvl.ood_auroc(x_test, noise)           # by the score -E

    **References:** G. Kan, J. Lü, T. Wang, B. Zhang, A. Zhu, L. Huang, G. Guo,
    H. Snoussi, "Bi-level doubly variational learning for energy-based latent
    variable models", CVPR 2022.
    """

    algorithm = "BiDVL"

    main_loss = "upper"

    def __init__(self, energy_model, decoder_model, encoder_guide, optim, vae_optim, inner_steps=1,
                 vae_weight=1.0, unroll_steps=0, latent_loss="mse", decoder_sample="rsample",
                 num_samples=None, obs_site=None, compile=False):
        for name, fn in (("energy_model", energy_model), ("decoder_model", decoder_model),
                         ("encoder_guide", encoder_guide)):
            if not callable(fn):
                raise TypeError(f"{name} must be a Pyro model / guide, got {type(fn).__name__}")
        for name, opt in (("optim", optim), ("vae_optim", vae_optim)):
            if not isinstance(opt, pyro.optim.PyroOptim):
                raise TypeError(f"{name} must be a pyro.optim optimizer, got {type(opt).__name__}")
        for name, value in (("inner_steps", inner_steps), ("unroll_steps", unroll_steps)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be an integer >= 0, got {value!r}")
        if num_samples is not None and (not isinstance(num_samples, int) or num_samples < 1):
            raise ValueError(f"num_samples must be None or an integer >= 1, got {num_samples!r}")
        if not (isinstance(vae_weight, (int, float)) and math.isfinite(vae_weight) and vae_weight >= 0):
            raise ValueError(f"vae_weight must be a finite number >= 0, got {vae_weight!r}")
        if latent_loss not in _LATENT_LOSS:
            raise ValueError(f"latent_loss must be one of {_LATENT_LOSS}, got {latent_loss!r}")
        if decoder_sample not in _DECODER_SAMPLE:
            raise ValueError(f"decoder_sample must be one of {_DECODER_SAMPLE}, got {decoder_sample!r}")
        if unroll_steps > 0:
            why = f"{self.algorithm} with unroll_steps={unroll_steps}"
            check_unrollable(decoder_model, why + " (decoder)")
            check_unrollable(encoder_guide, why + " (encoder)")
            require_adam(vae_optim, "unrolled lower-level steps")
        self.energy_model, self.decoder_model, self.encoder_guide = energy_model, decoder_model, encoder_guide
        self.optim, self.vae_optim = optim, vae_optim
        self.inner_steps, self.unroll_steps = inner_steps, unroll_steps
        self.vae_weight = float(vae_weight)
        self.latent_loss, self.decoder_sample = latent_loss, decoder_sample
        self.num_samples, self.obs_site = num_samples, obs_site
        self.view = energy_view(energy_model)
        self.guide_view = GuideView(encoder_guide)
        # a guide that describes itself and holds no PyroParam (read from the
        # param store) is evaluated directly, without a Pyro run
        self._direct = self.guide_view.direct and not any(
            getattr(m, "_pyro_params", None) for m in encoder_guide.modules())
        self.elbo = Trace_ELBO()
        #: the decoder draws :math:`\hat v` of the last upper-level step (detached)
        self.last_samples = None
        self._like = None
        self._num_decoder_params = 0
        super().__init__({"energy": "optim", "vae": "vae_optim"}, compile=compile)

    # -- the trainer contract ------------------------------------------------

    def _validate(self, args, kwargs, where):
        self._prepare_batch(args[0], args[1:], kwargs, where)

    def _parameters(self, args, kwargs):
        v, rest = args[0], args[1:]
        found = collect_parameters({
            "energy": [(self.energy_model, lambda: self.energy_model(v, *rest, **kwargs))],
            "decoder": [(self.decoder_model,
                         lambda: self.decoder_model(torch.zeros_like(v), *rest, **kwargs))],
            "encoder": [(self.encoder_guide, lambda: self.encoder_guide(v, *rest, **kwargs))],
        })
        for part, what in (("energy", "energy model"), ("decoder", "decoder model")):
            if not found[part]:
                raise ValueError(f"the {what} has no parameters: register its network with "
                                 "pyro.module(...) or make it a PyroModule")
        decoder = found["decoder"]
        taken = {id(p) for _, p in decoder}
        encoder = [(n, p) for n, p in found["encoder"] if id(p) not in taken]
        self._num_decoder_params = len(decoder)
        return {"energy": found["energy"], "vae": decoder + encoder}

    def _diagnose(self, args, kwargs):
        return self._diagnoser(args[0], args[1:], kwargs)()

    def _step(self, args, kwargs):
        """K lower-level steps, then one upper-level step. ``last_losses``:
        ``upper`` (:math:`J`), ``lower`` (:math:`\\mathcal L`, mean over the K
        steps), its terms ``energy_sample``, ``entropy``, ``latent``,
        ``neg_elbo`` (per item, from the last lower step), and ``energy_data``
        (mean :math:`E` of the batch)."""
        v, rest = args[0], args[1:]
        lowers, terms = [], {}
        for k in range(self.inner_steps):
            value, terms = self._lower_step(v, rest, kwargs, k)
            lowers.append(value)
        self._level_now = "energy"
        v_hat = self._upper_draws(v, rest, kwargs)
        done = self._compiled_upper_update(v, v_hat, rest, kwargs)
        if done is None:
            loss, e_data, _ = self._upper_energies(v, v_hat, rest, kwargs)
            self._watch("energy", "the upper-level loss", loss)
            self._minimize("energy", loss, "upper-level update")
            done = loss.detach(), {"energy_data": e_data.detach().mean()}
        out = {"upper": done[0], "lower": mean_or_nan(lowers)}
        out.update(terms)
        out["energy_data"] = done[1]["energy_data"]
        return out

    def _losses(self, args, kwargs):
        v, rest = args[0], args[1:]
        unroll, self.unroll_steps = self.unroll_steps, 0
        try:
            with torch.enable_grad():  # Trace_ELBO may need it for its estimator
                terms = self._lower_terms(v, rest, kwargs)
                loss, e_data, _ = self._upper_loss(v, rest, kwargs)
        finally:
            self.unroll_steps = unroll
        out = {"upper": loss.detach(), "lower": self._lower_total(terms).detach()}
        out.update({k: t.detach() if torch.is_tensor(t) else float(t) for k, t in terms.items()})
        out["energy_data"] = e_data.detach().mean()
        return out

    # -- validation --------------------------------------------------------

    def _check(self, v, args, kwargs, where):
        check_batch(v, where)  # every batch: one reduction
        key = (tuple(v.shape), v.dtype, v.device.type, len(args), tuple(sorted(kwargs)))
        if key in self._checked:
            return
        with at_step(self.algorithm, where, self._diagnoser(v, args, kwargs)):
            self._check_models(v, args, kwargs)
        self._checked.add(key)

    def _check_models(self, v, args, kwargs):
        for role, fn in (("energy_model", self.energy_model), ("decoder_model", self.decoder_model),
                         ("encoder_guide", self.encoder_guide)):
            check_dtype(v, fn, role)
        with torch.no_grad():
            trace = self._decoder_trace(torch.zeros_like(v), args, kwargs)
            q_v = self._observed(trace, v)
            latents = latent_sites(trace)
            if not latents:
                raise ValueError("the decoder model has no latent sample site h to decode from")
            require_reparameterized(latents.values(), "BiDVL's lower level (E(v̂) through the decoder)")
            if self.decoder_sample == "rsample" and not q_v.has_rsample:
                raise ValueError(
                    f"the decoder's observed site has a {type(q_v).__name__} distribution without "
                    "rsample, so v̂ cannot carry a gradient; use decoder_sample='mean'"
                )
            try:
                guide_trace = trace_run(self.encoder_guide, v, *args, **kwargs)
            except (RuntimeError, ValueError) as err:
                raise ValueError(f"running the encoder guide on the data batch of shape {tuple(v.shape)} "
                                 f"failed: {err}") from err
            guide_sites = latent_sites(guide_trace)
            check_guide_sites(latents, guide_sites)
            if self.latent_loss == "mse":
                for name, site in guide_sites.items():
                    try:
                        _ = site["fn"].mean
                    except NotImplementedError as err:
                        raise ValueError(
                            f"latent_loss='mse' needs the mean μ_φ(v) of the encoder's site '{name}', but "
                            f"its {type(site['fn']).__name__} has no .mean; use latent_loss='nll'"
                        ) from err
        try:
            st = self.view.structure(v, *args, **kwargs)
        except (RuntimeError, ValueError) as err:
            raise ValueError(f"running the energy model on the data batch of shape {tuple(v.shape)} "
                             f"failed: {err}") from err
        if st.latents:
            raise ValueError(
                f"BiDVL's energy model must be a model of the data alone, but it has latent site(s) "
                f"{sorted(st.latents)}; the latents belong to the decoder and the encoder"
            )
        self.view.check_model(v, *args, **kwargs)

    def _diagnoser(self, v, args, kwargs):
        """A ``diagnose()`` for a divergence or a first-run error: the first
        NaN / Inf site of the energy model, the decoder or the encoder on ``v``,
        then of the energy model on the last decoder draws."""
        v = v.detach()

        def diagnose():
            energy = dict(model=self.energy_model, model_role="energy model")
            vae = dict(guide=self.encoder_guide, guide_role="encoder guide", model=self.decoder_model,
                       model_role="decoder model")
            found = describe_nonfinite(v, args, kwargs, **energy)
            found = found or describe_nonfinite(v, args, kwargs, **vae)
            if found is None and self.last_samples is not None and not (args or kwargs):
                found = describe_nonfinite(self.last_samples, **energy)
                found = found and found + " on the decoder draws"
            return found

        return diagnose

    def _observed(self, trace, like, conditioned=()):
        site = observed_site(trace, self.obs_site, conditioned, role="decoder model",
                             what="q_ψ(v | h), obs=v")
        fn = site["fn"]
        shape = tuple(fn.batch_shape + fn.event_shape)
        if shape != tuple(like.shape):
            raise ValueError(
                f"the decoder's observed site '{site['name']}' produces a batch of shape {shape}, but the "
                f"data batch has shape {tuple(like.shape)}: the decoder must output one item of the "
                "data's shape per data item"
            )
        return fn

    # -- pieces ------------------------------------------------------------

    def _decoder_trace(self, like, args, kwargs, weights=None):
        model = functional(self.decoder_model, weights)
        try:
            return trace_run(model, like, *args, **kwargs)
        except (RuntimeError, ValueError) as err:
            raise ValueError(
                f"running the decoder model on a batch shaped like the data {tuple(like.shape)} failed: {err}"
            ) from err

    def _draw(self, n, args, kwargs, weights=None):
        """Decoder draws: ``(v̂, {site: ĥ}, per-item entropy of q(v | ĥ) or 0)``."""
        like = self._like.new_zeros((n,) + self._like.shape[1:])
        trace = self._decoder_trace(like, args, kwargs, weights)
        fn = self._observed(trace, like)
        h = {name: site["value"] for name, site in latent_sites(trace).items()}
        if self.decoder_sample == "mean":
            return fn.mean.to(like.dtype), h, like.new_zeros(())
        try:
            entropy = fn.entropy().reshape(n, -1).sum(-1)
        except NotImplementedError:
            entropy = like.new_zeros(())
        return fn.rsample(), h, entropy

    def energy(self, v, *args, **kwargs):
        """Per-item energy :math:`E_\\theta(v) = -\\log \\tilde p_\\theta(v)`, shape
        ``(len(v),)``, differentiable in ``v`` and :math:`\\theta`; :math:`-E` is the
        out-of-distribution score."""
        return self.view.data_potential(*args, purpose=self.algorithm, **kwargs)(v)

    def _energy(self, v, args, kwargs):
        return -self.view.log_density(v, *args, per_item=True, **kwargs)

    def _check_draws(self, v_hat):
        """Decoder draws must be finite: checked at the end of a step (no host
        sync), or at once outside one."""
        if self._records is not None:
            self._watch_value("vae", "the decoder draws v̂", v_hat)
        else:
            check_finite("decoder draws v̂", v_hat.detach())

    def _latent_term(self, v_hat, h_hat, args, kwargs, weights=None):
        if self._direct:
            with self.guide_view.using(weights):
                qs = self.guide_view.conditionals(v_hat, *args, **kwargs)
        else:
            trace = trace_run(functional(self.encoder_guide, weights), v_hat, *args, **kwargs)
            qs = {name: trace.nodes[name]["fn"] for name in h_hat}
        n = v_hat.shape[0]
        total = 0.0
        for name, h in h_hat.items():
            q = qs[name]
            if self.latent_loss == "mse":
                total = total + (q.mean - h).pow(2).reshape(n, -1).sum(-1)
            else:
                total = total - q.log_prob(h).reshape(n, -1).sum(-1)
        return total.mean()

    def _lower_terms(self, v, args, kwargs, weights=None):
        """The lower-level terms (each a 0-dim tensor with a graph), as a dict."""
        dec_w = enc_w = None
        if weights is not None:
            dec_w, enc_w = weights
        n = self.num_samples or v.shape[0]
        v_hat, h_hat, entropy = self._draw(n, args, kwargs, dec_w)
        self._check_draws(v_hat)
        terms = {"energy_sample": self.energy(v_hat, *args, **kwargs).mean(),
                 "entropy": entropy.mean() if torch.is_tensor(entropy) else entropy,
                 "latent": self._latent_term(v_hat, h_hat, args, kwargs, enc_w)}
        if self.vae_weight > 0:
            model, guide = functional(self.decoder_model, dec_w), functional(self.encoder_guide, enc_w)
            terms["neg_elbo"] = self.elbo.differentiable_loss(model, guide, v, *args, **kwargs) / v.shape[0]
        else:
            terms["neg_elbo"] = v.new_zeros(())
        return terms

    def _lower_total(self, terms):
        return (terms["energy_sample"] - terms["entropy"] + terms["latent"]
                + self.vae_weight * terms["neg_elbo"])

    def _lower_step(self, v, args, kwargs, k):
        self._level_now = "vae"
        terms = self._lower_terms(v, args, kwargs)
        total = self._lower_total(terms)
        self._watch("vae", f"the lower-level (step {k + 1}) loss", total)
        params = self.levels["vae"].params
        dec, enc = params[:self._num_decoder_params], params[self._num_decoder_params:]
        grads = list(torch.autograd.grad(total, dec, retain_graph=bool(enc), allow_unused=True))
        # the encoder learns from the ELBO only (frozen in the latent term)
        if enc and self.vae_weight > 0:
            grads += torch.autograd.grad(self.vae_weight * terms["neg_elbo"], enc, allow_unused=True)
        else:
            grads += [None] * len(enc)
        self._apply("vae", grads, f"lower-level step {k + 1}")
        return total.detach(), {k: t.detach() if torch.is_tensor(t) else float(t) for k, t in terms.items()}

    def _unrolled_weights(self, v, args, kwargs):
        """The decoder's and encoder's fast weights after N differentiable lower steps."""
        dec_w = trainable_parameters(self.decoder_model)
        enc_w = trainable_parameters(self.encoder_guide)
        optimizer = self.levels["vae"].optimizer
        dec_adam, enc_adam = UnrolledAdam(optimizer, dec_w), UnrolledAdam(optimizer, enc_w)
        for n in range(self.unroll_steps):
            terms = self._lower_terms(v, args, kwargs, weights=(dec_w, enc_w))
            total = self._lower_total(terms)
            if self._records is not None:
                self._watch("vae", f"the unrolled lower-level (step {n + 1}) loss", total.detach())
            new_dec = dec_adam.step(total, dec_w)
            if self.vae_weight > 0:
                enc_w = enc_adam.step(self.vae_weight * terms["neg_elbo"], enc_w)
            dec_w = new_dec
        return dec_w

    def _upper_draws(self, v, args, kwargs):
        """The upper level's decoder draws :math:`\\hat v` (detached, or with their
        graph through the unrolled steps)."""
        n = self.num_samples or v.shape[0]
        if self.unroll_steps:
            v_hat = self._draw(n, args, kwargs, self._unrolled_weights(v, args, kwargs))[0]
        else:
            with torch.no_grad():
                v_hat = self._draw(n, args, kwargs)[0]
        self._check_draws(v_hat)
        self.last_samples = v_hat.detach()
        return v_hat

    def _upper_energies(self, v, v_hat, args, kwargs, log_densities=None):
        """:math:`J` and the per-item energies of the data and of the draws, from
        ``log_densities = (for the data (or both together), for the draws)``,
        each ``f(x, *args, **kwargs)`` per item (the energy view's by default)."""
        if log_densities is None:
            def log_density(x, *args, **kwargs):
                return self.view.log_density(x, *args, per_item=True, **kwargs)

            log_densities = (log_density, log_density)
        if args or kwargs:  # per-item arguments: one run per batch
            e_data = -log_densities[0](v, *args, **kwargs)
            e_sample = -log_densities[1](v_hat, *args, **kwargs)
        else:  # one run over data and draws together
            both = -log_densities[0](torch.cat([v, v_hat.to(v.dtype)]))
            e_data, e_sample = both.split([v.shape[0], v_hat.shape[0]])
        return e_data.mean() - e_sample.mean(), e_data, e_sample

    def _upper_loss(self, v, args, kwargs):
        return self._upper_energies(v, self._upper_draws(v, args, kwargs), args, kwargs)

    def _compiled_upper_update(self, v, v_hat, args, kwargs):
        """The upper update through one compiled pure function of the energy model's
        parameters (:meth:`Trainer._compiled_minimize`): ``(J, {"energy_data"})``, or
        ``None`` for the eager update (compiling off or refused, ``unroll_steps >
        0``, or no pure density: one warning)."""
        if self.compile_options is None or self.unroll_steps:
            return None
        v, v_hat = v.detach(), v_hat.detach().to(v.dtype)
        if args or kwargs:
            pure = self._pure(self.view, v, *args, per_item=True, **kwargs)
            densities = [pure, pure and self._pure(self.view, v_hat, *args, per_item=True, **kwargs)]
        else:
            densities = [self._pure(self.view, torch.cat([v, v_hat]), per_item=True)]

        def loss_fn(fns, v, v_hat, args, kwargs):
            loss, e_data, _ = self._upper_energies(v, v_hat, args, kwargs, (fns[0], fns[-1]))
            return loss, {"energy_data": e_data.mean()}

        return self._compiled_minimize("energy", "upper", densities, loss_fn, (v, v_hat, args, kwargs),
                                       f"the upper-level update of {self.algorithm}",
                                       label="the upper-level loss", where="upper-level update")

    # -- public ------------------------------------------------------------

    def hypergradient(self, v, *args, **kwargs):
        """The upper loss :math:`J(\\theta, \\psi_N(\\theta))` (a float) and its total
        derivative in the energy's parameters, ``{param-store name: gradient}``, at
        the current parameters; nothing is updated."""
        self._validate((v,) + args, kwargs, "hypergradient")
        self._prepare((v,) + args, kwargs)
        return loss_and_grads_by_name(self, "energy", lambda: self._upper_loss(v, args, kwargs)[0])

    def generate(self, n, *args, langevin_steps=0, kernel=None, **kwargs):
        """``n`` draws :math:`\\hat v` of the decoder (as in training, see
        ``decoder_sample``), optionally refined by ``langevin_steps`` steps of
        ``kernel`` (e.g. ``pyro_ebm.mcmc.ULA(step_size)``) on :math:`E_\\theta`.

        :returns: a detached tensor ``(n, *event)``.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be an int >= 1, got {n!r}")
        if not isinstance(langevin_steps, int) or langevin_steps < 0:
            raise ValueError(f"langevin_steps must be an int >= 0, got {langevin_steps!r}")
        if langevin_steps and kernel is None:
            raise ValueError("langevin_steps > 0 needs a kernel, e.g. pyro_ebm.mcmc.ULA(step_size=1e-3)")
        if self._like is None:
            raise ValueError("the data shape is unknown: call step() (or evaluate_loss()) first")
        with torch.no_grad():
            x = self._draw(n, args, kwargs)[0].detach()
        check_finite("decoder draws v̂", x)
        if langevin_steps:
            from ..mcmc.amortized import AmortizedLangevin

            sampler = AmortizedLangevin(lambda m: x, self.energy_model, kernel, langevin_steps)
            x = sampler.revise(x, *args, **kwargs)
        return x

    def encode(self, v, *args, **kwargs) -> dict:
        """The encoder's means :math:`\\mu_\\phi(v)` by latent site (detached); a
        site whose distribution has no ``.mean`` gives one draw instead."""
        self.view._check_data(v)
        with torch.no_grad():
            trace = trace_run(self.encoder_guide, v, *args, **kwargs)
        out = {}
        for name, site in latent_sites(trace).items():
            try:
                out[name] = site["fn"].mean.detach()
            except NotImplementedError:
                out[name] = site["value"].detach()
        return out

    def reconstruct(self, v, *args, **kwargs):
        """Encode then decode: the decoder mean at :math:`h = \\mu_\\phi(v)`, shaped
        like ``v`` (detached)."""
        h = self.encode(v, *args, **kwargs)
        with torch.no_grad():
            trace = trace_run(self.decoder_model, v, *args, values=h, **kwargs)
            fn = self._observed(trace, v, conditioned=h)
        return fn.mean.to(v.dtype).detach()

    def reconstruction_error(self, v, *args, **kwargs):
        """Per-item squared error :math:`\\|v - \\text{reconstruct}(v)\\|^2`, shape ``(len(v),)``."""
        r = self.reconstruct(v, *args, **kwargs)
        return (v - r).pow(2).reshape(v.shape[0], -1).sum(-1)

    def ood_auroc(self, v_in, v_out, *args, **kwargs) -> float:
        """AUROC of the score :math:`-E_\\theta(v)` for telling ``v_in`` (in
        distribution) from ``v_out`` (:func:`pyro_ebm.metrics.auroc`)."""
        with torch.no_grad():
            s_in = -self.energy(v_in, *args, **kwargs)
            s_out = -self.energy(v_out, *args, **kwargs)
        return auroc(s_in, s_out)

    # -- helpers -----------------------------------------------------------

    def _prepare_batch(self, v, args, kwargs, where):
        self._check(v, args, kwargs, where)
        n = self.num_samples or v.shape[0]
        if n != v.shape[0] and (args or kwargs):
            raise ValueError(
                f"num_samples={n} differs from the batch size {v.shape[0]}, but the models take extra "
                "arguments (e.g. labels) that are per data item; leave num_samples=None"
            )
        self._like = torch.zeros_like(v[:1])
