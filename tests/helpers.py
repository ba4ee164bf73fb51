import torch
from torch import nn

import fastweedout as fw


def randomize_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BN affine parameters and running statistics (a fresh model has identity BN)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.bias.copy_(torch.randn(m.num_features, generator=g))
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model


def batch(model: fw.WideResNet, n: int = 6, h: int = 12, w: int = 10, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, model.in_channels, h, w, generator=g)
    y = torch.randint(0, model.num_classes, (n,), generator=g)
    return x, y


def state_snapshot(model: nn.Module):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.training


# The command line on tiny settings (the synthetic set, CPU): shared by the CLI tests.
CLI_DATA = ["--dataset", "synthetic", "--train-subset", "128", "--no-progress", "--device", "cpu"]
CLI_SEARCH = ["--population", "4", "--generations", "2", "--search-batch", "32"]


def snapshot(path) -> dict:
    """Every file under path and its bytes: to prove that nothing was written or overwritten."""
    import os

    out = {}
    for root, _, files in os.walk(path):
        for f in files:
            p = os.path.join(root, f)
            with open(p, "rb") as fh:
                out[p] = fh.read()
    return out


def run_dirs(results) -> list:
    import os

    return sorted(d for d in os.listdir(results) if not d.startswith("."))
