"""Datasets held as uint8 tensors and a seeded validation split.

Real datasets are read from torchvision's on-disk layouts (CIFAR pickle batches, MNIST-like IDX
files) with small readers of our own: torchvision's classes insist on the official checksums, which
small test files written in the same format cannot match, so they are used for their layout
constants and their download only. Fashion-MNIST is also read from the Debian package's directory.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
import struct
from collections.abc import Mapping
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

DATASETS = ("cifar10", "cifar100", "mnist", "fashion-mnist", "synthetic")
AUGMENTATIONS = ("crop_flip", "crop", "none")

# Per-channel mean/std of the full official training sets (the usual constants).
_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion-mnist": ((0.2860,), (0.3530,)),
}

# Directories that distribution packages install datasets into (searched when no root is given).
SYSTEM_DIRS = {
    "fashion-mnist": ["/usr/share/datasets/fashion-mnist"],
    "mnist": ["/usr/share/datasets/mnist"],
}
DATA_ROOT_ENV = "FASTWEEDOUT_DATA"


_ALIASES = {"cifar-10": "cifar10", "cifar-100": "cifar100", "fashionmnist": "fashion-mnist",
            "fmnist": "fashion-mnist"}


def dataset_key(name: str) -> str:
    """The canonical dataset name (``FashionMNIST`` -> ``fashion-mnist``); ValueError when unknown."""
    key = str(name).lower().replace("_", "-")
    key = _ALIASES.get(key, key)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; choose one of {list(DATASETS)}")
    return key


class DatasetError(ValueError):
    """A dataset that is missing, incomplete or corrupt; the message says where we looked and what to do."""


# ------------------------------------------------------------------------------------ containers
@dataclass
class Split:
    """Images ``uint8 [N, C, H, W]`` and labels ``int64 [N]``."""

    images: Tensor
    labels: Tensor

    def __post_init__(self):
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise ValueError(f"images must be uint8 [N, C, H, W], got {self.images.dtype} {list(self.images.shape)}")
        if self.labels.dim() != 1 or self.labels.shape[0] != self.images.shape[0]:
            raise ValueError(f"labels must be [N] with N = {self.images.shape[0]}, got {list(self.labels.shape)}")
        self.labels = self.labels.long()

    def __len__(self) -> int:
        return self.images.shape[0]

    @property
    def device(self) -> torch.device:
        return self.images.device

    def to(self, device) -> Split:
        return Split(self.images.to(device), self.labels.to(device))

    def subset(self, index: Tensor) -> Split:
        index = index.to(self.images.device)
        return Split(self.images.index_select(0, index), self.labels.index_select(0, index))


@dataclass
class Dataset:
    """A dataset with its train / val / test splits (val is held out of the official training set)."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    augment: str  # what training augmentation suits it: "crop_flip" | "crop" | "none"
    source: str = ""  # where it was read from
    classes: list[str] | None = None

    @property
    def device(self) -> torch.device:
        return self.train.device

    def to(self, device) -> Dataset:
        return replace(self, train=self.train.to(device), val=self.val.to(device), test=self.test.to(device))

    def split(self, name: str) -> Split:
        if name not in ("train", "val", "test"):
            raise ValueError(f"split must be 'train', 'val' or 'test', got {name!r}")
        return getattr(self, name)


@dataclass
class SyntheticConfig:
    """A deterministic, learnable toy set: one smooth random pattern per class, random contrast and
    shift, plus pixel noise. Its own ``seed`` fixes the images; the split seed only fixes the split."""

    train_size: int = 2000
    test_size: int = 500
    num_classes: int = 10
    channels: int = 1
    image_size: int = 16
    val_size: int = 200  # used when load_dataset gets val_size=None
    noise: float = 0.5  # pixel noise std relative to the pattern's std
    max_shift: int = 2
    seed: int = 0

    def __post_init__(self):
        for f in ("train_size", "test_size", "num_classes", "channels", "image_size"):
            if int(getattr(self, f)) < 1:
                raise ValueError(f"synthetic {f} must be >= 1, got {getattr(self, f)}")
        if self.num_classes < 2:
            raise ValueError("synthetic num_classes must be >= 2")
        if self.noise < 0 or self.max_shift < 0 or self.val_size < 0:
            raise ValueError("synthetic noise, max_shift and val_size must be >= 0")


# ------------------------------------------------------------------------------------- loading
def default_roots() -> list[str]:
    """Where datasets are looked for when no root is given: $FASTWEEDOUT_DATA, then ./data."""
    roots = []
    if os.environ.get(DATA_ROOT_ENV):
        roots.append(os.path.expanduser(os.environ[DATA_ROOT_ENV]))
    roots.append(os.path.abspath("data"))
    return roots


