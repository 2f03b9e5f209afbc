"""Datasets: tiny fake CIFAR / Fashion-MNIST folders generated here; never the real data."""
from __future__ import annotations

import gzip
import hashlib
import os
import pickle
import struct
import tarfile

import numpy as np
import pytest
import torch

from raftorch.training import data as D
from raftorch.training.config import TrainConfig
from raftorch.training.data import (Augmentation, CorruptDatasetError, DatasetNotFoundError, batch_indices,
                           load_dataset, shard)


# --------------------------------------------------------------------------- fake data

def write_fake_cifar(root, name="cifar10", per_batch=20, seed=0):
    """A CIFAR folder in the distributed python-pickle layout with random images."""
    spec = D.CIFAR[name]
    folder = root / spec["folder"]
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for f in spec["train"] + spec["test"]:
        labels = (np.arange(per_batch) % spec["num_classes"]).tolist()
        batch = {b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 spec["label_key"].encode(): labels, b"batch_label": b"fake"}
        with open(folder / f, "wb") as fh:
            pickle.dump(batch, fh, protocol=2)
    return folder


def write_idx(path, array):
    array = np.asarray(array, dtype=np.uint8)
    header = struct.pack(">BBBB", 0, 0, 8, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    raw = header + array.tobytes()
    if str(path).endswith(".gz"):
        with gzip.open(path, "wb") as f:
            f.write(raw)
    else:
        path.write_bytes(raw)


def write_fake_fashion_mnist(folder, n_train=30, n_test=10, gz=True, seed=0):
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    ext = ".gz" if gz else ""
    for split, n in (("train", n_train), ("test", n_test)):
        images, labels = D.FASHION_MNIST_FILES[split]
        write_idx(folder / (images + ext), rng.integers(0, 256, (n, 28, 28)))
        write_idx(folder / (labels + ext), np.arange(n) % 10)
    return folder


# --------------------------------------------------------------------------- CIFAR

def test_fake_cifar10_loads_as_normalised_tensors(tmp_path):
    folder = write_fake_cifar(tmp_path)
    s = load_dataset("cifar10", data_dir=tmp_path)
    assert s.x_train.shape == (100, 3, 32, 32) and s.x_test.shape == (20, 3, 32, 32)
    assert s.x_train.dtype == torch.float32 and s.y_train.dtype == torch.int64
    assert s.num_classes == 10 and s.classes == D.CIFAR10_CLASSES
    # per-channel standardisation with the training set's statistics, exactly
    with open(folder / "data_batch_1", "rb") as f:
        first = pickle.load(f, encoding="bytes")
    raw = torch.tensor(first[b"data"][:1], dtype=torch.float32).view(1, 3, 32, 32) / 255
    assert torch.allclose(s.x_train[:1], (raw - s.mean.view(1, 3, 1, 1)) / s.std.view(1, 3, 1, 1))
    assert torch.allclose(s.x_train.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert s.y_train[:20].tolist() == first[b"labels"]


def test_data_dir_may_point_at_the_cifar_folder_itself(tmp_path):
    folder = write_fake_cifar(tmp_path)
    assert len(load_dataset("cifar10", data_dir=folder).x_train) == 100


def test_cifar100_subset_keeps_the_first_k_classes(tmp_path):
    write_fake_cifar(tmp_path, "cifar100", per_batch=300)
    s = load_dataset("cifar100:50", data_dir=tmp_path)
    assert s.num_classes == 50
    assert s.y_train.max().item() == 49 and s.y_test.max().item() == 49
    assert len(s.y_train) == 150  # labels cycle 0..99 three times: half of them kept


def test_cifar100_random_subset_draws_k_classes_with_the_seed_and_relabels_them(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar100", per_batch=300)
    with open(folder / "train", "rb") as f:
        raw = pickle.load(f, encoding="bytes")
    images = torch.tensor(raw[b"data"], dtype=torch.float32).view(-1, 3, 32, 32)
    labels = torch.tensor(raw[b"fine_labels"])
    kept = D.class_subset(100, 50, "random", seed=3)
    assert kept.tolist() == sorted(set(kept.tolist())) and len(kept) == 50 and kept.max() < 100
    assert kept.tolist() != list(range(50))  # not the first 50
    assert torch.equal(kept, D.class_subset(100, 50, "random", seed=3))
    assert not torch.equal(kept, D.class_subset(100, 50, "random", seed=4))
    s = load_dataset("cifar100:50", data_dir=tmp_path, class_sample="random", seed=3)
    assert s.num_classes == 50 and len(s.y_train) == 150
    # sample i of the kept data is the i-th training image whose label is kept, relabelled to
    # that label's place in the sorted subset; the standardisation is per channel, so compare
    # the order of the pixel values (a monotone map of the raw ones)
    rows = torch.nonzero(torch.isin(labels, kept)).flatten()
    assert torch.equal(s.y_train, torch.searchsorted(kept, labels[rows]))
    raw0, got0 = images[rows[0]].flatten(), s.x_train[0].flatten()
    assert torch.equal(torch.argsort(raw0[:1024], stable=True), torch.argsort(got0[:1024], stable=True))


def test_class_sample_random_needs_a_class_subset_and_a_known_value():
    with pytest.raises(ValueError, match="picks the K classes of a 'name:K' dataset"):
        TrainConfig(data="digits", class_sample="random").validate()
    with pytest.raises(ValueError, match="class_sample must be one of first, random"):
        TrainConfig(data="digits:3", class_sample="some").validate()


def test_grayscale_is_the_bt601_luma_of_the_colour_image(tmp_path):
    folder = write_fake_cifar(tmp_path)
    s = load_dataset("cifar10", data_dir=tmp_path, grayscale=True)
    assert s.input_shape == (1, 32, 32)
    with open(folder / "data_batch_1", "rb") as f:
        rgb = torch.tensor(pickle.load(f, encoding="bytes")[b"data"][:1], dtype=torch.float32).view(1, 3, 32, 32) / 255
    luma = 0.299 * rgb[:, 0:1] + 0.587 * rgb[:, 1:2] + 0.114 * rgb[:, 2:3]
    assert torch.allclose(s.x_train[:1], (luma - s.mean) / s.std, atol=1e-5)


def test_validation_split_is_stratified_disjoint_and_seeded(tmp_path):
    write_fake_cifar(tmp_path)
    full = load_dataset("cifar10", data_dir=tmp_path)
    a = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.2, seed=1)
    b = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.2, seed=1)
    c = load_dataset("cifar10", data_dir=tmp_path, val_fraction=0.2, seed=2)
    assert len(a.x_val) == 20 and len(a.x_train) == 80
    assert torch.bincount(a.y_val).tolist() == [2] * 10  # 2 of each class's 10
    assert torch.equal(a.x_val, b.x_val) and not torch.equal(a.x_val, c.x_val)
    assert torch.equal(a.x_test, a.x_test) and len(a.x_test) == len(full.x_test)


def test_missing_cifar_names_the_dataset_where_it_looked_and_how_to_get_it(tmp_path):
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("cifar100", data_dir=tmp_path)
    msg = str(info.value)
    assert "'cifar100'" in msg and str(tmp_path / "cifar-100-python") in msg
    assert "cifar-100-python.tar.gz" in msg and "--download" in msg


def test_truncated_cifar_file_is_a_clear_error_not_a_pickle_traceback(tmp_path):
    folder = write_fake_cifar(tmp_path)
    path = folder / "data_batch_3"
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(CorruptDatasetError, match="data_batch_3.*corrupt or truncated"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    folder = write_fake_cifar(tmp_path)
    with open(folder / "test_batch", "wb") as f:
        pickle.dump({b"data": os.system}, f)  # a reference to a function: refused, never called
    with pytest.raises(CorruptDatasetError, match="refusing to load"):
        load_dataset("cifar10", data_dir=tmp_path)


def test_md5_check_rejects_files_that_are_not_the_originals(tmp_path):
    write_fake_cifar(tmp_path)
    with pytest.raises(CorruptDatasetError, match="MD5"):
        load_dataset("cifar10", data_dir=tmp_path, check_md5=True)


def test_download_fetches_checks_and_unpacks_the_archive(tmp_path, monkeypatch):
    src = tmp_path / "src"
    write_fake_cifar(src)
    archive = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    spec = dict(D.CIFAR["cifar10"], url=archive.as_uri(),
                archive_md5=hashlib.md5(archive.read_bytes()).hexdigest())
    monkeypatch.setitem(D.CIFAR, "cifar10", spec)
    dest = tmp_path / "cache"
    s = load_dataset("cifar10", data_dir=dest, download=True)
    assert len(s.x_train) == 100 and (dest / "cifar-10-batches-py" / "test_batch").is_file()
    monkeypatch.setitem(D.CIFAR, "cifar10", dict(spec, archive_md5="0" * 32))
    with pytest.raises(CorruptDatasetError, match="MD5"):
        load_dataset("cifar10", data_dir=tmp_path / "other", download=True)


def test_data_dir_then_environment_then_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    monkeypatch.delenv(D.ENV_VAR, raising=False)
    assert D.data_root() == tmp_path / "xdg" / "raftorch"
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "env"))
    assert D.data_root() == tmp_path / "env"
    assert D.data_root(tmp_path / "given") == tmp_path / "given"
    write_fake_cifar(tmp_path / "env")
    assert len(load_dataset("cifar10").x_train) == 100  # found through $RAFTORCH_DATA


