"""Matrix products on quantized weights.

Each op has a portable PyTorch path (widen the weights to the activation dtype, then a float matmul) that runs on
any device. On x86 CPUs with AVX2 + FMA, a small C++ extension (``csrc/qgemv.cpp``) does better: small-batch
products (decode steps: a few activation rows) stream the int8 / packed int4 weights and widen them in registers,
reading 4x / 8x fewer bytes than a float32 matmul; larger int8 ones run as an integer GEMM (int16 multiply-adds,
faster than float32's FMAs), larger int4 ones widen a layer's weights in one parallel pass (the portable int4
unpacking takes several) before a float GEMM. It is compiled on first use with the system C++ compiler and
cached by torch (``TORCH_EXTENSIONS_DIR``); without a compiler, raypress logs why once and uses the portable path.
Set ``RAYPRESS_KERNELS=0`` to force the portable path (for comparisons).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from pathlib import Path

import torch
import torch.nn.functional as F

from compress import kernel_fakes

log = logging.getLogger(__name__)

# int8 weights take the extension's product at any number of activation rows: a GEMV for a few (decode), an
# integer GEMM for many (prefill; about 1.5x float32's GEMM on AVX2, see csrc/gemm_body.h). int4 ones take its GEMV up
# to MAX_INT4_KERNEL_ROWS rows; above it, widening the layer's weights to float32 in one parallel pass and then ATen's
# GEMM is faster (the widened layer stays in the last-level cache). Measured on the int8-activation int4 kernel, a
# layer of TinyLlama-1.1B's shapes and six of SmolLM2's, 2 cores of a Zen 3 EPYC: the kernel ran 2.3x / 1.7x the
# widen + GEMM path's speed at 32 rows, 1.5x / 1.4x at 64, 1.12x / 1.05x at 128 and 0.89x / 0.83x at 256.
# The int4 kernel rounds the activations to int8 per block of 32 (llama.cpp's arithmetic for its Q4 formats); the
# sweep's evaluation (blocks of 256 tokens) runs on the float GEMM. Measured on SmolLM2 over wikitext with every
# product forced onto the kernel: KL to the float model 0.494 -> 0.498 (int4s-g32), 0.388 -> 0.393 (int4-g32),
# 0.565 -> 0.570 (int4-g128), perplexity within 0.6% either way.
#
# int8-dynamic's products beyond MAX_INT8_KERNEL_ROWS rows go to fbgemm where its int8 GEMM is exact (CPUs with
# VNNI: about 3x float32); below it fbgemm's per-call cost outweighs that, and raypress's kernels run them.
MAX_INT8_KERNEL_ROWS = 48
MAX_INT4_KERNEL_ROWS = 128


_UNSET = object()
_loaded = _UNSET  # the result of _build(), once it ran
_build_lock = threading.Lock()


def _extension():
    """``torch.ops.raypress`` once the kernels are built and loaded, else None (the portable path runs). A plain
    global read after the first call, so ``torch.compile`` traces through it without a graph break."""
    global _loaded
    if _loaded is _UNSET:
        with _build_lock:
            if _loaded is _UNSET:
                _loaded = _build()
    return _loaded


def _build():
    if os.environ.get("RAYPRESS_KERNELS", "1") == "0":
        return None
    if torch.backends.cpu.get_cpu_capability() not in ("AVX2", "AVX512"):
        capability = torch.backends.cpu.get_cpu_capability()
        log.info("CPU kernels need AVX2 + FMA (this CPU: %s); using the portable path", capability)
        return None
    try:
        from torch.utils.cpp_extension import load

        csrc = Path(__file__).with_name("csrc")
        sources = [csrc / "qgemv.cpp", csrc / "decode_ops.cpp", csrc / "decode_layers.cpp", csrc / "ops.h",
                   csrc / "gemv_body.h", csrc / "gemm_body.h"]
        # torch's build cache looks at the .cpp files only: the name carries a digest of every file, header included
        digest = hashlib.sha256(b"".join(p.read_bytes() for p in sources)).hexdigest()[:12]
        # -fopenmp lets ATen's parallel_for use torch's OpenMP threads (without it the loops run on one core);
        # the OpenMP symbols resolve to the runtime torch has already loaded. The AVX-512 copy of the kernels is
        # compiled under a target pragma inside the same file and only runs where cpuid reports AVX-512.
        flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]
        load(name=f"raypress_kernels_{digest}", sources=[str(p) for p in sources if p.suffix == ".cpp"],
             extra_cflags=flags, verbose=False, is_python_module=False)
        kernel_fakes.register()
        log.info("raypress CPU kernels: %s", torch.ops.raypress.isa())
        return torch.ops.raypress
    except Exception as e:  # a missing compiler or headers must not stop the model from running
        log.warning("could not build the raypress CPU kernels (%s); using the portable path", e)
        return None


def kernel_isa() -> str | None:
    """The instruction set the kernels run with ("avx2" or "avx512"), or None on the portable path."""
    ext = _extension()
    return ext.isa() if ext is not None else None


def ops():
    """``torch.ops.raypress`` where the extension is built and loaded, else None."""
    return _extension()


def kernels_available() -> bool:
    return _extension() is not None


def available_isas() -> list[str]:
    """The instruction sets the kernels can run with on this CPU (empty on the portable path)."""
    ext = _extension()
    return list(ext.cpu_isas()) if ext is not None else []


def use_isa(name: str) -> str:
    """Run the kernels with "avx2", "avx512", or "" (the best this CPU has); returns the one in use. The
    environment variable RAYPRESS_ISA sets it for a whole process."""
    ext = _extension()
    if ext is None:
        raise RuntimeError("the raypress CPU kernels are not loaded (portable path)")
    return ext.use_isa(name)


# The float32 kernel streams a weight matrix faster than ATen's GEMV/GEMM for a few activation rows. Measured over
# SmolLM2's 210 layer shapes, 2 cores of a Zen 4 EPYC: 2.0x ATen at 1 row, 1.4-1.5x at 8 (AVX2 and AVX-512), even
# at 12, behind from 16 rows on, where ATen's GEMM reuses each loaded weight across rows in registers better.
MAX_F32_KERNEL_ROWS = 8


def f32_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """F.linear(x, weight, bias), on the streaming kernel for decode-sized x."""
    k = weight.shape[1]
    rows = x.numel() // k if k else 0
    if (rows <= MAX_F32_KERNEL_ROWS and x.dtype == weight.dtype == torch.float32 and x.device.type == "cpu"
            and k % 16 == 0 and weight.is_contiguous() and not torch.is_grad_enabled() and _extension() is not None):
        y = _extension().f32_gemv(x.reshape(-1, k).contiguous(), [weight])
        y = y + bias if bias is not None else y
        return y.view(*x.shape[:-1], -1)
    return F.linear(x, weight, bias)


def on_cpu_kernels(*tensors: torch.Tensor) -> bool:
    """Whether float32 CPU tensors outside autograd can go to the extension's ops."""
    return (all(t.device.type == "cpu" and t.dtype == torch.float32 for t in tensors) and not torch.is_grad_enabled()
            and _extension() is not None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dimension (one op on the extension)."""
    if on_cpu_kernels(x, weight):
        return _extension().rms_norm(x.reshape(-1, x.shape[-1]).contiguous(), weight.contiguous(), eps).view(x.shape)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm_(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """h += delta (a residual connection, in place), then RMSNorm of h: one op on the extension. h and delta are
    [N, D]."""
    if on_cpu_kernels(h, delta, weight) and h.is_contiguous() and delta.is_contiguous():
        return _extension().add_rms_norm_(h, delta, weight.contiguous(), eps)
    return rms_norm(h.add_(delta), weight, eps)


def silu_mul(gu: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gu [N, 2I] holding gate and up side by side (a fused gate/up projection's output)."""
    if on_cpu_kernels(gu) and gu.is_contiguous():
        return _extension().silu_mul(gu)
    gate, up = gu.chunk(2, dim=-1)
    return F.silu(gate) * up


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding of x [N, heads, D] with cos/sin [N, D] (the rotate-half convention), portably; the lean
    forward's CPU path applies it inside ``rope_write_``."""
    half = x.shape[-1] // 2
    cos, sin = cos[:, None], sin[:, None]
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


ATTENTION_HEAD_DIM_MULTIPLE = 8  # decode_attention works in vectors of 8 floats


def decode_attention_applies(q: torch.Tensor, keys: torch.Tensor) -> bool:
    """Whether ``decode_attention`` can run these tensors (CPU float32 on the extension, head_dim a multiple of
    ATTENTION_HEAD_DIM_MULTIPLE)."""
    return on_cpu_kernels(q, keys) and q.shape[-1] % ATTENTION_HEAD_DIM_MULTIPLE == 0


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, tables: torch.Tensor,
                     lengths: torch.Tensor, scale: float, window: int) -> torch.Tensor:
    """q [n, heads, D], row i attending over the first lengths[i] positions of its sequence in keys/values
    [blocks, kv heads, block_size, D], position p in block tables[i, p // block_size] (the last ``window``
    positions when window > 0); the extension's op (see ``decode_attention_applies``)."""
    return _extension().decode_attention(q, keys, values, tables, lengths, scale, window)


