# SPDX-License-Identifier: Apache-2.0
"""Data sets: 2-D toy densities, scikit-learn's digits, and local-file loaders.

Nothing here downloads: the toys are generated, the digits ship with
scikit-learn, and MNIST / CIFAR-10 are read from files the user already has.
Every generator is deterministic given its ``seed`` and returns tensors in
PyTorch's default dtype.
"""

from __future__ import annotations

import gzip
import math
import pickle
from pathlib import Path

import numpy as np
import torch

__all__ = ["TOY_NAMES", "batches", "digits", "image_patches", "load_cifar10", "load_mnist", "toy",
           "toy_centers"]


def _checkerboard(n, g):
    # uniform on [0, 1/2]^2 ∪ [1/2, 1]^2: density 2 on the support, log-density log 2
    u = torch.rand(n, 2, generator=g) * 0.5
    upper = torch.rand(n, generator=g) < 0.5
    return u + 0.5 * upper[:, None]


def _eight_gaussians(n, g):
    k = torch.randint(0, 8, (n,), generator=g)
    angle = k * (math.pi / 4)
    centers = 2.0 * torch.stack([angle.cos(), angle.sin()], -1)
    return centers + 0.2 * torch.randn(n, 2, generator=g)


def _rings(n, g):
    radius = 0.5 * (1 + torch.randint(0, 4, (n,), generator=g))
    angle = 2 * math.pi * torch.rand(n, generator=g)
    x = radius[:, None] * torch.stack([angle.cos(), angle.sin()], -1)
    return x + 0.08 * torch.randn(n, 2, generator=g)


def _moons(n, g):
    upper = torch.rand(n, generator=g) < 0.5
    t = math.pi * torch.rand(n, generator=g)
    x = torch.where(upper, t.cos(), 1 - t.cos())
    y = torch.where(upper, t.sin(), 0.5 - t.sin())
    x = torch.stack([x - 0.5, y - 0.25], -1)
    return 2 * x + 0.1 * torch.randn(n, 2, generator=g)


def _pinwheel(n, g, arms=5, radial_std=0.3, tangential_std=0.05, rate=0.25):
    arm = torch.randint(0, arms, (n,), generator=g)
    r = 1.0 + radial_std * torch.randn(n, generator=g)
    t = tangential_std * torch.randn(n, generator=g)
    angle = arm * (2 * math.pi / arms) + rate * r.exp()
    cos, sin = angle.cos(), angle.sin()
    return 2 * torch.stack([r * cos - t * sin, r * sin + t * cos], -1)


def _swissroll(n, g):
    t = 1.5 * math.pi * (1 + 2 * torch.rand(n, generator=g))
    x = torch.stack([t * t.cos(), t * t.sin()], -1) / 5
    return x + 0.2 * torch.randn(n, 2, generator=g)


_TOYS = {
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "rings": _rings,
    "moons": _moons,
    "pinwheel": _pinwheel,
    "swissroll": _swissroll,
}
TOY_NAMES = tuple(_TOYS)


