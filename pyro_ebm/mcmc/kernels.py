# SPDX-License-Identifier: Apache-2.0
"""Batched many-chain MCMC kernels over a potential :math:`U(x) = -\\log \\tilde\\pi(x)`.

A kernel is a small object with ``init(position, potential) -> state`` and
``step(state) -> (state, info)``. ``position`` has shape ``(C, *event)`` (usually
``(C, D)``) with the C chains in the leading dimension; ``potential(x)`` maps it to
the per-chain potential energy, shape ``(C,)``. Gradients come from autograd,
through the one helper :func:`potential_and_grad`. Kernels know nothing about
Pyro; :func:`pyro_ebm.mcmc.sample` turns a Pyro model into a potential.

The :class:`KernelState` holds what the next step needs, the :class:`KernelInfo`
what a step reports (acceptance, divergence, the Hamiltonian); both are
NamedTuples of batched, detached tensors, so a step holds no autograd graph and
no host synchronization: chains never leave the device and a thousand chains
cost about what one does. Nothing else is kept between steps, so step-size
adaptation, annealing or an amortized initializer wrap a kernel without knowing
its inside. A chain whose proposal has a non-finite potential or gradient is
marked ``diverging`` for that step and stays where it was; the other chains
move on.

Each built-in kernel splits its step in two, so that the arithmetic can be
compiled (``mcmc.sample(..., compile=True)``): :meth:`~_Kernel.step_inputs` draws
the step's random numbers (and other per-step numbers) eagerly from torch's
generator, and :meth:`~_Kernel.move` is a pure function of tensors and of a
potential-and-gradient function that turns them into the next positions and the
step's statistics. ``step`` is ``move`` on the autograd gradient of the state's
potential, so an eager step and a compiled one consume the same random numbers.
"""

from __future__ import annotations

import functools
import math
from typing import Callable, NamedTuple, Optional

import torch

__all__ = [
    "HMC",
    "MALA",
    "ULA",
    "AnnealedLangevin",
    "KernelInfo",
    "KernelState",
    "NonFiniteStartError",
    "UnderdampedLangevin",
    "potential_and_grad",
]


class KernelState(NamedTuple):
    """What the next step of C chains needs; every tensor has the chains in dim 0.

    :ivar position: ``(C, *event)`` current positions.
    :ivar potential_energy: ``(C,)`` potential :math:`U` at ``position``.
    :ivar grad: ``(C, *event)`` :math:`\\nabla U` at ``position`` (the cache that
        the next step starts from).
    :ivar step_size: ``(C,)`` per-chain step size.
    :ivar momentum: ``(C, *event)`` velocity carried across steps by
        :class:`UnderdampedLangevin`, else ``None`` (HMC draws a fresh momentum
        every step, so it keeps none).
    :ivar potential_fn: the potential the chains run on.
    :ivar iteration: number of steps taken (a Python int; the temperature
        schedule of :class:`AnnealedLangevin` reads it).
    """

    position: torch.Tensor
    potential_energy: torch.Tensor
    grad: torch.Tensor
    step_size: torch.Tensor
    momentum: Optional[torch.Tensor]
    potential_fn: Callable
    iteration: int = 0


class KernelInfo(NamedTuple):
    """What one step of C chains reports; every tensor is ``(C,)``.

    :ivar accept_prob: Metropolis acceptance probability of the step (for the
        unadjusted kernels 1, or 0 for a divergent step).
    :ivar is_accepted: bool, the chain moved to its proposal (for the
        unadjusted kernels: the proposal was finite).
    :ivar diverging: bool, the proposal was non-finite (or, for HMC, its energy
        error exceeded ``max_delta_energy``).
    :ivar energy: the Hamiltonian :math:`U(x) + \\tfrac12\\|p\\|^2` after the step
        for the kernels with a momentum (HMC, underdamped Langevin), else ``None``.
    """

    accept_prob: torch.Tensor
    is_accepted: torch.Tensor
    diverging: torch.Tensor
    energy: Optional[torch.Tensor] = None