def _use_extension(x: torch.Tensor, k: int, scale: torch.Tensor) -> bool:
    return (
        x.device.type == "cpu"
        and x.dtype == torch.float32
        and scale.dtype == torch.float32
        and k % 16 == 0
        and not torch.is_grad_enabled()
        and _extension() is not None
    )


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None):
    """y = x @ (qweight * scale[:, None]).T + bias, for qweight int8 [N, K] and scale [N]."""
    k = qweight.shape[1]
    if _use_extension(x, k, scale):
        y = _extension().int8_gemv(x.reshape(-1, k).contiguous(), [qweight], [scale]).view(*x.shape[:-1], -1)
    else:
        y = F.linear(x, qweight.to(x.dtype)) * scale.to(x.dtype)
    return y.add_(bias) if bias is not None else y  # y is this call's own: no second output to allocate


_NO_OFFSETS = torch.empty(0)


def int4_kernel_offset(scale: torch.Tensor, offset: torch.Tensor) -> torch.Tensor:
    """The offsets as ``int4_gemv`` takes them: none (an empty tensor) on the symmetric grid, offset = -8 * scale
    exactly, whose zero point the kernel applies in its integer sums without reading a byte of offsets (at 1.1B that
    is a sixth of what int4-g32 decode reads); else the offsets themselves."""
    return _NO_OFFSETS if torch.equal(offset, scale * -8) else offset


