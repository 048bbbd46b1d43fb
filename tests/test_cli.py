# SPDX-License-Identifier: Apache-2.0
import math
import os
import re
import subprocess
import sys

import pytest

import pyro_ebm
from pyro_ebm import cli


def test_demo_quick_prints_table_and_writes_figures(tmp_path, capsys):
    cli.main(["demo", "--quick", "--out", str(tmp_path)])
    out = capsys.readouterr().out
    rows = re.findall(r"^(CD-1|DSM \(σ=0\.05\)|SSM)\s+(-?\d+\.\d+)\s", out, flags=re.M)
    assert {name for name, _ in rows} == {"CD-1", "DSM (σ=0.05)", "SSM"}
    for _, ll in rows:
        assert math.isfinite(float(ll)) and float(ll) < math.log(2) + 0.05  # never above the ceiling
    pngs = sorted(p.name for p in tmp_path.glob("grbm_*.png"))
    assert "grbm_cd_1.png" in pngs and "grbm_ssm.png" in pngs


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
        expected = "(0,)" if name == "deep-eblvm-digits" else "(0, 1, 2)"
        assert str(tuple(seeds)) == expected, name
    assert cli.DEFAULT_SEEDS == "0 1 2 (deep-eblvm-digits: 0)"


def test_help_imports_neither_torch_nor_pyro():
    code = ("import sys\nfrom pyro_ebm import cli\ntry:\n    cli.main(['reproduce', '--help'])\n"
            "except SystemExit:\n    pass\nprint(sorted(m for m in ('torch', 'pyro') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_no_progress_flag_switches_bars_off(monkeypatch, capsys):
    monkeypatch.setenv("PYRO_EBM_PROGRESS", "1")
    cli.main(["reproduce", "list", "--no-progress"])
    assert os.environ["PYRO_EBM_PROGRESS"] == "0"