def potential_and_grad(potential_fn, position):
    """Potential :math:`U(x)` and its gradient :math:`\\nabla_x U(x)` by autograd,
    both detached: shapes ``(C,)`` and ``position.shape``."""
    with torch.enable_grad():
        x = position.detach().requires_grad_(True)
        u = potential_fn(x)
        (grad,) = torch.autograd.grad(u.sum(), x, allow_unused=True)
    if grad is None:  # a constant potential
        grad = torch.zeros_like(x)
    return u.detach(), grad


def _column(t, like):
    """View a per-chain ``(C,)`` tensor so that it broadcasts against ``like``."""
    return t.view((-1,) + (1,) * (like.dim() - 1))


def _sq_norm(x):
    return x.pow(2).flatten(1).sum(-1)


def _metropolis(log_ratio, uniform, like):
    """Per-chain Metropolis test on ``log_ratio`` with the ``(C,)`` uniforms
    ``uniform`` (a non-finite ratio rejects): returns the acceptance probability,
    the ``(C,)`` accept mask and that mask shaped to broadcast against ``like``."""
    accept_prob = torch.where(torch.isfinite(log_ratio), log_ratio, -math.inf).clamp(max=0).exp()
    accept = uniform < accept_prob
    return accept_prob, accept, _column(accept, like)


def _check_positive(name, value):
    if torch.is_tensor(value):
        if value.dim() > 1 or not bool(torch.isfinite(value).all()) or not bool((value > 0).all()):
            raise ValueError(f"{name} must be a positive finite scalar or a (chains,) tensor, got {value}")
    elif not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be > 0, got {value!r}")


def _check_target(target_accept_prob):
    try:
        ok = not isinstance(target_accept_prob, bool) and 0.0 < float(target_accept_prob) < 1.0
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise ValueError(
            f"target_accept_prob must lie in (0, 1), got {target_accept_prob!r}; to keep the step "
            "size fixed during warmup pass adapt_step_size=False"
        )


