"""Dataset readers on small files written in the real on-disk formats, the split and the device loader."""

import gzip
import os
import pickle

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from fastweedout.data import datasets as D
from fastweedout.data.datasets import (
    DatasetError,
    Split,
    SyntheticConfig,
    holdout,
    load_dataset,
    read_idx,
    write_idx,
)
from fastweedout.data.loader import DeviceLoader, crop_flip

IDX = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")



@pytest.fixture(autouse=True)
def _no_default_data(tmp_path, monkeypatch):
    """Keep the tests away from any data on this machine unless a test puts it there."""
    monkeypatch.setenv(D.DATA_ROOT_ENV, str(tmp_path / "default-root"))
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(D, "SYSTEM_DIRS", {"fashion-mnist": [str(tmp_path / "system" / "fashion-mnist")]})


# ------------------------------------------------------------------------------- file writers
def write_cifar(root, kind="cifar10", per_batch=12, n_test=10, seed=0):
    """CIFAR python-version batches: pickled dicts of uint8 [N, 3072] data (CHW) and label lists."""
    rng = np.random.default_rng(seed)
    folder, train_files, test_files, meta_file, meta_key, k = D._CIFAR[kind]
    d = os.path.join(root, folder)
    os.makedirs(d, exist_ok=True)
    label_key = "labels" if kind == "cifar10" else "fine_labels"
    out = {}
    for split, files, n in (("train", train_files, per_batch), ("test", test_files, n_test)):
        xs, ys = [], []
        for f in files:
            m = n * (5 if kind == "cifar100" and split == "train" else 1)
            x = rng.integers(0, 256, size=(m, 3072), dtype=np.uint8)
            y = rng.integers(0, k, size=m).tolist()
            entry = {"batch_label": f, "data": x, label_key: y, "filenames": [f"{i}.png" for i in range(m)]}
            if kind == "cifar100":
                entry["coarse_labels"] = [v // 5 for v in y]
            with open(os.path.join(d, f), "wb") as fh:
                pickle.dump(entry, fh, protocol=2)
            xs.append(x)
            ys += y
        out[split] = (torch.from_numpy(np.concatenate(xs)).reshape(-1, 3, 32, 32), torch.tensor(ys))
    with open(os.path.join(d, meta_file), "wb") as fh:
        pickle.dump({meta_key: [f"class{i}" for i in range(k)]}, fh, protocol=2)
    return d, out


def write_mnist_like(d, gz=True, n_train=40, n_test=12, size=28, seed=0):
    g = torch.Generator().manual_seed(seed)
    os.makedirs(d, exist_ok=True)
    xtr = torch.randint(0, 256, (n_train, size, size), generator=g, dtype=torch.uint8)
    ytr = torch.randint(0, 10, (n_train,), generator=g, dtype=torch.uint8)
    xte = torch.randint(0, 256, (n_test, size, size), generator=g, dtype=torch.uint8)
    yte = torch.randint(0, 10, (n_test,), generator=g, dtype=torch.uint8)
    for name, t in zip(IDX, (xtr, ytr, xte, yte)):
        write_idx(os.path.join(d, name + (".gz" if gz else "")), t)
    return {"train": (xtr.unsqueeze(1), ytr.long()), "test": (xte.unsqueeze(1), yte.long())}


def assert_matches(ds, written, val_size):
    xtr, ytr = written["train"]
    assert torch.equal(ds.test.images, written["test"][0]) and torch.equal(ds.test.labels, written["test"][1])
    assert len(ds.val) == val_size and len(ds.train) == len(xtr) - val_size
    # Train and val partition the written training set: every image found once, with its label.
    both = torch.cat([ds.train.images, ds.val.images]).flatten(1)
    labels = torch.cat([ds.train.labels, ds.val.labels])
    flat = xtr.flatten(1)
    match = (both[:, None, :] == flat[None, :, :]).all(-1)  # [N, N]
    assert match.any(1).all() and match.sum(0).eq(1).all()
    assert torch.equal(labels, ytr[match.float().argmax(1)])


# -------------------------------------------------------------------------------------- readers
@pytest.mark.parametrize("kind", ["cifar10", "cifar100"])
def test_cifar_pickle_batches(tmp_path, kind):
    _, written = write_cifar(tmp_path, kind)
    ds = load_dataset(kind, root=tmp_path, val_size=7, seed=3)
    assert ds.num_classes == (10 if kind == "cifar10" else 100)
    assert (ds.in_channels, ds.image_size, ds.augment) == (3, 32, "crop_flip")
    assert ds.train.images.dtype == torch.uint8 and ds.train.labels.dtype == torch.long
    assert len(ds.mean) == len(ds.std) == 3
    assert ds.classes[:2] == ["class0", "class1"]
    assert_matches(ds, written, 7)


@pytest.mark.parametrize("gz", [False, True])
def test_mnist_torchvision_raw_layout(tmp_path, gz):
    written = write_mnist_like(tmp_path / "MNIST" / "raw", gz=gz)
    ds = load_dataset("mnist", root=tmp_path, val_size=10)
    assert (ds.num_classes, ds.in_channels, ds.image_size, ds.augment) == (10, 1, 28, "crop")
    assert ds.source == os.path.normpath(tmp_path / "MNIST" / "raw")
    assert_matches(ds, written, 10)


def test_fashion_mnist_torchvision_layout_and_flat_dir(tmp_path):
    written = write_mnist_like(tmp_path / "tv" / "FashionMNIST" / "raw", gz=True, seed=1)
    assert_matches(load_dataset("fashion-mnist", root=tmp_path / "tv", val_size=5), written, 5)
    flat = write_mnist_like(tmp_path / "flat", gz=True, seed=2)  # the Debian package's layout
    assert_matches(load_dataset("fashion_mnist", root=tmp_path / "flat", val_size=5), flat, 5)


def test_fashion_mnist_system_dir_searched_without_root(tmp_path):
    written = write_mnist_like(tmp_path / "system" / "fashion-mnist", gz=True, seed=4)
    ds = load_dataset("fashion-mnist", val_size=6)
    assert ds.source == os.path.normpath(tmp_path / "system" / "fashion-mnist")
    assert_matches(ds, written, 6)
    # An explicit root is taken at its word: the system directory is not a fallback for it.
    with pytest.raises(DatasetError):
        load_dataset("fashion-mnist", root=tmp_path / "elsewhere")


@pytest.mark.skipif(not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
                    reason="Debian package dataset-fashion-mnist not installed")
def test_real_debian_fashion_mnist(monkeypatch):
    monkeypatch.setattr(D, "SYSTEM_DIRS", {"fashion-mnist": ["/usr/share/datasets/fashion-mnist"]})
    ds = load_dataset("fashion-mnist")
    assert (len(ds.train), len(ds.val), len(ds.test)) == (55000, 5000, 10000)
    assert ds.train.images.shape[1:] == (1, 28, 28)
    assert torch.equal(torch.cat([ds.train.labels, ds.val.labels]).bincount(), torch.full((10,), 6000))
    # The published normalisation constants fit the real data.
    assert abs(ds.train.images.float().mean().item() / 255 - ds.mean[0]) < 2e-3


def test_idx_roundtrip(tmp_path):
    t = torch.randint(0, 256, (3, 5, 7), dtype=torch.uint8)
    for name in ("a-ubyte", "b-ubyte.gz"):
        write_idx(tmp_path / name, t)
        assert torch.equal(read_idx(tmp_path / name), t)
    with gzip.open(tmp_path / "b-ubyte.gz", "rb") as f:  # the standard header: 0,0,type 8,ndim then dims
        assert f.read(16) == bytes([0, 0, 8, 3, 0, 0, 0, 3, 0, 0, 0, 5, 0, 0, 0, 7])


# -------------------------------------------------------------------------------------- errors
def test_missing_dataset_error_names_places_and_remedies(tmp_path):
    with pytest.raises(DatasetError) as e:
        load_dataset("fashion-mnist")
    msg = str(e.value)
    for place in (tmp_path / "default-root" / "FashionMNIST" / "raw", tmp_path / "data",
                  tmp_path / "system" / "fashion-mnist"):
        assert os.path.normpath(place) in msg
    assert "apt-get install dataset-fashion-mnist" in msg and "download=True" in msg
    assert "FashionMNIST/raw" in msg
    with pytest.raises(DatasetError, match=r"(?s)cifar-10-batches-py.*download=True"):
        load_dataset("cifar10", root=tmp_path / "none")
    assert issubclass(DatasetError, ValueError)


def test_partial_dataset_lists_missing_files(tmp_path):
    d = tmp_path / "MNIST" / "raw"
    write_mnist_like(d)
    os.remove(d / "t10k-labels-idx1-ubyte.gz")
    with pytest.raises(DatasetError, match="missing t10k-labels-idx1-ubyte"):
        load_dataset("mnist", root=tmp_path)
    d2, _ = write_cifar(tmp_path / "c")
    os.remove(os.path.join(d2, "data_batch_3"))
    with pytest.raises(DatasetError, match="missing data_batch_3"):
        load_dataset("cifar10", root=tmp_path / "c")


def test_corrupt_idx_files(tmp_path):
    d = tmp_path / "MNIST" / "raw"
    write_mnist_like(d)
    path = d / "train-images-idx3-ubyte.gz"
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) // 2])  # truncated gzip stream
    with pytest.raises(DatasetError, match="train-images-idx3-ubyte.gz: corrupt"):
        load_dataset("mnist", root=tmp_path)
    with gzip.open(path, "wb") as f:  # a valid gzip of a wrong magic number
        f.write(b"\x12\x34\x08\x03" + bytes(20))
    with pytest.raises(DatasetError, match="bad magic"):
        load_dataset("mnist", root=tmp_path)
    write_idx(path, torch.zeros(40, 28, 28, dtype=torch.uint8))
    with gzip.open(path, "rb") as f:
        good = f.read()
    with gzip.open(path, "wb") as f:  # the header promises more bytes than the file holds
        f.write(good[:-5])
    with pytest.raises(DatasetError, match="header says"):
        load_dataset("mnist", root=tmp_path)
    write_idx(path, torch.zeros(39, 28, 28, dtype=torch.uint8))  # one image fewer than labels
    with pytest.raises(DatasetError, match="labels for 39 images"):
        load_dataset("mnist", root=tmp_path)
    write_idx(path, torch.zeros(40, 28, 28, dtype=torch.uint8))
    write_idx(d / "train-labels-idx1-ubyte.gz", torch.full((40,), 12, dtype=torch.uint8))
    with pytest.raises(DatasetError, match="corrupt labels"):
        load_dataset("mnist", root=tmp_path)


