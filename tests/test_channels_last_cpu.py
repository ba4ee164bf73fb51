"""Channels_last on a CPU: a pruned network's strided 1x1 shortcut must train correctly.

oneDNN's jit 1x1 backward-weights kernel writes past its workspace for strided nhwc inputs with fewer
channels than its register block (uxlfoundation/oneDNN#6035): wrong weight gradients with several
threads, a hang, or an abort with one. ``fastweedout.model.wrn.ShortcutConv`` runs such convolutions
at unit stride on the subsampled input. The gradient checks run in a subprocess, so that the abort this
guards against fails one test instead of killing the session.
"""

import subprocess
import sys
import textwrap

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastweedout.model.wrn import ShortcutConv, WideResNet
from tolerances import TOL

# Narrow node sets before both strided shortcuts (stage1 -> stage2, stage2 -> stage3): 6 and 3 < 8.
WIDTHS = {"stage1": 6, "stage1.block0": 5, "stage2": 3, "stage2.block0": 7, "stage3": 11, "stage3.block0": 4}

GRADIENTS_SCRIPT = textwrap.dedent("""
    import sys, torch
    torch.set_num_threads(int(sys.argv[1]))
    from fastweedout.model.wrn import WideResNet
    from fastweedout.training.loop import criterion
    widths = {widths!r}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 1, 28, 28, generator=g)
    y = torch.randint(0, 10, (32,), generator=g)
    torch.manual_seed(0)
    ref = WideResNet(10, 1, num_classes=10, in_channels=1, widths=widths).double().train()
    grads = {{}}
    for layout in ("nchw", "channels_last"):
        net = WideResNet(10, 1, num_classes=10, in_channels=1, widths=widths).train()
        net.load_state_dict({{k: v.float() for k, v in ref.state_dict().items()}})
        xi = x
        if layout == "channels_last":
            net = net.to(memory_format=torch.channels_last)
            xi = x.contiguous(memory_format=torch.channels_last)
        criterion(net(xi), y).backward()
        grads[layout] = {{n: p.grad for n, p in net.named_parameters()}}
    criterion(ref(x.double()), y).backward()
    worst = 0.0
    for n, p in ref.named_parameters():
        for layout in grads:
            err = ((grads[layout][n].double() - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-30)).item()
            if err > worst:
                worst, where = err, (layout, n)
    print(f"worst {{worst:.3e}} {{where}}")
""").format(widths=WIDTHS)


@pytest.mark.parametrize("threads", [1, 2])
def test_channels_last_gradients_of_a_narrow_pruned_network_match_float64(threads):
    """Every parameter's gradient, in NCHW and in channels_last, against the float64 network."""
    try:
        out = subprocess.run([sys.executable, "-c", GRADIENTS_SCRIPT, str(threads)], capture_output=True,
                             text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail("the channels_last backward hung (oneDNN#6035: the strided 1x1 backward-weights kernel)")
    assert out.returncode == 0, (f"the channels_last backward died (rc {out.returncode}; oneDNN#6035?):\n"
                                 f"{out.stderr[-2000:]}")
    worst = float(out.stdout.split()[1])
    assert worst < TOL[torch.float32][1] * 10, out.stdout


@pytest.mark.parametrize("hw", [28, 7, 4])
@pytest.mark.parametrize("stride", [1, 2])
def test_strided_pointwise_conv_is_the_same_function(hw, stride):
    conv = ShortcutConv(6, 13, stride).double()
    x = torch.randn(3, 6, hw, hw, dtype=torch.float64)
    want = F.conv2d(x, conv.weight, stride=stride)
    got = conv.to(memory_format=torch.channels_last)(x.contiguous(memory_format=torch.channels_last))
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, atol=TOL[torch.float64][0], rtol=TOL[torch.float64][1])


def test_nchw_shortcut_is_the_plain_convolution_bitwise():
    conv = ShortcutConv(6, 13, 2)
    x = torch.randn(2, 6, 9, 9)
    assert torch.equal(conv(x), nn.Conv2d.forward(conv, x))


def test_shortcut_is_a_module_hooks_see():
    net = WideResNet(10, 1, num_classes=10, in_channels=1, widths=WIDTHS).to(memory_format=torch.channels_last)
    seen = []
    for b in net.blocks():
        if b.shortcut is not None:
            b.shortcut.register_forward_hook(lambda m, i, o: seen.append(tuple(o.shape)))
    net(torch.randn(2, 1, 28, 28).contiguous(memory_format=torch.channels_last))
    assert seen == [(2, 3, 14, 14), (2, 11, 7, 7)]
