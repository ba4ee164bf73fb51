"""A loader over a split kept whole on its device, with the augmentation done there in one gather."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from fastweedout.data.datasets import AUGMENTATIONS, Split


class DeviceLoader:
    """Batches of a split kept whole on its device: ``(float images normalised, int64 labels)``.

    The epoch's order and augmentation parameters are drawn at the start of each pass from one CPU
    ``torch.Generator`` (``state_dict``/``load_state_dict`` save and restore it, so a resumed run sees
    the same data) and moved to the device once; cropping (zero padding, as torchvision's
    ``RandomCrop(padding=4)``) and flipping are one batched gather on the device.
    """

    def __init__(self, split: Split, batch_size: int, *, mean, std, shuffle: bool = False,
                 augment: str = "none", padding: int = 4, drop_last: bool = False, channels_last: bool = False,
                 seed: int = 0, generator: torch.Generator | None = None, dtype: torch.dtype = torch.float32):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        if augment not in AUGMENTATIONS:
            raise ValueError(f"augment must be one of {AUGMENTATIONS}, got {augment!r}")
        if padding < 0:
            raise ValueError(f"padding must be >= 0, got {padding}")
        self.split, self.batch_size = split, batch_size
        self.shuffle, self.augment, self.padding = shuffle, augment, padding
        self.drop_last, self.channels_last, self.dtype = drop_last, channels_last, dtype
        c = split.images.shape[1]
        mean = torch.as_tensor(mean, dtype=torch.float32).flatten()
        std = torch.as_tensor(std, dtype=torch.float32).flatten()
        if mean.numel() not in (1, c) or std.numel() not in (1, c):
            raise ValueError(f"mean/std need 1 or {c} values, got {mean.numel()} and {std.numel()}")
        # x_norm = (x/255 - mean)/std = x * scale + shift: one fused multiply-add on the device.
        dev = split.device
        self._scale = (1.0 / (255.0 * std)).expand(c).reshape(1, c, 1, 1).to(dev)
        self._shift = (-mean / std).expand(c).reshape(1, c, 1, 1).to(dev)
        self.generator = generator if generator is not None else torch.Generator().manual_seed(int(seed))

    @property
    def device(self) -> torch.device:
        return self.split.device

    def __len__(self) -> int:
        n = len(self.split)
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    @property
    def num_samples(self) -> int:
        """Images yielded per pass (fewer than the split's when drop_last drops a partial batch)."""
        return min(len(self) * self.batch_size, len(self.split))

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state()}

    def load_state_dict(self, state: Mapping) -> None:
        self.generator.set_state(state["generator"])

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        n, b, dev = len(self.split), self.batch_size, self.device
        g = self.generator
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        aug = None
        if self.augment != "none":
            off = torch.randint(0, 2 * self.padding + 1, (2, n), generator=g)
            flip = (torch.rand(n, generator=g) < 0.5 if self.augment == "crop_flip"
                    else torch.zeros(n, dtype=torch.bool))
            aug = (off[0].to(dev), off[1].to(dev), flip.to(dev))
        order = order.to(dev)
        for i in range(len(self)):
            idx = order[i * b:(i + 1) * b]
            x = self.split.images.index_select(0, idx)
            y = self.split.labels.index_select(0, idx)
            if aug is not None:
                sl = slice(i * b, i * b + idx.shape[0])
                x = crop_flip(x, aug[0][sl], aug[1][sl], aug[2][sl], self.padding)
            yield self.normalize(x), y

    def normalize(self, x: Tensor) -> Tensor:
        """uint8 ``[B, C, H, W]`` -> normalised float (channels_last when asked)."""
        y = x.to(torch.float32).mul_(self._scale).add_(self._shift)
        if self.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        return y if self.dtype == torch.float32 else y.to(self.dtype)


def crop_flip(x: Tensor, dy: Tensor, dx: Tensor, flip: Tensor, padding: int) -> Tensor:
    """Per-image crop of the zero-padded batch at offsets (dy, dx) in [0, 2*padding], then optional
    horizontal flip: one gather for the whole batch. x: ``[B, C, H, W]``; dy, dx, flip: ``[B]``."""
    bsz, c, h, w = x.shape
    if padding:
        x = F.pad(x, (padding, padding, padding, padding))
    dev = x.device
    rows = dy.view(-1, 1) + torch.arange(h, device=dev)
    cols = dx.view(-1, 1) + torch.arange(w, device=dev)
    cols = torch.where(flip.view(-1, 1), cols.flip(1), cols)
    bi = torch.arange(bsz, device=dev).view(-1, 1, 1, 1)
    ci = torch.arange(c, device=dev).view(1, -1, 1, 1)
    return x[bi, ci, rows.view(bsz, 1, h, 1), cols.view(bsz, 1, 1, w)]


__all__ = ["AUGMENTATIONS", "DeviceLoader", "crop_flip"]
