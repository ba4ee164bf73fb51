"""The analytic FLOP counter (fastweedout.cost.flops) against torch's FlopCounterMode and a hand count.

Convention everywhere: 1 multiply-add = 2 FLOPs, convolutions and linear layers only (FlopCounterMode's).
"""

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import fastweedout as fw
from fastweedout.cost.flops import (
    CONVENTION,
    count_forward,
    counted_flops,
    forward_flops,
    train_step_flops,
    training_flops,
    useful_flops,
)
from fastweedout.engines.registry import scoring_flops
from fastweedout.engines.scoring import population_logits
from fastweedout.model.masked import MaskedNet
from helpers import batch, randomize_bn


def _measured(fn, *args, **kwargs) -> int:
    with FlopCounterMode(display=False) as fc:
        fn(*args, **kwargs)
    return int(fc.get_total_flops())


def _live(mask):
    return {k: int(v.sum()) for k, v in mask.items()}


def _train_step(net, x, y):
    """One forward + backward (what a training step computes; the optimizer adds no FLOPs)."""
    loss = F.cross_entropy(net(x), y)
    loss.backward()


MODELS = [(10, 1, 3, (12, 10)), (16, 2, 1, (8, 8)), (16, 4, 3, (32, 32)), (22, 1, 3, (9, 7))]


# ------------------------------------------------------------------------------------ hand count
def test_wrn_16_4_hand_count():
    """WRN-16-4 at 32x32, 3 input channels, 10 classes, counted by hand.

    Stem set: 16 channels (the first stage is 64 wide, so the stem is its own node set).
    N = (16-4)/6 = 2 blocks per stage; stage widths 64, 128, 256 at 32x32, 16x16, 8x8.
    A 3x3 conv cin->cout at HxW costs 2*cin*cout*9*H*W FLOPs; a 1x1 conv 2*cin*cout*H*W.

    stem       3->16   3x3 @32x32: 2*3*16*9*1024    =     884,736
    stage1 b0  16->64  3x3 @32x32: 2*16*64*9*1024   =  18,874,368
               64->64  3x3 @32x32: 2*64*64*9*1024   =  75,497,472
      shortcut 16->64  1x1 @32x32: 2*16*64*1024     =   2,097,152
    stage1 b1  2 x (64->64 3x3 @32x32)              = 150,994,944
    stage1                                          = 247,463,936
    stage2 b0  64->128 3x3 s2 @16x16: 2*64*128*9*256 = 37,748,736
               128->128 3x3 @16x16: 2*128*128*9*256 = 75,497,472
      shortcut 64->128 1x1 s2 @16x16: 2*64*128*256  =   4,194,304
    stage2 b1  2 x 75,497,472                       = 150,994,944
    stage2                                          = 268,435,456
    stage3     (same arithmetic: channels x2, positions /4)  = 268,435,456
    fc         2*256*10                             =       5,120
    total      884,736 + 247,463,936 + 2*268,435,456 + 5,120 = 785,224,704 FLOPs
               = 392.6 MMAC: the paper's "0.39 GMAC" for WRN-16-4.
    """
    stem = 2 * 3 * 16 * 9 * 32 * 32
    stage1 = 2 * 16 * 64 * 9 * 1024 + 2 * 64 * 64 * 9 * 1024 + 2 * 16 * 64 * 1024 + 2 * (2 * 64 * 64 * 9 * 1024)
    stage2 = 2 * 64 * 128 * 9 * 256 + 2 * 128 * 128 * 9 * 256 + 2 * 64 * 128 * 256 + 2 * (2 * 128 * 128 * 9 * 256)
    stage3 = 2 * 128 * 256 * 9 * 64 + 2 * 256 * 256 * 9 * 64 + 2 * 128 * 256 * 64 + 2 * (2 * 256 * 256 * 9 * 64)
    fc = 2 * 256 * 10
    assert (stem, stage1, stage2, stage3, fc) == (884_736, 247_463_936, 268_435_456, 268_435_456, 5_120)
    total = stem + stage1 + stage2 + stage3 + fc
    assert total == 785_224_704
    m = fw.create_model("wrn_16_4")
    c = count_forward(m, 32)
    assert c.total == total and c.stem == stem and c.head == fc
    assert forward_flops(m, (32, 32)) == total
    # Training step: forward + grad-input + grad-weight (3x), less the stem's grad-input.
    assert train_step_flops(m, 32) == 3 * total - stem
    assert abs(total / 2 - 0.39e9) / 0.39e9 < 0.01  # Zagoruyko & Komodakis: 0.39 GMAC


