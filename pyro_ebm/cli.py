# SPDX-License-Identifier: Apache-2.0
"""The ``pyro-ebm`` command: ``demo``, ``reproduce NAME``, ``bench NAME``.

Nothing heavy (torch, Pyro) is imported before the arguments are parsed, so
``pyro-ebm --help`` answers at once.
"""

from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import runpy
import sys
from pathlib import Path

DESCRIPTION = """\
Energy-based latent variable models in Pyro.

  pyro-ebm demo               train GaussianRBMs by each method, compare them, write figures
  pyro-ebm reproduce list     list the experiments that reproduce the papers' claims
  pyro-ebm reproduce NAME     run one of them (results in docs/results.md)
  pyro-ebm bench list         list the speed benchmarks
  pyro-ebm bench NAME [ARGS]  run one of them (figures in docs/benchmarks.md)
"""

# the seeds each experiment runs unless --seeds is given (tests check these against run())
DEFAULT_SEEDS = "0 1 2"
_EXPERIMENTS = Path(__file__).resolve().parent / "experiments"
# benchmarks/ sits beside the package in a source checkout (editable install)
BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("pyro-ebm")
    except PackageNotFoundError:  # run from a source tree that is not installed
        from . import __version__

        return __version__


def experiment_names():
    """Names accepted by ``pyro-ebm reproduce`` (read from the folder, nothing imported)."""
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules([str(_EXPERIMENTS)])
                  if not m.name.startswith("_"))


def benchmark_names():
    """Names accepted by ``pyro-ebm bench``."""
    return sorted(p.stem for p in BENCHMARKS.glob("*.py") if not p.stem.startswith("_"))


def reproduce(name, out=None, quick=False, seeds=None, resume=False):
    names = experiment_names()
    if name not in names:
        raise SystemExit(f"pyro-ebm reproduce: unknown experiment {name!r}; choose one of {names}")
    module = importlib.import_module(f"pyro_ebm.experiments.{name.replace('-', '_')}")
    out_dir = Path(out or f"runs/reproduce/{name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"quick": quick, "resume": resume}
    if seeds is not None:
        kwargs["seeds"] = tuple(seeds)
    try:
        report = module.run(out_dir, **kwargs)
    except KeyboardInterrupt:
        from .experiments._runs import RUNS, finished_runs

        again = ["pyro-ebm", "reproduce", name, "--out", str(out_dir), "--resume"]
        again += ["--quick"] if quick else []
        again += ["--seeds", *map(str, seeds)] if seeds is not None else []
        print(f"\npyro-ebm reproduce {name}: interrupted. The {finished_runs(out_dir)} finished runs are in "
              f"{out_dir / RUNS} (and a checkpoint of the run in progress, if it got far enough); "
              f"continue with:\n  {' '.join(again)}", file=sys.stderr)
        raise SystemExit(130) from None
    (out_dir / f"{name}.md").write_text(report)
    print(report)
    print(f"\nwrote {out_dir / (name + '.md')} and the figures beside it")
    return report


def bench(name, extra):
    if not BENCHMARKS.is_dir():
        raise SystemExit(
            f"pyro-ebm bench: the benchmarks ship with the source repository, not with an installed "
            f"package; no folder {BENCHMARKS} (install from a checkout with `pip install -e .`)"
        )
    names = benchmark_names()
    if name not in names:
        raise SystemExit(f"pyro-ebm bench: unknown benchmark {name!r}; choose one of {names}")
    path = BENCHMARKS / f"{name}.py"
    sys.argv = [str(path), *extra]
    runpy.run_path(str(path), run_name="__main__")


def _parser():
    parser = argparse.ArgumentParser(prog="pyro-ebm", description=DESCRIPTION,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=f"%(prog)s {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{demo,reproduce,bench}")
    no_progress = dict(action="store_true",
                       help="no progress bars (they are shown only on a terminal anyway; "
                            "PYRO_EBM_PROGRESS=0 does the same)")

    demo = sub.add_parser("demo", help="train the demo models and print their scores",
                          description="Train GaussianRBMs on a 2-D toy by each method, print their "
                                      "test log-likelihoods and write the figures.")
    demo.add_argument("--out", default="runs/demo", help="folder for the figures (default: %(default)s)")
    demo.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for smoke tests")
    demo.add_argument("--no-progress", **no_progress)

    rep = sub.add_parser("reproduce", help="reproduce a paper's claim (see docs/results.md)",
                         description="Run one experiment that reproduces a paper's claim and write its "
                                     "report (Markdown) and figures. Each finished run's numbers are "
                                     "written to OUT/runs as soon as it ends and long trainings are "
                                     "checkpointed, so Ctrl-C loses little: rerun with --resume.")
    rep.add_argument("name", help="experiment name, or `list`; one of: " + ", ".join(experiment_names()))
    rep.add_argument("--out", default=None,
                     help="folder for the report and figures (default: runs/reproduce/NAME)")
    rep.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    rep.add_argument("--seeds", type=int, nargs="+", default=None,
                     help=f"random seeds, one run each (default: {DEFAULT_SEEDS})")
    rep.add_argument("--resume", action="store_true",
                     help="continue an interrupted reproduction in the same --out folder: finished runs "
                          "(their numbers are written to OUT/runs as each ends) are loaded, not redone, and "
                          "a run in progress continues from its last checkpoint; the report is the same as "
                          "an uninterrupted run's")
    rep.add_argument("--no-progress", **no_progress)

    ben = sub.add_parser("bench", help="run a speed benchmark (see docs/benchmarks.md)",
                         description="Run benchmarks/NAME.py from the source repository; extra "
                                     "arguments go to the benchmark (NAME --help lists them).")
    ben.add_argument("name", help="benchmark name, or `list`; one of: " + ", ".join(benchmark_names()))
    ben.add_argument("extra", nargs=argparse.REMAINDER, help="arguments passed to the benchmark")
    return parser


def main(argv=None):
    args = _parser().parse_args(argv)
    if getattr(args, "no_progress", False):
        os.environ["PYRO_EBM_PROGRESS"] = "0"
    if args.command == "demo":
        from .demo import run_demo

        run_demo(Path(args.out), quick=args.quick)
    elif args.command == "reproduce":
        if args.name == "list":
            print("\n".join(experiment_names()))
            return
        reproduce(args.name, args.out, args.quick, args.seeds, args.resume)
    else:
        if args.name == "list":
            print("\n".join(benchmark_names()))
            return
        bench(args.name, args.extra)


if __name__ == "__main__":
    main()
