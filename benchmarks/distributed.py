# SPDX-License-Identifier: Apache-2.0
"""Data-parallel scaling of pyro_ebm trainers under ``torch.distributed``.

Trains, at digits size (a GaussianRBM with 64 visible and 16 hidden units),

- ScoreMatching-DSM: ``infer.ScoreMatching(grbm.marginal, objective=DSM(0.3))``,
- BiSM: ``infer.BiSM(grbm, AmortizedBernoulli, objective=DSM(0.3), inner_steps=5, unroll_steps=5)``,

on a fixed *global* batch (strong scaling: W processes take 1/W of it each) and
reports steps/s for each number of processes W, the speed-up over one process
and the scaling efficiency (speed-up / W). The processes are started by this
script (one per rank, a gloo group on 127.0.0.1 on CPU; ``--gpu``: an NCCL group,
one GPU per rank, for every W from 1 to the number of GPUs). On CPU each process
gets ``cpu_count // W`` torch threads, so one process may use all cores that W
processes share: on a 2-core machine two processes can at best double the
throughput of one single-threaded process, and compete with each other (and
anything else running) for the same two cores, so the CPU figures bound the
communication overhead rather than show the speed-up of real hardware.

    python benchmarks/distributed.py                          # CPU, W = 1 and 2
    python benchmarks/distributed.py --steps 5 --batch 32     # smoke run
    python benchmarks/distributed.py --gpu                    # every GPU count
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import tempfile
import time

import pyro
import torch

from pyro_ebm import datasets
from pyro_ebm.guides import AmortizedBernoulli
from pyro_ebm.infer import DSM, BiSM, ScoreMatching
from pyro_ebm.infer.distributed import rank, seed_by_rank, world_size
from pyro_ebm.models import GaussianRBM

METHODS = ("ScoreMatching-DSM", "BiSM (K 5, N 5)")


def _trainer(method, device):
    pyro.clear_param_store()
    torch.manual_seed(0)  # the same model on every rank (rank 0's is broadcast at the first step anyway)
    grbm = GaussianRBM(visible_dim=64, hidden_dim=16).to(device)
    optim = pyro.optim.Adam({"lr": 2e-4})
    if method == METHODS[0]:
        return ScoreMatching(grbm.marginal, optim, objective=DSM(0.3))
    guide = AmortizedBernoulli(visible_dim=64, hidden_dim=16, site="h", temperature=0.1).to(device)
    return BiSM(grbm, guide, optim, objective=DSM(0.3), inner_steps=5, unroll_steps=5)


def _worker(args):
    backend = "nccl" if args.gpu else "gloo"
    torch.distributed.init_process_group(backend, init_method=f"tcp://127.0.0.1:{args.port}", rank=args.rank,
                                         world_size=args.world)
    device = torch.device(f"cuda:{rank()}") if args.gpu else torch.device("cpu")
    if args.gpu:
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size()))
    seed_by_rank(1)
    data = datasets.digits("train").to(device)
    local = args.batch // world_size()
    rows = torch.arange(rank() * local, (rank() + 1) * local)
    out = {}
    for method in METHODS:
        trainer = _trainer(method, device)
        picks = [torch.randperm(len(data))[:args.batch] for _ in range(args.steps + args.warmup)]
        batches = [data[p][rows] for p in picks]
        for b in batches[:args.warmup]:
            trainer.step(b)
        if args.gpu:
            torch.cuda.synchronize()
        torch.distributed.barrier()
        t0 = time.perf_counter()
        for b in batches[args.warmup:]:
            trainer.step(b)  # step returns a float: one host sync per step
        torch.distributed.barrier()
        out[method] = args.steps / (time.perf_counter() - t0)
    if rank() == 0:
        torch.save(out, args.out)
    torch.distributed.destroy_process_group()


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run(world, args):
    with tempfile.TemporaryDirectory() as tmp:
        out, port = os.path.join(tmp, "rates.pt"), _free_port()
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--rank", str(r),
                                   "--world", str(world), "--port", str(port), "--out", out,
                                   "--steps", str(args.steps),
                                   "--warmup", str(args.warmup), "--batch", str(args.batch)]
                                  + (["--gpu"] if args.gpu else []))
                 for r in range(world)]
        codes = [p.wait() for p in procs]
        if any(codes):
            raise RuntimeError(f"a rank of the {world}-process run failed (exit codes {codes})")
        return torch.load(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gpu", action="store_true", help="NCCL, one GPU per rank, every GPU count")
    parser.add_argument("--steps", type=int, default=30, help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128, help="the global batch (divisible by every W)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--rank", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--world", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", default="", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return _worker(args)
    if args.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu needs CUDA devices")
    worlds = range(1, torch.cuda.device_count() + 1) if args.gpu else (1, 2)
    load = os.getloadavg()[0]
    rates = {w: _run(w, args) for w in worlds}
    where = f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}" if args.gpu else (
        f"CPU, {os.cpu_count()} cores, gloo")
    print(f"# data-parallel scaling ({where}), global batch {args.batch}, {args.steps} steps; "
          f"load average {load:.2f} before, {os.getloadavg()[0]:.2f} after")
    print("| method | processes | steps/s | speed-up | efficiency |")
    print("|---|---|---|---|---|")
    for method in METHODS:
        for w in worlds:
            speedup = rates[w][method] / rates[1][method]
            print(f"| {method} | {w} | {rates[w][method]:.2f} | {speedup:.2f} | {speedup / w:.2f} |")


if __name__ == "__main__":
    main()