def int4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None,
    kernel_offset: torch.Tensor | None = None,
):
    """y = x @ W.T + bias with W[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k // group_size.
    ``kernel_offset``: ``int4_kernel_offset(scale, offset)`` where the caller keeps it (else it is found here)."""
    k = packed.shape[1] * 2
    if _use_extension(x, k, scale) and group_size % 16 == 0:
        ext = _extension()

        def gemv(x2):
            off = kernel_offset if kernel_offset is not None else int4_kernel_offset(scale, offset)
            return ext.int4_gemv(x2, [packed], [scale], [off], group_size)

        return _on_extension(
            x, k, bias, MAX_INT4_KERNEL_ROWS, gemv,
            packed.shape[0], lambda n0, out: ext.int4_widen_into(packed, scale, offset, group_size, n0, out),
        )
    return F.linear(x, dequantize_int4(packed, scale, offset, group_size).to(x.dtype), bias)


def _on_extension(x, k: int, bias, max_kernel_rows: int, gemv, n: int, widen_into) -> torch.Tensor:
    """A GEMV kernel for up to ``max_kernel_rows`` rows of x; else float GEMMs on weight rows widened into this
    thread's workspace, a chunk of rows at a time (one chunk for all but the largest layers, e.g. a vocabulary head)."""
    x2 = x.reshape(-1, k).contiguous()
    if len(x2) <= max_kernel_rows:
        y = gemv(x2)
        y = y + bias if bias is not None else y
        return y.view(*x.shape[:-1], -1)
    chunk = max(16, WORKSPACE_FLOATS // k)
    y = torch.empty(len(x2), n, dtype=x.dtype) if n > chunk else None
    for n0 in range(0, n, chunk):
        w = _workspace(min(chunk, n - n0) * k).view(-1, k)
        widen_into(n0, w)
        part = F.linear(x2, w, bias[n0 : n0 + len(w)] if bias is not None else None)
        if y is None:
            return part.view(*x.shape[:-1], -1)
        y[:, n0 : n0 + len(w)] = part
    return y.view(*x.shape[:-1], -1)


WORKSPACE_FLOATS = 8 * 2**20  # 32 MiB of widened weights at most, per thread
_local = threading.local()


def _workspace(numel: int) -> torch.Tensor:
    """A float32 buffer reused by every call on this thread. Fresh memory costs a page fault per 4 KiB written
    (filling fresh buffers for SmolLM2's 210 layers, all alive at once, took 120 ms against 13 ms into reused
    memory), and the cap bounds what widening may hold for a vocabulary-sized head."""
    buf = getattr(_local, "workspace", None)
    if buf is None or buf.numel() < numel:
        buf = _local.workspace = torch.empty(max(numel, 2**20))
    return buf[:numel]


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per token (last dim): returns integer-valued floats xq in [-127, 127] and scales [..., 1]."""
    sx = x.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
    return torch.round(x / sx), sx


def int8_dynamic_linear(x, qweight, scale, bias, packed=None):
    """y = quant8(x) @ (qweight * scale).T + bias with x quantized per token (symmetric, dynamic).

    On raypress's kernels (CPU) the per-token int8 values multiply the int8 weights in int16 lanes: the GEMV for a few
    rows, the integer GEMM for many; both exact. With ``packed`` (fbgemm, where its int8 GEMM is exact: CPUs with
    VNNI) products of more than MAX_INT8_KERNEL_ROWS rows run there instead: every row is first divided by its own
    scale so that its values span [-127, 127]; fbgemm's per-tensor dynamic quantization of the result then rounds
    each row on its own int8 grid, so this is per-token quantization on fbgemm's int8 GEMM (about 3x float32's matmul
    speed on CPUs with VNNI). reduce_range stays off: with it the activations would get 7 bits. Elsewhere the
    per-token int8 values go through the portable int8 product (the same arithmetic on a float GEMM).
    """
    k = qweight.shape[1]
    rows = x.numel() // k if k else 0
    on_fbgemm = packed is not None and x.device.type == "cpu" and x.dtype == torch.float32
    if _use_extension(x, k, scale) and not (on_fbgemm and rows > MAX_INT8_KERNEL_ROWS):
        y = _extension().int8_dynamic_gemv(x.reshape(-1, k).contiguous(), [qweight], [scale])
        y = y.view(*x.shape[:-1], -1)
    elif on_fbgemm:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        sx = x2.abs().amax(dim=-1, keepdim=True).clamp(min=1e-8) / 127
        y = torch.ops.quantized.linear_dynamic(x2 / sx, packed, False) * sx
        y = y.view(*shape[:-1], -1)
    else:
        xq, sx = quantize_per_token(x)
        y = int8_linear(xq, qweight, scale, None) * sx
    return y.add_(bias) if bias is not None else y


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


def widen_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> torch.Tensor:
    """The float32 weights [N, K] of packed int4 ones: in one pass where the CPU extension runs, else portably."""
    ext = _extension() if packed.device.type == "cpu" and group_size % 16 == 0 else None
    if ext is not None and scale.dtype == offset.dtype == torch.float32:
        out = torch.empty(packed.shape[0], packed.shape[1] * 2)
        ext.int4_widen_into(packed.contiguous(), scale.contiguous(), offset.contiguous(), group_size, 0, out)
        return out
    return dequantize_int4(packed, scale, offset, group_size)


def dequantize_int4(packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> torch.Tensor:
    return dequantize_groupwise(unpack_int4(packed), scale, offset, group_size)


def dequantize_groupwise(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int) -> torch.Tensor:
    """W[n, k] = q[n, k] * scale[n, g] + offset[n, g], g = k // group_size, for unpacked q [N, K]."""
    q = q.float()
    g = torch.arange(q.shape[1], device=q.device) // group_size
    return q * scale.float()[:, g] + offset.float()[:, g]