def load_dataset(name: str, root: str | os.PathLike | None = None, val_size: int | None = None, seed: int = 0,
                 download: bool = False, device=None, *,
                 synthetic: SyntheticConfig | Mapping | None = None) -> Dataset:
    """Load ``cifar10``, ``cifar100``, ``mnist``, ``fashion-mnist`` or ``synthetic``.

    root: the torchvision root (``<root>/cifar-10-batches-py``, ``<root>/FashionMNIST/raw`` ...; a
    flat directory of IDX files also works). None: :func:`default_roots` and, for Fashion-MNIST, the
    Debian package's ``/usr/share/datasets/fashion-mnist``. download: fetch through torchvision into
    root (or the first default root) when not found. val_size: images held out of the training set
    by a permutation seeded with ``seed`` (None: 5000, or the synthetic config's ``val_size``).
    Raises :class:`DatasetError` when the data is missing or corrupt.
    """
    key = dataset_key(name)
    if key == "synthetic":
        cfg = synthetic if isinstance(synthetic, SyntheticConfig) else SyntheticConfig(**(synthetic or {}))
        (xtr, ytr), (xte, yte) = make_synthetic(cfg)
        # Statistics of the generated training images (there are no published constants).
        f = xtr.float().div_(255)
        mean = tuple(float(v) for v in f.mean(dim=(0, 2, 3)))
        std = tuple(max(float(v), 1e-3) for v in f.std(dim=(0, 2, 3)))
        info = dict(num_classes=cfg.num_classes, mean=mean, std=std, augment="crop",
                    source=f"synthetic {cfg}", classes=None)
        vs = cfg.val_size if val_size is None else val_size
    else:
        if synthetic is not None:
            raise ValueError("the synthetic config only applies to dataset 'synthetic'")
        reader = _read_cifar if key.startswith("cifar") else _read_idx_dataset
        (xtr, ytr), (xte, yte), source, classes = reader(key, root, download)
        mean, std = _STATS[key]
        info = dict(num_classes=100 if key == "cifar100" else 10, mean=mean, std=std,
                    augment="crop_flip" if key.startswith("cifar") else "crop", source=source, classes=classes)
        vs = 5000 if val_size is None else val_size
    train, val = holdout(Split(xtr, ytr), vs, seed)
    ds = Dataset(name=key, train=train, val=val, test=Split(xte, yte), in_channels=xtr.shape[1],
                 image_size=xtr.shape[2], **info)
    return ds.to(device) if device is not None else ds


def holdout(split: Split, val_size: int, seed: int = 0) -> tuple[Split, Split]:
    """(train, val): ``val_size`` images picked by a permutation seeded with ``seed``; both keep file order."""
    n = len(split)
    if isinstance(val_size, bool) or not isinstance(val_size, int) or not 0 <= val_size < n:
        raise ValueError(f"val_size must be an integer in [0, {n}) (the training set has {n} images), got {val_size!r}")
    g = torch.Generator().manual_seed(int(seed))
    perm = torch.randperm(n, generator=g)
    val_idx, _ = perm[:val_size].sort()
    train_idx, _ = perm[val_size:].sort()
    return split.subset(train_idx), split.subset(val_idx)


def _get_help(key: str, root_hint: str) -> str:
    tv = {"cifar10": ("CIFAR10", "<root>/cifar-10-batches-py/{data_batch_1..5, test_batch}"),
          "cifar100": ("CIFAR100", "<root>/cifar-100-python/{train, test}"),
          "mnist": ("MNIST", "<root>/MNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]"),
          "fashion-mnist": ("FashionMNIST",
                            "<root>/FashionMNIST/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte[.gz]")}[key]
    lines = [f"How to get it: load_dataset({key!r}, root=..., download=True) (CLI: --download) fetches it "
             f"through torchvision.datasets.{tv[0]} into {root_hint}; or put the files in torchvision's layout "
             f"{tv[1]}."]
    if key == "fashion-mnist":
        lines.append("Offline on Debian/Ubuntu: sudo apt-get install dataset-fashion-mnist "
                     "(installs /usr/share/datasets/fashion-mnist, found automatically when no root is given).")
    if key in ("mnist", "fashion-mnist"):
        lines.append("A flat directory holding the four IDX files also works as root.")
    return "\n  ".join(lines)


def _roots(root) -> list[str]:
    return [os.fspath(root)] if root is not None else default_roots()


def _download(key: str, root: str) -> None:
    import torchvision.datasets as tvd  # only needed to download

    cls = {"cifar10": tvd.CIFAR10, "cifar100": tvd.CIFAR100, "mnist": tvd.MNIST,
           "fashion-mnist": tvd.FashionMNIST}[key]
    os.makedirs(root, exist_ok=True)
    try:
        cls(root, train=True, download=True)
        cls(root, train=False, download=True)
    except Exception as e:  # URLError, RuntimeError (checksum), OSError ...
        raise DatasetError(f"downloading {key} into {root} through torchvision.datasets.{cls.__name__} failed: "
                           f"{type(e).__name__}: {e}\n  {_get_help(key, root)}") from e


