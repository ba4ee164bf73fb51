"""Masked Wide ResNet (WRN-d-k, CIFAR variant, pre-activation) with node masks and physical pruning.

The network is described once, in :meth:`WideResNet.walk`, in terms of a *backend* that supplies
conv / act / add / dropout / head.  The plain masked forward, the folded and compacted population
engines and the FLOP counter are all backends of that one walk, so they cannot drift apart.
"""

from __future__ import annotations

import math
import re
from collections import OrderedDict
from collections.abc import Callable, Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fastweedout.masks import Masks, check_mask_names
from fastweedout.model.backend import BN_MODES, MaskedBackend


class ShortcutConv(nn.Conv2d):
    """The 1x1 projection shortcut. A strided one in channels_last on a CPU runs at unit stride on the
    subsampled input, the same function (a 1x1 kernel without padding reads only the strided pixels):
    oneDNN's jit 1x1 backward-weights kernel for strided nhwc inputs with fewer channels than its
    register block (8 on AVX2) writes past its workspace, giving wrong weight gradients, a hang or a
    crash (uxlfoundation/oneDNN#6035), and a pruned network's shortcut has such widths. A module still,
    so hooks and tracers (Torch-Pruning's DepGraph) see it."""

    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__(cin, cout, 1, stride, 0, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        s = self.stride
        # Strides, not is_contiguous(memory_format=...), which vmap does not answer.
        nhwc = x.dim() == 4 and x.size(1) > 1 and x.size(2) * x.size(3) > 1 and x.stride(1) == 1
        if s != (1, 1) and nhwc and x.device.type == "cpu":
            return F.conv2d(x[:, :, ::s[0], ::s[1]], self.weight, self.bias, 1, 0, self.dilation, self.groups)
        return super().forward(x)


class Block(nn.Module):
    """Pre-activation basic block: BN-ReLU-conv3x3-BN-ReLU-[dropout]-conv3x3 (+ 1x1 shortcut)."""

    def __init__(self, in_set: str, inner_set: str, out_set: str, widths: Mapping[str, int],
                 stride: int, dropout: float):
        super().__init__()
        self.in_set, self.inner_set, self.out_set = in_set, inner_set, out_set
        self.stride = stride
        self.dropout = dropout
        cin, cmid, cout = widths[in_set], widths[inner_set], widths[out_set]
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cmid, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cmid)
        self.conv2 = nn.Conv2d(cmid, cout, 3, 1, 1, bias=False)
        # A different node set on the output means different channels: project the shortcut.
        self.shortcut = ShortcutConv(cin, cout, stride) if in_set != out_set else None


