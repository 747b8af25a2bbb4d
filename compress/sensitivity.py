"""Per-layer sensitivity: what rounding one layer to one format costs the model's output, for every layer and format.

    table = sensitivity.measure(model, blocks)          # blocks: calibration token ids [n, seq_len]
    table.scores["model.layers.3.mlp.down_proj"]["int4-g32"]   # predicted KL to the base, nats per token

The estimate is second order in the layer's output change, weighted by the Fisher information of the model's own
output distribution, diagonal in the layer's output units: for a layer computing y = x W^T, rounding W to W_q
changes its outputs by dy = x (W_q - W)^T, and the model's KL to the base grows by about 1/2 sum_o F_oo dy_o^2 per
token. F_oo is estimated without bias by g_o^2, where g is the gradient of log p(y*) with respect to the layer's
output and y* a token drawn from the model's own next-token distribution (the true Fisher, not the empirical one on
the text's tokens: the budget is measured against the base model, not the text). For encoders the output is the last
hidden state and the loss its squared error, estimated the same way through a random Gaussian projection per token.

For ``int8-dynamic`` the activations are rounded too (per token, as its module does): dy = Q(x) Q(W)^T - x W^T.

One forward and one backward pass per calibration batch give every layer's gradient; each format then costs one
product x dW^T per layer: about (1 + formats / 3) times a training step over the calibration tokens. Scores add up
across layers (the usual assumption of HAWQ and ModelOpt's auto_quantize: layers' rounding errors are independent),
which ``compress.mixed`` relies on to choose a format per layer under a size limit.
"""

from __future__ import annotations

import contextlib
import logging
import re
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from compress import kernels, qmodules, quantize

log = logging.getLogger(__name__)

FLOAT = "float"
INT8 = "int8"
INT8_DYNAMIC = "int8-dynamic"  # int8 weights and per-token int8 activations: a candidate of compress.mixed's
# dynamic mixes (DynamicMixConfig), not of mixed-Nbit (same bytes as int8; it trades quality for prefill speed)
# every format a layer may take in a mixed variant: float, int8 per channel, int4 groups on each grid and size
INT4 = tuple(f"int4{letter}-g{g}" for letter in quantize.INT4_GRIDS.values() for g in quantize.GROUP_SIZES)
FORMATS = (FLOAT, INT8) + INT4
_INT4 = re.compile(r"int4([sm]?)-g(\d+)")
_GRIDS = {letter: grid for grid, letter in quantize.INT4_GRIDS.items()}


def parse_format(fmt: str) -> tuple[str, int | None, str | None]:
    """"int4m-g32" -> ("int4", 32, "min"); "int8" -> ("int8", None, None); "float" -> ("float", None, None)."""
    if fmt in (FLOAT, INT8, INT8_DYNAMIC):
        return fmt, None, None
    m = _INT4.fullmatch(fmt)
    if not m or int(m[2]) not in quantize.GROUP_SIZES:
        raise ValueError(f"layer format {fmt!r}: expected one of {', '.join(FORMATS)}")
    return "int4", int(m[2]), _GRIDS[m[1]]


def format_config(fmt: str):
    """The whole-model config whose module makers make a layer of format ``fmt`` (None for float)."""
    kind, group_size, grid = parse_format(fmt)
    if kind == FLOAT:
        return None
    if kind == INT8:
        return quantize.Int8WeightOnlyConfig()
    if kind == INT8_DYNAMIC:
        return quantize.Int8DynamicConfig()
    return quantize.Int4WeightOnlyConfig(group_size=group_size, grid=grid)


def fits(fmt: str, in_features: int, table: bool = False) -> bool:
    """Whether a layer with ``in_features`` inputs takes ``fmt`` in a mixed variant: int4 groups must divide its
    rows (raypress runs a partial last group, but the exports do not hold one: GGUF blocks, compressed-tensors'
    groups), so every mix exports; an embedding ``table`` (and a head tied to it) has no int8 activations."""
    kind, group_size, _ = parse_format(fmt)
    if kind == INT8_DYNAMIC:
        return not table
    return kind != "int4" or in_features % group_size == 0


