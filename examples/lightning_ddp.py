# SPDX-License-Identifier: Apache-2.0
"""Train a GaussianRBM by score matching under PyTorch Lightning, data-parallel
with DDP (in the manner of Pyro's examples/svi_lightning.py).

    pip install 'pyro-ebm[lightning]'
    python examples/lightning_ddp.py --devices 2                       # two CPU processes
    python examples/lightning_ddp.py --accelerator gpu --devices 4     # four GPUs

Lightning starts the other processes itself (it re-runs this script), gives each
its shard of the data (a ``DistributedSampler``) and initializes the
``torch.distributed`` process group; the pyro_ebm trainer, wrapped by
``pyro_ebm.lightning.TrainerModule``, averages its gradients across the ranks.
"""

import argparse
import os

import lightning
import pyro
import torch
from torch.utils.data import DataLoader, TensorDataset

from pyro_ebm import datasets
from pyro_ebm.infer import DSM, SSM, ExactSM, ScoreMatching
from pyro_ebm.lightning import TrainerModule
from pyro_ebm.models import GaussianRBM

OBJECTIVES = {"dsm": lambda args: DSM(args.noise_scale), "ssm": lambda args: SSM(),
              "exact": lambda args: ExactSM()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--toy", default="8gaussians", choices=datasets.TOY_NAMES)
    parser.add_argument("--num-data", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=8)
    parser.add_argument("--objective", choices=sorted(OBJECTIVES), default="dsm")
    parser.add_argument("--noise-scale", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--batch-size", type=int, default=256, help="per process")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--accelerator", default="cpu")
    parser.add_argument("--devices", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", default=None,
                        help="folder: each rank saves its parameters and losses there")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    # the same seed on every rank: the same data and initial model (DDP also
    # broadcasts rank 0's parameters when it wraps the module)
    lightning.seed_everything(args.seed, verbose=False)
    data = datasets.toy(args.toy, args.num_data, seed=args.seed)
    grbm = GaussianRBM(2, args.hidden)
    trainer = ScoreMatching(grbm.marginal, pyro.optim.Adam({"lr": args.lr}),
                            objective=OBJECTIVES[args.objective](args))
    module = TrainerModule(trainer)
    loader = DataLoader(TensorDataset(data), batch_size=args.batch_size, shuffle=True, drop_last=True)

    before = trainer.evaluate_loss(data)
    fitter = lightning.Trainer(strategy="ddp", accelerator=args.accelerator, devices=args.devices,
                               max_epochs=args.epochs, logger=False, enable_checkpointing=False,
                               enable_progress_bar=False, enable_model_summary=False)
    fitter.fit(module, loader)
    after = trainer.evaluate_loss(data)
    rank = fitter.global_rank
    if rank == 0:
        print(f"{args.objective} loss on all data: {before:.4f} before, {after:.4f} after "
              f"{trainer.num_steps} steps on each of {fitter.world_size} processes")
    if args.save:
        os.makedirs(args.save, exist_ok=True)
        torch.save({"parameters": {k: v.detach().clone() for k, v in grbm.state_dict().items()},
                    "before": before, "after": after, "num_steps": trainer.num_steps,
                    "world_size": fitter.world_size},
                   os.path.join(args.save, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