def toy(name: str, n: int, seed: int = 0) -> torch.Tensor:
    """``n`` draws from a 2-D toy density, shape ``(n, 2)``.

    - ``"checkerboard"``: uniform on the two squares :math:`[0, \\frac12]^2` and
      :math:`[\\frac12, 1]^2`; the density is 2 on the support, so the expected
      log-likelihood of any model is at most :math:`\\log 2 \\approx 0.693`.
    - ``"8gaussians"``: equal mixture of :math:`\\mathcal N(\\mu_k, 0.2^2 I)` with
      :math:`\\mu_k` at radius 2 and angles :math:`k\\pi/4`.
    - ``"rings"``: four concentric circles of radii 0.5, 1, 1.5, 2 (equal
      weights), radial Gaussian noise of scale 0.08.
    - ``"moons"``: two interleaved half circles of radius 2, centred at the
      origin, Gaussian noise of scale 0.1.
    - ``"pinwheel"``: five spiral arms at radius about 2.
    - ``"swissroll"``: the spiral :math:`t(\\cos t, \\sin t)/5`,
      :math:`t \\sim U(1.5\\pi, 4.5\\pi)`, Gaussian noise of scale 0.2 (within
      about :math:`[-3, 3]^2`).

    :param str name: one of :data:`TOY_NAMES`.
    :param int n: number of points.
    :param int seed: seed of a private generator (the global RNG is untouched).
    """
    if name not in _TOYS:
        raise ValueError(f"unknown toy data set {name!r}; choose one of {', '.join(TOY_NAMES)}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    g = torch.Generator().manual_seed(int(seed))
    return _TOYS[name](int(n), g).to(torch.get_default_dtype())


def toy_centers(name: str = "8gaussians") -> torch.Tensor:
    r"""The mode centres of a mixture toy, for mode-coverage counts
    (:func:`pyro_ebm.metrics.mode_coverage`): for ``"8gaussians"`` the eight
    :math:`\mu_k = 2(\cos k\pi/4, \sin k\pi/4)`, shape ``(8, 2)``."""
    if name != "8gaussians":
        raise ValueError(f"toy_centers knows the modes of '8gaussians' only, got {name!r}")
    angles = torch.arange(8) * math.pi / 4
    return (2.0 * torch.stack([torch.cos(angles), torch.sin(angles)], -1)).to(torch.get_default_dtype())


def digits(split: str = "train", with_labels: bool = False, seed: int = 0):
    """scikit-learn's 8×8 handwritten digits scaled to [0, 1], shape ``(n, 64)``.

    The 1797 images are split 80/20, stratified by label, with ``seed`` (1437
    train, 360 test); the same seed gives the same split on every call.

    :param str split: ``"train"`` or ``"test"``.
    :param bool with_labels: also return the labels (int64 tensor).
    :param int seed: seed of the split.
    """
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(
        data.data, data.target, test_size=0.2, stratify=data.target, random_state=seed
    )
    x, y = (x_tr, y_tr) if split == "train" else (x_te, y_te)
    x = torch.as_tensor(x / 16.0, dtype=torch.get_default_dtype())
    return (x, torch.as_tensor(y, dtype=torch.long)) if with_labels else x


TEST_FRACTION = 0.2


def image_patches(size: int = 8, split: str = "train", seed: int = 0):
    r"""Grey natural-image patches from the two photographs that ship with
    scikit-learn (``sklearn.datasets.load_sample_images``: ``china.jpg`` and
    ``flower.jpg``, 427×640 each; nothing is downloaded), shape ``(n, size * size)``.

    Each photograph is converted to grey, :math:`g = (0.299 R + 0.587 G + 0.114 B) / 255`,
    and cut into non-overlapping ``size``×``size`` tiles on the grid anchored at
    its top-left corner. **The split is by region**: tiles that start in the
    right-most 20% of a photograph's columns (first column ≥ 512) form the test
    split, all others the training split; tiles do not overlap, so no pixel is
    in both. Every patch is then
    standardized per coordinate with the training split's statistics,

    .. math::

        x = (p - \mu_\text{train}) / \sigma_\text{train},

    so the training split has mean 0 and standard deviation 1 in every
    coordinate and the test split is on the same scale. ``seed`` only shuffles
    the order of the patches within a split (the split itself is fixed). For
    ``size=8``: 6784 training and 1696 test patches; ``size=12``: 3010 and 700.

    :param int size: patch side, an integer from 2 to 32 (8 and 12 are the usual).
    :param str split: ``"train"`` or ``"test"``.
    :param int seed: seed of the patch order.
    :returns: a tensor of PyTorch's default dtype (float32 unless changed).

    >>> x = image_patches(8, "train")
    >>> x.shape, round(float(x.mean()), 4)
    (torch.Size([6784, 64]), 0.0)
    """
    from sklearn.datasets import load_sample_images

    if isinstance(size, bool) or not isinstance(size, (int, np.integer)) or not 2 <= size <= 32:
        raise ValueError(f"image_patches: size must be an integer from 2 to 32 (e.g. 8 or 12), got {size!r}")
    if split not in ("train", "test"):
        raise ValueError(f"image_patches: split must be 'train' or 'test', got {split!r}")
    size = int(size)
    parts = {"train": [], "test": []}
    for image in load_sample_images().images:
        grey = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114]) / 255.0
        rows, cols = grey.shape[0] // size, grey.shape[1] // size
        tiles = grey[: rows * size, : cols * size].reshape(rows, size, cols, size).transpose(0, 2, 1, 3)
        boundary = int(round((1 - TEST_FRACTION) * grey.shape[1]))
        in_test = np.arange(cols) * size >= boundary   # tile's first column in the test region
        parts["train"].append(tiles[:, ~in_test].reshape(-1, size * size))
        parts["test"].append(tiles[:, in_test].reshape(-1, size * size))
    train = np.concatenate(parts["train"])
    mean, std = train.mean(0), train.std(0)
    x = (np.concatenate(parts[split]) - mean) / std
    order = np.random.default_rng(int(seed)).permutation(len(x))
    return torch.as_tensor(x[order], dtype=torch.get_default_dtype())


def _missing(what, path, expected):
    return FileNotFoundError(
        f"{what} not found at {str(path)!r}: expected {expected}. pyro_ebm never downloads "
        "data; fetch the files yourself and pass their location"
    )


def _read_idx(path):
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape).copy()


