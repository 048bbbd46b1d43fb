# SPDX-License-Identifier: Apache-2.0
"""The pieces the long reproductions rest on: their metrics, verdicts and
milestone evaluations, checked against answers known in advance."""

import math

import pytest
import torch

from pyro_ebm import datasets
from pyro_ebm.experiments import deep_eblvm_digits, grbm_checkerboard, grbm_patches, teaching_digits
from pyro_ebm.experiments import teaching_digits_budget as budget
from pyro_ebm.experiments._grbm_table import method_factories, train_one
from pyro_ebm.experiments._runs import RunStore


def test_class_agreement_of_test_images_is_the_classifiers_accuracy_and_shuffling_gives_chance():
    x, y = datasets.digits("test", with_labels=True)
    agree, chance = deep_eblvm_digits.class_agreement(x, y)
    assert agree > 0.9  # the classifier's test accuracy is about 0.97
    # ten balanced classes: chance is Σ_c p_c² ≈ 0.1
    assert chance == pytest.approx(0.1, abs=0.01)
    shuffled = y[torch.randperm(len(y), generator=torch.Generator().manual_seed(0))]
    agree_shuffled, _ = deep_eblvm_digits.class_agreement(x, shuffled)
    assert abs(agree_shuffled - chance) < 0.06


def test_probe_reads_the_class_from_pixels_and_not_from_noise():
    x, y = datasets.digits("train", with_labels=True)
    xt, yt = datasets.digits("test", with_labels=True)
    assert deep_eblvm_digits.probe_accuracy(x, y, xt, yt) > 0.9
    g = torch.Generator().manual_seed(0)
    noise = deep_eblvm_digits.probe_accuracy(torch.randn(len(x), 16, generator=g), y,
                                             torch.randn(len(xt), 16, generator=g), yt)
    assert noise < 0.2


def test_milestone_evaluations_leave_the_training_as_it_was():
    """Evaluating at milestones (which draws random numbers) must not change the
    training: the final parameters equal those of a run without evaluations."""
    x = datasets.digits("train")[:200]

    def final_params(evaluate):
        model, guide, losses, evaluations = deep_eblvm_digits.train(
            0, x, 6, width=8, evaluate=evaluate, milestones=(2, 6))
        return [p.detach().clone() for p in model.parameters()], losses, evaluations

    plain, plain_losses, none = final_params(None)
    seen = []

    def evaluate(model, guide):
        seen.append(torch.rand(()))  # draws, as sampling does
        return {"calls": len(seen)}

    evaluated, losses, evaluations = final_params(evaluate)
    assert none == {}
    assert evaluations == {2: {"calls": 1}, 6: {"calls": 2}}
    assert losses == plain_losses
    for a, b in zip(plain, evaluated, strict=True):
        assert torch.equal(a, b)


def test_teaching_loop_evaluations_survive_a_resume(tmp_path):
    """The milestone evaluations of the teaching loops are step values of the
    checkpointed loop: a run resumed after its first milestone still reports it."""
    x = datasets.digits("train")[:300]
    calls = []

    def evaluate(vae):
        calls.append(1)
        return {"call": len(calls)}

    def once(resume, stop_after=None):
        store = RunStore(tmp_path, resume, {"t": 1})
        found = dict.fromkeys((2, 4))

        def compute():
            teaching_digits.train_vae(0, x, 4, store, evaluate=evaluate, evaluations=found)
            return {"found": {str(k): v for k, v in found.items()}}, None

        if stop_after is not None:  # interrupt after the given step, once its checkpoint is written
            original = store.train

            def train(*args, **kwargs):
                step = kwargs["step"]

                def stopping(i, batch):
                    value = step(i, batch)
                    if i + 1 == stop_after:
                        raise KeyboardInterrupt
                    return value

                return original(*args, **{**kwargs, "step": stopping, "every": 1})

            store.train = train
        return store.run("run", compute)[0]

    with pytest.raises(KeyboardInterrupt):
        once(False, stop_after=3)
    assert len(calls) == 1
    numbers = once(True)
    # the first milestone's evaluation came back from the checkpoint, the second ran now
    assert numbers["found"] == {"2": {"call": 1}, "4": {"call": 2}}
    assert len(calls) == 2