def stored_bytes(fmt: str, out_features: int, in_features: int) -> int:
    """Bytes an artifact stores for a weight [out, in] in ``fmt`` (bias and norms excluded: no format changes them)."""
    kind, group_size, _ = parse_format(fmt)
    if kind == FLOAT:
        return 4 * out_features * in_features
    if kind in (INT8, INT8_DYNAMIC):
        return out_features * in_features + 4 * out_features  # int8 values, a float32 scale per row
    groups = -(-in_features // group_size)
    return out_features * in_features // 2 + 8 * out_features * groups  # packed pairs; float32 scale, offset


def rounded(fmt: str, w: torch.Tensor) -> torch.Tensor:
    """``w`` [out, in] as the format stores it, back in float: the same rounding its module makes."""
    kind, group_size, grid = parse_format(fmt)
    w = w.detach().float()
    if kind == FLOAT:
        return w
    if kind in (INT8, INT8_DYNAMIC):
        q, scale = qmodules.quantize_per_channel(w)
        return q.float() * scale[:, None]
    q, scale, offset = qmodules.quantize_groupwise(w, group_size, grid=grid)
    expand = lambda t: t.repeat_interleave(group_size, dim=1)[:, : w.shape[1]]  # noqa: E731
    return q.float() * expand(scale) + expand(offset)


@dataclass
class Table:
    """Scores (predicted KL to the base, nats per token) and stored bytes of every layer in every format it fits."""

    scores: dict[str, dict[str, float]] = field(default_factory=dict)
    bytes: dict[str, dict[str, int]] = field(default_factory=dict)
    tokens: int = 0
    seconds: float = 0.0

    def rows(self) -> list[dict]:
        """One row per (layer, format), for a results table."""
        return [{"layer": layer, "format": fmt, "bytes": self.bytes[layer][fmt], "score": score}
                for layer, by_fmt in self.scores.items() for fmt, score in by_fmt.items()]


def layers(model: nn.Module) -> dict[str, nn.Module]:
    """The layers a mixed variant chooses a format for, by module name: every nn.Linear and nn.Embedding, except a
    tied output head (it is the input embedding's table, which takes one format for both)."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    table = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    tied = head is not None and table is not None and head.weight is table.weight
    return {name: mod for name, mod in model.named_modules()
            if isinstance(mod, nn.Embedding) or (isinstance(mod, nn.Linear) and not (tied and mod is head))}


def measure(model: nn.Module, blocks: torch.Tensor, formats: tuple[str, ...] = FORMATS, *, batch_size: int = 4,
            seed: int = 0) -> Table:
    """Score every layer of the float ``model`` in every format of ``formats`` on calibration ``blocks``."""
    start = time.perf_counter()
    named = layers(model)
    if not named:
        raise ValueError(f"{type(model).__name__} has no nn.Linear or nn.Embedding layers to score")
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    table_name = next((n for n, m in named.items() if head is not None and m.weight is head.weight), None)
    out = Table()
    for name, mod in named.items():
        n_out, n_in = _shape(mod)
        usable = [f for f in formats if fits(f, n_in, isinstance(mod, nn.Embedding))]
        out.scores[name] = dict.fromkeys(usable, 0.0)
        out.bytes[name] = {f: stored_bytes(f, n_out, n_in) for f in usable}
    causal = head is not None
    gen = torch.Generator().manual_seed(seed)
    hooks = []

    def accumulate(name: str, x: torch.Tensor, weight: torch.Tensor, grad: torch.Tensor, lookup: bool) -> None:
        g2 = grad.detach().float().reshape(-1, grad.shape[-1]).square()
        for fmt in out.scores[name]:
            if fmt == FLOAT:
                continue
            if fmt == INT8_DYNAMIC:  # activations rounded per token too: dy = Q(x) Q(W)^T - x W^T
                xq, sx = kernels.quantize_per_token(x)
                dy = (xq * sx) @ rounded(fmt, weight).T - x @ weight.detach().float().T
            else:
                dw = rounded(fmt, weight) - weight.detach().float()
                dy = dw[x] if lookup else x @ dw.T
            out.scores[name][fmt] += 0.5 * float((g2 * dy.square()).sum())

    def on_forward(lookup: bool, score_as: str):
        def hook(mod, args, output):
            x = args[0].detach().reshape(-1) if lookup else args[0].detach().float().reshape(-1, args[0].shape[-1])
            if lookup:  # an embedding's output becomes a leaf, so gradients reach every layer without weight grads
                output = output.detach().requires_grad_(True)
            output.register_hook(lambda g: accumulate(score_as, x, mod.weight, g, lookup))
            return output
        return hook

    for name, mod in named.items():
        hooks.append(mod.register_forward_hook(on_forward(isinstance(mod, nn.Embedding), name)))
    if table_name is not None and all(m is not head for m in named.values()):  # a tied head: it rounds with the
        hooks.append(head.register_forward_hook(on_forward(False, table_name)))  # table, its error counts there
    grads = {p: p.requires_grad for p in model.parameters()}
    try:
        with torch.enable_grad(), _eval(model):
            for p in model.parameters():
                p.requires_grad_(False)
            for i in range(0, blocks.shape[0], batch_size):
                ids = blocks[i : i + batch_size]
                output = model(input_ids=ids)
                logits = output.logits if causal else output.last_hidden_state
                _self_loss(logits, causal, gen).backward()
                out.tokens += ids.numel()
    finally:
        for h in hooks:
            h.remove()
        for p, g in grads.items():
            p.requires_grad_(g)
    for by_fmt in out.scores.values():
        for fmt in by_fmt:
            by_fmt[fmt] /= max(out.tokens, 1)
    out.seconds = time.perf_counter() - start
    log.info("sensitivity of %d layers x %d formats on %d tokens: %.1f s", len(named), len(formats), out.tokens,
             out.seconds)
    return out


def _self_loss(output: torch.Tensor, causal: bool, gen: torch.Generator) -> torch.Tensor:
    """A loss whose gradient's square estimates the Fisher information of the model's output: -log p(y*) with y*
    drawn from the model itself (causal), or the output's projection on a Gaussian direction (encoders)."""
    flat = output.float().reshape(-1, output.shape[-1])
    if causal:
        with torch.no_grad():
            drawn = torch.multinomial(torch.softmax(flat, -1), 1, generator=gen).squeeze(1)
        return nn.functional.cross_entropy(flat, drawn, reduction="sum")
    direction = torch.randn(flat.shape, generator=gen)
    return (flat * direction).sum()


def _shape(mod: nn.Module) -> tuple[int, int]:
    if isinstance(mod, nn.Embedding):
        return mod.num_embeddings, mod.embedding_dim
    return mod.out_features, mod.in_features


@contextlib.contextmanager
def _eval(model: nn.Module):
    was = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was)
