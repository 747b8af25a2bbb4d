"""Matrix products on quantized weights.

Each op has a portable PyTorch path (dequantize, then a float matmul) that runs anywhere.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """y = x @ (qweight * scale[:, None]).T + bias, for qweight int8 [N, K] and scale [N]."""
    y = F.linear(x, qweight.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y