# --- CIFAR
_CIFAR = {
    "cifar10": ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"],
                "batches.meta", "label_names", 10),
    "cifar100": ("cifar-100-python", ["train"], ["test"], "meta", "fine_label_names", 100),
}


def _read_cifar(key: str, root, download: bool):
    folder, train_files, test_files, meta_file, meta_key, num_classes = _CIFAR[key]
    looked: list[str] = []

    def attempt(roots):
        for r in roots:
            d = os.path.join(r, folder)
            missing = [f for f in train_files + test_files if not os.path.isfile(os.path.join(d, f))]
            if missing:
                looked.append(f"{d}: " + ("directory does not exist" if not os.path.isdir(d)
                                          else f"missing {', '.join(missing)}"))
                continue
            train = _cat([_read_cifar_batch(os.path.join(d, f), num_classes) for f in train_files])
            test = _cat([_read_cifar_batch(os.path.join(d, f), num_classes) for f in test_files])
            return train, test, d, _read_cifar_meta(os.path.join(d, meta_file), meta_key)
        return None

    return _search(key, root, download, attempt, looked)


def _search(key: str, root, download: bool, attempt, looked: list[str]):
    """Try the candidate places; on a miss, download into the first root when asked and try it again."""
    roots = _roots(root)
    found = attempt(roots)
    if found is None and download:
        _download(key, roots[0])
        found = attempt(roots[:1])
    if found is not None:
        return found
    raise DatasetError(f"dataset {key!r} not found. Looked in:\n    " + "\n    ".join(dict.fromkeys(looked))
                       + f"\n  {_get_help(key, roots[0])}")


def _read_cifar_batch(path: str, num_classes: int) -> tuple[Tensor, Tensor]:
    try:
        with open(path, "rb") as f:
            entry = pickle.load(f, encoding="latin1")
        data = entry["data"]
        labels = entry["labels"] if "labels" in entry else entry["fine_labels"]
    except Exception as e:
        raise DatasetError(f"{path}: corrupt CIFAR batch ({type(e).__name__}: {e}); delete it and download again "
                           "(download=True)") from e
    try:
        x = torch.as_tensor(data)
        y = torch.as_tensor(list(labels), dtype=torch.long)
    except Exception as e:
        raise DatasetError(f"{path}: corrupt CIFAR batch (unreadable arrays: {e})") from e
    if x.dtype != torch.uint8 or x.dim() != 2 or x.shape[1] != 3 * 32 * 32 or x.shape[0] != y.shape[0]:
        raise DatasetError(f"{path}: corrupt CIFAR batch: expected uint8 data [N, 3072] and N labels, "
                           f"got {x.dtype} {list(x.shape)} and {y.shape[0]} labels")
    _check_labels(path, y, num_classes)
    return x.reshape(-1, 3, 32, 32).clone(), y


def _read_cifar_meta(path: str, key: str) -> list[str] | None:
    try:  # class names are a nicety: the data is usable without them
        with open(path, "rb") as f:
            return list(pickle.load(f, encoding="latin1")[key])
    except Exception:
        return None


# --- MNIST-like (IDX)
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
              "t10k-labels-idx1-ubyte")