class _Kernel:
    """Shared ``init``: validates the positions and the potential, caches U and ∇U."""

    #: whether :func:`pyro_ebm.mcmc.sample` adapts the step size during warmup
    adapt_step_size = False
    target_accept_prob = None
    uses_momentum = False

    def __init__(self, step_size):
        _check_positive("step_size", step_size)
        self.step_size = step_size

    def init(self, position, potential) -> KernelState:
        """Start C chains at ``position`` ``(C, *event)`` on ``potential``: the
        state with :math:`U` and :math:`\\nabla U` there, the kernel's per-chain
        step sizes and (for :class:`UnderdampedLangevin`) a velocity drawn
        from :math:`\\mathcal N(0, I)`."""
        if not callable(potential):
            raise TypeError(f"potential must be callable, got {type(potential).__name__}")
        if not torch.is_tensor(position):
            raise TypeError(f"position must be a tensor, got {type(position).__name__}")
        if position.dim() < 2:
            raise ValueError(
                f"position must have shape (chains, dim) with the chains first, got shape "
                f"{tuple(position.shape)}; use x.unsqueeze(0) for one chain"
            )
        if not position.is_floating_point():
            raise TypeError(f"position must be a floating point tensor, got dtype {position.dtype}")
        _check_finite_positions(position)
        chains = position.shape[0]
        position = position.detach()
        try:
            u, grad = potential_and_grad(potential, position)
        except RuntimeError as err:
            if "does not require grad" in str(err):
                raise ValueError(
                    "the potential's output does not depend differentiably on the position "
                    "(was it computed under torch.no_grad or detached?)"
                ) from err
            raise
        if u.shape != (chains,):
            raise ValueError(
                f"potential must map positions of shape {tuple(position.shape)} to one energy "
                f"per chain, shape ({chains},), got shape {tuple(u.shape)}"
            )
        bad = ~(torch.isfinite(u) & torch.isfinite(grad).flatten(1).all(-1))
        if bool(bad.any()):
            raise NonFiniteStartError(u, grad, bad)
        step = torch.as_tensor(self.step_size, dtype=position.dtype, device=position.device)
        if step.dim() == 0:
            step = step.expand(chains).clone()
        elif step.shape != (chains,):
            raise ValueError(
                f"a per-chain step_size must have shape ({chains},), got {tuple(step.shape)}"
            )
        momentum = torch.randn_like(position) if self.uses_momentum else None
        return KernelState(
            position=position,
            potential_energy=u,
            grad=grad,
            step_size=step,
            momentum=momentum,
            potential_fn=potential,
            iteration=0,
        )

    def step(self, state: KernelState) -> tuple[KernelState, KernelInfo]:
        """One step of every chain: the next state and what the step reports
        (:meth:`move` on the autograd gradient of ``state.potential_fn``, with the
        random numbers of :meth:`step_inputs`)."""
        inputs = self.step_inputs(state)
        grad_fn = functools.partial(potential_and_grad, state.potential_fn)
        out = self.move(grad_fn, state.position, state.potential_energy, state.grad, state.step_size,
                        state.momentum, *inputs)
        return self.advance(state, out)

    def step_inputs(self, state: KernelState) -> tuple:  # pragma: no cover - abstract
        """The step's random numbers (and other per-step numbers), a tuple of tensors
        drawn eagerly from torch's generator, in the order the step uses them."""
        raise NotImplementedError

    def move(self, potential_and_grad_fn, position, potential_energy, grad, step_size, momentum,
             *inputs) -> tuple:  # pragma: no cover - abstract
        """The step as a pure function of tensors: ``potential_and_grad_fn(x)`` returns
        :math:`(U(x), \\nabla U(x))`; returns ``(position, potential_energy, grad,
        momentum, accept_prob, is_accepted, diverging, energy)`` after the step
        (``momentum`` and ``energy`` may be ``None``)."""
        raise NotImplementedError

    @staticmethod
    def advance(state: KernelState, out: tuple) -> tuple[KernelState, KernelInfo]:
        """The next state and the step's info from :meth:`move`'s result ``out``."""
        x, u, g, momentum, accept_prob, accepted, diverging, energy = out
        state = state._replace(position=x, potential_energy=u, grad=g, momentum=momentum,
                               iteration=state.iteration + 1)
        return state, KernelInfo(accept_prob=accept_prob, is_accepted=accepted, diverging=diverging,
                                 energy=energy)

    def __repr__(self):
        fields = ", ".join(f"{k}={v}" for k, v in vars(self).items() if not k.startswith("_"))
        return f"{type(self).__name__}({fields})"


class NonFiniteStartError(ValueError):
    """The potential or its gradient is NaN or Inf at the initial position of some
    chains. ``chains`` holds their indices; the message says which of U and ∇U is
    not finite, how, and whether every chain is affected (then the target itself
    is at fault, not the starting points)."""

    def __init__(self, potential_energy, grad, bad):
        self.chains = bad.nonzero().flatten().tolist()
        first = self.chains[0]
        u, g = potential_energy[first], grad[first]
        where = "the target's log density is not finite"
        if not bool(torch.isfinite(u)):
            what = f"the potential is {'NaN' if bool(torch.isnan(u)) else float(u)}"
        else:
            where = "the target's log density is not differentiable"
            kind = "NaN" if bool(torch.isnan(g).any()) else "Inf"
            what = f"the gradient of the potential has {kind} entries"
        total = bad.numel()
        if len(self.chains) == total:
            message = (
                f"{what} at the initial positions of all {total} chains (e.g. chain {first}): "
                f"{where} where the chains start; check the potential (the model and its data), "
                "or start the chains elsewhere"
            )
        else:
            message = (
                f"{what} at the initial position of {len(self.chains)} of {total} chains, e.g. "
                f"chain(s) {self.chains[:10]}; start them elsewhere"
            )
        super().__init__(message)


def _check_finite_positions(position):
    bad = ~torch.isfinite(position)
    if bool(bad.any()):
        index = tuple(int(i) for i in bad.nonzero()[0])
        raise ValueError(
            f"initial positions contain {int(bad.sum())} non-finite value(s), first at index "
            f"{index} (chain {index[0]}); shape {tuple(position.shape)}"
        )


