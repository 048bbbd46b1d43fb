# SPDX-License-Identifier: Apache-2.0
"""Differentiable (unrolled) optimizer steps on fast weights.

A bi-level algorithm takes real optimizer steps on a module's parameters and
then needs the parameters after N *more* steps as a differentiable function of
everything the inner loss depends on. :class:`UnrolledAdam` replays
``torch.optim.Adam`` on a dict of fast weights, starting from the hyperparameters
and the moment state that the level's one torch Adam holds for the real
parameters, and :func:`pyro_ebm.energy.functional` runs the module with those
weights through ``torch.func.functional_call``. The real parameters and the real
optimizer state are never written.
"""

from __future__ import annotations

import torch

from ..energy import trainable_parameters
from .distributed import differentiable_mean

__all__ = ["UnrolledAdam", "check_unrollable"]


def check_unrollable(module, why: str) -> None:
    """Raise a clear error unless ``module`` can run with swapped-in fast weights:
    it must be an ``nn.Module`` and hold no :class:`~pyro.nn.PyroParam` (whose
    value a :class:`~pyro.nn.PyroModule` reads from the param store, out of reach
    of ``functional_call``)."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(
            f"{why} runs the guide with fast weights (torch.func.functional_call), so the guide must be "
            f"an nn.Module (a PyroModule, or a module that calls pyro.module on itself); got "
            f"{type(module).__name__}. Use unroll_steps=0 with a function guide"
        )
    held = [f"{prefix + '.' if prefix else ''}{name}" for prefix, sub in module.named_modules()
            for name in getattr(sub, "_pyro_params", {})]
    if held:
        raise ValueError(
            f"{why} cannot swap the guide's PyroParam(s) {held} for fast weights (a PyroModule reads them "
            "from the param store); declare them as torch.nn.Parameter (e.g. a raw value passed through "
            "softplus) or use unroll_steps=0"
        )
    if not trainable_parameters(module):
        raise ValueError(f"{why} found no trainable parameters in the guide ({type(module).__name__})")


def _safe_sqrt(x):
    # sqrt whose derivative at 0 is 0 instead of inf (a coordinate with a zero
    # gradient so far would otherwise turn the hypergradient into NaN)
    positive = x > 0
    return torch.where(positive, torch.where(positive, x, torch.ones_like(x)).sqrt(), torch.zeros_like(x))


class UnrolledAdam:
    r"""Adam steps on fast weights that stay differentiable, continuing a real
    torch Adam (the one optimizer of a trainer's level).

    For each parameter it reads the hyperparameters of its parameter group
    (``lr``, ``betas``, ``eps``, ``weight_decay``, ``amsgrad``, ``maximize``;
    AdamW's decoupled decay) and the state (step count :math:`t_0`, first and
    second moments :math:`m, u`) that the optimizer holds for that parameter
    (zeros if it has taken no step). Each call of :meth:`step` then performs,
    with :math:`g = \nabla_\phi L` taken with ``create_graph=True``,

    .. math::

        m \leftarrow \beta_1 m + (1 - \beta_1) g, \quad
        u \leftarrow \beta_2 u + (1 - \beta_2) g^2, \quad
        \phi \leftarrow \phi - \frac{\text{lr}}{1 - \beta_1^t}\,
            \frac{m}{\sqrt{u / (1 - \beta_2^t)} + \epsilon},

    exactly as ``torch.optim.Adam`` does, but out of place, so the result is a
    differentiable function of whatever :math:`L` depends on. The real
    parameters and the optimizer's own state are left untouched. Under a
    ``torch.distributed`` process group :math:`g` is the mean over the ranks,
    by a differentiable ``all_reduce``
    (:func:`~pyro_ebm.infer.distributed.differentiable_mean`).

    :param torch.optim.Optimizer optimizer: a ``torch.optim.Adam`` or ``AdamW``
        holding the real parameters (fused, foreach or single-tensor alike).
    :param dict params: the real parameters by name (the keys of the fast weights).

    >>> unrolled = UnrolledAdam(trainer.levels["guide"].optimizer, trainable_parameters(guide))
    >>> weights = trainable_parameters(guide)
    >>> for _ in range(5):
    ...     loss = inner_loss(functional(guide, weights))
    ...     weights = unrolled.step(loss, weights)

    **References:** D. P. Kingma, J. Ba, "Adam: a method for stochastic
    optimization", ICLR 2015; L. Metz, B. Poole, D. Pfau, J. Sohl-Dickstein,
    "Unrolled generative adversarial networks", ICLR 2017.
    """

    def __init__(self, optimizer, params: dict):
        if not isinstance(optimizer, (torch.optim.Adam, torch.optim.AdamW)):
            raise ValueError(
                f"unrolled steps replay Adam, but the optimizer is {type(optimizer).__name__}; use "
                "pyro.optim.Adam or pyro.optim.AdamW (or unroll_steps=0)"
            )
        group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
        decoupled = isinstance(optimizer, torch.optim.AdamW)
        self.hyper, self.state = {}, {}
        for name, p in params.items():
            group = group_of.get(id(p))
            if group is None:
                raise ValueError(f"parameter '{name}' is not one of the optimizer's parameters, so its Adam "
                                 "state is unknown")
            hyper = {k: v for k, v in group.items() if k != "params"}
            hyper.setdefault("decoupled_weight_decay", decoupled)
            self.hyper[name] = hyper
            st = optimizer.state.get(p) or {}
            zeros = torch.zeros_like(p).detach()
            step = st.get("step", 0)  # a tensor in torch >= 1.12: kept one, no host sync
            self.state[name] = {
                "step": step.detach().to(torch.float64) if torch.is_tensor(step) else float(step),
                "exp_avg": st.get("exp_avg", zeros).detach(),
                "exp_avg_sq": st.get("exp_avg_sq", zeros).detach(),
                "max_exp_avg_sq": st.get("max_exp_avg_sq", zeros).detach(),
            }

    def step(self, loss: torch.Tensor, weights: dict) -> dict:
        """One differentiable Adam step: the new fast weights (the moment state
        advances with them)."""
        names = list(weights)
        grads = torch.autograd.grad(loss, [weights[n] for n in names], create_graph=True, allow_unused=True)
        # data-parallel: the ranks' gradients averaged, differentiably (a no-op in one process)
        grads = differentiable_mean(grads)
        new, self.state = self.update(weights, dict(zip(names, grads, strict=True)), self.state)
        return new

    def update(self, weights: dict, grads: dict, state: dict):
        """The Adam step as a pure function: ``(new weights, new state)`` from the fast
        ``weights``, their gradients ``grads`` (``None`` for a weight without one,
        which keeps its value) and the moment ``state`` (:attr:`state`'s layout).
        Written for ``torch.func`` and ``torch.compile`` as well as autograd."""
        new, out = dict(weights), dict(state)
        for name, g in grads.items():
            if g is None:  # torch.optim.Adam skips a parameter without a gradient
                continue
            hp, st, phi = self.hyper[name], state[name], weights[name]
            lr, (beta1, beta2), eps, wd = float(hp["lr"]), hp["betas"], hp["eps"], hp["weight_decay"]
            beta1, beta2 = float(beta1), float(beta2)
            if hp.get("maximize", False):
                g = -g
            t = st["step"] + 1
            if wd:
                if hp["decoupled_weight_decay"]:
                    phi = phi * (1 - lr * wd)
                else:
                    g = g + wd * phi
            m = beta1 * st["exp_avg"] + (1 - beta1) * g
            u = beta2 * st["exp_avg_sq"] + (1 - beta2) * g * g
            if hp.get("amsgrad", False):
                u_max = torch.maximum(st["max_exp_avg_sq"], u)
            else:
                u_max = u
            bias1, bias2 = 1 - beta1**t, 1 - beta2**t
            denom = _safe_sqrt(u_max) / bias2**0.5 + eps
            new[name] = phi - (lr / bias1) * m / denom
            out[name] = {"step": t, "exp_avg": m, "exp_avg_sq": u, "max_exp_avg_sq": u_max}
        return new, out
