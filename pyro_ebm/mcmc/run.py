# SPDX-License-Identifier: Apache-2.0
"""The sampling driver: many chains of one kernel on a Pyro model's latent sites or
on a plain potential, with warmup step-size adaptation, thinning, storage in the
ArviZ layout ``(chain, draw, ...)`` and a progress bar."""

from __future__ import annotations

import inspect
import math

import torch

from ..energy import LatentPotential, check_finite
from .kernels import KernelState

__all__ = ["DualAveraging", "Samples", "sample"]


class DualAveraging:
    r"""Per-chain dual averaging of the log step size toward a target acceptance
    probability δ (Hoffman & Gelman 2014, Algorithm 5):

    .. math::

        \bar H_t &= (1 - \tfrac{1}{t + t_0})\,\bar H_{t-1} + \tfrac{1}{t + t_0}(\delta - \alpha_t)\\
        \log\epsilon_t &= \mu - \tfrac{\sqrt t}{\gamma}\bar H_t,\qquad
        \log\bar\epsilon_t = t^{-\kappa}\log\epsilon_t + (1 - t^{-\kappa})\log\bar\epsilon_{t-1}

    with :math:`\mu = \log(10\,\epsilon_0)`. Warmup steps use :math:`\epsilon_t`;
    sampling uses the averaged :math:`\bar\epsilon`.

    :param torch.Tensor step_size: ``(C,)`` initial step sizes ε0.
    :param float target_accept: δ.

    **References:** M. D. Hoffman, A. Gelman, "The No-U-Turn Sampler", JMLR 2014.
    """

    def __init__(self, step_size, target_accept, gamma=0.05, t0=10.0, kappa=0.75):
        log_eps = step_size.log()
        self.mu = log_eps + math.log(10.0)
        self.h_bar = torch.zeros_like(log_eps)
        self.log_eps_bar = log_eps.clone()
        self.target_accept, self.gamma, self.t0, self.kappa = float(target_accept), gamma, t0, kappa
        self.t = 0

    def update(self, accept_prob):
        """One adaptation step from the last ``(C,)`` acceptance probabilities;
        returns the step sizes for the next step."""
        self.t += 1
        w = 1.0 / (self.t + self.t0)
        self.h_bar = (1 - w) * self.h_bar + w * (self.target_accept - accept_prob)
        log_eps = self.mu - (math.sqrt(self.t) / self.gamma) * self.h_bar
        eta = self.t ** -self.kappa
        self.log_eps_bar = eta * log_eps + (1 - eta) * self.log_eps_bar
        return log_eps.exp()

    def final_step_size(self):
        """The averaged step sizes :math:`\\bar\\epsilon`, used after warmup."""
        return self.log_eps_bar.exp()


class Samples:
    """The draws of :func:`sample`: positions of every chain and the per-step
    statistics, in the ArviZ layout ``(chain, draw, ...)``.

    :ivar torch.Tensor positions: ``(chain, draw, *event)`` kept positions, in the
        unconstrained space for a Pyro model.
    :ivar dict stats: ``accept_prob``, ``step_size``, ``potential_energy``,
        ``diverging`` (and ``energy``, the Hamiltonian, for kernels with a
        momentum), each ``(chain, draw)``.
    :ivar torch.Tensor warmup_divergences: ``(chain,)`` divergent warmup steps.
    :ivar KernelState last_state: the kernel state after the last step (to go on
        sampling: ``kernel.step(samples.last_state)``).
    """

    def __init__(self, positions, stats, unpack, warmup_divergences, last_state: KernelState):
        self.positions = positions  # (chain, draw, *event), unconstrained
        self.stats = stats
        self.warmup_divergences = warmup_divergences
        self.last_state = last_state
        self._unpack = unpack
        self._samples = None

    @property
    def num_chains(self) -> int:
        return self.positions.shape[0]

    @property
    def num_samples(self) -> int:
        return self.positions.shape[1]

    @property
    def num_divergences(self) -> int:
        """Divergent steps among the kept draws, over all chains."""
        return int(self.stats["diverging"].sum())

    def get_samples(self, group_by_chain=True):
        """The draws by site, in the constrained space: ``(chain, draw, *site_shape)``,
        or ``(chain * draw, *site_shape)`` with ``group_by_chain=False``. A plain
        potential's draws are under the key ``"x"``."""
        if self._samples is None:
            chains, draws = self.positions.shape[:2]
            flat = self.positions.reshape((chains * draws,) + self.positions.shape[2:])
            with torch.no_grad():
                values = self._unpack(flat)
            self._samples = {k: v.reshape((chains, draws) + v.shape[1:]) for k, v in values.items()}
        if group_by_chain:
            return dict(self._samples)
        return {k: v.reshape((-1,) + v.shape[2:]) for k, v in self._samples.items()}

    def to_inference_data(self):
        """The draws and statistics as ArviZ data (``InferenceData`` under ArviZ 0.x,
        a ``DataTree`` under ArviZ 1.x); see :func:`pyro_ebm.diagnostics.to_inference_data`."""
        from ..diagnostics import to_inference_data

        return to_inference_data(self.get_samples(), self.stats)

    def summary(self, **kwargs):
        """ArviZ's summary table (mean, sd, intervals, MCSE, ``ess_bulk``,
        ``ess_tail``, ``r_hat``) per site and coordinate."""
        from ..diagnostics import summary

        return summary(self, **kwargs)

    def plot_trace(self, path, **kwargs):
        """Write ArviZ's trace plot of every site (the first 8 chains by default)
        to the PNG file ``path``; see :func:`pyro_ebm.diagnostics.plot_trace`."""
        from ..diagnostics import plot_trace

        return plot_trace(self, path, **kwargs)

    def __repr__(self):
        sites = ", ".join(f"{k}: {tuple(v.shape)}" for k, v in self.get_samples().items())
        return (f"Samples({self.num_chains} chains x {self.num_samples} draws; {sites}; "
                f"{self.num_divergences} divergences)")


