# SPDX-License-Identifier: Apache-2.0
import gzip
import pickle

import numpy as np
import pytest
import torch

from pyro_ebm import datasets


@pytest.mark.parametrize("name", datasets.TOY_NAMES)
def test_toy_shape_dtype_and_determinism(name):
    x = datasets.toy(name, 500, seed=3)
    assert x.shape == (500, 2) and x.dtype == torch.get_default_dtype()
    assert torch.isfinite(x).all()
    assert torch.equal(x, datasets.toy(name, 500, seed=3))
    assert not torch.equal(x, datasets.toy(name, 500, seed=4))
    assert x.abs().max() < 6  # the documented scales keep every toy within a few units
    assert x.std(0).min() > 0.2  # and spread out


def test_toy_leaves_global_rng_alone():
    torch.manual_seed(0)
    a = torch.rand(3)
    torch.manual_seed(0)
    datasets.toy("moons", 100)
    assert torch.equal(torch.rand(3), a)


def test_checkerboard_support_and_uniformity():
    x = datasets.toy("checkerboard", 20000, seed=0)
    lower = (x <= 0.5).all(-1)
    upper = (x >= 0.5).all(-1)
    assert bool((lower | upper).all())  # only the two squares
    assert bool(((x >= 0) & (x <= 1)).all())
    # each square holds half the mass (binomial sd of the fraction: 0.0035)
    assert abs(float(lower.double().mean()) - 0.5) < 0.015
    # uniform within a square: the mean of a coordinate is 1/4 (sd 0.0020)
    assert abs(float(x[lower].mean()) - 0.25) < 0.01


def test_eight_gaussians_and_rings_geometry():
    x = datasets.toy("8gaussians", 8000, seed=1)
    angle = torch.atan2(x[:, 1], x[:, 0])
    k = torch.round(angle / (torch.pi / 4)) % 8
    counts = torch.bincount(k.long(), minlength=8).double()
    assert ((counts / 8000 - 1 / 8).abs() < 0.02).all()
    assert abs(float(x.norm(dim=-1).mean()) - 2.0) < 0.05
    r = datasets.toy("rings", 8000, seed=1).norm(dim=-1)
    radii = torch.tensor([0.5, 1.0, 1.5, 2.0])
    gap, ring = (r[:, None] - radii).abs().min(-1)
    assert float(gap.mean()) < 0.08  # radial noise 0.08: mean |gap| is about 0.064
    share = torch.bincount(ring, minlength=4).double() / 8000
    assert ((share - 0.25).abs() < 0.02).all()


def test_unknown_toy_lists_names():
    with pytest.raises(ValueError, match="checkerboard.*swissroll"):
        datasets.toy("spiral", 10)


def test_digits_range_split_sizes_and_disjointness():
    train, y_train = datasets.digits("train", with_labels=True)
    test, y_test = datasets.digits("test", with_labels=True)
    assert train.shape == (1437, 64) and test.shape == (360, 64)
    assert float(train.min()) == 0.0 and float(train.max()) == 1.0
    assert torch.equal(train, datasets.digits("train"))  # the same split every call
    # stratified: every class keeps its share in the test split
    share = torch.bincount(y_test, minlength=10).double() / 360
    assert ((share - 0.1).abs() < 0.01).all()
    # disjoint: no test image equals a train image with a different index (sklearn's
    # digits has a few exact duplicates, so compare the row sets of the full data)
    from sklearn.datasets import load_digits

    full = torch.as_tensor(load_digits().data / 16.0, dtype=train.dtype)
    rows = lambda t: {r.tobytes() for r in t.numpy()}  # noqa: E731
    assert len(rows(train)) + len(rows(test)) - len(rows(train) & rows(test)) == len(rows(full))
    assert len(train) + len(test) == len(full)
    assert y_train.dtype == torch.long
    with pytest.raises(ValueError, match="split"):
        datasets.digits("valid")


def test_batches_cover_each_epoch_once_and_are_reproducible():
    x = torch.arange(10.0)[:, None]
    stream = list(datasets.batches(x, 4, seed=0, epochs=2))
    assert [len(b) for b in stream] == [4, 4, 2, 4, 4, 2]
    first = torch.cat(stream[:3]).flatten()
    second = torch.cat(stream[3:]).flatten()
    assert sorted(first.tolist()) == list(range(10)) and sorted(second.tolist()) == list(range(10))
    assert not torch.equal(first, second)  # reshuffled
    again = list(datasets.batches(x, 4, seed=0, epochs=2))
    assert all(torch.equal(a, b) for a, b in zip(stream, again, strict=True))
    assert [len(b) for b in datasets.batches(x, 4, seed=0, epochs=1, drop_last=True)] == [4, 4]
    # tuples stay aligned; an endless stream keeps going
    pairs = datasets.batches((x, 2 * x), 3, seed=1)
    for _ in range(7):
        a, b = next(pairs)
        assert torch.equal(b, 2 * a)
    with pytest.raises(ValueError, match="batch_size"):
        datasets.batches(x, 0, seed=0)


