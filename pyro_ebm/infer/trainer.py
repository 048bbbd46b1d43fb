# SPDX-License-Identifier: Apache-2.0
"""The one trainer contract of :mod:`pyro_ebm.infer`.

Every trainer (:class:`~pyro_ebm.infer.ScoreMatching`, ``BiSM``, ``VaGES``,
``ContrastiveDivergence``, ``KALE``, ``MCMCTeaching``, ``BiDVL``) is a
:class:`Trainer`: ``step(*args)`` returns the main loss as a float and keeps
every named loss of the step in ``last_losses``; ``evaluate_loss(*args)``
returns the main loss without changing anything (``evaluate_losses`` all of
them); ``num_steps`` counts the steps taken; every batch is validated.

Each *level* of a trainer (``"model"``, ``"guide"``, ``"critic"``, ...) owns a
set of parameters, collected once at the first step from the Pyro callables
of that level (the trainable parameters of an ``nn.Module`` or
``PyroModule``, plain ``nn.Module`` children included, and the ``pyro.param``
sites of one run), and ONE torch optimizer over all of them, built from the
``pyro.optim`` object the user passed. Updates take one path: gradients, then
the optimizer step, with the loss, every gradient and every updated parameter
checked for NaN / Inf by one host sync per step. Under an initialized
``torch.distributed`` process group the gradients are combined over the ranks
on that path (:mod:`pyro_ebm.infer.distributed`). A step that diverges raises
:class:`DivergenceError` naming the step and the level, and leaves every
parameter and optimizer state as it was before the step.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings

import pyro
import torch
from pyro.optim import PyroOptim
from pyro.optim.lr_scheduler import PyroLRScheduler
from pyro.params.param_store import module_from_param_with_module_name, normalize_param_name, user_param_name

from ..energy import DivergenceError, NotTraced, is_validation_error, nonfinite_entry
from ..energy.compile import Compiled, compile_options
from ..energy.params import adopt_store, collect_parameters, module_parameters, param_sites
from .distributed import average_gradients, broadcast_parameters, world_size

__all__ = ["Level", "Trainer", "collect_parameters", "make_optimizer", "module_parameters", "param_sites",
           "random_state", "require_adam", "set_random_state"]


# -- one torch optimizer per level ----------------------------------------------------


def _same_args(a, b):
    if a.keys() != b.keys():
        return False
    for k in a:
        x, y = a[k], b[k]
        if x is y:
            continue
        if torch.is_tensor(x) or torch.is_tensor(y) or type(x) is not type(y) or x != y:
            return False
    return True


def _args_of(optim, name):
    """The per-parameter arguments of a ``pyro.optim`` object whose ``optim_args``
    is a callable, called as Pyro calls it: with the normalized name
    (``"encoder.weight"``) for a one-argument callable, with ``(module name,
    parameter name)`` for a two-argument one."""
    raw = name
    if getattr(optim, "pt_optim_args_argc", 1) == 1:
        args = optim.pt_optim_args(normalize_param_name(raw))
    else:
        args = optim.pt_optim_args(module_from_param_with_module_name(raw), user_param_name(raw))
    if not isinstance(args, dict):
        raise TypeError(f"the optimizer's optim_args callable must return a dict for parameter '{name}', "
                        f"got {type(args).__name__}")
    return args


_FUSABLE = (torch.optim.Adam, torch.optim.AdamW)
_IMPLEMENTATION = {"fused", "foreach", "differentiable", "capturable"}


def make_optimizer(optim, params, names):
    """ONE torch optimizer over ``params`` from the ``pyro.optim`` object ``optim``:
    its ``pt_optim_constructor`` with its ``pt_optim_args`` (a dict for all, or a
    callable of the parameter's name, giving one parameter group per distinct
    result). Adam and AdamW run fused where the device supports it, other
    optimizers with ``foreach=True`` where they take it, unless the arguments
    choose an implementation themselves."""
    constructor = optim.pt_optim_constructor
    if callable(optim.pt_optim_args):
        groups = []
        for p, name in zip(params, names, strict=True):
            args = _args_of(optim, name)
            for group_args, members in groups:
                if _same_args(group_args, args):
                    members.append(p)
                    break
            else:
                groups.append((args, [p]))
        spec = [{"params": members, **args} for args, members in groups]
        chosen = set().union(*(set(args) for args, _ in groups)) if groups else set()
    else:
        spec = [{"params": list(params), **optim.pt_optim_args}]
        chosen = set(optim.pt_optim_args)
    if not chosen & _IMPLEMENTATION:
        if constructor in _FUSABLE and all(p.is_floating_point() for p in params):
            try:
                return constructor(spec, fused=True)
            except (RuntimeError, ValueError, TypeError):  # e.g. a device without fused kernels
                pass
        try:
            takes_foreach = "foreach" in inspect.signature(constructor).parameters
        except (TypeError, ValueError):
            takes_foreach = False
        if takes_foreach:
            return constructor(spec, foreach=True)
    return constructor(spec)


def _at_least_1d(t):
    """``t``, or a ``(1,)`` view of a 0-d ``t``: ``torch.compile`` (torch 2.13) drops
    in-place updates of 0-d tensor inputs, and keeps those of a view."""
    return t.view(1) if t.dim() == 0 else t


def _adam_update(params, grads, moments, hyper):
    r"""Adam's (AdamW's with ``decoupled``) update of ``params`` in place, as
    ``torch.optim.Adam`` computes it:

    .. math::

        m \leftarrow \beta_1 m + (1-\beta_1) g,\quad
        v \leftarrow \beta_2 v + (1-\beta_2) g^2,\quad
        \theta \leftarrow \theta - \frac{\eta}{1-\beta_1^t}\,
            \frac{m}{\sqrt{v}/\sqrt{1-\beta_2^t} + \epsilon}

    (weight decay added to :math:`g`, or :math:`\theta \leftarrow \theta(1-\eta\lambda)`
    decoupled), for a compiled step. Returns a 0-d flag, NaN when an updated
    parameter is NaN / Inf."""
    exp_avg, exp_avg_sq, steps, lrs = moments
    flag = None
    with torch.no_grad():
        for p, g, m, v, t, lr, (beta1, beta2, eps, wd, decoupled, maximize) in zip(
                params, grads, exp_avg, exp_avg_sq, steps, lrs, hyper, strict=True):
            g = -g if maximize else g
            if wd and decoupled:
                p.mul_(1 - lr * wd)
            elif wd:
                g = g + wd * p
            t.add_(1)
            m.lerp_(g, 1 - beta1)
            v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
            n = t.to(p.dtype)  # the count is float32: its powers in the parameters' precision
            step_size = lr / (1 - beta1 ** n)
            denom = v.sqrt() / (1 - beta2 ** n).sqrt() + eps
            p.sub_(step_size * m / denom)
            peak = p.abs().amax() * 0  # NaN when p holds a NaN or an Inf
            flag = peak if flag is None else flag + peak
    return flag


def require_adam(optim, why):
    """Raise a ``ValueError`` unless the ``pyro.optim`` object ``optim`` builds a
    ``torch.optim.Adam`` or ``AdamW`` (what unrolled steps replay)."""
    constructor = getattr(optim, "pt_optim_constructor", None)
    if constructor not in _FUSABLE:
        name = getattr(constructor, "__name__", type(optim).__name__)
        raise ValueError(f"{why} replay Adam, but the optimizer is {name}; use pyro.optim.Adam or "
                         "pyro.optim.AdamW (or unroll_steps=0)")


class Level:
    """One level of a trainer: its parameters and its one torch optimizer.

    The optimizer (and, for a ``pyro.optim`` scheduler such as
    ``pyro.optim.ExponentialLR``, a scheduler over it) is registered in the
    ``pyro.optim`` object's ``optim_objs`` under the level's first parameter, so
    that the user's ``scheduler.step()``, ``get_state()``, ``save`` and ``load``
    reach it. A state set with ``set_state`` / ``load`` is loaded at the next step.

    :ivar str name: the level's name.
    :ivar list params: its parameters; :ivar list names: their names.
    :ivar torch.optim.Optimizer optimizer: the one optimizer.
    """

    def __init__(self, name, optim, named):
        self.name = name
        self.names = [n for n, _ in named]
        self.params = [p for _, p in named]
        self.pyro_optim = None
        self._groups, self._fused_check = None, True
        self._group_cache, self._state_cache, self._lr_cache = None, None, {}
        store = pyro.get_param_store()
        self._store_keys = [(i, store.param_name(p)) for i, p in enumerate(self.params)
                            if store.param_name(p) is not None]
        self.build(optim)

    def adam_hyperparameters(self, indices):
        """For an Adam or AdamW optimizer with no gradient clipping, the static
        hyperparameters ``(beta1, beta2, eps, weight_decay, decoupled, maximize)``
        of the parameters ``indices`` (a tuple, for a compiled step that updates
        them itself, :func:`_adam_update`); ``None`` otherwise (AMSGrad, a
        clipped, capturable or differentiable optimizer, another optimizer)."""
        opt = self.optimizer
        if type(opt) not in _FUSABLE or self._clip is not None:
            return None
        groups = self._param_groups()
        out = []
        for i in indices:
            g = groups[i]
            if g.get("amsgrad") or g.get("differentiable") or torch.is_tensor(g["betas"][0]):
                return None
            decoupled = bool(g.get("decoupled_weight_decay", isinstance(opt, torch.optim.AdamW)))
            out.append((float(g["betas"][0]), float(g["betas"][1]), float(g["eps"]), float(g["weight_decay"]),
                        decoupled, bool(g.get("maximize", False))))
        return tuple(out)

    def _param_groups(self):
        """Each parameter's group of the optimizer (cached while the groups stay)."""
        groups = self.optimizer.param_groups
        cached = self._group_cache
        if cached is None or cached[0] is not groups or cached[1] != len(groups):
            by_id = {id(p): g for g in groups for p in g["params"]}
            self._group_cache = cached = (groups, len(groups), [by_id[id(p)] for p in self.params])
        return cached[2]

    def adam_state(self, indices):
        """``(exp_avg, exp_avg_sq, step, lr)`` lists of the parameters ``indices``
        (the optimizer's own state tensors, created as Adam creates them on a
        first step; ``lr`` as 0-d tensors, so a scheduler's change needs no new
        compilation)."""
        state, groups = self.optimizer.state, self._param_groups()
        key = (len(state), tuple(indices))
        cached = self._state_cache
        if cached is None or cached[0] is not state or cached[1] != key:  # holds the dict: no id reuse
            m, v, steps = [], [], []
            for i in indices:
                p = self.params[i]
                st = state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32, device=p.device)
                    st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                    st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                m.append(st["exp_avg"])
                v.append(st["exp_avg_sq"])
                steps.append(st["step"])
            self._state_cache = (state, key, (m, v, steps))
        lrs = []
        for i in indices:  # one 0-d tensor per group, dtype and device, new when the rate changes
            p, lr = self.params[i], groups[i]["lr"]
            where = (id(groups[i]), p.dtype, p.device)
            found = self._lr_cache.get(where)
            if found is None or found[0] != lr:
                found = self._lr_cache[where] = (lr, torch.as_tensor(lr, dtype=p.dtype, device=p.device))
            lrs.append(found[1])
        return (*self._state_cache[2], lrs)

    def adopt_store(self):
        """Take the values Pyro's param store holds for this level's parameters when
        they are other tensors (``get_param_store().load(path)`` after the level
        was built), and point the store at the level's parameters again."""
        params = pyro.get_param_store()._params
        for i, key in self._store_keys:
            found, p = params.get(key), self.params[i]
            if found is not None and found is not p:
                adopt_store([(self.names[i], p)], [(self.names[i], found)])

    def build(self, optim):
        """(Re)build the optimizer from ``optim`` (fresh state, as a new ``pyro.optim``
        object would start)."""
        if not isinstance(optim, PyroOptim):
            raise TypeError(f"the {self.name} level's optimizer must be a pyro.optim optimizer (e.g. "
                            f"pyro.optim.Adam({{'lr': 1e-3}})), got {type(optim).__name__}")
        self.pyro_optim = optim
        self.optimizer = make_optimizer(optim, self.params, self.names)
        self.scheduler = None
        if isinstance(optim, PyroLRScheduler):
            self.scheduler = optim.pt_scheduler_constructor(self.optimizer, **optim.kwargs)
        store = pyro.get_param_store()
        key = next((p for p in self.params if store.param_name(p) is not None), self.params[0])
        self.key_name = store.param_name(key)
        optim.optim_objs[key] = self.scheduler or self.optimizer
        optim.grad_clip[key] = None
        self._clip = self._clipper(optim)
        self.consume_state()

    def _clipper(self, optim):
        clip = optim.pt_clip_args
        if not clip:
            return None
        per = [clip if isinstance(clip, dict)
               else clip(module_from_param_with_module_name(n), user_param_name(n)) for n in self.names]

        def apply():
            for p, args in zip(self.params, per, strict=True):
                if p.grad is not None and args:
                    PyroOptim._clip_grad(p, **args)  # per parameter, as pyro.optim clips

        return apply

    def consume_state(self):
        """Load a state waiting in the ``pyro.optim`` object (``set_state`` / ``load``)
        under this level's key, if there is one."""
        waiting = self.pyro_optim._state_waiting_to_be_consumed
        if not waiting or self.key_name not in waiting:
            return
        state = waiting.pop(self.key_name)
        try:
            if self.scheduler is not None:
                self.scheduler.load_state_dict(state["scheduler"])
                self.optimizer.load_state_dict(state["optimizer"])
            else:
                self.optimizer.load_state_dict(state)
        except (ValueError, KeyError, TypeError) as err:
            raise ValueError(
                f"the saved optimizer state under '{self.key_name}' does not fit the {self.name} level's "
                f"one optimizer over {len(self.params)} parameters ({err}); it must come from the same "
                "trainer's get_state()"
            ) from err

    def apply(self, grads):
        """One optimizer step with ``grads`` (aligned with :attr:`params`, ``None``
        where a parameter has no gradient). Returns 0-d flags, nonzero when a
        parameter is NaN / Inf after the step (a non-finite gradient makes its
        parameter non-finite), with no host sync."""
        for p, g in zip(self.params, grads, strict=True):
            p.grad = g
        if self._clip is not None:
            self._clip()
        self.optimizer.step()
        for p in self.params:
            p.grad = None
        return self.nonfinite_flags()

    def nonfinite_flags(self):
        """0-d float tensors (one per device and dtype of the parameters), nonzero
        when a parameter holds a NaN or an Inf: one fused kernel per group."""
        if self._groups is None:
            groups = {}
            for p in self.params:  # detached views, for an in-place check outside no_grad
                groups.setdefault((p.device, p.dtype), []).append(p.detach())
            self._groups = [(ps, torch.ones((), device=device)) for (device, _), ps in groups.items()]
        flags = []
        for ps, one in self._groups:
            flag = torch.zeros((), device=one.device)
            if self._fused_check:
                try:  # GradScaler's check (a multiplication by 1 leaves the values as they are)
                    torch._amp_foreach_non_finite_check_and_unscale_(ps, flag, one)
                    flags.append(flag)
                    continue
                except (RuntimeError, NotImplementedError):  # no kernel for this device in this torch
                    self._fused_check = False
            norms = torch._foreach_norm(ps, ord=math.inf)
            flags.append(torch.stack(norms).amax().float() * 0)  # NaN when any entry is NaN / Inf
        return flags

    def first_nonfinite(self):
        """``(name, description)`` of the first parameter holding a NaN / Inf, or ``None``."""
        for name, p in zip(self.names, self.params, strict=True):
            found = nonfinite_entry(p.detach())
            if found:
                return name, found
        return None

    def state_dict(self):
        state = {"optimizer": self.optimizer.state_dict()}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state):
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and "scheduler" in state:
            self.scheduler.load_state_dict(state["scheduler"])