def sample(model_or_potential, kernel, num_chains, num_samples, warmup_steps=0, thin=1,
           model_args=(), model_kwargs=None, initial=None, progress=True) -> Samples:
    """Run ``num_chains`` chains of ``kernel`` as one batch and keep ``num_samples``
    draws of each after ``warmup_steps`` steps, every ``thin``-th step.

    ``model_or_potential`` is either

    - a Pyro model, run as ``model(*model_args, **model_kwargs)``: the chains move
      over all its latent sites jointly, in the unconstrained space of each site's
      support (``biject_to``), on the potential of
      :meth:`~pyro_ebm.energy.EnergyView.latent_potential`; draws come back in the
      constrained space under the site names. ``initial`` is ``None`` (draws from
      the model's own sampling statements), ``"uniform"`` (uniform on (-2, 2) in
      the unconstrained space, Stan's default, better when the priors are much
      broader than the posterior: a chain started far out adapts a tiny step
      size and may not reach the posterior within warmup, which R-hat then
      shows), a dict of constrained values ``(num_chains, *site_shape)`` by
      site, or a packed unconstrained ``(num_chains, dim)`` tensor;
    - a plain potential ``U(x)``, mapping ``(C, *event)`` to ``(C,)``: taken as such
      when ``initial`` is a ``(num_chains, *event)`` tensor, no model arguments
      are given and the callable takes one argument (draws under the key
      ``"x"``); or a :class:`~pyro_ebm.energy.LatentPotential`.

    During warmup, kernels with ``adapt_step_size`` (MALA, HMC) adapt each chain's
    step size toward their ``target_accept`` by :class:`DualAveraging`. A divergent
    step (non-finite proposal) leaves that chain in place and is counted; the run
    goes on.

    :param model_or_potential: Pyro model, potential callable or ``LatentPotential``.
    :param kernel: a kernel from :mod:`pyro_ebm.mcmc.kernels`.
    :param int num_chains: chains C, run as one batch.
    :param int num_samples: draws kept per chain.
    :param int warmup_steps: steps before the first kept draw.
    :param int thin: keep every ``thin``-th step after warmup.
    :param tuple model_args: arguments of the Pyro model.
    :param dict model_kwargs: keyword arguments of the Pyro model.
    :param initial: initial positions (see above).
    :param bool progress: show a progress bar with acceptance and divergences.
    :returns: :class:`Samples`.

    >>> samples = mcmc.sample(model, mcmc.MALA(0.1), num_chains=1024, num_samples=500,
    ...                       warmup_steps=500, model_args=(v,))
    >>> samples.get_samples()["z"].shape          # (1024, 500, *site_shape)
    >>> samples.summary()
    """
    for name, value, low in (("num_chains", num_chains, 1), ("num_samples", num_samples, 1),
                             ("warmup_steps", warmup_steps, 0), ("thin", thin, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    for attr in ("init", "step"):
        if not callable(getattr(kernel, attr, None)):
            raise TypeError(f"kernel must have init(position, potential) and step(state), got {kernel!r}")
    potential, position, unpack = _setup(model_or_potential, num_chains, model_args,
                                         model_kwargs or {}, initial)
    with torch.no_grad():
        state = kernel.init(position, potential)
        return _run(kernel, state, unpack, num_samples, warmup_steps, thin, progress)


def _run(kernel, state, unpack, num_samples, warmup_steps, thin, progress):
    adapter = None
    if warmup_steps and getattr(kernel, "adapt_step_size", False):
        adapter = DualAveraging(state.step_size, kernel.target_accept)
    warm_div = torch.zeros(state.position.shape[0], dtype=torch.long, device=state.position.device)
    total = warmup_steps + num_samples * thin
    bar = _progress_bar(total, progress)
    refresh = max(1, total // 100)
    draws = {"position": [], "accept_prob": [], "step_size": [], "potential_energy": [], "diverging": []}
    energies = [] if state.momentum is not None else None
    acc_sum = torch.zeros_like(state.potential_energy)
    div_sum = torch.zeros_like(warm_div)
    for i in range(total):
        state = kernel.step(state)
        if i < warmup_steps:
            warm_div += state.diverging
            if adapter is not None:
                if i + 1 < warmup_steps:
                    state = state._replace(step_size=adapter.update(state.accept_prob))
                else:
                    adapter.update(state.accept_prob)
                    state = state._replace(step_size=adapter.final_step_size())
        elif (i - warmup_steps + 1) % thin == 0:
            draws["position"].append(state.position)
            draws["accept_prob"].append(state.accept_prob)
            draws["step_size"].append(state.step_size)
            draws["potential_energy"].append(state.potential_energy)
            draws["diverging"].append(state.diverging)
            if energies is not None:
                energies.append(state.potential_energy + 0.5 * state.momentum.pow(2).flatten(1).sum(-1))
        if bar is not None:  # host syncs only every `refresh` steps
            acc_sum += state.accept_prob
            div_sum += state.diverging
            if (i + 1) % refresh == 0 or i + 1 == total:
                steps = (i + 1) - bar.n
                bar.set_description("warmup" if i < warmup_steps else "sample", refresh=False)
                bar.set_postfix(accept=f"{float(acc_sum.mean()) / steps:.3f}",
                                divergences=int(div_sum.sum()), refresh=False)
                bar.update(steps)
                acc_sum.zero_()
    if bar is not None:
        bar.close()
    positions = torch.stack(draws.pop("position"), 1)
    stats = {k: torch.stack(v, 1) for k, v in draws.items()}
    if energies is not None:
        stats["energy"] = torch.stack(energies, 1)
    return Samples(positions, stats, unpack, warm_div, state)


def _progress_bar(total, progress):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, leave=True)


def _setup(target, num_chains, model_args, model_kwargs, initial):
    """Resolve the potential, the initial positions and the unpacking of draws."""
    if isinstance(target, LatentPotential):
        return target, _latent_initial(target, num_chains, initial), target.unpack
    if not callable(target):
        raise TypeError(f"expected a Pyro model or a potential function, got {type(target).__name__}")
    if torch.is_tensor(initial) and not model_args and not model_kwargs and _takes_one_argument(target):
        if initial.dim() < 2 or initial.shape[0] != num_chains:
            raise ValueError(
                f"initial positions for a potential must have shape (num_chains={num_chains}, "
                f"*event), got {tuple(initial.shape)}"
            )
        return target, initial.detach(), _as_x
    from ..infer.score_matching import energy_view

    view = energy_view(target)
    try:
        potential = view.latent_potential(*model_args, **model_kwargs)
    except TypeError as err:
        if not model_args and not model_kwargs and initial is None:
            raise TypeError(
                f"{err}. If {getattr(target, '__name__', 'this callable')} is a plain potential "
                "U(x) rather than a Pyro model, pass initial positions of shape (num_chains, dim)"
            ) from err
        raise
    return potential, _latent_initial(potential, num_chains, initial), potential.unpack


def _takes_one_argument(fn):
    """Whether ``fn(x)`` is a valid call (a potential); a Pyro model without
    arguments is not."""
    try:
        inspect.signature(fn).bind(None)
    except TypeError:
        return False
    except ValueError:  # no signature available (some builtins): assume a potential
        return True
    return True


def _as_x(z):
    return {"x": z}


def _latent_initial(potential, num_chains, initial):
    if initial is None:
        position = potential.sample_prior(num_chains)
    elif isinstance(initial, str):
        if initial != "uniform":
            raise ValueError(f"initial must be None, 'uniform', a dict or a tensor, got {initial!r}")
        prior = potential.sample_prior(num_chains)
        position = 4 * torch.rand_like(prior) - 2
    elif isinstance(initial, dict):
        expected = {info.name: info.shape for info, *_ in potential.sites}
        unknown = sorted(set(initial) - set(expected))
        missing = sorted(set(expected) - set(initial))
        if unknown or missing:
            raise ValueError(
                f"initial values must be given for exactly the latent sites {sorted(expected)}; "
                f"missing {missing}, unknown {unknown}"
            )
        for name, shape in expected.items():
            value = initial[name]
            if not torch.is_tensor(value) or tuple(value.shape) != (num_chains,) + tuple(shape):
                got = tuple(value.shape) if torch.is_tensor(value) else type(value).__name__
                raise ValueError(
                    f"initial value of site '{name}' must have shape (num_chains, *site_shape) = "
                    f"{(num_chains,) + tuple(shape)}, got {got}"
                )
            check_finite(f"initial value of site '{name}'", value)
        position = potential.pack({k: v.detach() for k, v in initial.items()})
        for info, _, _, sl in potential.sites:
            if not bool(torch.isfinite(position[:, sl]).all()):
                raise ValueError(
                    f"initial value of site '{info.name}' lies outside its support {info.support}"
                )
    elif torch.is_tensor(initial):
        if tuple(initial.shape) != (num_chains, potential.dim):
            raise ValueError(
                f"packed unconstrained initial positions must have shape (num_chains, dim) = "
                f"{(num_chains, potential.dim)}, got {tuple(initial.shape)}"
            )
        position = initial.detach()
    else:
        raise TypeError(f"initial must be None, a dict by site or a tensor, got {type(initial).__name__}")
    return position
