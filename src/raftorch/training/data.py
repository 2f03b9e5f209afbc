"""Datasets as in-memory tensors.

``load_dataset(name, ...)`` returns a :class:`DataSplits` with train / (optional) validation /
test tensors. Batches are sliced from these tensors on the fly: the datasets are small, and a
``DataLoader`` with worker processes costs more than it saves on a 2-core machine.

Names: ``digits`` (scikit-learn, 8x8), ``fashion-mnist`` (28x28), ``cifar10``, ``cifar100`` and
``cifar100:K`` (the first ``K`` classes of CIFAR-100). Any name may also end in ``:K``.

Where files are looked for, in order of precedence (the first that is set is used):

1. ``data_dir=`` (``--data-dir`` on the command line),
2. the environment variable ``RAFTORCH_DATA``,
3. the cache folder ``$XDG_CACHE_HOME/raftorch`` (``~/.cache/raftorch``).

Inside it: ``fashion-mnist/`` with the four idx files (``.gz`` or not),
``cifar-10-batches-py/`` and ``cifar-100-python/`` (the python-pickle layouts the dataset
authors distribute). Fashion-MNIST is also found where the Debian package
``dataset-fashion-mnist`` installs it (``/usr/share/datasets/fashion-mnist``), unless
``data_dir`` names a folder: a folder the user named is the only place looked in, and a
dataset missing there is an error, never replaced by another copy.
``download=True`` fetches what is missing into that folder (needs a network).
"""
from __future__ import annotations

import gzip
import hashlib
import io
import math
import os
import pickle
import shutil
import struct
import tarfile
import tempfile
import urllib.request
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

ENV_VAR = "RAFTORCH_DATA"
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


class DatasetNotFoundError(FileNotFoundError):
    """A dataset's files are not where they were looked for (the message says how to get them)."""


class CorruptDatasetError(ValueError):
    """A dataset file exists but cannot be read: truncated, corrupt, or a wrong checksum."""