#: the ``"format"`` entry of a trainer's state_dict
STATE_FORMAT = "pyro_ebm.trainer/1"


def random_state() -> dict:
    """The torch (CPU, and every CUDA device once CUDA is initialized), Python and
    numpy random states, as :meth:`Trainer.state_dict` keeps them."""
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_random_state(state: dict) -> None:
    """Restore :func:`random_state`'s output."""
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class _Snapshot:
    """The parameters and optimizer states of all levels at the start of a step,
    copied into buffers allocated once (``torch._foreach_copy_``), for restoring
    them when the step diverges. The list of tensors is rebuilt only when an
    optimizer or the set of its states changed (a first step, ``load_state_dict``)."""

    def __init__(self):
        self.key, self.src, self.buf, self.fresh, self.scalars = None, [], [], [], []

    def take(self, levels):
        key = tuple((id(lv.optimizer), id(lv.optimizer.state), len(lv.optimizer.state)) for lv in levels)
        if key != self.key or self.fresh or self.scalars:
            self._gather(levels)
            self.key = key
            with torch.no_grad():
                self.buf = [t.detach().clone() for t in self.src]
        elif self.src:
            with torch.no_grad():
                torch._foreach_copy_(self.buf, self.src)

    def _gather(self, levels):
        src, fresh, scalars = [], [], []
        for level in levels:
            src.extend(level.params)
            state = level.optimizer.state
            for p in level.params:
                st = state.get(p)
                if not st:
                    fresh.append((state, p))
                    continue
                for k, value in st.items():
                    if torch.is_tensor(value):
                        src.append(value)
                    else:
                        scalars.append((st, k, value))
        self.src, self.fresh, self.scalars = src, fresh, scalars

    def restore(self, levels):
        with torch.no_grad():
            if self.src:
                torch._foreach_copy_(self.src, self.buf)
        for state, p in self.fresh:
            state.pop(p, None)
        for st, k, value in self.scalars:
            st[k] = value
        for level in levels:
            for p in level.params:
                p.grad = None