def _langevin_move(x, u, g, momentum, proposal, u_new, g_new):
    """Keep the proposal where its potential and gradient are finite; elsewhere the
    chain stays and the step is marked divergent. Returns :meth:`_Kernel.move`'s tuple."""
    ok = torch.isfinite(u_new + g_new.flatten(1).sum(-1))
    keep = _column(ok, proposal)
    return (torch.where(keep, proposal, x), torch.where(ok, u_new, u), torch.where(keep, g_new, g),
            momentum, ok.to(u_new.dtype), ok, ~ok, None)


class ULA(_Kernel):
    r"""Unadjusted Langevin algorithm: the Euler–Maruyama discretization of the
    Langevin diffusion, with no Metropolis correction (so a bias of order γ).

    .. math::

        x' = x - \gamma \nabla U(x) + \sqrt{2\gamma}\,\xi, \qquad \xi \sim \mathcal N(0, I)

    One gradient per step. A proposal with a non-finite potential or gradient is
    rejected (the chain stays) and counted as divergent.

    :param float step_size: γ > 0, a float or a per-chain ``(C,)`` tensor.

    >>> kernel = ULA(step_size=0.01)
    >>> state = kernel.init(torch.zeros(1024, 2), lambda x: 0.5 * x.pow(2).sum(-1))
    >>> for _ in range(100):
    ...     state, info = kernel.step(state)
    >>> state.position.shape, info.diverging.shape
    (torch.Size([1024, 2]), torch.Size([1024]))

    **References:** G. O. Roberts, R. L. Tweedie, "Exponential convergence of
    Langevin distributions and their discrete approximations", Bernoulli 1996.
    """

    def step_inputs(self, state):
        return (torch.randn_like(state.position),)

    def move(self, potential_and_grad_fn, x, u, g, step_size, momentum, noise):
        h = _column(step_size, x)
        proposal = torch.addcmul(torch.addcmul(x, h, g, value=-1.0), (2 * h).sqrt(), noise)
        u_new, g_new = potential_and_grad_fn(proposal)
        return _langevin_move(x, u, g, momentum, proposal, u_new, g_new)


class MALA(_Kernel):
    r"""Metropolis-adjusted Langevin algorithm, with a per-chain accept / reject.

    The Langevin proposal :math:`x' = x - \gamma\nabla U(x) + \sqrt{2\gamma}\,\xi`
    has density :math:`\log q(x' \mid x) = -\|x' - x + \gamma \nabla U(x)\|^2 / (4\gamma)`
    (a Gaussian of variance :math:`2\gamma`), and is accepted with probability

    .. math::

        \alpha = \min\Big(1, \exp\big(U(x) - U(x') + \log q(x \mid x') - \log q(x' \mid x)\big)\Big),

    so the chains target :math:`\pi \propto e^{-U}` exactly. During warmup,
    :func:`~pyro_ebm.mcmc.sample` adapts each chain's γ toward
    ``target_accept_prob`` by dual averaging
    (:class:`~pyro_ebm.mcmc.adaptation.StepSizeAdaptation`). A non-finite proposal
    is rejected and marked divergent. The keyword names are those of Pyro's
    :class:`~pyro.infer.mcmc.HMC`.

    :param float step_size: γ > 0 (initial value when adapted), float or ``(C,)`` tensor.
    :param float target_accept_prob: acceptance rate that warmup adapts γ toward
        (0.574 is optimal for MALA in high dimension).
    :param bool adapt_step_size: adapt γ during warmup; ``False`` keeps it fixed.

    >>> samples = mcmc.sample(potential_fn=potential, kernel=MALA(0.1), num_chains=1024,
    ...                       num_samples=200, warmup_steps=200, initial=torch.zeros(1024, 2))

    **References:** G. O. Roberts, R. L. Tweedie, "Exponential convergence of
    Langevin distributions and their discrete approximations", Bernoulli 1996;
    G. O. Roberts, J. S. Rosenthal, "Optimal scaling of discrete approximations
    to Langevin diffusions", JRSS B 1998.
    """

    def __init__(self, step_size, target_accept_prob=0.57, *, adapt_step_size=True):
        super().__init__(step_size)
        _check_target(target_accept_prob)
        self.target_accept_prob = float(target_accept_prob)
        self.adapt_step_size = bool(adapt_step_size)

    def step_inputs(self, state):
        # the proposal noise, then the accept uniforms: the order of the draws of an
        # eager step that draws each where it is used
        return torch.randn_like(state.position), torch.rand_like(state.potential_energy)

    def move(self, potential_and_grad_fn, x, u, g, step_size, momentum, noise, uniform):
        h = _column(step_size, x)
        proposal = torch.addcmul(torch.addcmul(x, h, g, value=-1.0), (2 * h).sqrt(), noise)
        u_new, g_new = potential_and_grad_fn(proposal)
        # log q(x'|x) = -|sqrt(2h) noise|^2 / (4h) = -|noise|^2 / 2, so
        # log_ratio = U(x) - U(x') + |noise|^2 / 2 - |x - x' + h ∇U(x')|^2 / (4h)
        log_rev = _sq_norm(torch.addcmul(x - proposal, h, g_new)) / (4 * step_size)
        log_ratio = torch.add(u - u_new, _sq_norm(noise), alpha=0.5) - log_rev
        ok = torch.isfinite(log_ratio)  # a non-finite U(x') or ∇U(x') is a divergence
        accept_prob, accept, keep = _metropolis(log_ratio, uniform, x)
        return (torch.where(keep, proposal, x), torch.where(accept, u_new, u), torch.where(keep, g_new, g),
                momentum, accept_prob, accept, ~ok, None)