def test_wrn_28_10_matches_paper():
    m = fw.create_model("wrn_28_10")
    assert abs(forward_flops(m, 32) - 10.49e9) / 10.49e9 < 0.005  # 5.24 GMAC = 10.49 GFLOP
    assert sum(p.numel() for p in m.parameters()) == 36_479_194


# ------------------------------------------------------------------------- against FlopCounterMode
@pytest.mark.parametrize("depth,width,cin,hw", MODELS)
def test_dense_forward_matches_flop_counter(depth, width, cin, hw):
    m = fw.WideResNet(depth, width, num_classes=7, in_channels=cin)
    x = torch.randn(3, cin, *hw)
    assert _measured(m, x) == 3 * forward_flops(m, hw)


@pytest.mark.parametrize("depth,width,cin,hw", MODELS[:3])
def test_dense_training_step_matches_flop_counter(depth, width, cin, hw):
    m = fw.WideResNet(depth, width, num_classes=7, in_channels=cin).train()
    x, y = torch.randn(4, cin, *hw), torch.randint(0, 7, (4,))
    assert _measured(_train_step, m, x, y) == 4 * train_step_flops(m, hw)
    t = training_flops(m, hw)
    assert t["useful"] == t["executed"] == train_step_flops(m, hw)


@pytest.mark.parametrize("depth,width,eta,mode", [(10, 2, 0.5, "layerwise"), (16, 1, 0.3, "global"),
                                                  (16, 4, 0.8, "layerwise")])
def test_pruned_network_matches_flop_counter(depth, width, eta, mode):
    m = randomize_bn(fw.WideResNet(depth, width))
    mask = fw.sample_masks(m, 1, eta, mode, torch.Generator().manual_seed(3)).member(0)
    small = m.prune(mask)
    x, y = torch.randn(2, 3, 16, 12), torch.randint(0, 10, (2,))
    expect = forward_flops(m, (16, 12), _live(mask))
    assert forward_flops(small, (16, 12)) == expect
    assert _measured(small, x) == 2 * expect
    # Training the pruned network: executed = useful = the live step.
    small.train()
    assert _measured(_train_step, small, x, y) == 2 * train_step_flops(m, (16, 12), _live(mask))
    t = training_flops(m, (16, 12), mask)
    assert t["useful"] == t["executed"] == train_step_flops(small, (16, 12))


def test_masked_training_executes_the_dense_step():
    m = fw.WideResNet(10, 2).train()
    mask = fw.sample_masks(m, 1, 0.5, generator=torch.Generator().manual_seed(0)).member(0)
    net = MaskedNet(m, mask).train()
    x, y = torch.randn(2, 3, 8, 8), torch.randint(0, 10, (2,))
    t = training_flops(m, 8, mask, masked=True)
    assert _measured(_train_step, net, x, y) == 2 * t["executed"]
    assert t["executed"] == train_step_flops(m, 8)
    assert t["useful"] == train_step_flops(m.prune(mask), 8) < t["executed"]


def test_counted_flops_helper():
    m = fw.WideResNet(10, 1)
    x = torch.randn(2, 3, 8, 8)
    n, out = counted_flops(m, x)
    assert n == 2 * forward_flops(m, 8) and out.shape == (2, 10)
    assert "2 FLOPs" in CONVENTION


# --------------------------------------------------------------------- engines' executed FLOPs
ENGINE_CASES = [(10, 2, 0.0, "layerwise", 3), (10, 2, 0.5, "layerwise", 4), (16, 1, 0.4, "global", 3),
                (16, 4, 0.8, "layerwise", 2)]