_TV_CLASS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}
_CLASSES = {"mnist": [str(i) for i in range(10)],
            "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                              "Sneaker", "Bag", "Ankle boot"]}


def _idx_candidates(key: str, roots: list[str], system: bool) -> list[str]:
    dirs = []
    for r in roots:
        dirs += [os.path.join(r, _TV_CLASS[key], "raw"), os.path.join(r, key), r]
    if system:
        dirs += SYSTEM_DIRS.get(key, [])
    return list(dict.fromkeys(os.path.normpath(d) for d in dirs))


def _find_idx(d: str, stem: str) -> str | None:
    for name in (stem, stem + ".gz"):  # torchvision extracts; Debian ships .gz
        p = os.path.join(d, name)
        if os.path.isfile(p):
            return p
    return None


def _read_idx_dataset(key: str, root, download: bool):
    looked: list[str] = []

    def attempt(roots):
        # The distribution's directory is searched only when the caller named no root of their own.
        for d in _idx_candidates(key, roots, system=root is None):
            paths = [_find_idx(d, s) for s in _IDX_FILES]
            if None in paths:
                miss = [s + "[.gz]" for s, p in zip(_IDX_FILES, paths) if p is None]
                looked.append(f"{d}: " + ("directory does not exist" if not os.path.isdir(d)
                                          else f"missing {', '.join(miss)}"))
                continue
            xtr, ytr, xte, yte = (read_idx(p) for p in paths)
            for xp, yp, x, y in ((paths[0], paths[1], xtr, ytr), (paths[2], paths[3], xte, yte)):
                if x.dim() != 3:
                    raise DatasetError(f"{xp}: corrupt: expected 3-d image IDX data, got shape {list(x.shape)}")
                if y.dim() != 1 or y.shape[0] != x.shape[0]:
                    raise DatasetError(f"{yp}: corrupt: {list(y.shape)} labels for {x.shape[0]} images in {xp}")
                _check_labels(yp, y.long(), 10)
            if xtr.shape[1:] != xte.shape[1:]:
                raise DatasetError(f"{d}: train images {list(xtr.shape[1:])} and test images "
                                   f"{list(xte.shape[1:])} differ in size")
            return (xtr.unsqueeze(1), ytr.long()), (xte.unsqueeze(1), yte.long()), d, list(_CLASSES[key])
        return None

    return _search(key, root, download, attempt, looked)


_IDX_DTYPES = {0x08: torch.uint8}


def read_idx(path: str | os.PathLike) -> Tensor:
    """Read an IDX file (gzip-compressed when the name ends in .gz); uint8 data only, as in (Fashion-)MNIST."""
    path = os.fspath(path)
    try:
        with (gzip.open(path, "rb") if path.endswith(".gz") else open(path, "rb")) as f:
            raw = f.read()
    except (OSError, EOFError, gzip.BadGzipFile) as e:  # truncated or not gzip
        raise DatasetError(f"{path}: corrupt or unreadable ({type(e).__name__}: {e}); delete it and fetch it "
                           "again") from e
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES or not 1 <= raw[3] <= 4:
        raise DatasetError(f"{path}: not an IDX file of uint8 data (bad magic number {raw[:4].hex()})")
    ndim = raw[3]
    head = 4 + 4 * ndim
    if len(raw) < head:
        raise DatasetError(f"{path}: corrupt IDX file (truncated header)")
    dims = struct.unpack(f">{ndim}I", raw[4:head])
    if len(raw) - head != math.prod(dims):
        raise DatasetError(f"{path}: corrupt IDX file: header says {list(dims)} ({math.prod(dims)} bytes), "
                           f"the file holds {len(raw) - head} data bytes")
    return torch.frombuffer(bytearray(raw[head:]), dtype=torch.uint8).reshape(dims)


def write_idx(path: str | os.PathLike, data: Tensor) -> None:
    """Write uint8 data as an IDX file (gzip when the name ends in .gz); the format the readers take."""
    path = os.fspath(path)
    data = data.to(torch.uint8).contiguous().cpu()
    raw = bytes([0, 0, 0x08, data.dim()]) + struct.pack(f">{data.dim()}I", *data.shape) + data.numpy().tobytes()
    with (gzip.open(path, "wb") if path.endswith(".gz") else open(path, "wb")) as f:
        f.write(raw)


def _check_labels(path: str, y: Tensor, num_classes: int) -> None:
    if y.numel() and (int(y.min()) < 0 or int(y.max()) >= num_classes):
        raise DatasetError(f"{path}: corrupt labels: values in [{int(y.min())}, {int(y.max())}], "
                           f"expected [0, {num_classes})")


def _cat(parts):
    return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])


# --- synthetic
def make_synthetic(cfg: SyntheticConfig) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """((train images, labels), (test images, labels)) of the synthetic set, a pure function of ``cfg``."""
    g = torch.Generator().manual_seed(int(cfg.seed))
    c, s, k = cfg.channels, cfg.image_size, cfg.num_classes
    # Smooth class patterns: a coarse random grid upsampled, so crops and shifts keep them recognisable.
    coarse = torch.randn(k, c, 4, 4, generator=g)
    protos = F.interpolate(coarse, size=(s, s), mode="bilinear", align_corners=False)
    protos = (protos - protos.mean(dim=(1, 2, 3), keepdim=True)) / protos.std(dim=(1, 2, 3), keepdim=True)

    def draw(n: int):
        y = torch.randint(0, k, (n,), generator=g)
        contrast = 0.7 + 0.6 * torch.rand(n, 1, 1, 1, generator=g)
        x = protos[y] * contrast + cfg.noise * torch.randn(n, c, s, s, generator=g)
        if cfg.max_shift:
            shifts = torch.randint(-cfg.max_shift, cfg.max_shift + 1, (n, 2), generator=g)
            x = torch.stack([torch.roll(xi, (int(a), int(b)), dims=(1, 2)) for xi, (a, b) in zip(x, shifts)])
        return (128 + 40 * x).round().clamp(0, 255).to(torch.uint8), y

    return draw(cfg.train_size), draw(cfg.test_size)


__all__ = ["DATASETS", "Dataset", "DatasetError", "Split", "SyntheticConfig", "dataset_key", "default_roots",
           "holdout", "load_dataset", "make_synthetic", "read_idx", "write_idx"]