# --------------------------------------------------------------------------- Fashion-MNIST

@pytest.mark.parametrize("gz", [True, False])
def test_fashion_mnist_from_an_idx_folder(tmp_path, gz):
    write_fake_fashion_mnist(tmp_path / "fashion-mnist", gz=gz)
    s = load_dataset("fashion-mnist", data_dir=tmp_path)
    assert s.x_train.shape == (30, 1, 28, 28) and s.x_test.shape == (10, 1, 28, 28)
    assert s.y_train.tolist() == [i % 10 for i in range(30)]
    assert s.classes[0] == "T-shirt/top"


def test_truncated_idx_file_is_a_clear_error(tmp_path):
    folder = write_fake_fashion_mnist(tmp_path / "fashion-mnist", gz=False)
    path = folder / "t10k-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-5])
    with pytest.raises(CorruptDatasetError, match="truncated"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_corrupt_gzip_is_a_clear_error(tmp_path):
    folder = write_fake_fashion_mnist(tmp_path / "fashion-mnist")
    path = folder / "train-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:20])
    with pytest.raises(CorruptDatasetError, match="train-labels.*corrupt or truncated"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_missing_fashion_mnist_explains_the_debian_package(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path))
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist")
    msg = str(info.value)
    assert "'fashion-mnist'" in msg and "apt-get install dataset-fashion-mnist" in msg
    assert str(tmp_path / "fashion-mnist") in msg and str(tmp_path / "no-debian") in msg
    assert "\n" not in msg  # one line


def test_fashion_mnist_download_fetches_the_four_files(tmp_path, monkeypatch):
    mirror = write_fake_fashion_mnist(tmp_path / "mirror")
    monkeypatch.setattr(D, "FASHION_MNIST_URL", mirror.as_uri() + "/")
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", tmp_path / "no-debian")
    s = load_dataset("fashion-mnist", data_dir=tmp_path / "cache", download=True)
    assert len(s.x_train) == 30
    assert sorted(p.name for p in (tmp_path / "cache" / "fashion-mnist").iterdir()) == sorted(
        p.name for p in mirror.iterdir())


def test_fashion_mnist_falls_back_to_the_debian_folder(tmp_path, monkeypatch):
    debian = write_fake_fashion_mnist(tmp_path / "debian")
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", debian)
    (tmp_path / "empty").mkdir()
    monkeypatch.setenv(D.ENV_VAR, str(tmp_path / "empty"))
    assert len(load_dataset("fashion-mnist").x_train) == 30


def test_an_explicit_data_folder_without_fashion_mnist_is_refused_not_replaced(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", write_fake_fashion_mnist(tmp_path / "debian"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DatasetNotFoundError) as info:
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")
    msg = str(info.value)
    assert "--data-dir" in msg and str(tmp_path / "empty" / "fashion-mnist") in msg and "\n" not in msg


@pytest.mark.parametrize("fraction, message", [
    (0.999, r"holds out all 1438 training images of digits, leaving none to train on"),
    (0.001, r"holds out no image of digits"),
])
def test_a_validation_split_that_leaves_nothing_is_an_error(fraction, message):
    with pytest.raises(ValueError, match=message):
        load_dataset("digits", val_fraction=fraction)


def test_a_train_size_above_the_images_there_are_names_both_numbers(tmp_path):
    with pytest.raises(ValueError, match=r"train_size 5000 .* more than the 1438 training images of digits"):
        load_dataset("digits", train_size=5000)
    write_fake_fashion_mnist(tmp_path / "fashion-mnist")
    with pytest.raises(ValueError, match=r"train_size 21 .* more than the 20 training images of fashion-mnist "
                                         r"left after the validation split"):
        load_dataset("fashion-mnist", data_dir=tmp_path, val_fraction=0.2, train_size=21)
    assert len(load_dataset("digits", train_size=1438).x_train) == 1438  # all of them is fine


def test_an_explicit_data_folder_that_does_not_exist_is_an_error_not_ignored(tmp_path, monkeypatch):
    monkeypatch.setattr(D, "DEBIAN_FASHION_MNIST", write_fake_fashion_mnist(tmp_path / "debian"))
    for name in ("fashion-mnist", "cifar10"):
        with pytest.raises(DatasetNotFoundError, match=r"the data folder .*nonexistent.* does not exist"):
            load_dataset(name, data_dir=tmp_path / "nonexistent")


# --------------------------------------------------------------------------- names, digits

@pytest.mark.parametrize("name, fragment", [
    ("mnist", "unknown dataset 'mnist'"), ("cifar100:0", "1 to 100"), ("cifar10:x", "whole number"),
    ("cifar100:101", "1 to 100")])
def test_bad_dataset_names_are_value_errors(name, fragment):
    with pytest.raises(ValueError, match=fragment):
        load_dataset(name)


def test_digits_keeps_its_interface():
    s = D.load_digits(seed=0, val_fraction=0.1)
    assert isinstance(s, D.DataSplits) and s.input_shape == (1, 8, 8) and s.x_val is not None
    t = load_dataset("digits", seed=0, val_fraction=0.1)
    assert torch.equal(s.x_train, t.x_train) and torch.equal(s.y_val, t.y_val)
    assert load_dataset("digits:3").y_test.max().item() == 2


# --------------------------------------------------------------------------- batches, augmentation

def test_crop_flip_and_cutout_do_what_they_say():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4) + 1
    crop = Augmentation(crop_padding=1)
    centred = crop.apply(x, {"crop": torch.tensor([[1, 1], [1, 1]])})
    assert torch.equal(centred, x)  # offset p: the original image
    shifted = crop.apply(x, {"crop": torch.tensor([[0, 2], [2, 0]])})
    assert torch.equal(shifted[0, 0, 1:, :3], x[0, 0, :3, 1:]) and shifted[0, 0, 0].eq(0).all()
    assert torch.equal(shifted[1, 0, :3, 1:], x[1, 0, 1:, :3]) and shifted[1, 0, :, 0].eq(0).all()
    flipped = Augmentation(flip=True).apply(x, {"flip": torch.tensor([True, False])})
    assert torch.equal(flipped[0], x[0].flip(-1)) and torch.equal(flipped[1], x[1])
    cut = Augmentation(cutout=2).apply(x, {"cutout": torch.tensor([[1, 1], [0, 3]])})
    assert cut[0, 0, 0:2, 0:2].eq(0).all() and cut[0].eq(0).sum() == 4
    assert cut[1, 0, 0, 2:].eq(0).all() and cut[1].eq(0).sum() == 2  # clipped at the corner


def test_augmentation_is_reproducible_from_the_generator():
    aug = Augmentation(crop_padding=2, flip=True, cutout=3)
    x = torch.randn(8, 3, 8, 8)
    a = aug(x, torch.Generator().manual_seed(5))
    b = aug(x, torch.Generator().manual_seed(5))
    assert torch.equal(a, b) and not torch.equal(a, x)


def test_shards_of_a_global_batch_cover_it_in_order():
    batches = batch_indices(23, 8, shuffle=True, generator=torch.Generator().manual_seed(0))
    assert sorted(torch.cat(batches).tolist()) == list(range(23))
    for b in batches:
        parts = [shard(b, r, 3) for r in range(3)]
        assert torch.equal(torch.cat(parts), b) and max(map(len, parts)) - min(map(len, parts)) <= 1
    assert len(batch_indices(23, 8, shuffle=False, drop_last=True)) == 2


# --------------------------------------------------------------------------- subsets and resizing

def test_stratified_subset_takes_exactly_n_in_each_class_share():
    labels = torch.tensor([0] * 50 + [1] * 30 + [2] * 20)
    idx = D.stratified_subset(labels, 10, seed=0)
    assert len(idx) == 10 and len(set(idx.tolist())) == 10 and torch.equal(idx, idx.sort().values)
    assert torch.bincount(labels[idx]).tolist() == [5, 3, 2]
    odd = D.stratified_subset(labels, 7, seed=0)  # shares 3.5, 2.1, 1.4: the largest remainders round up
    assert torch.bincount(labels[odd], minlength=3).tolist() == [4, 2, 1]
    assert torch.equal(D.stratified_subset(labels, 10, seed=0), idx)
    assert not torch.equal(D.stratified_subset(labels, 10, seed=1), idx)
    assert torch.equal(D.stratified_subset(labels, 500, seed=0), torch.arange(100))


def test_resize_images_averages_each_covered_block():
    x = torch.arange(16.0).view(1, 1, 4, 4)
    assert torch.equal(D.resize_images(x, 2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    assert D.resize_images(x, None) is x and D.resize_images(x, 4) is x


def test_train_size_and_image_size_reach_every_dataset(tmp_path):
    write_fake_fashion_mnist(tmp_path / "fashion-mnist", n_train=40, n_test=10)
    s = load_dataset("fashion-mnist", data_dir=tmp_path, train_size=20, image_size=14, seed=3)
    assert s.x_train.shape == (20, 1, 14, 14) and s.x_test.shape == (10, 1, 14, 14)
    assert torch.bincount(s.y_train).tolist() == [2] * 10
    d = load_dataset("digits", train_size=100, image_size=4)
    assert d.x_train.shape == (100, 1, 4, 4) and len(d.x_test) == len(load_dataset("digits").x_test)
    with pytest.raises(ValueError, match="train_size must be a positive"):
        load_dataset("digits", train_size=0)


def test_a_cifar_folder_with_a_missing_batch_names_what_is_missing(tmp_path):
    folder = write_fake_cifar(tmp_path, "cifar10")
    (folder / "data_batch_3").unlink()
    with pytest.raises(DatasetNotFoundError, match=r"has 5 of the files; missing: data_batch_3\)"):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize("name, grayscale, image_size", [
    ("digits", False, None), ("digits", False, 4), ("fashion-mnist", False, None), ("fashion-mnist", True, 14),
    ("cifar10", False, None), ("cifar10", True, 16), ("cifar100", False, None), ("cifar100:7", True, None)])
def test_dataset_shape_is_what_load_dataset_returns_without_loading(tmp_path, name, grayscale, image_size):
    write_fake_fashion_mnist(tmp_path / "fashion-mnist", n_train=20, n_test=10)
    write_fake_cifar(tmp_path, "cifar10")
    write_fake_cifar(tmp_path, "cifar100", per_batch=100)
    s = load_dataset(name, data_dir=tmp_path, grayscale=grayscale, image_size=image_size)
    assert D.dataset_shape(name, grayscale=grayscale, image_size=image_size) == (tuple(s.x_train.shape[1:]),
                                                                                s.num_classes)


def test_the_dataset_cache_loads_each_dataset_once_and_hands_out_copies():
    from raftorch.training.data import DatasetCache

    calls = []

    def counting(name, **kw):
        calls.append((name, kw))
        return load_dataset(name, **kw)

    cache = DatasetCache(counting, size=2)
    a = cache("digits", val_fraction=0.1)
    b = cache("digits", val_fraction=0.1)
    assert len(calls) == 1 and a is not b and a.x_train is b.x_train  # one load, shallow copies
    cache("digits", val_fraction=0.2)
    cache("digits", train_size=100)  # a third: the oldest is dropped
    assert len(cache) == 2 and len(calls) == 3
    cache("digits", val_fraction=0.1)
    assert len(calls) == 4
    cache.clear()
    assert len(cache) == 0