def test_squares_verdict_counts_seeds_above_the_best_gaussian():
    above, below = grbm_checkerboard.BEST_GAUSSIAN_LL + 0.01, grbm_checkerboard.BEST_GAUSSIAN_LL - 0.01
    text = grbm_checkerboard.squares_verdict({"A": [{"ll": above}, {"ll": below}, {"ll": above}],
                                              "B": [{"ll": below}] * 3})
    assert "A 2/3" in text and "B 0/3" in text


def test_best_gaussian_of_the_checkerboard_is_what_the_report_says():
    x = datasets.toy("checkerboard", 200_000, seed=0).double()
    cov = torch.cov(x.T)
    assert cov[0, 0] == pytest.approx(1 / 12, rel=0.02) and cov[0, 1] == pytest.approx(1 / 16, rel=0.03)
    ll = -0.5 * torch.logdet(2 * math.pi * math.e * cov)
    assert float(ll) == pytest.approx(grbm_checkerboard.BEST_GAUSSIAN_LL, abs=0.005)


def test_gaussian_baselines_equal_the_entropy_of_a_known_gaussian():
    g = torch.Generator().manual_seed(0)
    scale = torch.tensor([[1.0, 0.0, 0.0], [0.8, 0.6, 0.0], [0.0, 0.5, 0.5]])
    train = torch.randn(100_000, 3, generator=g) @ scale.T
    test = torch.randn(100_000, 3, generator=g) @ scale.T
    full, diagonal = grbm_patches.gaussian_baselines(train, test)
    cov = scale @ scale.T
    assert full == pytest.approx(float(-0.5 * torch.logdet(2 * math.pi * math.e * cov)), abs=0.02)
    assert diagonal == pytest.approx(float(-0.5 * torch.log(2 * math.pi * math.e * cov.diagonal()).sum()),
                                     abs=0.02)
    assert full > diagonal  # correlated coordinates: the full covariance fits better


def test_train_one_with_ais_agrees_with_the_exact_log_likelihood(tmp_path):
    train = datasets.toy("checkerboard", 500, seed=1)
    test = datasets.toy("checkerboard", 300, seed=2)
    factory = method_factories(0.05, 1e-2, 2, 4)["DSM"]
    store = RunStore(tmp_path, False, {})
    numbers, _ = store.run("run", train_one, "DSM", factory, train, test, 2, 4, 30, 0, store,
                           ais={"num_chains": 400, "num_temperatures": 300})
    assert math.isfinite(numbers["ll"])
    assert numbers["ll_ais"] == pytest.approx(numbers["ll"], abs=max(0.05, 4 * numbers["ais_se"]))


def _runs(x0, alone, sd=0.1):
    """Three seeds' numbers at one milestone, FD and MMD both centred on the given values."""
    return [{"100": {"teaching, VAE (x0)": {"fd": x0 + d, "mmd": x0 + d},
                     "VAE alone": {"fd": alone + d, "mmd": alone + d},
                     "teaching, revised (x̃)": {"fd": 1.0, "mmd": 1.0}}} for d in (-sd, 0.0, sd)]


def test_budget_verdict_says_whether_the_taught_vae_wins_beyond_the_spread():
    assert budget.verdict(_runs(10.0, 20.0), (100,)).startswith("**The taught VAE beats")
    assert budget.verdict(_runs(20.0, 20.05), (100,)).startswith("**The taught VAE does not beat")
    assert "FD equal within the spread" in budget.verdict(_runs(20.0, 20.05), (100,))
    assert "FD worse" in budget.verdict(_runs(30.0, 20.0), (100,))


def test_mean_sd_and_cell_give_the_sample_sd_over_seeds():
    from pyro_ebm.experiments._runs import cell, mean_sd

    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0)  # sample sd (n - 1)
    assert mean_sd(x for x in [4.0]) == (4.0, 0.0)  # one seed: no spread; a generator is fine
    assert cell([1.0, 2.0, 3.0], 1) == "2.0 ± 1.0"
