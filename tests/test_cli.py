# SPDX-License-Identifier: Apache-2.0
import math
import re

import pytest

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


def test_bench_names_missing_script(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match="no benchmarks/nothing.py"):
        cli.main(["bench", "nothing"])