class WideResNet(nn.Module):
    """WRN-depth-width (Zagoruyko & Komodakis 2016), CIFAR variant, with node masks.

    ``model(x, masks)`` multiplies ``mask * relu(bn(x))`` for every consumer of a node set, which is
    exactly equivalent to deleting the masked channels (see :meth:`prune`).
    """

    def __init__(self, depth: int = 16, width: int = 4, num_classes: int = 10, in_channels: int = 3,
                 dropout: float = 0.0, *, widths: Mapping[str, int] | None = None):
        super().__init__()
        if (depth - 4) % 6 != 0 or depth < 10:
            raise ValueError(f"WRN depth must be 6n+4 with n >= 1 (10, 16, 22, 28, 40, ...), got {depth}")
        if width < 1:
            raise ValueError(f"WRN width factor must be >= 1, got {width}")
        if num_classes < 1 or in_channels < 1:
            raise ValueError("num_classes and in_channels must be >= 1")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.depth, self.width = depth, width
        self.num_classes, self.in_channels, self.dropout = num_classes, in_channels, dropout
        n = (depth - 4) // 6
        stage_widths = [16 * width, 32 * width, 64 * width]
        full: OrderedDict[str, int] = OrderedDict()
        # When the stem already has the first stage's width, it feeds the residual stream directly
        # and is part of that node set (no projection shortcut in the first block).
        stem_set = "stage1" if stage_widths[0] == 16 else "stem"
        if stem_set == "stem":
            full["stem"] = 16
        for s, w in enumerate(stage_widths, start=1):
            full[f"stage{s}"] = w
            for b in range(n):
                full[f"stage{s}.block{b}"] = w
        if widths is not None:  # a pruned network: same node sets, fewer channels
            if set(widths) != set(full):
                raise ValueError(f"widths must name exactly the node sets {list(full)}, got {list(widths)}")
            for k, v in widths.items():
                if int(v) < 1:
                    raise ValueError(f"node set {k!r} needs at least one channel, got {v}")
            full = OrderedDict((k, int(widths[k])) for k in full)
        self._node_layers = full
        self.stem_set = stem_set
        self.stem = nn.Conv2d(in_channels, full[stem_set], 3, 1, 1, bias=False)
        stages = []
        prev = stem_set
        for s in range(1, 4):
            blocks = []
            for b in range(n):
                stride = 2 if (s > 1 and b == 0) else 1
                blocks.append(Block(prev, f"stage{s}.block{b}", f"stage{s}", full, stride, dropout))
                prev = f"stage{s}"
            stages.append(nn.Sequential(*blocks))
        self.stage1, self.stage2, self.stage3 = stages
        self.bn = nn.BatchNorm2d(full["stage3"])
        self.fc = nn.Linear(full["stage3"], num_classes)
        self.reset_parameters()

    # ----------------------------------------------------------------------------------- structure
    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        """He-normal (fan-in, ReLU gain) for convs and the linear layer; BN weight 1, biases 0."""
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                fan_in = m.weight[0].numel()
                with torch.no_grad():
                    m.weight.normal_(0.0, math.sqrt(2.0 / fan_in), generator=generator)
                    if m.bias is not None:
                        m.bias.zero_()
            elif isinstance(m, nn.BatchNorm2d):
                m.reset_parameters()

    def node_layers(self) -> OrderedDict[str, int]:
        """Ordered mapping node-set name -> channel count."""
        return OrderedDict(self._node_layers)

    def blocks(self):
        for stage in (self.stage1, self.stage2, self.stage3):
            yield from stage

    @property
    def config(self) -> dict:
        return dict(depth=self.depth, width=self.width, num_classes=self.num_classes,
                    in_channels=self.in_channels, dropout=self.dropout)

    # ------------------------------------------------------------------------------------ the walk
    def walk(self, be, x: Tensor) -> Tensor:
        """The network, once, over a backend (:class:`fastweedout.model.backend.Backend`)."""
        x = be.stem(x, self.stem, self.stem_set)
        for blk in self.blocks():
            o = be.act(x, blk.bn1, blk.in_set)
            sc = x if blk.shortcut is None else be.conv(o, blk.shortcut, blk.in_set, blk.out_set)
            h = be.conv_act(o, blk.conv1, blk.bn2, blk.in_set, blk.inner_set)
            h = be.dropout(h, blk.dropout)
            h = be.conv(h, blk.conv2, blk.inner_set, blk.out_set)
            x = be.add(h, sc)
        o = be.act(x, self.bn, "stage3")
        return be.head(o, self.fc, "stage3")

    def forward(self, x: Tensor, masks: Mapping[str, Tensor] | None = None, *, bn: str | None = None) -> Tensor:
        """Logits of one (optionally masked) network.

        masks: one member's mapping node-set -> bool ``[C]`` (None: dense).
        bn: None uses the module's own BN behaviour (train/eval); ``"batch"`` normalises with the
        batch statistics without touching the running buffers; ``"running"`` uses running statistics.
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected images [B, {self.in_channels}, H, W] ({self.in_channels} input channels), "
                             f"got {tuple(x.shape)}")
        if bn is not None and bn not in BN_MODES:
            raise ValueError(f"bn must be one of {BN_MODES} or None, got {bn!r}")
        if masks is not None:
            masks = self.check_member_masks(masks, device=x.device, dtype=x.dtype)
        return self.walk(MaskedBackend(masks, bn, self.training), x)

    # ------------------------------------------------------------------------------- mask checking
    def check_member_masks(self, masks: Mapping[str, Tensor], device=None, dtype=None) -> dict[str, Tensor]:
        """Validate one member's masks (bool ``[C]`` per node set) and return them as float multipliers."""
        if isinstance(masks, Masks):
            if masks.population != 1:
                raise ValueError(f"model(x, masks) takes one member; got a population of {masks.population} "
                                 "(use masks.member(i) or score_population)")
            masks = masks.member(0)
        check_mask_names(self.node_layers(), masks)
        out = {}
        for name, c in self._node_layers.items():
            m = masks[name]
            if not isinstance(m, Tensor) or m.dtype != torch.bool:
                raise ValueError(f"mask {name!r} must be a bool tensor, got "
                                 f"{m.dtype if isinstance(m, Tensor) else type(m).__name__}")
            if tuple(m.shape) != (c,):
                raise ValueError(f"mask {name!r} must have shape [{c}], got {list(m.shape)}")
            if not bool(m.any()):
                raise ValueError(f"mask {name!r} switches off every node; at least one must stay live")
            out[name] = m.to(device=device, dtype=dtype or torch.float32)
        return out

    # ------------------------------------------------------------------------------------- pruning
    @torch.no_grad()
    def prune(self, masks: Mapping[str, Tensor]) -> WideResNet:
        """A physically smaller dense WRN holding only the live channels (weights, BN state copied).

        It computes the same function as ``self(x, masks)`` in both BN modes and trains normally.
        """
        fm = self.check_member_masks(masks)
        idx = {k: torch.nonzero(v > 0).flatten() for k, v in fm.items()}
        widths = {k: int(v.numel()) for k, v in idx.items()}
        ref = self.stem.weight
        small = WideResNet(self.depth, self.width, self.num_classes, self.in_channels, self.dropout,
                           widths=widths).to(device=ref.device, dtype=ref.dtype)
        small.train(self.training)
        dev_idx = {k: v.to(ref.device) for k, v in idx.items()}

        def conv(dst: nn.Conv2d, src: nn.Conv2d, out_set: str, in_set: str | None):
            w = src.weight.index_select(0, dev_idx[out_set])
            if in_set is not None:
                w = w.index_select(1, dev_idx[in_set])
            dst.weight.copy_(w)

        def bn(dst: nn.BatchNorm2d, src: nn.BatchNorm2d, node_set: str):
            i = dev_idx[node_set]
            for name in ("weight", "bias", "running_mean", "running_var"):
                getattr(dst, name).copy_(getattr(src, name).index_select(0, i))
            dst.num_batches_tracked.copy_(src.num_batches_tracked)
            dst.momentum, dst.eps = src.momentum, src.eps

        conv(small.stem, self.stem, self.stem_set, None)
        for b_small, b in zip(small.blocks(), self.blocks()):
            bn(b_small.bn1, b.bn1, b.in_set)
            conv(b_small.conv1, b.conv1, b.inner_set, b.in_set)
            bn(b_small.bn2, b.bn2, b.inner_set)
            conv(b_small.conv2, b.conv2, b.out_set, b.inner_set)
            if b.shortcut is not None:
                conv(b_small.shortcut, b.shortcut, b.out_set, b.in_set)
        bn(small.bn, self.bn, "stage3")
        small.fc.weight.copy_(self.fc.weight.index_select(1, dev_idx["stage3"]))
        small.fc.bias.copy_(self.fc.bias)
        return small


