"""Matrix products on quantized weights.

Each op has a portable PyTorch path (widen the weights to the activation dtype, then a float matmul) that runs on
any device. On x86 CPUs with AVX2 + FMA, small-batch products (decode steps: a few activation rows) go through a
small C++ extension (``csrc/qgemv.cpp``) that streams the int8 / packed int4 weights and widens them in registers,
reading 4x / 8x fewer bytes than a float32 matmul. It is compiled on first use with the system C++ compiler and
cached by torch (``TORCH_EXTENSIONS_DIR``); without a compiler, raypress logs why once and uses the portable path.
Set ``RAYPRESS_KERNELS=0`` to force the portable path (for comparisons).
"""

from __future__ import annotations

import functools
import logging
import os
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

MAX_KERNEL_ROWS = 16  # above this many activation rows a float matmul on widened weights is faster


@functools.cache
def _extension():
    if os.environ.get("RAYPRESS_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        capability = torch.backends.cpu.get_cpu_capability()
        log.info("CPU kernels need AVX2 + FMA (this CPU: %s); using the portable path", capability)
        return None
    try:
        from torch.utils.cpp_extension import load

        src = Path(__file__).with_name("csrc") / "qgemv.cpp"
        return load(name="raypress_qgemv", sources=[str(src)], extra_cflags=["-O3", "-mavx2", "-mfma"], verbose=False)
    except Exception as e:  # a missing compiler or headers must not stop the model from running
        log.warning("could not build the raypress CPU kernels (%s); using the portable path", e)
        return None


def kernels_available() -> bool:
    return _extension() is not None


def _use_kernel(x: torch.Tensor, k: int) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and k % 16 == 0
        and x.numel() // k <= MAX_KERNEL_ROWS
        and not torch.is_grad_enabled()
        and _extension() is not None
    )


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """y = x @ (qweight * scale[:, None]).T + bias, for qweight int8 [N, K] and scale [N]."""
    k = qweight.shape[1]
    if _use_kernel(x, k):
        y = _extension().int8_gemv(x.reshape(-1, k).contiguous(), qweight, scale.float()).view(*x.shape[:-1], -1)
    else:
        y = F.linear(x, qweight.to(x.dtype)) * scale.to(x.dtype)
    return y + bias if bias is not None else y


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
):
    """y = x @ W.T + bias with W[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k // group_size."""
    k = packed.shape[1] * 2
    if _use_kernel(x, k) and group_size % 16 == 0 and scale.dtype == torch.float32:
        y = _extension().int4_gemv(x.reshape(-1, k).contiguous(), packed, scale, offset, group_size)
        y = y.view(*x.shape[:-1], -1)
    else:
        y = F.linear(x, dequantize_int4(packed, scale, offset, group_size).to(x.dtype))
    return y + bias if bias is not None else y


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per token (last dim): returns integer-valued floats xq in [-127, 127] and scales [..., 1]."""
    sx = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(x / sx), sx


def fbgemm_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


def fbgemm_prepack(qweight: torch.Tensor, scale: torch.Tensor):
    """Pack int8 weights [N, K] with per-row scales for fbgemm's int8 x int8 GEMM (CPU); None where torch no
    longer offers these ops (its quantized tensors are deprecated), and callers then take the portable path."""
    n = qweight.shape[0]
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*quantized tensor creation functions.*")
            wq = torch._make_per_channel_quantized_tensor(
                qweight.cpu(), scale.detach().double().cpu(), torch.zeros(n, dtype=torch.long), 0
            )
            return torch.ops.quantized.linear_prepack(wq, None)
    except (AttributeError, RuntimeError) as e:
        log.warning("fbgemm int8 GEMM unavailable (%s); int8-dynamic uses the portable path", e)
        return None


def int8_dynamic_linear(x, qweight, scale, bias, packed=None):
    """y = quant8(x) @ (qweight * scale).T + bias with x quantized per token (symmetric, dynamic).

    With ``packed`` (CPU, fbgemm): every row is first divided by its own scale so that its values span [-127, 127];
    fbgemm's per-tensor dynamic quantization of the result then rounds each row on its own int8 grid, so this is
    per-token quantization on fbgemm's int8 GEMM (about 3x float32's matmul speed on AVX2 CPUs). reduce_range stays
    off: with it the activations would get 7 bits.
    """
    if packed is not None and x.device.type == "cpu" and x.dtype == torch.float32:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        sx = x2.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
        y = torch.ops.quantized.linear_dynamic(x2 / sx, packed, False) * sx
        y = y.view(*shape[:-1], -1)
    else:
        xq, sx = quantize_per_token(x)
        y = F.linear(xq, qweight.to(x.dtype)) * scale.to(x.dtype) * sx
    return y + bias if bias is not None else y


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """q uint8 [N, K] with values 0..15, K % 16 == 0 -> [N, K/2]: in each block of 16, k0..k7 in the low nibbles
    of 8 bytes and k8..k15 in the high nibbles (so the kernel widens one load into two contiguous runs)."""
    n, k = q.shape
    blocks = q.to(torch.uint8).view(n, k // 16, 2, 8)
    return (blocks[:, :, 0] | (blocks[:, :, 1] << 4)).reshape(n, k // 2)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    n, half = packed.shape
    blocks = packed.view(n, half // 8, 1, 8)
    return torch.cat([blocks & 0xF, blocks >> 4], dim=2).reshape(n, half * 2)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> torch.Tensor:
    q = unpack_int4(packed).float()
    g = torch.arange(q.shape[1], device=q.device) // group_size
    return q * scale.float()[:, g] + offset.float()[:, g]
