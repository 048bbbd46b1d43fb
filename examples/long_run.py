# SPDX-License-Identifier: Apache-2.0
"""A long run with pyro_ebm.fit: checkpoints, Ctrl-C, metrics and resume.

Trains a GaussianRBM on a 2-D toy by denoising score matching with ``fit``.
With ``--out`` the run keeps its checkpoints and ``metrics.csv`` there: press
Ctrl-C at any time (the current step finishes and a checkpoint is written), then
run the same command with ``--resume`` to continue where it stopped:

    python examples/long_run.py --out runs/grbm --steps 20000
    python examples/long_run.py --out runs/grbm --steps 20000 --resume

Without ``--out`` it shows the whole story in a temporary folder: half the steps,
then a freshly built model and trainer (as a new process would build them) that
resume from the checkpoint and finish the run.
"""

import argparse
import tempfile

import pyro
import torch

from pyro_ebm import datasets, fit
from pyro_ebm.infer import DSM, ScoreMatching
from pyro_ebm.models import GaussianRBM


def make(args):
    """The model and its trainer, built the same way in every session."""
    pyro.clear_param_store()
    torch.manual_seed(args.seed)
    grbm = GaussianRBM(2, args.hidden)
    optim = pyro.optim.Adam({"lr": args.lr, "betas": (0.9, 0.95)})
    return grbm, ScoreMatching(grbm.marginal, optim, objective=DSM(args.noise_scale))


def train(args, folder, resume):
    grbm, trainer = make(args)
    result = fit(trainer, args.data, args.steps, args.batch_size, seed=args.seed, checkpoint=folder,
                 checkpoint_every=args.checkpoint_every, keep=args.keep, resume=resume,
                 progress=False if args.no_progress else None)
    return grbm, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=None, help="checkpoint folder (default: a temporary one)")
    parser.add_argument("--resume", action="store_true", help="continue the run saved in --out")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=100)
    parser.add_argument("--checkpoint-every", type=int, default=500)
    parser.add_argument("--keep", type=int, default=3)
    parser.add_argument("--toy", default="checkerboard", choices=datasets.TOY_NAMES)
    parser.add_argument("--hidden", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--noise-scale", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # toy-sized tensors run fastest on one thread
    args.data = datasets.toy(args.toy, 5000, seed=args.seed)
    test = datasets.toy(args.toy, 2000, seed=args.seed + 1)

    with tempfile.TemporaryDirectory(prefix="pyro_ebm_long_run_") as scratch:
        if args.out is None:
            folder, total = scratch, args.steps
            args.steps = total // 2
            _, first = train(args, folder, resume=False)
            print(f"first session: {first.num_steps} steps, checkpoint {first.checkpoint}")
            args.steps = total
            grbm, result = train(args, folder, resume=True)  # a fresh model and trainer
            print(f"second session: resumed and trained steps {first.num_steps + 1}-{result.num_steps}")
        else:
            folder = args.out
            grbm, result = train(args, folder, resume=args.resume)
        with torch.no_grad():
            log_likelihood = float(grbm.log_likelihood(test).mean())
        print(f"metrics: {folder}/metrics.csv; newest checkpoint: {result.checkpoint}")
    if result.interrupted:
        print(f"interrupted after step {result.num_steps}; run again with --resume to continue")
    print(f"exact test log-likelihood after {result.num_steps} steps: {log_likelihood:.3f}")
    return result, log_likelihood


if __name__ == "__main__":
    main()