@pytest.mark.parametrize("engine", ["loop", "folded", "compact"])
@pytest.mark.parametrize("depth,width,eta,mode,p", ENGINE_CASES)
@pytest.mark.parametrize("bn", ["batch", "running"])
def test_engine_executed_flops_match_flop_counter(engine, depth, width, eta, mode, p, bn):
    """scoring_flops(...)["executed"] is what FlopCounterMode sees over the engine's real computation."""
    m = randomize_bn(fw.WideResNet(depth, width))
    masks = fw.sample_masks(m, p, eta, mode, torch.Generator().manual_seed(1))
    x, _ = batch(m, n=3, h=8, w=6)
    counted, logits = counted_flops(population_logits, m, masks, x, engine, bn)
    assert logits.shape == (p, 3, 10)
    fl = scoring_flops(m, masks, 3, (8, 6), engine)
    assert counted == fl["executed"]
    assert fl["useful"] == 3 * useful_flops(m, masks, (8, 6))
    # Useful FLOPs are the live sub-networks': each member's pruned network counted by torch.
    pruned = sum(_measured(m.prune(masks.member(i)), x) for i in range(p))
    assert fl["useful"] == pruned
    if engine == "loop":
        assert fl["executed"] == p * 3 * forward_flops(m, (8, 6))
    if engine == "compact" and mode == "layerwise":
        # Layerwise: every member is as wide as its live channels, stem aside.
        stem = count_forward(m, (8, 6)).stem
        dense_stem = p * 3 * stem  # useful counts each member's stem; compact runs it once, dense
        live_stem = sum(3 * count_forward(m, (8, 6), _live(masks.member(i))).stem for i in range(p))
        assert fl["executed"] == fl["useful"] - live_stem + 3 * stem
        assert dense_stem >= live_stem


def test_scoring_flops_fall_with_sparsity_for_compact_only():
    m = fw.WideResNet(16, 2)
    prev = None
    for eta in (0.0, 0.4, 0.8):
        masks = fw.sample_masks(m, 4, eta, generator=torch.Generator().manual_seed(0))
        c = scoring_flops(m, masks, 8, 32, "compact")["executed"]
        f = scoring_flops(m, masks, 8, 32, "folded")["executed"]
        if prev is not None:
            assert c < prev
        prev = c
        if eta == 0.8:  # convs scale with (1-eta)^2 in both their channel counts
            assert c < 0.1 * f


