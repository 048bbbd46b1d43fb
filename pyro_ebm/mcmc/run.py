# SPDX-License-Identifier: Apache-2.0
"""The sampling driver: many chains of one kernel on a Pyro model's latent sites or
on a plain potential, with warmup step-size adaptation, thinning, storage in the
ArviZ layout ``(chain, draw, ...)`` and a progress bar."""

from __future__ import annotations

import inspect
import warnings

import torch

from ..energy import LatentPotential, check_data, check_finite, energy_view
from ..energy.compile import compile_options
from ..longrun import DeferredInterrupt, atomic_write
from ..progress import progress_bar
from .adaptation import StepSizeAdaptation
from .kernels import KernelState, NonFiniteStartError
from .sharded import chain_shard

__all__ = ["Samples", "load_draws", "sample"]

#: all chains diverging on this many consecutive steps (or on every step of a
#: shorter run) stops the run with an error: no chain can move any more (checked
#: every 1% of the run, so a streak is caught within one such window)
_STUCK_STEPS = 100


class Samples:
    """The draws of :func:`sample`: positions of every chain and the per-step
    statistics, in the ArviZ layout ``(chain, draw, ...)``.

    :ivar torch.Tensor positions: ``(chain, draw, *event)`` kept positions, in the
        unconstrained space for a Pyro model.
    :ivar dict stats: ``accept_prob``, ``step_size``, ``potential_energy``,
        ``diverging`` (and ``energy``, the Hamiltonian, for kernels with a
        momentum), each ``(chain, draw)``.
    :ivar torch.Tensor warmup_divergences: ``(chain,)`` divergent warmup steps.
    :ivar KernelState last_state: the kernel state after the last step, to go on
        sampling: ``state, info = kernel.step(samples.last_state)``, or
        ``mcmc.sample(model, kernel, ..., initial=samples.last_state)`` (same
        positions and adapted step sizes).
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


def sample(model=None, kernel=None, num_chains=None, num_samples=None, warmup_steps=0, thin=1,
           model_args=(), model_kwargs=None, initial=None, progress=None, *, potential_fn=None,
           compile=False, checkpoint=None, shard_chains=None) -> Samples:
    """Run ``num_chains`` chains of ``kernel`` as one batch and keep ``num_samples``
    draws of each after ``warmup_steps`` steps, every ``thin``-th step.

    The target is given in one of two ways, as for Pyro's
    :class:`~pyro.infer.mcmc.HMC` (exactly one of them, or it is an error):

    - ``model``, a Pyro model, run as ``model(*model_args, **model_kwargs)``: the
      chains move over all its latent sites jointly, in the unconstrained space
      of each site's support (``biject_to``), on the potential of
      :meth:`~pyro_ebm.energy.EnergyView.latent_potential`; draws come back in
      the constrained space under the site names. ``initial`` is ``None`` (draws
      from the model's own sampling statements), ``"uniform"`` (uniform on
      (-2, 2) in the unconstrained space, Stan's default, better when the priors
      are much broader than the posterior: a chain started far out adapts a tiny
      step size and may not reach the posterior within warmup, which R-hat then
      shows), a dict of constrained values ``(num_chains, *site_shape)`` by site,
      or a packed unconstrained ``(num_chains, dim)`` tensor;
    - ``potential_fn``, a potential :math:`U(x) = -\\log\\tilde\\pi(x)` mapping
      positions ``(C, *event)`` to ``(C,)``, with ``initial`` positions
      ``(num_chains, *event)`` (required); draws come back under the key ``"x"``.
      A :class:`~pyro_ebm.energy.LatentPotential` (a model's latent potential,
      e.g. ``GEBM.latent_potential()``) is a potential too and carries its own
      unpacking: its draws come back by site, and its ``initial`` may also be a
      dict by site or ``"uniform"``.

    ``initial`` may also be the :attr:`Samples.last_state` of an earlier run: the
    chains go on from its positions with its adapted per-chain step sizes (kept
    as they are with ``warmup_steps=0``, the starting point of a new adaptation
    otherwise), the underdamped kernel's velocities and its step counter.

    The model's tensor arguments are checked first: an empty batch, NaN or Inf,
    or (floating point) values so large that their squares overflow the dtype
    are refused with an error naming the argument. Integer arguments are passed
    as they are (e.g. counts observed at a Poisson site); if the model fails on
    one (a Bernoulli site needs float observations), the error names it and its
    dtype.

    During warmup, kernels with ``adapt_step_size`` (MALA, HMC) adapt each chain's
    step size toward their ``target_accept_prob`` by
    :class:`~pyro_ebm.mcmc.adaptation.StepSizeAdaptation`, on the ``accept_prob``
    of each step's :class:`~pyro_ebm.mcmc.kernels.KernelInfo`. A divergent step
    (non-finite proposal) leaves that chain in place and is counted; the run goes
    on, unless every chain diverges on 100 consecutive steps (or on every step of
    a shorter run): then no chain can move and the run stops with an error.

    :param callable model: a Pyro model (not with ``potential_fn``).
    :param kernel: a kernel from :mod:`pyro_ebm.mcmc.kernels`, or any object with
        ``init(position, potential) -> state`` and ``step(state) -> (state, info)``.
    :param int num_chains: chains C, run as one batch.
    :param int num_samples: draws kept per chain.
    :param int warmup_steps: steps before the first kept draw.
    :param int thin: keep every ``thin``-th step after warmup.
    :param tuple model_args: arguments of the Pyro model.
    :param dict model_kwargs: keyword arguments of the Pyro model.
    :param initial: initial positions (see above), or a ``KernelState`` to go on from.
    :param progress: show a progress bar with acceptance and divergences; ``None``
        (default) shows it only when standard error is a terminal (see
        :func:`pyro_ebm.progress.progress_enabled`).
    :param callable potential_fn: a potential ``U`` (not with ``model``).
    :param compile: ``False`` (default) runs ``kernel.step`` eagerly; ``True``, or
        a dict of ``torch.compile`` keyword arguments (``backend``, ``mode``,
        ``fullgraph``, ``dynamic``, ``options``) and optionally
        ``steps_per_call`` (an int >= 1, default 10), compiles the steps, see
        below; anything else is a ``TypeError``.
    :param checkpoint: a file path: the draws (see :func:`load_draws`) are written
        there, atomically, when the run ends or is interrupted.
    :param shard_chains: under an initialized ``torch.distributed`` process group
        of W > 1 ranks, ``None`` (default) or ``True`` runs C / W of the chains on
        each rank, see below; ``False`` runs all C chains on every rank.
    :returns: :class:`Samples`.

    **Ctrl-C.** SIGINT during the run ends it after the current step (a second
    Ctrl-C stops at once): the draws taken so far come back as :class:`Samples`
    (and go to ``checkpoint``) with a warning that says how many; during warmup
    that is none, and ``initial=samples.last_state`` goes on from where the
    chains stopped.

    **Chain-sharded sampling** (:mod:`pyro_ebm.mcmc.sharded`). Under a process
    group of W ranks (e.g. started by ``torchrun --nproc_per_node=W``), rank r runs
    the chains ``[r C / W, (r + 1) C / W)`` (C must be a multiple of W, else a
    ``ValueError``) and rank 0 gathers them: there ``sample`` returns the
    :class:`Samples` of all C chains, in chain order; every other rank gets the
    :class:`Samples` of its own chains. Every rank must call ``sample`` with the
    same arguments and the same seed: each random number is drawn for all C chains
    on every rank and each rank keeps its chains' rows, so the draws equal those of
    one process running all C chains. ``initial`` may be the ``last_state`` of
    either kind of result. The progress bar shows on rank 0 only.

    **Compiled steps** (``compile=``). A built-in kernel's step is split into its
    random numbers, drawn eagerly by ``kernel.step_inputs(state)`` in the order an
    eager step draws them (proposal noise, momentum, accept uniforms), and
    ``kernel.move``, a pure function of tensors

    .. math::

        (\\theta, x, U(x), \\nabla U(x), \\epsilon, p, \\xi) \\mapsto
        (x', U(x'), \\nabla U(x'), p', \\alpha, \\text{accepted}, \\text{diverging}),

    compiled with ``torch.compile`` (:class:`~pyro_ebm.energy.compile.Compiled`;
    ``mode="reduce-overhead"``, CUDA graphs, on a CUDA device). :math:`U_\\theta`
    and :math:`\\nabla U_\\theta` come from ``torch.func.grad_and_value`` of the
    model's traced log density (:meth:`~pyro_ebm.energy.EnergyView.pure`, the
    parameters :math:`\\theta` passed as tensors, plus the log-determinants of
    the unconstrained sites), or of ``potential_fn`` itself for a plain
    potential. So for the same seed a compiled run gives the eager run's draws
    to rounding. Step-size adaptation and storage stay eager. Warmup runs one
    step per compiled call; after it, at fixed step sizes, ``k =
    steps_per_call`` steps run per call (``move`` unrolled ``k`` times, the
    random numbers of the ``k`` steps drawn first in the order of ``k`` single
    steps, the ``k`` positions and statistics returned stacked), which pays the
    fixed cost of a call (guards, wrappers, the driver's Python) once per ``k``
    steps; the last ``num_samples * thin % k`` steps run one per call. Ctrl-C
    then ends the run after the current call. Where the step
    cannot be compiled (a model on the Pyro path, see
    :class:`~pyro_ebm.energy.NotTraced`; a potential ``torch.func`` refuses; a
    kernel without ``step_inputs`` / ``move``; a step the compiler refuses), one
    ``UserWarning`` says why and the eager kernel runs.

    >>> samples = mcmc.sample(model, mcmc.MALA(0.1), num_chains=1024, num_samples=500,
    ...                       warmup_steps=500, model_args=(v,))
    >>> samples.get_samples()["z"].shape          # (1024, 500, *site_shape)
    >>> samples.summary()
    >>> more = mcmc.sample(model, mcmc.MALA(0.1), 1024, 500, model_args=(v,),
    ...                    initial=samples.last_state)   # the same chains, 500 more draws
    >>> gauss = mcmc.sample(potential_fn=lambda x: 0.5 * x.pow(2).sum(-1), kernel=mcmc.HMC(0.3),
    ...                     num_chains=64, num_samples=200, warmup_steps=200,
    ...                     initial=torch.zeros(64, 2))
    >>> gauss.get_samples()["x"].shape            # (64, 200, 2)
    >>> fast = mcmc.sample(model, mcmc.MALA(0.1), 1024, 500, warmup_steps=500,
    ...                    model_args=(v,), compile=True)   # compiled steps, same draws
    """
    _check_model_or_potential(model, potential_fn, model_args, model_kwargs, initial)
    compile, steps_per_call = _steps_per_call(compile)
    options = compile_options(compile)
    if kernel is None or not all(callable(getattr(kernel, attr, None)) for attr in ("init", "step")):
        raise TypeError("kernel must have init(position, potential) -> state and "
                        f"step(state) -> (state, info), got {kernel!r}")
    for name, value, low in (("num_chains", num_chains, 1), ("num_samples", num_samples, 1),
                             ("warmup_steps", warmup_steps, 0), ("thin", thin, 1)):
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    model_kwargs = model_kwargs or {}
    shard = chain_shard(num_chains, shard_chains)
    if shard is not None:
        kernel = shard.kernel(kernel)
        progress = progress if shard.rank == 0 else False
    labels = _argument_labels(model, model_args, model_kwargs) if model is not None else {}
    _check_model_arguments(model_args, model_kwargs, labels)
    last = initial if isinstance(initial, KernelState) else None
    if last is not None:
        last = last if shard is None else shard.take_state(last)
        initial = last.position
    # positions are made for all chains and sliced, unless a state of this rank's chains is given
    local = shard is not None and last is not None
    chains = shard.size if local else num_chains
    potential = None
    try:
        if potential_fn is None:
            potential = _model_potential(model, model_args, model_kwargs, initial)
        else:
            potential = potential_fn
        if isinstance(potential, LatentPotential):
            position, unpack = _latent_initial(potential, chains, initial), potential.unpack
        else:
            position, unpack = _plain_initial(chains, initial), _as_x
        if shard is not None and not local:
            position = shard.take(position)
        with torch.no_grad():
            state = kernel.init(position, potential)
    except RuntimeError as err:  # torch refusing an integer tensor somewhere in the model
        integers = [f"{labels[k]} has dtype {v.dtype}" for k, v in _tensor_arguments(model_args, model_kwargs)
                    if not v.is_floating_point()]
        if not integers:
            raise
        raise TypeError(
            f"the model failed on integer data: {'; '.join(integers)} (torch: {_first_line(err)}). "
            "Pass floating point values where the model computes with them or observes them at a "
            "site that needs floats (e.g. Bernoulli: y.float())"
        ) from err
    except NonFiniteStartError as err:
        if not isinstance(potential, LatentPotential):
            raise
        chain = err.chains[0]
        with torch.no_grad():
            values = potential.unpack(position[chain:chain + 1])
        at = ", ".join(f"{k} = {_brief(v[0])}" for k, v in values.items())
        raise ValueError(f"{err}; chain {chain} starts at {at}, {_describe_initial(initial)}") from err
    if last is not None:
        state = _go_on_from(state, last)
    step = kernel.step
    if options is not None:
        from .compiled import compiled_step

        step = compiled_step(kernel, state, options)
    else:
        steps_per_call = 1
    with torch.no_grad():
        samples = _run(kernel, state, unpack, num_samples, warmup_steps, thin, progress, step, steps_per_call)
    if shard is not None:
        samples = shard.gather(samples)
    if checkpoint is not None:
        _save_draws(samples, checkpoint)
    return samples


#: compiled steps per call in the sampling phase, unless ``compile={"steps_per_call": k}``
STEPS_PER_CALL = 10


def _steps_per_call(compile):
    """``(compile, k)``: the ``compile=`` argument without its ``steps_per_call`` entry,
    and that entry (:data:`STEPS_PER_CALL` by default)."""
    if not isinstance(compile, dict) or "steps_per_call" not in compile:
        return compile, STEPS_PER_CALL
    compile = dict(compile)
    k = compile.pop("steps_per_call")
    if not isinstance(k, int) or isinstance(k, bool) or k < 1:
        raise ValueError(f"compile['steps_per_call'] must be an int >= 1, got {k!r}")
    return compile, k


def _check_model_or_potential(model, potential_fn, model_args, model_kwargs, initial):
    """Exactly one of ``model`` and ``potential_fn``, each with what it needs."""
    if model is not None and potential_fn is not None:
        raise ValueError("mcmc.sample takes either model= (a Pyro model) or potential_fn= (a potential "
                         "U(x)), not both")
    if model is None and potential_fn is None:
        raise ValueError("mcmc.sample needs a target: model= (a Pyro model, with model_args=...) or "
                         "potential_fn= (a potential U(x) of positions (num_chains, *event), with "
                         "initial=...)")
    if model is not None:
        if isinstance(model, LatentPotential):
            raise TypeError("model is a LatentPotential, a potential rather than a Pyro model: pass it "
                            "as potential_fn=")
        if not callable(model):
            raise TypeError(f"model must be a callable Pyro model, got {type(model).__name__}")
        return
    if not callable(potential_fn):
        raise TypeError(f"potential_fn must be callable as potential_fn(x) -> (num_chains,), got "
                        f"{type(potential_fn).__name__}")
    if model_args or model_kwargs:
        raise ValueError("model_args and model_kwargs are the arguments of a Pyro model; a potential_fn "
                         "takes the positions alone (bind other arguments in a closure or "
                         "functools.partial)")
    if initial is None:
        raise ValueError("potential_fn needs initial positions: initial=<tensor of shape (num_chains, "
                         "*event)> (or a Samples.last_state)")


def _run(kernel, state, unpack, num_samples, warmup_steps, thin, progress, step, steps_per_call=1):
    adaptation = StepSizeAdaptation.for_kernel(kernel, state, warmup_steps)
    # divergent steps per chain so far: one in-place add per step, read on the host
    # only every `refresh` steps (progress bar, and the check that some chain can move)
    div_count = torch.zeros(state.position.shape[0], dtype=torch.long, device=state.position.device)
    total = warmup_steps + num_samples * thin
    bar = progress_bar(total=total, progress=progress, leave=True)
    refresh = max(1, total // 100)
    stuck_limit = min(_STUCK_STEPS, total)
    draws = {"position": [], "accept_prob": [], "step_size": [], "potential_energy": [], "diverging": []}
    energies = []  # the Hamiltonian, from kernels whose info reports one
    acc_sum = torch.zeros_like(state.potential_energy)
    with DeferredInterrupt("mcmc.sample: interrupted; ending after this step (Ctrl-C again to stop at "
                           "once)") as interrupt:
        done = _steps(kernel, state, step, adaptation, total, warmup_steps, thin, bar, refresh, stuck_limit,
                      draws, energies, acc_sum, div_count, interrupt, steps_per_call)
    state, warm_div, taken = done
    if bar is not None:
        bar.close()
    if taken < total:
        kept = len(draws["position"])
        phase = "warmup" if taken < warmup_steps else "sampling"
        warnings.warn(f"mcmc.sample was interrupted at step {taken} of {total} ({phase}): returning the "
                      f"{kept} draw(s) per chain taken so far (initial=samples.last_state goes on from "
                      "there)", UserWarning, stacklevel=3)
    if draws["position"]:
        positions = torch.stack(draws.pop("position"), 1)
        stats = {k: torch.stack(v, 1) for k, v in draws.items()}
    else:  # interrupted during warmup: no draw, shapes kept
        positions = state.position.new_zeros((state.position.shape[0], 0) + tuple(state.position.shape[1:]))
        stats = {k: torch.zeros((state.position.shape[0], 0), dtype=torch.bool if k == "diverging"
                                else state.potential_energy.dtype, device=state.position.device)
                 for k in draws if k != "position"}
    if energies:
        stats["energy"] = torch.stack(energies, 1)
    return Samples(positions, stats, unpack, warm_div, state)


def _steps(kernel, state, step, adaptation, total, warmup_steps, thin, bar, refresh, stuck_limit, draws,
           energies, acc_sum, div_count, interrupt, steps_per_call=1):
    """The steps of :func:`_run`; ``(last state, warmup divergences, steps taken)``.
    A compiled ``step`` (:class:`~pyro_ebm.mcmc.compiled.CompiledSteps`) runs the
    sampling phase ``steps_per_call`` steps per call; warmup, whose adaptation
    reads every step, one per call. Draws, statistics, the divergence count, the
    progress bar and Ctrl-C are then handled per call."""
    warm_div = div_count.clone()
    stuck, checked_at, div_at_check = 0, 0, div_count.clone()  # steps on which every chain diverged
    run_steps = getattr(step, "run", None) if steps_per_call > 1 else None  # CompiledSteps.run
    block = min(steps_per_call, total - warmup_steps)  # steps per compiled call after warmup
    i = 0
    while i < total:
        if interrupt.requested:
            return state, warm_div, i
        step_size = state.step_size  # the step size this step runs at
        if run_steps is not None and i >= warmup_steps and total - i >= block:
            # sampling, compiled: `block` steps per call at the fixed step size (the
            # last total % block steps, if any, one per call)
            n = block
            state, steps = run_steps(state, n)
            div_count += steps.diverging.sum(0)
            first = -(i - warmup_steps + 1) % thin  # the first kept step of the block
            if first < n:
                draws["position"].extend(steps.position[first::thin].unbind(0))
                draws["accept_prob"].extend(steps.accept_prob[first::thin].unbind(0))
                draws["potential_energy"].extend(steps.potential_energy[first::thin].unbind(0))
                draws["diverging"].extend(steps.diverging[first::thin].unbind(0))
                draws["step_size"].extend([step_size] * len(range(first, n, thin)))
                if steps.energy is not None:
                    energies.extend(steps.energy[first::thin].unbind(0))
            if bar is not None:
                acc_sum += steps.accept_prob.sum(0)
        else:
            n = 1
            state, info = step(state)
            div_count += info.diverging
            if i < warmup_steps:
                if adaptation is not None:
                    state = adaptation.step(state, info, final=i + 1 == warmup_steps)
                if i + 1 == warmup_steps:
                    warm_div = div_count.clone()
            elif (i - warmup_steps + 1) % thin == 0:
                draws["position"].append(state.position)
                draws["accept_prob"].append(info.accept_prob)
                draws["step_size"].append(step_size)
                draws["potential_energy"].append(state.potential_energy)
                draws["diverging"].append(info.diverging)
                if info.energy is not None:
                    energies.append(info.energy)
            if bar is not None:
                acc_sum += info.accept_prob
        i += n
        if i // refresh > (i - n) // refresh or i == total:
            # every chain diverged on every step since the last check iff the fewest
            # divergences any chain had since then equals the number of steps
            window = i - checked_at
            stuck = stuck + window if int((div_count - div_at_check).min()) == window else 0
            checked_at, div_at_check = i, div_count.clone()
            if stuck >= stuck_limit:
                if bar is not None:
                    bar.close()
                _raise_stuck(kernel, state, stuck, i - 1, warmup_steps)
            if bar is not None:
                shown = i - bar.n
                bar.set_description("warmup" if i - 1 < warmup_steps else "sample", refresh=False)
                bar.set_postfix(accept=f"{float(acc_sum.mean()) / shown:.3f}",
                                divergences=int(div_count.sum()), refresh=False)
                bar.update(shown)
                acc_sum.zero_()
    return state, warm_div, total


SAMPLES_FORMAT = "pyro_ebm.samples/1"


def _save_draws(samples, path):
    draws = {"format": SAMPLES_FORMAT, "positions": samples.positions, "stats": samples.stats,
             "warmup_divergences": samples.warmup_divergences, "samples": samples.get_samples(),
             "last_position": samples.last_state.position, "last_step_size": samples.last_state.step_size}
    atomic_write(path, lambda f: torch.save(draws, f))


def load_draws(path) -> dict:
    """The draws :func:`sample` wrote to its ``checkpoint`` file: ``positions``
    ``(chain, draw, *event)``, ``stats``, ``warmup_divergences``, ``samples`` (the
    constrained draws by site), ``last_position`` and ``last_step_size``.
    Raises a ``ValueError`` naming the file when it is not such a file."""
    try:
        found = torch.load(path, weights_only=False)
    except Exception as err:  # a truncated or foreign file: torch raises many kinds
        raise ValueError(f"{path} cannot be read as mcmc.sample draws: {type(err).__name__}: {err}") from err
    if not isinstance(found, dict) or found.get("format") != SAMPLES_FORMAT:
        raise ValueError(f"{path} is not a file of mcmc.sample draws (format {SAMPLES_FORMAT!r})")
    return found


def _raise_stuck(kernel, state, steps, i, warmup_steps):
    first, last = i + 2 - steps, i + 1  # 1-based step numbers
    phases = [name for name, lo, hi in (("warmup", 1, warmup_steps), ("sampling", warmup_steps + 1, last))
              if lo <= last and first <= hi]
    energy_error = ""
    if hasattr(kernel, "max_delta_energy"):
        energy_error = " (or an energy error above max_delta_energy)"
    lo, hi = float(state.step_size.min()), float(state.step_size.max())
    sizes = f"the step size is {lo:.3g}" if lo == hi else f"the step sizes are {lo:.3g} to {hi:.3g}"
    raise ValueError(
        f"every one of the {state.position.shape[0]} chains had a non-finite potential or gradient"
        f"{energy_error} at its proposal on each of {steps} consecutive steps ({first} to {last}, "
        f"{' and '.join(phases)}), so no chain can move; {sizes}. "
        f"Lower step_size, or check where the potential (the model and its data) is NaN or Inf"
    )


def _go_on_from(state, last):
    """``state`` (fresh from ``kernel.init`` at ``last.position``) with the step
    sizes, velocities and step counter of ``last``, the state to go on from."""
    momentum = state.momentum
    if momentum is not None and last.momentum is not None and last.momentum.shape == momentum.shape:
        momentum = last.momentum.to(momentum)
    return state._replace(step_size=last.step_size.to(state.step_size), momentum=momentum,
                          iteration=last.iteration)


def _model_potential(model, model_args, model_kwargs, initial):
    """The latent potential of the Pyro model ``model`` run on its arguments."""
    view = energy_view(model)
    name = getattr(model, "__name__", "this callable")
    try:
        return view.latent_potential(*model_args, **model_kwargs)
    except TypeError as err:
        if model_args or model_kwargs:
            raise
        raise TypeError(
            f"{err}. If {name} is a potential U(x) rather than a Pyro model, pass it as "
            "potential_fn= with initial positions of shape (num_chains, *event)"
        ) from err


def _plain_initial(num_chains, initial):
    """Initial positions ``(num_chains, *event)`` for a plain potential."""
    if not torch.is_tensor(initial):
        raise TypeError(f"initial for a potential_fn must be a tensor of shape (num_chains, *event) or a "
                        f"Samples.last_state, got {type(initial).__name__}")
    if initial.dim() < 2 or initial.shape[0] != num_chains:
        raise ValueError(
            f"initial positions for a potential must have shape (num_chains={num_chains}, "
            f"*event), got {tuple(initial.shape)}"
        )
    return initial.detach()


def _tensor_arguments(model_args, model_kwargs):
    """``(key, tensor)`` for every tensor argument, keyed by position or by name."""
    items = list(enumerate(model_args)) + list(model_kwargs.items())
    return [(k, v) for k, v in items if torch.is_tensor(v)]


def _argument_labels(model, model_args, model_kwargs):
    """How errors name each argument: ``model argument 'y' (model_args[1])``."""
    try:
        params = list(inspect.signature(model).parameters.values())
    except (TypeError, ValueError):
        params = []
    positional = [p.name for p in params
                  if p.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    labels = {i: (f"model argument '{positional[i]}' (model_args[{i}])" if i < len(positional)
                  else f"model_args[{i}]") for i in range(len(model_args))}
    labels.update({k: f"model argument '{k}'" for k in model_kwargs})
    return labels


def _check_model_arguments(model_args, model_kwargs, labels):
    """Refuse empty, non-finite and overflowing tensor arguments before the model
    runs (an empty batch would end in a ZeroDivisionError inside a plate)."""
    for key, value in _tensor_arguments(model_args, model_kwargs):
        label = labels[key]
        if value.dim() == 0:
            check_finite(label, value)
        elif value.is_floating_point():
            check_data(value, label, min_dim=1)
        elif value.shape[0] == 0:
            raise ValueError(
                f"{label} is an empty batch (shape {tuple(value.shape)}): pass at least one item"
            )


def _first_line(err):
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def _brief(value, limit=6):
    flat = value.detach().flatten()
    shown = ", ".join(f"{float(x):.4g}" for x in flat[:limit])
    return f"[{shown}{', ...' if flat.numel() > limit else ''}]" if value.dim() else shown


def _describe_initial(initial):
    if initial is None:
        return "drawn from the model's own sampling statements"
    if isinstance(initial, str):
        return "drawn uniformly on (-2, 2) in the unconstrained space"
    return "as given by initial"


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
        expected = {site.name: site.info.shape for site in potential.sites}
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
        for site in potential.sites:
            if not bool(torch.isfinite(position[:, site.slice]).all()):
                raise ValueError(
                    f"initial value of site '{site.name}' lies outside its support {site.info.support}"
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
