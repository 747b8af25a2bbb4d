"""GPTQ: int4 weights with error-compensating rounding, in the same stored format as round-to-nearest int4.

    quantize_(model, GPTQConfig(group_size=128), blocks=calibration_token_blocks)

For each linear layer, H = 2 X X^T from the layer's inputs on calibration text. Columns are quantized one at a
time, in order of decreasing H diagonal (the inputs that matter most first), and each column's rounding error is
spread over the columns not yet quantized through the inverse Hessian's Cholesky factor (Frantar et al., 2022).
Group scales and offsets are fixed up front from the float weights ("static groups"), so the column order does not
change the stored layout. Blocks are quantized in order, each with Hessians from inputs that went through the
blocks before it already quantized, so later blocks learn to compensate the error of earlier ones ("sequential");
layers outside the block stack, and models without a recognisable one, take Hessians from one pass at the end.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from compress import calibrate, kernels, qmodules, quantize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GPTQConfig:
    group_size: int = 128
    damp: float = 0.01  # fraction of the mean H diagonal added to the diagonal
    block_size: int = 128  # columns updated together (lazy batch updates)
    act_order: bool = True
    sequential: bool = True  # block by block, on the outputs of the blocks already quantized
    grid: str = "zero_point"  # one of quantize.INT4_GRIDS
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        quantize.check_int4(type(self).__name__, self.group_size, self.grid)
        if not 0 < self.damp < 1:
            raise ValueError(f"GPTQConfig.damp={self.damp!r}: expected a value in (0, 1)")

    @property
    def token(self) -> str:
        return f"gptq-int4{quantize.INT4_GRIDS[self.grid]}-g{self.group_size}"

    def apply_(self, model: nn.Module, *, restore: bool = False, blocks: torch.Tensor | None = None) -> None:
        gptq_(model, self, restore=restore, blocks=blocks)


def gptq_quantize(w: torch.Tensor, H: torch.Tensor, config: GPTQConfig, bits: int = 4):
    """w[N, K], H[K, K] -> (q uint8 [N, K], scale [N, G], offset [N, G]) minimizing ||(W - Q) X||."""
    W = w.detach().float().clone()
    H = H.clone()
    N, K = W.shape
    gs = config.group_size
    scale, offset = qmodules.quantize_groupwise(W, gs, bits, config.grid)[1:]  # static groups, float weights
    dead = torch.diag(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    perm = torch.argsort(torch.diag(H), descending=True) if config.act_order else torch.arange(K)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = perm // gs  # group of each permuted column
    H += config.damp * torch.mean(torch.diag(H)) * torch.eye(K)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    Q = torch.zeros_like(W)
    for i1 in range(0, K, config.block_size):
        i2 = min(i1 + config.block_size, K)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros(N, i2 - i1), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            g = group_of[i1 + i]
            s, o = scale[:, g], offset[:, g]
            q = qmodules.quantize_with(W1[:, i : i + 1], s, o, bits)[:, 0]
            Q[:, i1 + i] = q
            err = (W1[:, i] - (q * s + o)) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] * Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    Q = Q[:, torch.argsort(perm)]
    return Q.to(torch.uint8), scale, offset


def gptq_(model: nn.Module, config: GPTQConfig, *, restore: bool = False, blocks: torch.Tensor | None = None) -> None:
    """Quantize every linear layer with GPTQ (the embedding table, and a head tied to it, round to nearest)."""
    quantized = None
    if not restore:
        if blocks is None:
            raise ValueError("GPTQ needs calibration text (blocks=): token blocks from the calibration data")
        quantized = _quantize_layers(model, blocks, config)
    gs = config.group_size
    quantize.swap_modules_(
        model, quantize.int4_linear_maker(gs, restore, quantized, config.grid),
        quantize.int4_embedding_maker(gs, restore, config.grid)
    )


def _quantize_layers(model: nn.Module, blocks: torch.Tensor, config: GPTQConfig) -> dict[str, tuple]:
    """{layer name: (q, scale, offset)} for every block linear layer whose width int4 packing takes."""
    layers = {n: m for n, m in calibrate.block_linears(model).items() if m.in_features % 16 == 0}
    quantized: dict[str, tuple] = {}

    def quantize_all(hess: dict[str, torch.Tensor], names: dict[str, nn.Linear]) -> None:
        for name, layer in names.items():
            q, scale, offset = gptq_quantize(layer.weight.cpu(), hess.pop(name), config)
            quantized[name] = tuple(t.to(layer.weight.device) for t in (q, scale, offset))
            # the quantized weights, widened, so that what follows sees this layer as it will be
            w = kernels.dequantize_groupwise(q, scale, offset, config.group_size)
            layer.weight.data.copy_(w.to(layer.weight.device, layer.weight.dtype))

    if config.sequential:

        def visit(block: nn.Module, feed) -> None:
            names = {n: m for n, m in layers.items() if any(m is b for b in block.modules())}
            if names:
                quantize_all(calibrate.hessians_of(names, lambda fn: feed(fn, names)), names)

        done = calibrate.block_by_block(model, blocks, visit)
        log.info("GPTQ: %d layers block by block%s", len(quantized), "" if done else " (no block stack found)")
    rest = {n: m for n, m in layers.items() if n not in quantized}
    if rest:
        log.info("GPTQ: %d layers from one pass over %d calibration blocks", len(rest), len(blocks))
        quantize_all(calibrate.hessians(model, blocks, rest), rest)
    return quantized
