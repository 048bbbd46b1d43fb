# SPDX-License-Identifier: Apache-2.0
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import pyro_ebm
from pyro_ebm import cli


def test_demo_quick_prints_table_and_writes_figures(tmp_path, capsys):
    cli.main(["demo", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    number = r"(-?\d+\.\d+)"
    methods = ("CD-1", "DSM", "SSM", "BiDSM (K=5, N=0)", "BiSSM (K=5, N=0)")
    found = re.findall(rf"^({'|'.join(map(re.escape, methods))})\s+{number}\s+{number}$", out, flags=re.M)
    rows = {name: ll for name, ll, _seconds in found}
    assert set(rows) == set(methods)
    references = dict(re.findall(rf"^(round Gaussian|correlated Gaussian|untrained GRBM)\s+{number}$", out,
                                 flags=re.M))
    assert set(references) == {"round Gaussian", "correlated Gaussian", "untrained GRBM"}
    for ll in [*rows.values(), *references.values()]:
        assert math.isfinite(float(ll)) and float(ll) < math.log(2) + 0.05  # never above the ceiling
    # the correlated Gaussian beats the round one (checkerboard: correlation 3/4)
    assert float(references["correlated Gaussian"]) > float(references["round Gaussian"]) + 0.3
    assert re.search(r"^ +mean +sd +ess_bulk +ess_tail +r_hat$", out, flags=re.M)  # the ArviZ summary
    # 64 chains x 50 draws do not converge: the R-hat warning names coordinates
    assert re.search(r"^WARNING: R-hat above 1.01 at h\[\d, \d\] \(1\.\d{3}\)", out, flags=re.M)
    assert re.search(r"^The demo took \d+ s on one CPU thread", out, flags=re.M)
    figures = re.findall(r"^figure (\S+\.png): \w", out, flags=re.M)
    assert sorted(Path(f).name for f in figures) == [
        "gebm_samples.png", "grbm_densities.png", "latent_chains_trace.png", "teaching_samples.png"]
    for f in figures:
        assert Path(f).stat().st_size > 1000


def test_reproduce_lists_and_rejects_unknown(capsys):
    cli.main(["reproduce", "list"])
    names = capsys.readouterr().out.split()
    assert names == cli.experiment_names()
    with pytest.raises(SystemExit, match="unknown experiment 'no-such'"):
        cli.main(["reproduce", "no-such"])


def test_bench_lists_and_runs_from_any_folder(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # not the repository root
    cli.main(["bench", "list"])
    names = capsys.readouterr().out.split()
    assert "overhead" in names and "samplers" in names
    assert names == sorted(p.stem for p in cli.BENCHMARKS.glob("*.py"))
    with pytest.raises(SystemExit, match="unknown benchmark 'nothing'; choose one of"):
        cli.main(["bench", "nothing"])
    with pytest.raises(SystemExit) as exit_info:  # found from tmp_path; its own --help exits 0
        cli.main(["bench", "overhead", "--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


def test_version_and_plain_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["--version"])
    assert capsys.readouterr().out.strip() == f"pyro-ebm {pyro_ebm.__version__}"
    for argv in (["--help"], ["reproduce", "--help"], ["bench", "--help"], ["demo", "--help"]):
        with pytest.raises(SystemExit):
            cli.main(argv)
        text = capsys.readouterr().out
        assert "``" not in text and ":class:" not in text and ":func:" not in text, argv
    with pytest.raises(SystemExit):
        cli.main(["reproduce", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: runs/reproduce/NAME)" in text and "(default: 0 1 2" in text


def test_default_seeds_in_help_are_the_experiments_own():
    import importlib
    import inspect

    for name in cli.experiment_names():
        run = importlib.import_module(f"pyro_ebm.experiments.{name.replace('-', '_')}").run
        seeds = inspect.signature(run).parameters["seeds"].default
        assert str(tuple(seeds)) == "(0, 1, 2)", name
    assert cli.DEFAULT_SEEDS == "0 1 2"


def test_help_imports_neither_torch_nor_pyro():
    code = ("import sys\nfrom pyro_ebm import cli\ntry:\n    cli.main(['reproduce', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'pyro') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_no_progress_flag_switches_bars_off(monkeypatch, capsys):
    monkeypatch.setenv("PYRO_EBM_PROGRESS", "1")
    cli.main(["reproduce", "list", "--no-progress"])
    assert os.environ["PYRO_EBM_PROGRESS"] == "0"