def load_mnist(path, split: str = "train", with_labels: bool = False, flatten: bool = True):
    """MNIST from local files, pixels scaled to [0, 1].

    ``path`` is either an ``.npz`` file with arrays ``x_train, y_train, x_test,
    y_test`` (the common ``mnist.npz``) or a directory holding the idx files
    ``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
    ``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte`` (optionally ``.gz``).

    :param path: the ``.npz`` file or the idx directory.
    :param str split: ``"train"`` or ``"test"``.
    :param bool with_labels: also return the labels (int64 tensor).
    :param bool flatten: shape ``(n, 784)`` if true, else ``(n, 1, 28, 28)``.
    :raises FileNotFoundError: when the files are absent.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    if path.is_file():
        with np.load(path) as npz:
            x, y = npz[f"x_{split}"], npz[f"y_{split}"]
    else:
        stem = "train" if split == "train" else "t10k"
        found = []
        for kind in ("images-idx3", "labels-idx1"):
            name = f"{stem}-{kind}-ubyte"
            candidates = [path / name, path / (name + ".gz")]
            hit = next((c for c in candidates if c.is_file()), None)
            if hit is None:
                raise _missing("MNIST", path, f"an .npz file or a directory with {name}[.gz]")
            found.append(_read_idx(hit))
        x, y = found
    x = torch.as_tensor(np.asarray(x, dtype=np.float32) / 255.0).to(torch.get_default_dtype())
    x = x.reshape(len(x), -1) if flatten else x.reshape(len(x), 1, 28, 28)
    return (x, torch.as_tensor(np.asarray(y), dtype=torch.long)) if with_labels else x


def load_cifar10(path, split: str = "train", with_labels: bool = False):
    """CIFAR-10 from the local python pickles, shape ``(n, 3, 32, 32)`` in [0, 1].

    ``path`` is the ``cifar-10-batches-py`` directory (or its parent) holding
    ``data_batch_1`` … ``data_batch_5`` and ``test_batch``.

    :param path: the batches directory or its parent.
    :param str split: ``"train"`` or ``"test"``.
    :param bool with_labels: also return the labels (int64 tensor).
    :raises FileNotFoundError: when the files are absent.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    path = Path(path)
    if (path / "cifar-10-batches-py").is_dir():
        path = path / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    xs, ys = [], []
    for name in names:
        file = path / name
        if not file.is_file():
            raise _missing("CIFAR-10", file, f"the python pickles {', '.join(names)} in {str(path)!r}")
        with open(file, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
        xs.append(np.asarray(batch[b"data"], dtype=np.uint8))
        ys.append(np.asarray(batch[b"labels"]))
    x = torch.as_tensor(np.concatenate(xs).astype(np.float32) / 255.0).reshape(-1, 3, 32, 32)
    x = x.to(torch.get_default_dtype())
    return (x, torch.as_tensor(np.concatenate(ys), dtype=torch.long)) if with_labels else x


def batches(data, batch_size: int, seed: int = 0, epochs: int | None = None, drop_last: bool = False):
    """Shuffled mini-batches of ``data`` without a ``DataLoader``.

    Each epoch visits every row once in a fresh random order (a private
    generator seeded with ``seed``, so the sequence is reproducible). With
    ``epochs=None`` the generator runs forever; otherwise it stops after that
    many epochs. Indexing happens on ``data``'s device.

    :param data: a tensor, or a tuple of tensors sharing their first dim (e.g.
        ``(x, y)``), in which case tuples of batches are yielded.
    :param int batch_size: rows per batch.
    :param int seed: seed of the shuffling.
    :param epochs: number of epochs, or ``None`` for an endless stream.
    :param bool drop_last: skip each epoch's last, smaller batch.

    >>> for step, v in zip(range(1000), batches(toy("moons", 5000), 128)):
    ...     svi.step(v)
    """
    tensors = data if isinstance(data, (tuple, list)) else (data,)
    n = len(tensors[0])
    if any(len(t) != n for t in tensors):
        raise ValueError(f"tensors must share their first dim, got lengths {[len(t) for t in tensors]}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if epochs is not None and epochs < 0:
        raise ValueError(f"epochs must be >= 0 or None, got {epochs}")
    if n == 0 or (drop_last and n < batch_size):
        raise ValueError(f"no batch of size {batch_size} can be drawn from {n} rows")
    return _stream(tensors, isinstance(data, (tuple, list)), batch_size, seed, epochs, drop_last)


def _stream(tensors, as_tuple, batch_size, seed, epochs, drop_last):
    n = len(tensors[0])
    g = torch.Generator().manual_seed(int(seed))
    epoch = 0
    while epochs is None or epoch < epochs:
        order = torch.randperm(n, generator=g).to(tensors[0].device)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            idx = order[start: start + batch_size]
            picked = tuple(t[idx] for t in tensors)
            yield picked if as_tuple else picked[0]
        epoch += 1
