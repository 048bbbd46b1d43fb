# SPDX-License-Identifier: Apache-2.0
"""Smoke test of examples/long_run.py with tiny sizes: its resumed runs (in a
temporary folder, and with --out then --resume) end where a straight run ends."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "long_run.py"


def test_long_run_example_resumes_to_the_straight_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("long_run_example", SCRIPT)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    threads = torch.get_num_threads()
    small = ["--batch-size", "50", "--checkpoint-every", "5", "--no-progress"]
    tiny = ["--steps", "20", *small]
    try:
        straight, ll_straight = example.main(["--out", str(tmp_path / "a"), *tiny])
        demo, ll_demo = example.main(tiny)  # half, then a fresh trainer resumes
        example.main(["--out", str(tmp_path / "b"), "--steps", "10", *small])
        again, ll_again = example.main(["--out", str(tmp_path / "b"), *tiny, "--resume"])
        with pytest.raises(ValueError, match="already holds checkpoints"):
            example.main(["--out", str(tmp_path / "b"), *tiny])
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    assert "first session: 10 steps" in out and "second session: resumed and trained steps 11-20" in out
    assert straight.num_steps == demo.num_steps == again.num_steps == 20
    assert len(again.losses["loss"]) == 10 and not again.interrupted
    assert math.isfinite(ll_straight) and ll_demo == ll_straight and ll_again == ll_straight
    assert sorted(p.name for p in (tmp_path / "b").glob("step-*.pt")) == [
        "step-00000010.pt", "step-00000015.pt", "step-00000020.pt"]
    assert len((tmp_path / "b" / "metrics.csv").read_text().splitlines()) == 21