def test_corrupt_cifar_batches(tmp_path):
    d, _ = write_cifar(tmp_path)
    p = os.path.join(d, "data_batch_2")
    with open(p, "rb") as f:
        raw = f.read()
    with open(p, "wb") as f:
        f.write(raw[:100])
    with pytest.raises(DatasetError, match="data_batch_2: corrupt CIFAR batch"):
        load_dataset("cifar10", root=tmp_path)
    with open(p, "wb") as f:
        pickle.dump({"data": np.zeros((4, 100), np.uint8), "labels": [0] * 4}, f)
    with pytest.raises(DatasetError, match=r"\[N, 3072\]"):
        load_dataset("cifar10", root=tmp_path)


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("imagenet")
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("synthetic", val_size=2000)
    with pytest.raises(ValueError, match="val_size"):
        load_dataset("synthetic", val_size=-1)


# -------------------------------------------------------------------------------------- split
def test_val_split_seeded_disjoint_and_test_untouched():
    cfg = dict(train_size=300, test_size=50)
    a = load_dataset("synthetic", val_size=60, seed=1, synthetic=cfg)
    b = load_dataset("synthetic", val_size=60, seed=1, synthetic=cfg)
    c = load_dataset("synthetic", val_size=60, seed=2, synthetic=cfg)
    assert torch.equal(a.val.images, b.val.images) and torch.equal(a.train.labels, b.train.labels)
    assert not torch.equal(a.val.images, c.val.images)
    assert torch.equal(a.test.images, c.test.images)

    idx = torch.arange(300)
    base = Split(idx.view(300, 1, 1, 1).to(torch.uint8).repeat(1, 1, 1, 2), idx)  # label = position
    tr, va = holdout(base, 60, seed=1)
    assert len(set(tr.labels.tolist()) & set(va.labels.tolist())) == 0
    assert sorted(tr.labels.tolist() + va.labels.tolist()) == list(range(300))
    assert len(holdout(base, 0)[1]) == 0


