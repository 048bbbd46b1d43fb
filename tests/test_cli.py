# SPDX-License-Identifier: Apache-2.0
import math
import re
from pathlib import Path

import pytest

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


def test_bench_names_missing_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no benchmarks/nothing.py"):
        cli.main(["bench", "nothing"])
