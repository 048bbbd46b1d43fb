# SPDX-License-Identifier: Apache-2.0
"""Every `pyro-ebm reproduce NAME` runs at tiny size and reports a table and figures."""

import re

import pytest

from pyro_ebm import cli

NAMES = [n for n in cli.experiment_names() if n != "deep-eblvm-digits"]  # tested in test_deep.py


@pytest.mark.parametrize("name", NAMES)
def test_reproduce_quick(name, tmp_path, capsys):
    report = cli.reproduce(name, out=tmp_path, quick=True)
    capsys.readouterr()
    rows = [line for line in report.splitlines() if re.match(r"^\|.*\|$", line)]
    assert len(rows) >= 3, report  # header, rule and at least one result row
    numbers = [float(x) for x in re.findall(r"(?<![\w.])-?\d+\.\d+", "\n".join(rows[2:]))]
    assert numbers, report
    assert (tmp_path / f"{name}.md").read_text() == report
    assert list(tmp_path.glob("*.png")), "no figure written"