# ------------------------------------------------------------------------------------ bytes moved
def test_scoring_bytes_hand_count():
    """WRN-10-1 (stem = stage1, 16/32/64 channels, one block per stage), 3x4x4 images, B=1, P=2,
    layerwise eta=0.5 (live 8/8/16/16/32/32), fp32 (4 bytes), batch BN. Elements moved, counted by hand.

    compact + Triton, widths padded to 16 (K = 16/16/16/16/32/32), activations:
      stem      read image 1*3*16 = 48, write the dense stem 16*16 = 256, gather every member's channels
                (read + write 2*16*16 = 512 each) = 1024, the stem's statistics read the dense stem: 256
                                                                                     -> 1584
      block 1   (4x4, no shortcut) conv1 reads x 512, writes h 512; conv2 reads h 512, writes x' 512 and
                reads the shortcut 512 in its epilogue: 5 activation-sized tensors   -> 2560
      block 2   (stride 2 -> 2x2) shortcut 1x1 reads 512, writes 2*16*4 = 128; conv1 reads 512, writes
                128; conv2 reads 128, writes 128; the residual read 128             -> 1664
      block 3   (-> 1x1, K_out 32) shortcut 128 + 64; conv1 128 + 64; conv2 64 + 64; residual 64 -> 576
      head      apply the pending activation (read + write 64), mean (read 64)      -> 192
      total 6576 elements = 26,304 bytes
    weights (gathered per member: read, write, conv read = 3 * P * K_in * K_out * k*k; the stem dense):
      stem 432, block 1: 2 * 3*2*16*16*9, block 2: 3*2*16*16 + 2 * 3*2*16*16*9,
      block 3: 3*2*16*32 + 3*2*16*32*9 + 3*2*32*32*9, fc 2*32*10
      = 143,920 elements = 575,680 bytes

    folded + Triton (dense widths 16/32/64, weights read once), activations:
      stem 48 + 256; its shared BN + ReLU on [B] (5 passes of 256) + one product per member (read 256,
      write 512) = 2048; block 1: conv1 1024, epilogue 3*512, conv2 1024, add (h 2*512 + shared sc 256)
      = 4864; block 2: epilogue 1536, shortcut 768, conv1 768 + epilogue 768, conv2 512, add 768 = 5120;
      block 3: 768 + 384 + 384 + 384 + 256 + 384 = 2560; final epilogue 384 + mean 128
      total 15,408 elements = 61,632 bytes; weights 77,360 elements (the dense network) = 309,440 bytes
    """
    from fastweedout.cost.bytes import scoring_bytes
    m = fw.create_model("wrn_10_1")
    masks = fw.sample_masks(m, 2, 0.5, generator=torch.Generator().manual_seed(0))
    assert {k: v.tolist() for k, v in masks.live_counts().items()} == {
        "stage1": [8, 8], "stage1.block0": [8, 8], "stage2": [16, 16], "stage2.block0": [16, 16],
        "stage3": [32, 32], "stage3.block0": [32, 32]}
    stem, block1, block2, block3, head = 48 + 256 + 1024 + 256, 5 * 512, 640 + 640 + 256 + 128, 576, 192
    weights = 432 + 2 * 6 * 2304 + 6 * 256 + 2 * 6 * 2304 + 6 * 512 + 6 * 4608 + 6 * 9216 + 640
    c = scoring_bytes(m, masks, 1, 4, "compact", kernels=True, pad_multiple=16)
    assert c == {"activations": 4 * (stem + block1 + block2 + block3 + head), "weights": 4 * weights,
                 "total": 4 * (stem + block1 + block2 + block3 + head + weights), "variant": "compact-triton"}
    assert c["activations"] == 26_304 and c["weights"] == 575_680
    f = scoring_bytes(m, masks, 1, 4, "folded", kernels=True)
    assert (f["activations"], f["weights"]) == (4 * 15_408, 4 * 77_360)
    assert (f["activations"], f["weights"]) == (4 * (304 + 2048 + 4864 + 5120 + 2560 + 512),
                                                4 * (432 + 2 * 2304 + 512 + 4608 + 9216 + 2048 + 18432 + 36864 + 640))


def test_scoring_bytes_fused_pass_moves_fewer_bytes():
    """The fused compact engine moves ~5 activation-sized tensors per block, the eager engines more;
    bf16 halves every count; running BN needs no statistics pass."""
    from fastweedout.cost.bytes import scoring_bytes
    m = fw.create_model("wrn_16_4")
    masks = fw.sample_masks(m, 4, 0.8, generator=torch.Generator().manual_seed(0))
    b = {(e, k): scoring_bytes(m, masks, 8, 32, e, kernels=k, pad_multiple=16 if k else 1)["activations"]
         for e in ("loop", "folded", "compact") for k in (False, True)}
    assert b[("compact", True)] < b[("compact", False)] < b[("folded", True)] < b[("folded", False)]
    assert b[("loop", True)] == b[("loop", False)]  # the loop has no Triton variant
    half = scoring_bytes(m, masks, 8, 32, "compact", kernels=True, pad_multiple=16, element_size=2)
    assert 2 * half["total"] == scoring_bytes(m, masks, 8, 32, "compact", kernels=True, pad_multiple=16)["total"]
    run = scoring_bytes(m, masks, 8, 32, "folded", kernels=True, bn="running")["activations"]
    assert run < b[("folded", True)]
    with pytest.raises(ValueError):
        scoring_bytes(m, masks, 8, 32, "nope")


def test_compact_executed_flops_count_the_padding():
    m = fw.create_model("wrn_10_1")
    masks = fw.sample_masks(m, 2, 0.5, generator=torch.Generator().manual_seed(0))  # 8 live of 16: padded to 16
    plain = scoring_flops(m, masks, 2, 8, "compact")
    padded = scoring_flops(m, masks, 2, 8, "compact", pad_multiple=16)
    assert plain["useful"] == padded["useful"] and padded["executed"] > plain["executed"]
    assert padded["executed"] <= scoring_flops(m, masks, 2, 8, "folded")["executed"]
