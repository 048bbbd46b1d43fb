# SPDX-License-Identifier: Apache-2.0
import pytest
import torch

from pyro_ebm import datasets, features
from pyro_ebm.metrics import frechet_distance


@pytest.fixture
def fresh_cache(tmp_path, monkeypatch):
    """An empty cache directory and no classifier loaded in memory."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(features, "_LOADED", {})
    return tmp_path / "pyro_ebm"


def test_trained_on_first_use_cached_and_reloaded(fresh_cache, monkeypatch):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    net = features.digits_classifier()
    # training ran under its own seed and left the caller's random stream alone
    assert torch.equal(torch.rand(3), expected_next)
    files = list(fresh_cache.glob("digits_classifier_*.pt"))
    assert len(files) == 1

    x, y = datasets.digits("test", with_labels=True)
    accuracy = (net(x.float()).argmax(-1) == y).float().mean().item()
    assert accuracy > 0.95, accuracy  # held-out split, never seen in training

    # a new process (empty memory) loads the file instead of training again
    monkeypatch.setattr(features, "_LOADED", {})

    def no_training(*args):
        raise AssertionError("the cached weights were not used")

    monkeypatch.setattr(features, "_train", no_training)
    again = features.digits_classifier()
    for (k, a), b in zip(net.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_training_is_deterministic(fresh_cache):
    net = features.digits_classifier()
    x, y = features._training_data()
    retrained = features._train(x, y)
    for (k, a), b in zip(net.state_dict().items(), retrained.state_dict().values(), strict=True):
        assert torch.equal(a, b), k


def test_unreadable_cache_is_retrained(fresh_cache):
    x, y = features._training_data()
    fresh_cache.mkdir(parents=True)
    path = fresh_cache / f"digits_classifier_{features._fingerprint(x, y)}.pt"
    path.write_bytes(b"not a checkpoint")
    with pytest.warns(UserWarning, match="unreadable"):
        net = features.digits_classifier()
    xt, yt = datasets.digits("test", with_labels=True)
    assert (net(xt.float()).argmax(-1) == yt).float().mean().item() > 0.95


def test_features_follow_input_dtype_and_shapes():
    x = datasets.digits("test")[:50]
    f32 = features.digits_features(x.float())
    f64 = features.digits_features(x.double().reshape(50, 8, 8))
    assert f32.shape == (50, 64) and f32.dtype == torch.float32
    assert f64.shape == (50, 64) and f64.dtype == torch.float64
    torch.testing.assert_close(f64.float(), f32, atol=1e-4, rtol=1e-4)
    assert not f32.requires_grad
    # the features are the input of the classifier's last layer
    net = features.digits_classifier()
    torch.testing.assert_close(net.head(f32), net(x.float()))


def test_frechet_distance_on_features_ranks_sample_quality():
    train, test = datasets.digits("train"), datasets.digits("test")
    g = torch.Generator().manual_seed(0)
    f_test = features.digits_features(test)
    real = frechet_distance(features.digits_features(train), f_test)
    blurred = frechet_distance(features.digits_features(train.mean(0).expand(360, 64)
                                                        + 0.1 * torch.randn(360, 64, generator=g)), f_test)
    noise = frechet_distance(features.digits_features(torch.rand(360, 64, generator=g)), f_test)
    assert real < 0.2 * blurred and real < 0.2 * noise, (real, blurred, noise)


@pytest.mark.parametrize(
    "bad, error, match",
    [
        (torch.rand(5, 63), ValueError, r"\(5, 63\)"),
        (torch.rand(64), ValueError, r"\(64,\)"),
        (torch.full((2, 64), float("nan")), ValueError, "NaN"),
        (torch.ones(2, 64, dtype=torch.long), TypeError, "floating point"),
    ],
)
def test_bad_digits_are_rejected(bad, error, match):
    with pytest.raises(error, match=match):
        features.digits_features(bad)


def test_first_use_inside_no_grad_trains(fresh_cache):
    """The first use may come inside the caller's ``torch.no_grad()`` (a metric
    computed on samples) with an empty cache: training still runs."""
    assert not list(fresh_cache.glob("*.pt"))
    with torch.no_grad():
        feats = features.digits_features(datasets.digits("test")[:5].float())
    assert feats.shape == (5, 64) and torch.isfinite(feats).all()
    assert len(list(fresh_cache.glob("digits_classifier_*.pt"))) == 1
    x, y = datasets.digits("test", with_labels=True)
    with torch.no_grad():
        accuracy = (features.digits_classifier()(x.float()).argmax(-1) == y).float().mean().item()
    assert accuracy > 0.95, accuracy