def test_local_loaders_refuse_to_download(tmp_path):
    with pytest.raises(FileNotFoundError, match="never downloads"):
        datasets.load_mnist(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="data_batch_1"):
        datasets.load_cifar10(tmp_path)


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(n).to_bytes(4, "big") for n in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_load_mnist_from_idx_and_npz(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (5, 28, 28))
    labels = rng.integers(0, 10, 5)
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", labels)
    x, y = datasets.load_mnist(tmp_path, split="test", with_labels=True)
    assert x.shape == (5, 784)
    assert torch.allclose(x, torch.as_tensor(images.reshape(5, -1) / 255.0, dtype=x.dtype))
    assert y.tolist() == labels.tolist()
    with pytest.raises(FileNotFoundError, match="train-images-idx3-ubyte"):
        datasets.load_mnist(tmp_path, split="train")
    np.savez(tmp_path / "mnist.npz", x_train=images.astype(np.uint8), y_train=labels,
             x_test=images[:2].astype(np.uint8), y_test=labels[:2])
    img = datasets.load_mnist(tmp_path / "mnist.npz", split="train", flatten=False)
    assert img.shape == (5, 1, 28, 28) and float(img.max()) <= 1.0
    assert datasets.load_mnist(tmp_path / "mnist.npz", split="test").shape == (2, 784)


def test_load_cifar10_from_pickles(tmp_path):
    root = tmp_path / "cifar-10-batches-py"
    root.mkdir()
    rng = np.random.default_rng(0)
    batches = []
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        batch = {b"data": rng.integers(0, 256, (3, 3072)).astype(np.uint8), b"labels": [1, 2, 3]}
        batches.append(batch)
        with open(root / name, "wb") as f:
            pickle.dump(batch, f)
    x, y = datasets.load_cifar10(tmp_path, split="train", with_labels=True)  # the parent works too
    assert x.shape == (15, 3, 32, 32) and y.tolist() == [1, 2, 3] * 5
    expected = torch.as_tensor(batches[0][b"data"][1].reshape(3, 32, 32) / 255.0, dtype=x.dtype)
    assert torch.allclose(x[1], expected)
    assert datasets.load_cifar10(root, split="test").shape == (3, 3, 32, 32)


@pytest.mark.parametrize("size, n_train, n_test", [(8, 6784, 1696), (12, 3010, 700)])
def test_image_patches_shapes_standardization_and_determinism(size, n_train, n_test):
    train = datasets.image_patches(size, "train")
    test = datasets.image_patches(size, "test")
    assert train.shape == (n_train, size * size) and test.shape == (n_test, size * size)
    assert train.dtype == torch.float32 and torch.isfinite(train).all()
    # standardized per coordinate with the training split's statistics
    assert train.double().mean(0).abs().max() < 1e-4
    assert (train.double().std(0, unbiased=False) - 1).abs().max() < 1e-4
    assert test.double().mean(0).abs().max() > 1e-3      # the test split has its own (different) statistics
    assert torch.equal(train, datasets.image_patches(size, "train"))
    again = datasets.image_patches(size, "train", seed=1)
    assert not torch.equal(again, train)                  # the seed reorders ...
    assert torch.equal(again.sort(0).values, train.sort(0).values)   # ... the same patches


def test_image_patches_splits_are_disjoint():
    train, test = datasets.image_patches(8, "train"), datasets.image_patches(8, "test")
    rows = {tuple(r) for r in train.numpy().round(5).tolist()}
    assert not any(tuple(r) in rows for r in test.numpy().round(5).tolist())


@pytest.mark.parametrize("size", [1, 7.5, "8", True, 33])
def test_image_patches_bad_size(size):
    with pytest.raises(ValueError, match="size must be an integer from 2 to 32"):
        datasets.image_patches(size)


def test_image_patches_bad_split():
    with pytest.raises(ValueError, match="split must be 'train' or 'test', got 'valid'"):
        datasets.image_patches(8, "valid")


def test_toy_centers_are_the_eight_gaussians_modes():
    centers = datasets.toy_centers("8gaussians")
    x = datasets.toy("8gaussians", 2000, seed=0)
    assert centers.shape == (8, 2)
    assert torch.cdist(x, centers).min(-1).values.max() < 1.2    # every draw within 6 sd of a centre
    with pytest.raises(ValueError, match="'8gaussians' only"):
        datasets.toy_centers("rings")
