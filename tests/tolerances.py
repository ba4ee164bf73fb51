"""Tolerances as data: (atol, rtol) per dtype, and the fitness tolerance every engine must meet."""

import torch

TOL = {
    torch.float64: (1e-10, 1e-8),
    torch.float32: (1e-4, 1e-4),
    torch.float16: (2e-2, 2e-2),
    torch.bfloat16: (5e-2, 5e-2),
}
# Issue contract: every engine agrees with `loop` in fp32 to a relative error below 1e-4.
FITNESS_RTOL = 1e-4
# Engines' logits against `loop` on a GPU, by the precision that ran (fp32 convolutions run as tf32 there).
GPU_LOGITS_TOL = {"tf32": (5e-2, 2e-2), "fp16": (5e-2, 5e-2), "bf16": (1e-1, 5e-2)}