def test_synthetic_deterministic_and_configurable():
    cfg = SyntheticConfig(train_size=50, test_size=20, num_classes=4, channels=3, image_size=12, val_size=10)
    a, b = load_dataset("synthetic", synthetic=cfg), load_dataset("synthetic", synthetic=cfg)
    assert torch.equal(a.train.images, b.train.images) and torch.equal(a.test.labels, b.test.labels)
    assert (a.num_classes, a.in_channels, a.image_size, len(a.train), len(a.val), len(a.test)) == (4, 3, 12, 40, 10, 20)
    other = load_dataset("synthetic", synthetic=SyntheticConfig(**{**cfg.__dict__, "seed": 1}))
    assert not torch.equal(a.train.images, other.train.images)


# -------------------------------------------------------------------------------------- loader
def _split(n=37, c=3, s=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return Split(torch.randint(0, 256, (n, c, s, s), generator=g, dtype=torch.uint8), torch.arange(n))


def test_loader_batches_normalisation_and_len():
    sp = _split()
    mean, std = (0.1, 0.2, 0.3), (0.5, 0.25, 0.2)
    ld = DeviceLoader(sp, 10, mean=mean, std=std)
    assert len(ld) == 4 and len(DeviceLoader(sp, 10, mean=mean, std=std, drop_last=True)) == 3
    xs, ys = zip(*ld)
    assert [y.shape[0] for y in ys] == [10, 10, 10, 7]
    x = torch.cat(xs)
    assert x.dtype == torch.float32 and torch.equal(torch.cat(ys), sp.labels)
    ref = (sp.images.float() / 255 - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)
    torch.testing.assert_close(x, ref, atol=1e-5, rtol=1e-5)
    cl = next(iter(DeviceLoader(sp, 10, mean=mean, std=std, channels_last=True)))[0]
    assert cl.is_contiguous(memory_format=torch.channels_last)
    with pytest.raises(ValueError):
        DeviceLoader(sp, 0, mean=mean, std=std)


def test_crop_flip_matches_per_image_reference():
    x = torch.randint(0, 256, (6, 2, 5, 7), dtype=torch.uint8)
    dy, dx = torch.tensor([0, 8, 3, 4, 1, 6]), torch.tensor([8, 0, 2, 4, 7, 5])
    flip = torch.tensor([True, False, True, False, False, True])
    out = crop_flip(x, dy, dx, flip, 4)
    for i in range(6):
        p = F.pad(x[i], (4, 4, 4, 4))[:, dy[i]:dy[i] + 5, dx[i]:dx[i] + 7]
        assert torch.equal(out[i], p.flip(-1) if flip[i] else p)


def _is_crop(img, orig, pad, flips):
    p = F.pad(orig.float(), (pad,) * 4)
    h, w = orig.shape[-2:]
    cands = [p[:, a:a + h, b:b + w] for a in range(2 * pad + 1) for b in range(2 * pad + 1)]
    return any(torch.equal(img, c) or (flips and torch.equal(img, c.flip(-1))) for c in cands)


@pytest.mark.parametrize("augment", ["crop", "crop_flip"])
def test_augmentation_shapes_kinds_and_determinism(augment):
    sp = _split(n=24, c=1, s=6)
    def mk(seed):
        return DeviceLoader(sp, 8, mean=(0.0,), std=(1 / 255,), shuffle=True, augment=augment, seed=seed)

    a, b = list(mk(5)), list(mk(5))
    assert all(torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b))
    assert any(not torch.equal(x1, x2) for (x1, _), (x2, _) in zip(a, list(mk(6))))
    assert all(x.shape == (8, 1, 6, 6) for x, _ in a)
    # With mean 0 and std 1/255 the loader returns raw pixel values: each is a crop of its source.
    flipped_somewhere = False
    for x, y in a:
        for img, lab in zip(x, y):
            orig = sp.images[lab]
            assert _is_crop(img, orig, 4, flips=augment == "crop_flip")
            flipped_somewhere |= not _is_crop(img, orig, 4, flips=False)
    assert flipped_somewhere == (augment == "crop_flip")


def test_loader_state_dict_resumes_the_same_order():
    sp = _split(n=30)
    ld = DeviceLoader(sp, 7, mean=(0.5,), std=(0.5,), shuffle=True, augment="crop_flip", seed=11)
    list(ld)  # epoch 1
    state = ld.state_dict()
    epoch2 = list(ld)
    other = DeviceLoader(sp, 7, mean=(0.5,), std=(0.5,), shuffle=True, augment="crop_flip", seed=99)
    other.load_state_dict(state)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(epoch2, other))
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(epoch2, list(ld)))  # epochs differ


def test_dataset_split_and_to():
    ds = load_dataset("synthetic", synthetic=dict(train_size=64, test_size=16, val_size=16))
    assert ds.split("test") is ds.test and ds.augment == "crop"
    assert ds.to("cpu").device.type == "cpu"
    with pytest.raises(ValueError):
        ds.split("holdout")
