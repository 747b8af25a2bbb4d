"""fbgemm's int8 x int8 GEMM (torch's quantized CPU ops), where int8-dynamic's larger products run: whether it is
there, whether it is exact on this CPU, and packing weights for it.

    packed = prepack(qweight, scale)     # None where fbgemm is missing or would saturate: take the portable path
"""

from __future__ import annotations

import logging
import warnings

import torch

log = logging.getLogger(__name__)


def available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines or "x86" in torch.backends.quantized.supported_engines


_exact: bool | None = None


def exact() -> bool:
    """Whether fbgemm's int8 GEMM gives exact int8 products on this CPU. Without VNNI its AVX2 path adds pairs of
    u8 x s8 products in int16 (``vpmaddubsw``), which saturates once activations use their full 8 bits (measured on
    a Zen 3 EPYC: 4.4% relative error on a SmolLM2-sized layer, and int8-dynamic's perplexity +6.8% instead of
    +2.7%); with VNNI (``vpdpbusd``) it sums in int32 and is exact. Probed once with a product that saturates."""
    global _exact
    if _exact is None:
        q = torch.full((8, 64), 127, dtype=torch.int8)
        packed = _prepack(q, torch.ones(8))
        if packed is None:
            _exact = False
        else:
            y = torch.ops.quantized.linear_dynamic(torch.full((1, 64), 127.0), packed, False)
            _exact = bool(torch.allclose(y, torch.full_like(y, 127.0 * 127 * 64), rtol=1e-3))
            if not _exact:
                log.info("fbgemm's int8 GEMM saturates on this CPU (no VNNI): int8-dynamic runs its larger products "
                         "as int8 values on a float GEMM")
    return _exact


def prepack(qweight: torch.Tensor, scale: torch.Tensor):
    """Pack int8 weights [N, K] with per-row scales for fbgemm's int8 x int8 GEMM (CPU); None where torch no
    longer offers these ops (its quantized tensors are deprecated) or they are not exact here (``exact``),
    and callers then take the portable path."""
    if not (available() and exact()):
        return None
    return _prepack(qweight, scale)


def _prepack(qweight: torch.Tensor, scale: torch.Tensor):
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