class _Record:
    """One checked quantity of a step: a loss, an update (its gradients and
    updated parameters) or a value (e.g. negatives), with the 0-d tensors whose
    finiteness is checked at the end of the step."""

    __slots__ = ("kind", "level", "label", "where", "tensors", "names", "refs", "diagnose")

    def __init__(self, kind, level, label, where, tensors, names=None, refs=None, diagnose=None):
        self.kind, self.level, self.label, self.where = kind, level, label, where
        self.tensors, self.names, self.refs, self.diagnose = tensors, names, refs, diagnose


def _to_host(tensors):
    """The 0-d tensors as floats, with one host sync."""
    if not tensors:
        return []
    with torch.no_grad():
        try:  # 0-d tensors on one device (dtypes are promoted)
            return torch.stack(tensors).tolist()
        except RuntimeError:
            first = tensors[0]
            return torch.stack([t.detach().reshape(()).to(first.device, torch.float64)
                                for t in tensors]).tolist()


def _kind(value):
    return "NaN" if math.isnan(value) else "Inf"


class Trainer:
    """Base of every trainer in :mod:`pyro_ebm.infer` (see the module docstring).

    Subclasses call ``super().__init__({level: attribute, ...})`` naming, for
    each level, the attribute that holds its ``pyro.optim`` object (replacing
    the attribute's object rebuilds the level's optimizer at the next step),
    and implement :meth:`_validate`, :meth:`_parameters`, :meth:`_step` and
    :meth:`_losses`; inside :meth:`_step` they report losses with
    :meth:`_watch` and update a level with :meth:`_minimize` or :meth:`_apply`.

    :ivar int num_steps: steps taken so far.
    :ivar dict last_losses: every named loss of the last step, as floats.
    :ivar dict levels: ``{name: Level}``, built at the first step.
    """

    algorithm = "Trainer"
    #: the key of ``last_losses`` that :meth:`step` returns
    main_loss = "loss"
    #: what a divergence message advises
    advice = "lower the learning rate"
    #: levels whose loss is a sum over the batch (not a mean): their gradients are
    #: summed over the ranks of a process group instead of averaged
    summed_levels = frozenset()

    def __init__(self, levels, compile=False):
        self.compile_options = compile_options(compile)
        self._compiled_steps = {}
        self._optim_attrs = dict(levels)
        self.levels = {}
        self.num_steps = 0
        self.last_losses = {}
        self._checked = set()
        self._snapshot = _Snapshot()
        self._records = None
        self._level_now = None
        self._pending_state = None

    # -- what a trainer implements -------------------------------------------------

    def _validate(self, args, kwargs, where):
        """Check the batch ``args[0]`` (every call) and the models (once per shape);
        errors name ``where`` (e.g. ``"step 3"``)."""
        raise NotImplementedError

    def _parameters(self, args, kwargs):
        """``{level: [(name, tensor), ...]}``, collected once (e.g. by
        :func:`collect_parameters`)."""
        raise NotImplementedError

    def _setup(self, args, kwargs):
        """Once, before the parameters are collected (e.g. create a learned scalar)."""

    def _step(self, args, kwargs):
        """The body of one step: updates through :meth:`_minimize` / :meth:`_apply`;
        returns ``{name: 0-d tensor or float}`` holding :attr:`main_loss`."""
        raise NotImplementedError

    def _losses(self, args, kwargs):
        """The named losses at the current parameters, no update (for :meth:`evaluate_losses`)."""
        raise NotImplementedError

    def _diagnose(self, args, kwargs):
        """Which site or term is non-finite on this batch (a sentence), for a
        divergence message; run after the parameters are restored."""
        return None

    def _save_extra(self):
        """Trainer state other than parameters to restore after a divergence."""
        return None

    def _load_extra(self, saved):
        pass

    # -- the contract ----------------------------------------------------------------

    def step(self, *args, **kwargs) -> float:
        """One training step on the batch ``args[0]`` (further arguments go to the
        Pyro callables); returns the main loss (:attr:`main_loss`) as a float and
        keeps every named loss of the step in :attr:`last_losses`.

        :raises DivergenceError: a loss, gradient or updated parameter is NaN /
            Inf; every parameter and optimizer state is then as before the step.
        """
        losses = self._run(self._step, args, kwargs, "step")
        self.num_steps += 1
        self.last_losses = losses
        return losses[self.main_loss]

    def evaluate_losses(self, *args, **kwargs) -> dict:
        """Every named loss on the batch ``args[0]`` at the current parameters, as
        floats; nothing is updated."""
        self._require_data(args, "evaluate_loss")
        self._validate_keeping_rng(args, kwargs, "evaluate_loss")
        named = self._losses(args, kwargs)
        keys = [k for k, v in named.items() if torch.is_tensor(v)]
        values = _to_host([named[k] for k in keys])
        out = {k: v if torch.is_tensor(v) else float(v) for k, v in named.items()}
        out.update(zip(keys, values, strict=True))
        return out

    def evaluate_loss(self, *args, **kwargs) -> float:
        """The main loss on the batch ``args[0]`` (a float); nothing is updated."""
        return self.evaluate_losses(*args, **kwargs)[self.main_loss]

    def state_dict(self) -> dict:
        """Everything needed to continue training exactly, in PyTorch's sense:

        - ``"levels"``: per level, its parameters by name (copies of the tensors
          the optimizer updates: module parameters, and ``pyro.param`` sites
          unconstrained), its optimizer's state (the moments the unrolled steps
          replay included) and its scheduler's;
        - ``"num_steps"`` and the trainer's own state (``"extra"``: e.g. CD's
          persistent chains; KALE's :math:`c` is a parameter of its critic level);
        - ``"rng"``: the torch (CPU and initialized CUDA devices), Python and
          numpy random states, so that a loaded trainer draws what the saved one
          would have drawn next.

        ``torch.save(trainer.state_dict(), path)`` writes it; a freshly built
        trainer of the same kind continues with
        ``trainer.load_state_dict(torch.load(path, weights_only=False))``. Before
        the first step no level exists yet and the state holds no parameters.
        """
        levels = {}
        for name, level in self.levels.items():
            levels[name] = {"params": {n: p.detach().clone() for n, p in zip(level.names, level.params,
                                                                              strict=True)},
                            **level.state_dict()}
        if self._pending_state:
            levels = {**self._pending_state, **levels}
        return {"format": STATE_FORMAT, "algorithm": self.algorithm, "num_steps": self.num_steps,
                "levels": levels, "extra": self._save_extra(), "rng": random_state()}

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`'s output: the step count, the trainer's own
        state and the random states at once; parameters and optimizer states at
        once for levels that exist, else at the first step (when the levels are
        collected). Raises a ``ValueError`` for a state of another trainer or
        format, or parameters whose names or shapes do not fit."""
        if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
            found = state.get("format") if isinstance(state, dict) else type(state).__name__
            raise ValueError(f"{self.algorithm}.load_state_dict needs the output of a trainer's state_dict() "
                             f"(format '{STATE_FORMAT}'), got {found!r}")
        if state.get("algorithm") != self.algorithm:
            raise ValueError(f"the state comes from {state.get('algorithm')}, not {self.algorithm}")
        self.num_steps = int(state["num_steps"])
        pending = {}
        for name, level_state in state.get("levels", {}).items():
            if name in self.levels:
                self._load_level(self.levels[name], level_state)
            else:
                pending[name] = level_state
        self._pending_state = pending or None
        self._load_extra(state.get("extra"))
        if state.get("rng") is not None:
            set_random_state(state["rng"])

    def _load_level(self, level, state):
        saved = state.get("params")
        if saved is not None:
            if list(saved) != level.names:
                raise ValueError(f"the saved {level.name} level has parameters {list(saved)}, but this "
                                 f"trainer's has {level.names}; the state must come from a trainer built the "
                                 "same way")
            with torch.no_grad():
                for name, p in zip(level.names, level.params, strict=True):
                    value = saved[name]
                    if value.shape != p.shape:
                        raise ValueError(f"parameter '{name}' of the {level.name} level has shape "
                                         f"{tuple(p.shape)}, the saved one {tuple(value.shape)}")
                    p.copy_(value)
        level.load_state_dict(state)

    # -- compiled steps ----------------------------------------------------------------

    def _compiled(self, key, build, what):
        """The :class:`~pyro_ebm.energy.compile.Compiled` function under ``key`` (built
        once by ``build()``, a pure function of tensors), for ``compile=`` trainers;
        ``None`` with ``compile=False`` or after the compiler refused it (one
        warning), so that the caller takes its eager path."""
        if self.compile_options is None:
            return None
        found = self._compiled_steps.get(key)
        if found is None:
            found = self._compiled_steps[key] = Compiled(build(), self.compile_options, what)
        return None if found.fell_back else found

    def _pure(self, view, *args, **kwargs):
        """``view.pure(*args, **kwargs)`` (a :class:`~pyro_ebm.energy.PureDensity`), or
        ``None`` with one warning (per trainer) when the signature runs on the
        Pyro path, so that a ``compile=`` trainer takes its eager step."""
        try:
            return view.pure(*args, **kwargs)
        except NotTraced as err:
            if not self._compiled_steps.get("not traced"):
                self._compiled_steps["not traced"] = True
                warnings.warn(f"{self.algorithm}(compile=...): {err}; the step runs eagerly", UserWarning,
                              stacklevel=4)
            return None

    def _compiled_minimize(self, level, key, densities, loss_fn, tensors, what, label=None, where=None):
        """One update of ``level`` along the gradient of a loss of pure log densities,
        computed by one compiled function; ``None`` (nothing done) when compiling
        is off or was refused, for the caller's eager update.

        :param list densities: :class:`~pyro_ebm.energy.PureDensity` objects.
        :param callable loss_fn: ``loss_fn(fns, *tensors) -> (loss, aux)`` where
            ``fns[i](*args, values=None, **kwargs)`` is ``densities[i]`` at the
            level's parameters being differentiated (the other inputs of the
            densities held fixed); ``aux`` is a dict of tensors (no gradient).
        :param tensors: its tensor inputs, a tuple or a function returning one,
            called only when the compiled function runs (draw the step's random
            numbers there, as the eager step draws them, so that compiled and
            eager steps agree and a refused compile draws nothing extra).
        :param str label: the loss in a divergence message (``"the loss"``).
        :returns: ``(loss, aux)``, with the update applied and the loss watched.
        """
        if self.compile_options is None or any(d is None for d in densities):
            return None
        params = [d.parameters() for d in densities]
        lv = self.levels[level]
        trainable = {id(p): i for i, p in enumerate(lv.params)}
        slots = tuple(tuple((j, trainable[id(p)]) for j, p in enumerate(ps) if id(p) in trainable)
                      for ps in params)
        used = sorted({i for slot in slots for _, i in slot})
        shapes = tuple(tuple(lv.params[i].shape) for i in used)
        # under a process group the gradients are averaged over the ranks before Adam steps, so
        # the compiled function returns them and the step runs in _apply
        adam = lv.adam_hyperparameters(used) if world_size() == 1 else None
        key = (key, tuple(id(d._entry) for d in densities), slots, adam)

        def build():
            order = {i: k for k, i in enumerate(used)}

            def fn(theta, consts, tensors, moments):
                rank1 = theta  # 0-d tensors come as (1,) views: see _at_least_1d
                theta = [x.view(shape) for x, shape in zip(theta, shapes, strict=True)]

                def loss(theta):
                    fns = []
                    for d, ps, slot in zip(densities, consts, slots, strict=True):
                        full = list(ps)
                        for j, i in slot:
                            full[j] = theta[order[i]]
                        fns.append(functools.partial(d, full))
                    return loss_fn(fns, *tensors)

                grads, (value, aux) = torch.func.grad_and_value(loss, has_aux=True)(theta)
                if adam is None:
                    return value, aux, grads, None
                flat = [g.reshape(x.shape) for g, x in zip(grads, rank1, strict=True)]
                return value, aux, grads, _adam_update(rank1, flat, moments, adam)

            return fn

        step = self._compiled(key, build, what)
        if step is None:
            return None
        theta = [_at_least_1d(lv.params[i].detach()) for i in used]
        # the level's own parameters enter once (as theta): no input aliases another
        consts = [[None if id(p) in trainable else p.detach() for p in ps] for ps in params]
        moments = None
        if adam is not None:
            *state, lrs = lv.adam_state(used)
            moments = (*([_at_least_1d(t) for t in ts] for ts in state), lrs)
        value, aux, grads, flag = step(theta, consts, tuple(tensors() if callable(tensors) else tensors),
                                       moments)
        self._watch(level, label or "the loss", value, where)
        full = [None] * len(lv.params)
        for i, g in zip(used, grads, strict=True):
            full[i] = g
        if flag is None:
            self._apply(level, full, where)
        else:  # the optimizer step ran inside the compiled function
            self._level_now = level
            self._records.append(_Record("update", level, None, where, [flag], refs=full))
        return value, aux

    # -- the update path -----------------------------------------------------------

    def _watch(self, level, label, loss, where=None, diagnose=None):
        """Check the 0-d ``loss`` of ``level`` at the end of the step; ``label``
        reads ``"{label} is nan"`` in the message (e.g. ``"the upper-level loss"``).
        Outside a step (e.g. a hypergradient) nothing is recorded."""
        if self._records is None:
            return
        self._records.append(_Record("loss", level, label, where, [loss], diagnose=diagnose))
        self._level_now = level

    def _watch_value(self, level, label, value, where=None):
        """Check every entry of the tensor ``value`` (e.g. ``"the negatives"``)."""
        if self._records is None:
            return
        self._records.append(_Record("value", level, label, where, [value.detach().abs().amax()],
                                     refs=[value]))

    def _minimize(self, level, loss, where=None, retain_graph=None):
        """One step of ``level``'s optimizer along the gradient of ``loss`` in its
        parameters (and in no other)."""
        params = self.levels[level].params
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=retain_graph)
        self._apply(level, grads, where)

    def _apply(self, level, grads, where=None, then=None):
        """One step of ``level``'s optimizer with ``grads`` (aligned with its
        parameters), averaged over the ranks under a process group
        (:func:`~pyro_ebm.infer.distributed.average_gradients`); the updated
        parameters are checked at the end of the step (and, when one is
        non-finite, the gradients, to say which went first). ``then(grads) ->
        grads``, when given, transforms the combined gradients (e.g. a clip)."""
        self._level_now = level
        # the one place ranks combine gradients (a no-op in one process)
        grads = average_gradients(grads, summed=level in self.summed_levels)
        if then is not None:
            grads = then(grads)
        flags = self.levels[level].apply(grads)
        self._records.append(_Record("update", level, None, where, flags, refs=grads))

    # -- the machinery -------------------------------------------------------------

    def _validate_keeping_rng(self, args, kwargs, where):
        """:meth:`_validate`; the first checks of a new shape run the models, which
        draws random numbers: the random stream is put back after them, so that
        a run resumed from a :meth:`state_dict` draws what the uninterrupted run
        drew (one CPU state copy per step otherwise)."""
        checked = len(self._checked)
        cpu = torch.get_rng_state()
        cuda = [a.device for a in args if torch.is_tensor(a) and a.device.type == "cuda"][:1]
        cuda_state = [torch.cuda.get_rng_state(d) for d in cuda]
        self._validate(args, kwargs, where)
        if len(self._checked) != checked:
            torch.set_rng_state(cpu)
            for d, st in zip(cuda, cuda_state, strict=True):
                torch.cuda.set_rng_state(st, d)

    def _require_data(self, args, what):
        if not args:
            raise ValueError(f"{self.algorithm}.{what} needs the data batch as its first argument")

    def _prepare(self, args, kwargs):
        """Collect the parameters and build the optimizers (first call); later,
        rebuild a level whose ``pyro.optim`` object was replaced and load states
        set with ``set_state`` / ``load``."""
        if self.levels:
            for level in self.levels.values():
                level.adopt_store()
                optim = getattr(self, self._optim_attrs[level.name])
                if optim is not level.pyro_optim:
                    level.build(optim)
                elif optim._state_waiting_to_be_consumed:
                    level.consume_state()
            return
        # the set-up (e.g. KALE's c from generator draws) and the collecting runs draw random
        # numbers: leave the user's random stream as it was, so that a trainer loaded from a
        # state_dict (whose first step collects anew) draws what the uninterrupted one drew
        devices = [a.device for a in args if torch.is_tensor(a) and a.device.type == "cuda"][:1]
        with torch.random.fork_rng(devices=devices):
            self._setup(args, kwargs)
            found = self._parameters(args, kwargs)
        for name, attr in self._optim_attrs.items():
            optim = getattr(self, attr)
            named = found.get(name) or []
            if optim is None or not named:
                continue
            self.levels[name] = Level(name, optim, named)
        # data-parallel: every rank starts from rank 0's parameters (identical updates keep them so)
        broadcast_parameters([p for level in self.levels.values() for p in level.params])
        if self._pending_state:
            for name in list(self._pending_state):
                if name in self.levels:
                    self._load_level(self.levels[name], self._pending_state.pop(name))

    def _run(self, body, args, kwargs, what):
        """Validate, prepare, snapshot, run ``body``, check everything with one host
        sync; restore and raise :class:`DivergenceError` on a divergence."""
        self._require_data(args, what)
        step = self.num_steps + 1
        self._validate_keeping_rng(args, kwargs, f"step {step}" if what == "step" else what)
        self._prepare(args, kwargs)
        levels = list(self.levels.values())
        self._snapshot.take(levels)
        extra = self._save_extra()
        self._records, self._level_now = [], None
        try:
            return self._checked_run(body, args, kwargs, step, levels, extra)
        finally:
            self._records = None

    def _checked_run(self, body, args, kwargs, step, levels, extra):
        try:
            with torch.enable_grad():  # trains under the caller's no_grad too
                named = body(args, kwargs)
            keys = [k for k, v in named.items() if torch.is_tensor(v)]
            checked = [t for r in self._records for t in r.tensors]
            values = _to_host([named[k] for k in keys] + checked)
        except BaseException as err:
            if not isinstance(err, Exception):
                self._snapshot.restore(levels)
                self._load_extra(extra)
                raise
            found = self._first_nonfinite(None)
            detail = self._detail(found) if found is not None else None
            self._snapshot.restore(levels)
            self._load_extra(extra)
            if found is not None:
                raise self._divergence(found, detail, step, args, kwargs) from err
            if isinstance(err, DivergenceError):
                raise
            if is_validation_error(err):
                raise self._invalid_distribution(err, step, args, kwargs) from err
            raise
        found = self._first_nonfinite(values[len(keys):])
        if found is not None:
            detail = self._detail(found)
            self._snapshot.restore(levels)
            self._load_extra(extra)
            raise self._divergence(found, detail, step, args, kwargs)
        out = {k: v if torch.is_tensor(v) else float(v) for k, v in named.items()}
        out.update(zip(keys, values[: len(keys)], strict=False))
        return out

    def _first_nonfinite(self, values):
        """``(record, value)`` of the first checked quantity that is not finite, in
        the order of the step; ``values`` are the checked tensors as floats
        (``None``: read them now, after an error)."""
        records = self._records or ()
        if values is None:  # after an error: slow path, one sync per record
            values = [x for r in records for x in _to_host(r.tensors)]
        i = 0
        for r in records:
            for value in values[i:i + len(r.tensors)]:
                if not math.isfinite(value) or (r.kind == "update" and value != 0):
                    return r, value
            i += len(r.tensors)
        return None

    def _detail(self, found):
        """What went non-finite (read before the parameters are restored) and
        whether a site diagnosis helps."""
        record, value = found
        if record.kind == "loss":
            return f"{record.label} is {value}", True
        if record.kind == "value":
            return f"{record.label} contain {nonfinite_entry(record.refs[0].detach())}", True
        level = self.levels[record.level]
        for name, grad in zip(level.names, record.refs, strict=True):
            found = nonfinite_entry(grad.detach()) if grad is not None else None
            if found:
                return f"parameter '{name}' got a gradient with {found}", True
        bad = level.first_nonfinite()
        name, what = bad if bad is not None else ("?", "NaN / Inf")
        return f"parameter '{name}' became non-finite in the update ({what})", False

    def _divergence(self, found, detail, step, args, kwargs):
        record = found[0]
        text, diagnose = detail
        where = f" ({record.where})" if record.where else ""
        text = f"{self.algorithm} diverged at step {step}{where}: {text} ({record.level} level)"
        if diagnose:
            found = record.diagnose() if record.diagnose is not None else self._diagnose(args, kwargs)
            if found:
                text += f"; {found}"
        return DivergenceError(f"{text}; {self.advice}", step=step, level=record.level)

    def _invalid_distribution(self, err, step, args, kwargs):
        first = str(err.__cause__ or err).splitlines()[0]
        level = self._level_now or next(iter(self._optim_attrs), None)
        text = (f"{self.algorithm} diverged at step {step}: a distribution got invalid parameters ({first}) "
                f"({level} level)")
        found = self._diagnose(args, kwargs)
        if found:
            text += f"; {found}"
        return DivergenceError(f"{text}; {self.advice}", step=step, level=level)