# ------------------------------------------------------------------------------------ registry
_MODELS: dict[str, Callable[..., WideResNet]] = {}
_NAME = re.compile(r"^wrn[_-](\d+)[_-](\d+)$")


def register_model(name: str, depth: int, width: int) -> None:
    _MODELS[name] = lambda **kw: WideResNet(depth, width, **kw)


for _d, _k in [(10, 1), (10, 2), (16, 1), (16, 2), (16, 4), (16, 8), (22, 2), (22, 4), (28, 2),
               (28, 10), (40, 4)]:
    register_model(f"wrn_{_d}_{_k}", _d, _k)


def parse_model_name(name: str) -> tuple[int, int]:
    """(depth, width) of ``wrn_<depth>_<width>`` (``WRN-28-10`` also works); ValueError otherwise."""
    m = _NAME.match(str(name).lower().replace("-", "_"))
    if m is None:
        raise ValueError(f"unknown model {name!r}; use 'wrn_<depth>_<width>', e.g. wrn_10_1, wrn_16_4, wrn_28_10")
    depth, width = int(m.group(1)), int(m.group(2))
    if depth < 10 or (depth - 4) % 6 or width < 1:
        raise ValueError(f"model {name!r}: WRN depth must be 6n+4 >= 10 (10, 16, 22, 28, 40, ...) and width >= 1")
    return depth, width


def create_model(name: str, **kwargs) -> WideResNet:
    """``create_model("wrn_28_10", num_classes=100)``; any ``wrn_<depth>_<width>`` is accepted."""
    key = str(name).lower().replace("-", "_")
    if key in _MODELS:
        return _MODELS[key](**kwargs)
    depth, width = parse_model_name(name)
    return WideResNet(depth, width, **kwargs)


def list_models() -> list[str]:
    return sorted(_MODELS)