class UnderdampedLangevin(_Kernel):
    r"""Underdamped (kinetic) Langevin dynamics with unit mass, by the BAOAB
    splitting: one gradient per step, the velocity kept across steps.

    .. math::

        v &\leftarrow v - \tfrac{h}{2}\nabla U(x) &&\text{(B)}\\
        x &\leftarrow x + \tfrac{h}{2} v &&\text{(A)}\\
        v &\leftarrow e^{-\gamma h} v + \sqrt{1 - e^{-2\gamma h}}\;\xi &&\text{(O)}\\
        x &\leftarrow x + \tfrac{h}{2} v &&\text{(A)}\\
        v &\leftarrow v - \tfrac{h}{2}\nabla U(x) &&\text{(B)}

    with :math:`\xi \sim \mathcal N(0, I)`; the chains target :math:`\pi(x)\,\mathcal
    N(v; 0, I)` up to an :math:`O(h^2)` bias in x. Large friction approaches
    overdamped Langevin; small friction lets the velocity carry chains across
    energy barriers. A non-finite step is rejected, marked divergent, and the
    chain's velocity is refreshed from :math:`\mathcal N(0, I)`.

    :param float step_size: h > 0, float or ``(C,)`` tensor.
    :param float friction: γ > 0.

    >>> kernel = UnderdampedLangevin(step_size=0.1, friction=1.0)

    **References:** B. Leimkuhler, C. Matthews, "Rational construction of
    stochastic numerical methods for molecular sampling", AMRX 2013.
    """

    uses_momentum = True

    def __init__(self, step_size, friction=1.0):
        super().__init__(step_size)
        _check_positive("friction", friction)
        self.friction = float(friction)

    def step_inputs(self, state):
        return (torch.randn_like(state.position),)

    def move(self, potential_and_grad_fn, x, u, g, step_size, v, noise):
        h = _column(step_size, x)
        half = 0.5 * h
        decay = torch.exp(-self.friction * h)
        v_new = v - half * g
        x_new = x + half * v_new
        v_new = decay * v_new + (1 - decay * decay).sqrt() * noise
        x_new = x_new + half * v_new
        u_new, g_new = potential_and_grad_fn(x_new)
        v_new = v_new - half * g_new
        ok = torch.isfinite(u_new + g_new.flatten(1).sum(-1) + v_new.flatten(1).sum(-1))
        keep = _column(ok, x)
        u_out, v_out = torch.where(ok, u_new, u), torch.where(keep, v_new, noise)
        energy = u_out + 0.5 * _sq_norm(v_out)
        return (torch.where(keep, x_new, x), u_out, torch.where(keep, g_new, g), v_out,
                ok.to(u_new.dtype), ok, ~ok, energy)


