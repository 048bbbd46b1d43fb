# SPDX-License-Identifier: Apache-2.0
"""PyTorch Lightning adapter: any :mod:`pyro_ebm.infer` trainer as a
``LightningModule``, so that ``lightning.Trainer`` (``strategy="ddp"``,
``devices=N``, checkpoints, loggers) drives it. Needs the optional extra:
``pip install pyro-ebm[lightning]``.
"""

from __future__ import annotations

try:
    import lightning
except ImportError as err:  # pragma: no cover - depends on the installation
    raise ImportError(
        "pyro_ebm.lightning needs PyTorch Lightning: pip install 'pyro-ebm[lightning]' "
        "(or pip install lightning)"
    ) from err
import torch

from .infer.trainer import Trainer

__all__ = ["TrainerModule"]


class TrainerModule(lightning.LightningModule):
    r"""A ``LightningModule`` around a pyro_ebm trainer: each training batch is one
    ``trainer.step(*batch)``, and every entry of ``trainer.last_losses`` is logged
    under its own name.

    The trainer owns its optimizers (one per level; BiSM, VaGES, KALE and BiDVL
    step several of them per batch), so the module uses Lightning's manual
    optimization (``automatic_optimization = False``) and hands Lightning only a
    no-op optimizer, stepped once per batch so that Lightning counts training
    steps (``global_step``, ``max_steps``, step-based checkpoints). Under
    ``lightning.Trainer(strategy="ddp", devices=N)`` every
    process runs ``trainer.step`` on its shard of the data (Lightning's
    ``DistributedSampler``) inside an initialized ``torch.distributed`` process
    group, where the pyro_ebm trainer itself averages the gradients of every
    level across ranks; Lightning's own ``DistributedDataParallel`` wrapper
    syncs nothing in manual optimization, but it broadcasts rank 0's parameters
    when it wraps the module, so every rank starts from the same model. With a
    per-rank batch of B / N, a loss that is a mean over the batch therefore takes
    the step of one process on the whole batch of B:

    .. math::

        \nabla_\theta J = \frac1N \sum_{r=1}^{N} \nabla_\theta J_r ,\qquad
        J_r = \frac{N}{B} \sum_{i \in \text{shard } r} \ell_\theta(v_i).

    The ``nn.Module`` objects that the trainer's attributes hold (the model, the
    guide, a critic; also the module of a bound method such as
    ``grbm.marginal``) become submodules, so Lightning moves them to each rank's
    device, saves their parameters in checkpoints and wraps them in DDP (which
    refuses a module without parameters: pass ``modules=`` when the parameters
    live elsewhere). A checkpoint also holds ``trainer.state_dict()`` (optimizer
    states, step count, random state) under ``"pyro_ebm_trainer"``, loaded back
    on resume.

    :param Trainer trainer: a pyro_ebm trainer (``ScoreMatching``, ``BiSM``,
        ``VaGES``, ``ContrastiveDivergence``, ``KALE``, ``MCMCTeaching``,
        ``BiDVL``).
    :param modules: the ``nn.Module`` objects holding the trainer's parameters;
        by default those found among the trainer's attributes.

    >>> grbm = GaussianRBM(2, 4)
    >>> module = TrainerModule(ScoreMatching(grbm.marginal, pyro.optim.Adam({"lr": 1e-2})))
    >>> loader = DataLoader(TensorDataset(datasets.toy("8gaussians", 4096)), batch_size=128)
    >>> lightning.Trainer(strategy="ddp", accelerator="cpu", devices=2, max_epochs=5).fit(module, loader)
    """

    def __init__(self, trainer: Trainer, modules=None):
        super().__init__()
        if not isinstance(trainer, Trainer):
            raise TypeError(f"trainer must be a pyro_ebm.infer trainer (a Trainer), got "
                            f"{type(trainer).__name__}")
        self.automatic_optimization = False
        self.ebm_trainer = trainer
        found = _modules_of(trainer) if modules is None else list(modules)
        for i, module in enumerate(found):
            if not isinstance(module, torch.nn.Module):
                raise TypeError(f"modules[{i}] must be a torch.nn.Module, got {type(module).__name__}")
        self.ebm_modules = torch.nn.ModuleList(found)

    def training_step(self, batch, batch_idx):
        """``trainer.step(*batch)`` (a tensor batch is passed as it is); logs every
        named loss of the step. Returns ``None``: the trainer has updated the
        parameters already."""
        args = tuple(batch) if isinstance(batch, (tuple, list)) else (batch,)
        self.ebm_trainer.step(*args)
        self.optimizers().step()  # the no-op step that Lightning counts
        size = len(args[0]) if torch.is_tensor(args[0]) and args[0].dim() else None
        main = getattr(self.ebm_trainer, "main_loss", None)
        for name, value in self.ebm_trainer.last_losses.items():
            self.log(name, float(value), prog_bar=name == main, batch_size=size)
        return None

    def configure_optimizers(self):
        """A no-op optimizer (:class:`StepCounter`): the pyro_ebm trainer owns the real ones."""
        return StepCounter()

    def on_save_checkpoint(self, checkpoint):
        checkpoint["pyro_ebm_trainer"] = self.ebm_trainer.state_dict()

    def on_load_checkpoint(self, checkpoint):
        if "pyro_ebm_trainer" in checkpoint:
            self.ebm_trainer.load_state_dict(checkpoint["pyro_ebm_trainer"])


class StepCounter(torch.optim.Optimizer):
    """An optimizer that updates nothing: :class:`TrainerModule` steps it once per
    batch, after the pyro_ebm trainer's step, because Lightning counts training
    steps by optimizer steps in manual optimization."""

    def __init__(self):
        super().__init__([torch.zeros(0)], {})

    def step(self, closure=None):
        return closure() if closure is not None else None


def _modules_of(trainer):
    """The distinct ``nn.Module`` objects among ``trainer``'s attributes (bound
    methods count by their module), in attribute order."""
    found, seen = [], set()
    for value in vars(trainer).values():
        module = getattr(value, "__self__", value)
        if isinstance(module, torch.nn.Module) and id(module) not in seen:
            seen.add(id(module))
            found.append(module)
    return found
