# SPDX-License-Identifier: Apache-2.0
"""The ``pyro-ebm`` command: ``demo``, ``reproduce NAME``, ``bench NAME``."""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import runpy
import sys
from pathlib import Path


def experiment_names():
    """Names accepted by ``pyro-ebm reproduce``."""
    from . import experiments

    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(experiments.__path__)
                  if not m.name.startswith("_"))


def reproduce(name, out=None, quick=False, seeds=None):
    names = experiment_names()
    if name not in names:
        raise SystemExit(f"pyro-ebm reproduce: unknown experiment {name!r}; choose one of {names}")
    module = importlib.import_module(f"pyro_ebm.experiments.{name.replace('-', '_')}")
    out_dir = Path(out or f"runs/reproduce/{name}")
    out_dir.mkdir(parents=True, exist_ok=True)
    kwargs = {"quick": quick}
    if seeds is not None:
        kwargs["seeds"] = tuple(seeds)
    report = module.run(out_dir, **kwargs)
    (out_dir / f"{name}.md").write_text(report)
    print(report)
    print(f"\nwrote {out_dir / (name + '.md')} and the figures beside it")
    return report


def bench(name, extra):
    path = Path("benchmarks") / f"{name}.py"
    if not path.exists():
        available = sorted(p.stem for p in Path("benchmarks").glob("*.py"))
        raise SystemExit(f"pyro-ebm bench: no {path} (run from the repository root); available: {available}")
    sys.argv = [str(path), *extra]
    runpy.run_path(str(path), run_name="__main__")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="pyro-ebm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="train the demo models and print their scores")
    demo.add_argument("--out", default="runs/demo", help="folder for the figures")
    demo.add_argument("--quick", action="store_true", help="tiny sizes (seconds), for smoke tests")
    rep = sub.add_parser("reproduce", help="reproduce a paper's claim (see docs/results.md)")
    rep.add_argument("name", help="experiment name; `pyro-ebm reproduce list` lists them")
    rep.add_argument("--out", default=None, help="folder for the report and figures")
    rep.add_argument("--quick", action="store_true", help="tiny sizes, for smoke tests")
    rep.add_argument("--seeds", type=int, nargs="+", default=None)
    ben = sub.add_parser("bench", help="run benchmarks/NAME.py (from the repository root)")
    ben.add_argument("name")
    ben.add_argument("extra", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from .demo import run_demo

        run_demo(Path(args.out), quick=args.quick)
    elif args.command == "reproduce":
        if args.name == "list":
            print("\n".join(experiment_names()))
            return
        reproduce(args.name, args.out, args.quick, args.seeds)
    else:
        bench(args.name, args.extra)


if __name__ == "__main__":
    main()