class HMC(_Kernel):
    r"""Hamiltonian Monte Carlo with ``num_steps`` leapfrog steps, a fresh
    unit-mass momentum per step and a per-chain Metropolis accept.

    With :math:`H(x, p) = U(x) + \tfrac12\|p\|^2`, :math:`p \sim \mathcal N(0, I)` and
    L leapfrog steps of size ε,

    .. math::

        p &\leftarrow p - \tfrac{\epsilon}{2}\nabla U(x),\quad
        x \leftarrow x + \epsilon p,\quad
        p \leftarrow p - \tfrac{\epsilon}{2}\nabla U(x)\quad (\times L)\\
        \alpha &= \min\big(1, \exp(H(x, p) - H(x', p'))\big)

    (consecutive half kicks fused: L gradients per step, since the gradient at
    the current point is cached in the state). On rejection the chain keeps its
    position together with the cached potential and gradient of that position.
    A step whose energy error :math:`H(x', p') - H(x, p)` is non-finite or exceeds
    ``max_delta_energy`` is divergent. The keyword names are those of Pyro's
    :class:`~pyro.infer.mcmc.HMC`; the mass matrix is the identity and is not adapted.

    :param float step_size: ε > 0 (initial value when adapted), float or ``(C,)`` tensor.
    :param int num_steps: L ≥ 1 leapfrog steps per step.
    :param float target_accept_prob: acceptance rate that warmup adapts ε toward
        (:class:`~pyro_ebm.mcmc.adaptation.StepSizeAdaptation`).
    :param float max_delta_energy: energy error above which a step is divergent.
    :param bool adapt_step_size: adapt ε during warmup; ``False`` keeps it fixed.

    >>> kernel = HMC(step_size=0.2, num_steps=10)

    **References:** S. Duane, A. D. Kennedy, B. J. Pendleton, D. Roweth, "Hybrid
    Monte Carlo", Physics Letters B 1987; R. M. Neal, "MCMC using Hamiltonian
    dynamics", Handbook of MCMC 2011.
    """

    def __init__(self, step_size, num_steps=10, target_accept_prob=0.8, max_delta_energy=1000.0, *,
                 adapt_step_size=True):
        super().__init__(step_size)
        if not isinstance(num_steps, int) or isinstance(num_steps, bool) or num_steps < 1:
            raise ValueError(f"num_steps must be an int >= 1, got {num_steps!r}")
        _check_target(target_accept_prob)
        _check_positive("max_delta_energy", max_delta_energy)
        self.num_steps = num_steps
        self.target_accept_prob = float(target_accept_prob)
        self.adapt_step_size = bool(adapt_step_size)
        self.max_delta_energy = float(max_delta_energy)

    def step_inputs(self, state):
        # the momentum, then the accept uniforms (the order of an eager step)
        return torch.randn_like(state.position), torch.rand_like(state.potential_energy)

    def move(self, potential_and_grad_fn, x0, u0, g0, step_size, momentum, p0, uniform):
        eps = _column(step_size, x0)
        p = p0 - 0.5 * eps * g0
        x = x0
        for i in range(self.num_steps):
            x = x + eps * p
            u, g = potential_and_grad_fn(x)
            p = p - (eps if i + 1 < self.num_steps else 0.5 * eps) * g
        log_ratio = (u0 + 0.5 * _sq_norm(p0)) - (u + 0.5 * _sq_norm(p))
        finite = torch.isfinite(log_ratio)
        diverging = ~finite | (log_ratio < -self.max_delta_energy)
        accept_prob, accept, keep = _metropolis(log_ratio, uniform, x0)
        u_out = torch.where(accept, u, u0)
        # the Hamiltonian of the chain's point after the step: (x', p') if accepted, else (x, p)
        energy = u_out + 0.5 * _sq_norm(torch.where(keep, p, p0))
        # on rejection the chain keeps its cached potential and gradient
        return (torch.where(keep, x, x0), u_out, torch.where(keep, g, g0), momentum, accept_prob, accept,
                diverging, energy)