@dataclass
class DataSplits:
    """Train, validation and test tensors of one dataset (inputs float, labels int64).

    Inputs are ``(N, C, H, W)`` float32, normalised with the training part's statistics
    (``mean``, ``std``: per channel, or one number for ``digits``).
    """

    name: str
    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    num_classes: int
    x_val: Tensor | None = None
    y_val: Tensor | None = None
    mean: Tensor | None = None
    std: Tensor | None = None
    classes: tuple[str, ...] | None = None

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.x_train.shape[1:])

    def to(self, device) -> "DataSplits":
        """The same splits with every tensor moved to ``device``."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return DataSplits(self.name, move(self.x_train), move(self.y_train), move(self.x_test),
                          move(self.y_test), self.num_classes, move(self.x_val), move(self.y_val),
                          self.mean, self.std, self.classes)

    def __repr__(self) -> str:
        val = 0 if self.x_val is None else len(self.x_val)
        return (f"DataSplits({self.name!r}, input_shape={self.input_shape}, classes={self.num_classes}, "
                f"train={len(self.x_train)}, val={val}, test={len(self.x_test)})")


def _split_indices(labels: Tensor, fraction: float, seed: int) -> tuple[Tensor, Tensor]:
    """Stratified split: returns (kept, held_out) index tensors, `fraction` of each class held out."""
    g = torch.Generator().manual_seed(seed)
    kept, held = [], []
    for c in torch.unique(labels):
        idx = torch.nonzero(labels == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        n_held = int(round(fraction * len(idx)))
        held.append(idx[:n_held])
        kept.append(idx[n_held:])
    return torch.sort(torch.cat(kept)).values, torch.sort(torch.cat(held)).values


def _validation_split(labels: Tensor, fraction: float, seed: int, name: str) -> tuple[Tensor, Tensor]:
    """:func:`_split_indices` of the training set, refusing a split that leaves nothing to train on
    or holds out no image at all (each class rounds its share to whole images)."""
    keep, val = _split_indices(labels, fraction, seed)
    largest = int(torch.unique(labels, return_counts=True)[1].max()) if len(labels) else 0
    if len(keep) == 0:
        raise ValueError(f"val_fraction {fraction} (--val-fraction) holds out all {len(labels)} training images "
                         f"of {name}, leaving none to train on; use a smaller fraction, at most "
                         f"{1 - 1 / max(largest, 1):.3g} (e.g. 0.1)")
    if len(val) == 0:
        raise ValueError(f"val_fraction {fraction} (--val-fraction) holds out no image of {name} (its share of "
                         f"each class rounds to 0 of at most {largest} images); use at least "
                         f"{1 / max(largest, 1):.2g} (e.g. 0.1), or 0 for no validation split")
    return keep, val


def _training_subset(labels: Tensor, train_size: int, seed: int, name: str, val_fraction: float) -> Tensor:
    """:func:`stratified_subset` of ``train_size`` training images; more than there are is an error."""
    if train_size > len(labels):
        after = f" left after the validation split (val_fraction {val_fraction})" if val_fraction else ""
        raise ValueError(f"train_size {train_size} (--train-size) is more than the {len(labels)} training images "
                         f"of {name}{after}; use at most {len(labels)}, or leave train_size out to train on all")
    return stratified_subset(labels, train_size, seed)


def load_digits(*, seed: int = 0, val_fraction: float = 0.0, test_fraction: float = 0.2) -> DataSplits:
    """scikit-learn's 8x8 digits (1797 images, 10 classes), shape (N, 1, 8, 8).

    scikit-learn ships no test split, so a fixed stratified 20% is held out for testing
    (split seed 0, independent of ``seed``, so every run is scored on the same images).
    ``seed`` only drives the optional validation split taken from the training part.
    Pixels (0..16) are standardised with the training set's mean and standard deviation.
    """
    from sklearn.datasets import load_digits as _sk_load_digits

    bunch = _sk_load_digits()
    x = torch.tensor(bunch.images, dtype=torch.float32).unsqueeze(1)
    y = torch.tensor(bunch.target, dtype=torch.int64)
    train_idx, test_idx = _split_indices(y, test_fraction, seed=0)
    x_train, y_train, x_test, y_test = x[train_idx], y[train_idx], x[test_idx], y[test_idx]
    x_val = y_val = None
    if val_fraction > 0:
        keep, val = _validation_split(y_train, val_fraction, seed, "digits")
        x_val, y_val = x_train[val], y_train[val]
        x_train, y_train = x_train[keep], y_train[keep]
    mean, std = x_train.mean(), x_train.std()
    norm = lambda t: None if t is None else (t - mean) / std  # noqa: E731
    return DataSplits("digits", norm(x_train), y_train, norm(x_test), y_test, 10, norm(x_val), y_val,
                      mean=mean, std=std, classes=tuple(str(i) for i in range(10)))


# --------------------------------------------------------------------------- where data lives

def default_data_dir() -> Path:
    """``$XDG_CACHE_HOME/raftorch``, or ``~/.cache/raftorch``."""
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(cache) / "raftorch"


def data_root(data_dir: str | os.PathLike | None = None) -> Path:
    """The folder datasets are looked for in: ``data_dir``, else ``$RAFTORCH_DATA``, else the cache."""
    if data_dir is not None:
        return Path(data_dir).expanduser()
    if os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR]).expanduser()
    return default_data_dir()


def _root_origin(data_dir) -> str:
    if data_dir is not None:
        return "data_dir / --data-dir"
    if os.environ.get(ENV_VAR):
        return f"${ENV_VAR}"
    return f"the default cache (set ${ENV_VAR} or --data-dir to change it)"


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _download(url: str, dest: Path, md5: str | None = None) -> None:
    """Fetch ``url`` to ``dest`` atomically (temp file + rename), checking ``md5`` if given."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
    os.close(fd)
    try:
        print(f"downloading {url} -> {dest}", flush=True)
        try:
            with urllib.request.urlopen(url, timeout=60) as response, open(tmp, "wb") as out:
                shutil.copyfileobj(response, out)
        except OSError as exc:
            raise DatasetNotFoundError(f"could not download {url}: {exc}") from None
        if md5 is not None and _md5(Path(tmp)) != md5:
            raise CorruptDatasetError(f"{url}: downloaded file has the wrong MD5 checksum "
                                      f"(expected {md5}); try again")
        os.replace(tmp, dest)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


# --------------------------------------------------------------------------- Fashion-MNIST

FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
FASHION_MNIST_FILES = {  # split -> (images, labels), without the optional ".gz"
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
FASHION_MNIST_URL = "http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read one idx file (``.gz`` or raw) of unsigned bytes into an array of the stored shape.

    Raises :class:`CorruptDatasetError` for a truncated or malformed file.
    """
    path = Path(path)
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                data = f.read()
        else:
            data = path.read_bytes()
    except (EOFError, zlib.error, gzip.BadGzipFile, OSError) as exc:
        raise CorruptDatasetError(f"{path} cannot be read ({exc}): the file is corrupt or truncated; "
                                  f"delete it and get it again") from None
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise CorruptDatasetError(f"{path} is not an idx file of unsigned bytes (bad header)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if len(data) < header:
        raise CorruptDatasetError(f"{path} is truncated (the header is incomplete)")
    dims = struct.unpack(f">{ndim}I", data[4:header])
    if len(data) - header != math.prod(dims):
        raise CorruptDatasetError(
            f"{path} is truncated or corrupt: the header says shape {dims} ({math.prod(dims)} bytes) "
            f"but the file holds {len(data) - header} bytes; delete it and get it again")
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(dims)


def _find_idx(folder: Path, stem: str) -> Path | None:
    for name in (stem, stem + ".gz"):
        if (folder / name).is_file():
            return folder / name
    return None


def _fashion_mnist_candidates(data_dir=None) -> list[Path]:
    """Where Fashion-MNIST is looked for, in order: a folder the user named is the only place
    looked in; else also the Debian package's folder."""
    root = data_root(data_dir)
    return [root / "fashion-mnist", root] + ([DEBIAN_FASHION_MNIST] if data_dir is None else [])


def find_fashion_mnist(data_dir=None) -> Path | None:
    """The folder that holds Fashion-MNIST's four idx files (:func:`load_fashion_mnist`'s
    search, without reading them), or ``None``."""
    stems = [s for pair in FASHION_MNIST_FILES.values() for s in pair]
    return next((c for c in _fashion_mnist_candidates(data_dir) if all(_find_idx(c, s) for s in stems)), None)


def load_fashion_mnist(*, data_dir=None, download: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Fashion-MNIST as uint8 ``(N, 1, 28, 28)`` images and int64 labels: (x_train, y_train, x_test, y_test)."""
    root = data_root(data_dir)
    candidates = _fashion_mnist_candidates(data_dir)
    stems = [s for pair in FASHION_MNIST_FILES.values() for s in pair]
    folder = find_fashion_mnist(data_dir)
    if folder is None and download:
        folder = root / "fashion-mnist"
        for stem in stems:
            if _find_idx(folder, stem) is None:
                _download(FASHION_MNIST_URL + stem + ".gz", folder / (stem + ".gz"))
    if folder is None:
        looked = " and ".join(str(c) for c in candidates)
        if data_dir is not None:
            raise DatasetNotFoundError(
                f"dataset 'fashion-mnist' is not in the folder given as data_dir / --data-dir: looked for "
                f"its four idx files ({', '.join(stems)}, optionally .gz) in {looked}; copy them into "
                f"{root / 'fashion-mnist'}, add --download where a network is available, or leave --data-dir "
                f"out to use ${ENV_VAR}, {default_data_dir()} or the Debian package's {DEBIAN_FASHION_MNIST}")
        raise DatasetNotFoundError(
            f"dataset 'fashion-mnist' not found: looked for its four idx files ({', '.join(stems)}, "
            f"optionally .gz) in {looked} (the first two from {_root_origin(data_dir)}); to get it, "
            f"install the Debian package (apt-get install dataset-fashion-mnist, which puts the files in "
            f"{DEBIAN_FASHION_MNIST}), copy the files from https://github.com/zalandoresearch/fashion-mnist "
            f"into {root / 'fashion-mnist'}, or add --download where a network is available")
    out = []
    for split in ("train", "test"):
        img_path, lab_path = (_find_idx(folder, s) for s in FASHION_MNIST_FILES[split])
        images, labels = read_idx(img_path), read_idx(lab_path)
        if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
            raise CorruptDatasetError(f"{img_path} / {lab_path}: shapes {images.shape} and "
                                      f"{labels.shape} do not make a labelled image set")
        out += [torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64))]
    return tuple(out)


# --------------------------------------------------------------------------- CIFAR

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer",
                   "dog", "frog", "horse", "ship", "truck")

# The archives and files as distributed by https://www.cs.toronto.edu/~kriz/cifar.html,
# with the MD5 checksums published for them.
CIFAR = {
    "cifar10": {
        "folder": "cifar-10-batches-py",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "archive_md5": "c58f30108f718f92721af3b95e74349a",
        "train": ("data_batch_1", "data_batch_2", "data_batch_3", "data_batch_4", "data_batch_5"),
        "test": ("test_batch",),
        "label_key": "labels",
        "num_classes": 10,
        "md5": {
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
        },
    },
    "cifar100": {
        "folder": "cifar-100-python",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "archive_md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "train": ("train",),
        "test": ("test",),
        "label_key": "fine_labels",
        "num_classes": 100,
        "md5": {"train": "16019d7e3df5f24257cddd939b257f8d", "test": "f0ef6b0ae62326f3e7ffdfab6717acfc"},
    },
}


class _ArrayUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: a CIFAR file can run no code."""

    _ALLOWED = {("numpy", "ndarray"), ("numpy", "dtype"),
                ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
                ("_codecs", "encode")}  # how protocol 2 stores bytes

    def find_class(self, module, name):
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        if module.startswith("numpy.core."):
            module = "numpy._core." + module[len("numpy.core."):]
        return super().find_class(module, name)


def _read_cifar_batch(path: Path, label_key: str, check_md5: str | None) -> tuple[np.ndarray, np.ndarray]:
    if check_md5 is not None and _md5(path) != check_md5:
        raise CorruptDatasetError(f"{path} has the wrong MD5 checksum (expected {check_md5}): "
                                  f"the file is corrupt or not the original; delete it and get it again")
    try:
        with open(path, "rb") as f:
            batch = _ArrayUnpickler(io.BytesIO(f.read()), encoding="bytes").load()
        batch = {k.decode() if isinstance(k, bytes) else k: v for k, v in batch.items()}
        data = np.asarray(batch["data"], dtype=np.uint8)
        labels = np.asarray(batch[label_key], dtype=np.int64)
    except (pickle.UnpicklingError, EOFError, KeyError, AttributeError, ValueError, TypeError,
            IndexError, MemoryError) as exc:
        raise CorruptDatasetError(
            f"{path} is not a readable CIFAR batch ({type(exc).__name__}: {exc}); the file is corrupt "
            f"or truncated: delete the folder and get it again") from None
    if data.ndim != 2 or data.shape[1] != 3 * 32 * 32 or len(labels) != len(data):
        raise CorruptDatasetError(f"{path}: expected data of shape (N, 3072) and N labels, "
                                  f"got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def load_cifar(name: str, *, data_dir=None, download: bool = False,
               check_md5: bool = False) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """CIFAR-10 / CIFAR-100 (fine labels) as uint8 ``(N, 3, 32, 32)`` images and int64 labels."""
    spec = CIFAR[name]
    root = data_root(data_dir)
    files = spec["train"] + spec["test"]
    candidates = [root / spec["folder"]] + ([root] if root.name == spec["folder"] else [])
    folder = next((c for c in candidates if all((c / f).is_file() for f in files)), None)
    if folder is None and download:
        archive = root / Path(spec["url"]).name
        if not archive.is_file():
            _download(spec["url"], archive, md5=spec["archive_md5"])
        with tarfile.open(archive, "r:gz") as tar:
            tar.extractall(root, filter="data")
        folder = root / spec["folder"]
    if folder is None:
        looked = " and ".join(f"{c}" + (f" (has {len(files) - len(miss)} of the files; missing: {', '.join(miss)})"
                                         if 0 < len(miss := [f for f in files if not (c / f).is_file()]) < len(files)
                                         else "")
                              for c in candidates)
        raise DatasetNotFoundError(
            f"dataset {name!r} not found: looked for {', '.join(files)} in {looked} "
            f"(from {_root_origin(data_dir)}); to get it, download {spec['url']} and unpack it into {root} "
            f"(so that {root / spec['folder']} holds those files), add --download where a network is "
            f"available, or point --data-dir / ${ENV_VAR} at the folder that contains {spec['folder']}/")
    parts = {}
    for split in ("train", "test"):
        batches = [_read_cifar_batch(folder / f, spec["label_key"], spec["md5"][f] if check_md5 else None)
                   for f in spec[split]]
        x = np.concatenate([b[0] for b in batches])
        y = np.concatenate([b[1] for b in batches])
        if y.min() < 0 or y.max() >= spec["num_classes"]:
            raise CorruptDatasetError(f"{folder}: labels outside 0..{spec['num_classes'] - 1}")
        parts[split] = (torch.from_numpy(x), torch.from_numpy(y))
    return parts["train"][0], parts["train"][1], parts["test"][0], parts["test"][1]


# --------------------------------------------------------------------------- one entry point

def _to_grayscale(x: Tensor) -> Tensor:
    """ITU-R BT.601 luma ``0.299 R + 0.587 G + 0.114 B``; single-channel inputs are returned as they are."""
    if x.shape[1] == 1:
        return x
    w = torch.tensor([0.299, 0.587, 0.114], dtype=x.dtype).view(1, 3, 1, 1)
    return (x * w).sum(dim=1, keepdim=True)


def stratified_subset(labels: Tensor, n: int, seed: int) -> Tensor:
    """Sorted indices of ``n`` samples drawn without replacement, each class in its share
    (largest remainders round the shares to whole numbers), chosen with ``seed``."""
    if n >= len(labels):
        return torch.arange(len(labels))
    g = torch.Generator().manual_seed(seed)
    classes, counts = torch.unique(labels, return_counts=True)
    exact = counts.double() * n / len(labels)
    take = exact.floor().long()
    rest = n - int(take.sum())
    if rest:
        take[torch.argsort(exact - take, descending=True, stable=True)[:rest]] += 1
    chosen = []
    for c, k in zip(classes.tolist(), take.tolist()):
        idx = torch.nonzero(labels == c).flatten()
        chosen.append(idx[torch.randperm(len(idx), generator=g)[:k]])
    return torch.sort(torch.cat(chosen)).values


def resize_images(x: Tensor, size: int | None) -> Tensor:
    """``(N, C, H, W)`` -> ``(N, C, size, size)`` by area averaging (each output pixel the mean
    of the input pixels it covers); ``None`` or the same size: unchanged."""
    if size is None or tuple(x.shape[-2:]) == (size, size):
        return x
    return F.interpolate(x, size=(size, size), mode="area")


def class_subset(num_classes: int, k: int, how: str = "first", seed: int = 0) -> Tensor:
    """The sorted labels of the ``k`` classes a ``"name:K"`` dataset keeps: ``0..k-1``
    (``how="first"``) or ``k`` of the ``num_classes`` drawn without replacement with ``seed``
    (``"random"``; the same seed, the same classes). They are relabelled ``0..k-1`` in this order."""
    if how == "first":
        return torch.arange(k)
    if how != "random":
        raise ValueError(f"class_sample must be 'first' or 'random', got {how!r}")
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(num_classes, generator=g)[:k].sort().values


def _keep_classes(x: Tensor | None, y: Tensor | None, kept: Tensor):
    """The samples of the classes ``kept`` (sorted labels), relabelled ``0..len(kept)-1``."""
    if x is None:
        return None, None
    m = torch.isin(y, kept)
    return x[m], torch.searchsorted(kept, y[m]).to(y.dtype)


def _prepare(name: str, x_train, y_train, x_test, y_test, num_classes: int, *, classes=None,
             subset: int | None, grayscale: bool, val_fraction: float, seed: int,
             train_size: int | None = None, image_size: int | None = None,
             class_sample: str = "first") -> DataSplits:
    """uint8 images -> float in [0, 1] -> optional grayscale, class subset, resize, validation
    split, training subset -> per-channel standardisation with the training part's mean and
    standard deviation."""
    if subset is not None:
        kept = class_subset(num_classes, subset, class_sample, seed)
        (x_train, y_train), (x_test, y_test) = _keep_classes(x_train, y_train, kept), _keep_classes(x_test, y_test, kept)
        num_classes = subset
        classes = None if classes is None else tuple(classes[int(c)] for c in kept)
    x_train = resize_images(x_train.to(torch.float32).div_(255.0), image_size)
    x_test = resize_images(x_test.to(torch.float32).div_(255.0), image_size)
    if grayscale:
        x_train, x_test = _to_grayscale(x_train), _to_grayscale(x_test)
    x_val = y_val = None
    if val_fraction > 0:
        keep, val = _validation_split(y_train, val_fraction, seed, name)
        x_val, y_val = x_train[val], y_train[val]
        x_train, y_train = x_train[keep], y_train[keep]
    if train_size is not None:
        keep = _training_subset(y_train, train_size, seed, name, val_fraction)
        x_train, y_train = x_train[keep], y_train[keep]
    mean = x_train.mean(dim=(0, 2, 3))
    std = x_train.std(dim=(0, 2, 3))
    view = (1, -1, 1, 1)
    norm = lambda t: None if t is None else t.sub_(mean.view(view)).div_(std.view(view))  # noqa: E731
    return DataSplits(name, norm(x_train), y_train, norm(x_test), y_test, num_classes,
                      norm(x_val), y_val, mean=mean, std=std, classes=classes)


def parse_dataset_name(name: str) -> tuple[str, int | None]:
    """``"cifar100:50"`` -> ``("cifar100", 50)``; ``"cifar10"`` -> ``("cifar10", None)``."""
    base, sep, k = name.partition(":")
    if base not in _NUM_CLASSES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {', '.join(DATASETS)} "
                         f"(optionally with ':K' for the first K classes, e.g. 'cifar100:50')")
    if not sep:
        return base, None
    if not k.isdigit() or not 1 <= int(k) <= _NUM_CLASSES[base]:
        raise ValueError(f"dataset {name!r}: the class subset after ':' must be a whole number "
                         f"from 1 to {_NUM_CLASSES[base]}, e.g. '{base}:{_NUM_CLASSES[base] // 2}'")
    return base, int(k)


def load_dataset(name: str, *, data_dir: str | os.PathLike | None = None, download: bool = False,
                 grayscale: bool = False, check_md5: bool = False, val_fraction: float = 0.0,
                 seed: int = 0, train_size: int | None = None, image_size: int | None = None,
                 class_sample: str = "first", **kwargs) -> DataSplits:
    """Load a dataset by name into memory. Known names: see ``DATASETS``; ``"name:K"`` keeps
    ``K`` classes (e.g. ``"cifar100:50"``, paper Fig. 3c): the first ``K``, or ``K`` drawn with
    ``seed`` (``class_sample="random"``, :func:`class_subset`), relabelled ``0..K-1``.

    Args:
        data_dir: folder to look in (else ``$RAFTORCH_DATA``, else ``~/.cache/raftorch``).
        download: fetch missing files into that folder (needs a network; not for ``digits``).
        grayscale: convert colour images to one luma channel (paper Fig. 4: grayscale CIFAR).
        check_md5: verify the CIFAR files against their published MD5 checksums.
        val_fraction: hold out this stratified fraction of the training set as a validation
            split (chosen with ``seed``), so results are not picked on the test set.
        seed: seed of the validation split, of the training subset and of a random class subset.
        train_size: keep a stratified random subset of this many training images (after the
            validation split), for runs that must be short; ``None``: all of them. More than
            there are is a ``ValueError`` naming both numbers.
        image_size: resize images to ``image_size x image_size`` by area averaging (before
            standardisation); ``None``: as stored.
        kwargs: passed to the loader (``digits``: ``test_fraction``).

    Raises:
        ValueError: unknown name or bad option. :class:`DatasetNotFoundError`: files missing
        (the message says where they were looked for and how to get them).
        :class:`CorruptDatasetError`: a truncated or corrupt file.
    """
    base, subset = parse_dataset_name(name)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if train_size is not None and (not isinstance(train_size, int) or train_size < 1):
        raise ValueError(f"train_size must be a positive whole number of images, got {train_size!r}")
    if image_size is not None and (not isinstance(image_size, int) or image_size < 1):
        raise ValueError(f"image_size must be a positive whole number of pixels, got {image_size!r}")
    if base == "digits":
        if kwargs.keys() - {"test_fraction"}:
            raise ValueError(f"digits: unknown option(s) {sorted(kwargs.keys() - {'test_fraction'})}")
        splits = load_digits(seed=seed, val_fraction=val_fraction, **kwargs)
        if subset is not None:
            splits = _take_classes(splits, class_subset(10, subset, class_sample, seed), name)
        if image_size is not None:
            splits.x_train, splits.x_test = resize_images(splits.x_train, image_size), resize_images(splits.x_test, image_size)
            splits.x_val = None if splits.x_val is None else resize_images(splits.x_val, image_size)
        if train_size is not None:
            keep = _training_subset(splits.y_train, train_size, seed, name, val_fraction)
            splits.x_train, splits.y_train = splits.x_train[keep], splits.y_train[keep]
        return splits
    if kwargs:
        raise ValueError(f"{base}: unknown option(s) {sorted(kwargs)}")
    if data_dir is not None and not download and not Path(data_dir).expanduser().is_dir():
        raise DatasetNotFoundError(f"{name}: the data folder {data_dir} (data_dir / --data-dir) does not exist; "
                                   f"give the folder that holds the dataset, or leave it out to use "
                                   f"${ENV_VAR} or {default_data_dir()}")
    if base == "fashion-mnist":
        arrays = load_fashion_mnist(data_dir=data_dir, download=download)
        classes = FASHION_MNIST_CLASSES
    else:
        arrays = load_cifar(base, data_dir=data_dir, download=download, check_md5=check_md5)
        classes = CIFAR10_CLASSES if base == "cifar10" else None
    return _prepare(name, *arrays, _NUM_CLASSES[base], classes=classes, subset=subset,
                    grayscale=grayscale, val_fraction=val_fraction, seed=seed,
                    train_size=train_size, image_size=image_size, class_sample=class_sample)


def _take_classes(splits: DataSplits, kept: Tensor, name: str) -> DataSplits:
    """``splits`` restricted to the classes ``kept`` (sorted labels), relabelled ``0..K-1``."""
    (x_tr, y_tr), (x_te, y_te) = _keep_classes(splits.x_train, splits.y_train, kept), _keep_classes(splits.x_test, splits.y_test, kept)
    x_va, y_va = _keep_classes(splits.x_val, splits.y_val, kept)
    classes = None if splits.classes is None else tuple(splits.classes[int(c)] for c in kept)
    return DataSplits(name, x_tr, y_tr, x_te, y_te, len(kept), x_va, y_va, splits.mean, splits.std, classes)


_NUM_CLASSES = {"digits": 10, "fashion-mnist": 10, "cifar10": 10, "cifar100": 100}
_IMAGE_SHAPES = {"digits": (1, 8, 8), "fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32),
                 "cifar100": (3, 32, 32)}  # (C, H, W) as stored

DATASETS = tuple(_NUM_CLASSES)


def dataset_shape(name: str, *, grayscale: bool = False,
                  image_size: int | None = None) -> tuple[tuple[int, int, int], int]:
    """``((C, H, W), num_classes)`` of the images :func:`load_dataset` returns for ``name``
    (``"cifar100:50"`` counts 50 classes) with these ``grayscale`` / ``image_size`` settings,
    without loading anything."""
    base, subset = parse_dataset_name(name)
    c, h, w = _IMAGE_SHAPES[base]
    if grayscale:
        c = 1
    if image_size is not None:
        h = w = int(image_size)
    return (c, h, w), (subset if subset is not None else _NUM_CLASSES[base])


_TRAIN_PER_CLASS = {"fashion-mnist": 6000, "cifar10": 5000, "cifar100": 500}  # as distributed


def train_images(name: str, *, val_fraction: float = 0.0, train_size: int | None = None) -> int:
    """How many training images :func:`load_dataset` keeps for ``name`` with these settings
    (the validation split rounds per class, then ``train_size`` caps), without loading the
    images (``digits``: its labels, from scikit-learn)."""
    base, subset = parse_dataset_name(name)
    if base == "digits":
        from sklearn.datasets import load_digits as _sk_load_digits

        labels = torch.as_tensor(_sk_load_digits().target)
        counts = [int((labels == c).sum()) for c in range(subset or 10)]
        counts = [n - int(round(0.2 * n)) for n in counts]  # load_digits' fixed 20% test split
    else:
        counts = [_TRAIN_PER_CLASS[base]] * (subset or _NUM_CLASSES[base])
    n = sum(c - int(round(val_fraction * c)) for c in counts)
    return n if train_size is None else min(n, train_size)


def synthetic_like(name: str, *, n_train: int, n_test: int, grayscale: bool = False,
                   image_size: int | None = None, seed: int = 0) -> DataSplits:
    """Random stand-in data of the shape and number of classes ``load_dataset(name, ...)``
    gives (:func:`dataset_shape`): standard normal images (as after standardisation) and
    labels cycling through the classes in a random order, named ``synthetic:<name>``.

    Not a dataset: nothing can be learned from it. Only ``raftorch reproduce --smoke`` uses it,
    where the named dataset is missing and the run is for timing and device checks, and it
    says so; :func:`load_dataset` never falls back to it."""
    shape, k = dataset_shape(name, grayscale=grayscale, image_size=image_size)
    g = torch.Generator().manual_seed(seed)

    def part(n: int) -> tuple[Tensor, Tensor]:
        labels = (torch.arange(n) % k)[torch.randperm(n, generator=g)]
        return torch.randn(n, *shape, generator=g), labels

    (x_train, y_train), (x_test, y_test) = part(n_train), part(n_test)
    return DataSplits(f"synthetic:{name}", x_train, y_train, x_test, y_test, k,
                      mean=torch.zeros(shape[0]), std=torch.ones(shape[0]))


# --------------------------------------------------------------------------- batches and augmentation

@dataclass(frozen=True)
class Augmentation:
    """Training-time augmentation of normalised image batches, drawn from a ``torch.Generator``.

    - ``crop_padding=p``: pad by ``p`` zeros (the mean colour, after normalisation) and crop
      back to the original size at a random offset.
    - ``flip``: mirror left-right with probability 1/2.
    - ``cutout=L``: zero one ``L x L`` square at a random centre, clipped at the border
      (DeVries & Taylor 2017).

    Random numbers are drawn per batch with :meth:`sample` and applied with :meth:`apply`, so
    several processes can draw them for a whole global batch and each apply its own slice.
    """

    crop_padding: int = 0
    flip: bool = False
    cutout: int = 0

    def __bool__(self) -> bool:
        return bool(self.crop_padding or self.flip or self.cutout)

    def sample(self, n: int, height: int, width: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Draw the random parameters for :meth:`apply` of ``n`` images ``height x width`` from ``generator``:
        ``crop`` offsets, ``flip`` flags and ``cutout`` centres, each only for an augmentation that is on."""
        params = {}
        if self.crop_padding:
            params["crop"] = torch.randint(0, 2 * self.crop_padding + 1, (n, 2), generator=generator)
        if self.flip:
            params["flip"] = torch.rand(n, generator=generator) < 0.5
        if self.cutout:
            params["cutout"] = torch.stack([torch.randint(0, height, (n,), generator=generator),
                                            torch.randint(0, width, (n,), generator=generator)], dim=1)
        return params

    def apply(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Augment ``x`` of shape ``(n, C, H, W)`` with ``params`` drawn for ``n`` samples."""
        n, _, h, w = x.shape
        dev = x.device
        if "crop" in params:
            p = self.crop_padding
            padded = F.pad(x, (p, p, p, p)).flatten(2)  # (n, C, (H+2p)(W+2p))
            off = params["crop"].to(dev)
            rows = off[:, 0:1] + torch.arange(h, device=dev)  # (n, H)
            cols = off[:, 1:2] + torch.arange(w, device=dev)  # (n, W)
            flat = (rows[:, :, None] * (w + 2 * p) + cols[:, None, :]).flatten(1)  # (n, H W)
            x = padded.gather(2, flat[:, None, :].expand(-1, x.shape[1], -1)).view_as(x)
        if "flip" in params:
            x = torch.where(params["flip"].to(dev).view(n, 1, 1, 1), x.flip(3), x)
        if "cutout" in params:
            centre = params["cutout"].to(dev)
            half = self.cutout // 2
            i = torch.arange(h, device=dev).view(1, h, 1)
            j = torch.arange(w, device=dev).view(1, 1, w)
            cy, cx = centre[:, 0].view(n, 1, 1), centre[:, 1].view(n, 1, 1)
            hole = (i >= cy - half) & (i < cy - half + self.cutout) & (j >= cx - half) & (j < cx - half + self.cutout)
            x = x.masked_fill(hole.unsqueeze(1), 0.0)
        return x.contiguous()

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        return self.apply(x, self.sample(len(x), x.shape[2], x.shape[3], generator))


def batch_indices(n: int, batch_size: int, *, shuffle: bool, generator: torch.Generator | None = None,
                  drop_last: bool = False) -> list[Tensor]:
    """Index tensors of the batches of one pass over ``n`` samples (a random order if ``shuffle``)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    batches = list(torch.split(order, batch_size))
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    return batches


def shard(batch: Tensor, rank: int, world_size: int) -> Tensor:
    """This process's contiguous part of a global batch (sizes differ by at most one)."""
    return torch.tensor_split(batch, world_size)[rank]


class DatasetCache:
    """A loader with :func:`load_dataset`'s signature that keeps the last ``size`` distinct
    datasets in memory: a sweep of many runs on one dataset (``raftorch reproduce``) loads it
    once per process. Pass it to :func:`raftorch.training.loop.train` (``load=``); each call
    returns a shallow copy, so a run's ``.to(device)`` never changes the cached tensors.
    ``clear()`` drops them."""

    def __init__(self, load=None, size: int = 4):
        self._load = load or load_dataset
        self._size = size
        self._kept: dict[tuple, DataSplits] = {}

    def __call__(self, name: str, **kwargs) -> DataSplits:
        import copy

        key = (name, tuple(sorted((k, str(v)) for k, v in kwargs.items())))
        if key not in self._kept:
            if len(self._kept) >= self._size:
                self._kept.pop(next(iter(self._kept)))
            self._kept[key] = self._load(name, **kwargs)
        return copy.copy(self._kept[key])

    def __len__(self) -> int:
        return len(self._kept)

    def clear(self) -> None:
        """Drop every kept dataset."""
        self._kept.clear()