class AnnealedLangevin(_Kernel):
    r"""Annealed Langevin dynamics: unadjusted Langevin on a fixed potential at a
    decreasing schedule of temperatures, ``steps_per_level`` steps per level.

    At level k the chains move toward :math:`\pi_k(x) \propto e^{-U(x)/T_k}` with
    the step size scaled by the temperature, :math:`\gamma_k = \gamma\,T_k` (so
    the step stays in proportion to the level's spread, as for the noise levels of
    annealed sampling of score-based models):

    .. math::

        x' = x - \frac{\gamma_k}{T_k}\nabla U(x) + \sqrt{2\gamma_k}\,\xi
           = x - \gamma\nabla U(x) + \sqrt{2\gamma T_k}\,\xi .

    This is the sampler of energies trained by multiscale denoising score
    matching (one energy for all noise levels): start at a high temperature
    (broad, easy to mix), end at :math:`T = 1`. After the last level the kernel
    keeps stepping at the last temperature, so with ``warmup_steps=kernel.num_steps``
    the draws of :func:`~pyro_ebm.mcmc.sample` target :math:`\pi_K`. Non-finite
    proposals are rejected and marked divergent.

    :param float step_size: γ > 0, float or ``(C,)`` tensor.
    :param temperatures: the schedule :math:`T_1, \dots, T_K > 0` (usually
        decreasing to 1), a sequence of floats.
    :param int steps_per_level: Langevin steps at each temperature.

    >>> kernel = AnnealedLangevin(0.01, temperatures=torch.logspace(2, 0, 10).tolist(),
    ...                           steps_per_level=20)
    >>> samples = mcmc.sample(potential_fn=energy, kernel=kernel, num_chains=1024, num_samples=1,
    ...                       warmup_steps=kernel.num_steps, initial=torch.randn(1024, 2))

    **References:** Z. Li, Y. Chen, F. T. Sommer, "Learning energy-based models in
    high-dimensional spaces with multi-scale denoising score matching", 2019;
    Y. Song, S. Ermon, "Generative modeling by estimating gradients of the data
    distribution", NeurIPS 2019.
    """

    def __init__(self, step_size, temperatures=(1.0,), steps_per_level=1):
        super().__init__(step_size)
        temperatures = [float(t) for t in temperatures]
        if not temperatures or not all(math.isfinite(t) and t > 0 for t in temperatures):
            raise ValueError(f"temperatures must be a non-empty sequence of values > 0, got {temperatures}")
        if not isinstance(steps_per_level, int) or steps_per_level < 1:
            raise ValueError(f"steps_per_level must be an int >= 1, got {steps_per_level!r}")
        self.temperatures = temperatures
        self.steps_per_level = steps_per_level

    @property
    def num_steps(self) -> int:
        """Length of the whole schedule, ``len(temperatures) * steps_per_level``."""
        return len(self.temperatures) * self.steps_per_level

    def temperature(self, iteration: int) -> float:
        """The temperature that step number ``iteration`` (from 0) runs at."""
        level = min(iteration // self.steps_per_level, len(self.temperatures) - 1)
        return self.temperatures[level]

    def step_inputs(self, state):
        # the temperature as a tensor, so that a compiled step serves every level
        temperature = torch.tensor(self.temperature(state.iteration), dtype=state.position.dtype,
                                   device=state.position.device)
        return torch.randn_like(state.position), temperature

    def move(self, potential_and_grad_fn, x, u, g, step_size, momentum, noise, temperature):
        h = _column(step_size, x)
        proposal = torch.addcmul(torch.addcmul(x, h, g, value=-1.0), (2 * temperature * h).sqrt(), noise)
        u_new, g_new = potential_and_grad_fn(proposal)
        return _langevin_move(x, u, g, momentum, proposal, u_new, g_new)
