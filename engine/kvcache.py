"""The paged KV cache: keys and values in blocks of positions, one step's layout over them, and the attention that
reads them, for Hugging Face decoder models.

    cache = PagedKVCache.for_model(model, num_blocks=2048, block_size=16)
    layout = cache.plan(decode=[([3, 9], 20), ([4], 7)], prefill=[([5, 6, 8], 16, 30, False)])
    out = cache.attend(layer_idx, query, scaling)          # inside that forward, per layer

Each layer holds keys and values as ``[num_blocks, kv_heads, block_size, head_dim]``; a sequence's positions live
in the blocks of its block table (position p at row p % block_size of block table[p // block_size]), so a sequence
holds what it uses and sequences that share a prefix share its blocks (engine.blocks). One engine step is one
forward over a single packed row: first one token for each decoding sequence, then the prompt chunks. The model's
projections, norms and MLPs see the packed tokens as one matrix, so the weights are read once per step whatever the
mix; ``update`` (or the lean runner's fused write) puts every token's keys and values at its block and offset, and
``attend`` computes attention per part: the decoding sequences as one batch through their block tables (one op on
the CPU kernels), each prompt chunk causally over its own blocks, gathered. The runners (engine.runner,
engine.lean) call these from the model's attention layers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from compress import kernels

log = logging.getLogger(__name__)


@dataclass
class Layout:
    """Where the tokens of one packed forward go, and what each part attends to."""

    positions: torch.Tensor  # [1, N] position of every packed token
    token_blocks: torch.Tensor  # [N] block each token's keys are written to
    token_offsets: torch.Tensor  # [N] row inside that block
    num_decode: int  # the first num_decode tokens are one per decoding sequence
    decode_len: int  # longest decoding sequence (keys read for the decode part)
    decode_tables: torch.Tensor | None  # [num_decode, blocks] int64: each decoding sequence's blocks, padded
    decode_lengths: torch.Tensor | None  # [num_decode] int64: its positions after this step
    prefill: list[tuple[int, torch.Tensor, int, int, torch.Tensor]]  # (packed offset, blocks, start, count, mask)
    logit_rows: torch.Tensor  # packed indices whose logits the forward returns: each part's last token, or all of
    # a chunk's tokens where its request asked for prompt log-probabilities
    part_rows: list[range]  # for each part, its rows of the returned logits (the last one is sampled)
    dummy_mask: torch.Tensor  # a 4D placeholder: makes HF skip its own mask building


def text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config


def model_dims(model) -> tuple[int, int, int, torch.dtype, torch.device, int | None]:
    """(layers, kv heads, head_dim, dtype, device, sliding window) of a decoder's cache."""
    config = text_config(model)
    heads = config.num_attention_heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
    param = next(model.parameters())
    dtype = param.dtype if param.dtype.is_floating_point else torch.float32
    return config.num_hidden_layers, kv_heads, head_dim, dtype, param.device, window


def block_bytes(model, block_size: int) -> int:
    """Bytes one block of ``block_size`` positions takes over every layer (keys and values)."""
    layers, kv_heads, head_dim, dtype, _, _ = model_dims(model)
    return 2 * layers * kv_heads * block_size * head_dim * torch.empty(0, dtype=dtype).element_size()


class PagedKVCache:
    """Keys and values of ``num_blocks`` blocks of ``block_size`` positions, per layer."""

    is_compileable = False

    def __init__(self, num_layers: int, num_blocks: int, block_size: int, kv_heads: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, sliding_window: int | None = None):
        shape = (num_blocks, kv_heads, block_size, head_dim)
        # zeros, not empty: masked keys get weight 0, and 0 * NaN from uninitialised memory would be NaN
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.num_blocks, self.block_size, self.sliding_window = num_blocks, block_size, sliding_window
        self.device = device
        self.layout: Layout | None = None
        self.attention_calls = 0
        self.model_configs: list = []  # the model's configs, whose attention implementation the HF runner switches

    @classmethod
    def for_model(cls, model, num_blocks: int, block_size: int) -> PagedKVCache:
        layers, kv_heads, head_dim, dtype, device, window = model_dims(model)
        cache = cls(layers, num_blocks, block_size, kv_heads, head_dim, dtype, device, sliding_window=window)
        cache.model_configs = list({id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values())
        log.info("raypress engine: KV cache of %d blocks x %d positions (%d layers, %d kv heads x %d, %s): %.1f MiB",
                 num_blocks, block_size, layers, kv_heads, head_dim, str(dtype).split(".")[-1], cache.nbytes / 2**20)
        return cache

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # -- the engine's side ----------------------------------------------------------------------------------------

    def plan(self, decode: list[tuple[list[int], int]], prefill: list[tuple[list[int], int, int, bool]]) -> Layout:
        """Lay out one forward.

        Args:
            decode: (block table, positions after this step) of each decoding sequence: its one new token goes at
                the last of them.
            prefill: (block table, start, count, all logits) of each prompt chunk: ``count`` tokens at positions
                start..; with ``all logits``, the logits of every one of them come back, else of the last.
        """
        device, size = self.device, self.block_size
        n = len(decode)
        positions = [length - 1 for _, length in decode]
        blocks = [table[(length - 1) // size] for table, length in decode]
        parts, keep, offset = [], list(range(n)), n
        part_rows = [range(i, i + 1) for i in range(n)]
        for table, start, count, all_logits in prefill:
            span = range(start, start + count)
            positions += span
            blocks += [table[p // size] for p in span]
            query_pos = torch.arange(start, start + count, device=device)[:, None]
            used = torch.tensor(table[: -(-(start + count) // size)], device=device)
            parts.append((offset, used, start, count, self._visible(query_pos, start + count)[None, None]))
            kept = range(offset, offset + count) if all_logits else range(offset + count - 1, offset + count)
            part_rows.append(range(len(keep), len(keep) + len(kept)))
            keep += kept
            offset += count
        tables = lengths = None
        if n:
            width = max(len(table) for table, _ in decode)
            tables = torch.tensor([table + [0] * (width - len(table)) for table, _ in decode], device=device)
            lengths = torch.tensor([length for _, length in decode], device=device)
        pos = torch.tensor([positions], device=device)
        self.layout = Layout(
            positions=pos, token_blocks=torch.tensor(blocks, device=device), token_offsets=pos[0] % size,
            num_decode=n, decode_len=max((length for _, length in decode), default=0), decode_tables=tables,
            decode_lengths=lengths, prefill=parts, logit_rows=torch.tensor(keep, device=device), part_rows=part_rows,
            dummy_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool))
        return self.layout

    def _visible(self, query_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[Q, kv_len] bool: key j is visible from a query at position p when j <= p (and within the window)."""
        key_pos = torch.arange(kv_len, device=query_pos.device)[None, :]
        visible = key_pos <= query_pos
        if self.sliding_window:
            visible &= key_pos > query_pos - self.sliding_window
        return visible

    def gather(self, layer_idx: int, blocks: torch.Tensor, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values [kv heads, length, D] of a sequence's first ``length`` positions, from its blocks."""
        out = []
        for t in (self.keys[layer_idx], self.values[layer_idx]):
            kv = t.index_select(0, blocks)  # [blocks, kv heads, block_size, D]
            out.append(kv.transpose(0, 1).reshape(kv.shape[1], -1, kv.shape[3])[:, :length])
        return out[0], out[1]

    # -- the model's side (the Hugging Face cache protocol) -------------------------------------------------------

    def write(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the packed tokens' keys and values [N, kv heads, D] at their blocks and offsets."""
        blocks, offsets = self.layout.token_blocks, self.layout.token_offsets
        cache_k, cache_v = self.keys[layer_idx], self.values[layer_idx]
        if kernels.on_cpu_kernels(keys, values, cache_k) and keys.is_contiguous() and values.is_contiguous():
            kernels.ops().cache_write_(cache_k, cache_v, keys, values, blocks, offsets)
            return
        cache_k[blocks, :, offsets] = keys.to(cache_k.dtype)
        cache_v[blocks, :, offsets] = values.to(cache_v.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """HF's cache call: key/value states [1, H, N, D] of the packed tokens, written at their blocks."""
        self.write(layer_idx, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        return key_states, value_states  # attend reads the blocks, not these

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.num_blocks * self.block_size

    # -- attention over the blocks --------------------------------------------------------------------------------

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [1, H, N, D] of the packed tokens -> attention output [1, N, H, D]."""
        self.attention_calls += 1
        lay, keys, values = self.layout, self.keys[layer_idx], self.values[layer_idx]
        heads, kv_heads, dim = query.shape[1], keys.shape[1], query.shape[-1]
        out = torch.empty(query.shape[2], heads, dim, dtype=query.dtype, device=query.device)
        n = lay.num_decode
        if n and kernels.decode_attention_applies(query, keys):  # one op: each query through its block table
            out[:n] = kernels.decode_attention(query[0, :, :n].transpose(0, 1).contiguous(), keys, values,
                                               lay.decode_tables, lay.decode_lengths, scaling,
                                               self.sliding_window or 0)
        elif n:
            out[:n] = self._decode_sdpa(layer_idx, query[0, :, :n].transpose(0, 1), scaling)
        for offset, blocks, start, count, mask in lay.prefill:
            q = query[:, :, offset : offset + count]
            k, v = self.gather(layer_idx, blocks, start + count)
            o = F.scaled_dot_product_attention(q, k[None].to(q.dtype), v[None].to(q.dtype), attn_mask=mask,
                                               scale=scaling, enable_gqa=kv_heads != heads)
            out[offset : offset + count] = o[0].transpose(0, 1)
        return out[None]

    def _decode_sdpa(self, layer_idx: int, q: torch.Tensor, scaling: float) -> torch.Tensor:
        """Decode attention without the kernels: each sequence's blocks gathered to [n, kv heads, longest, D]."""
        lay = self.layout
        n, heads, dim = q.shape
        kv_heads = self.keys[layer_idx].shape[1]
        k, v = (t[lay.decode_tables].transpose(1, 2).reshape(n, kv_heads, -1, dim)[:, :, : lay.decode_len]
                for t in (self.keys[layer_idx], self.values[layer_idx]))
        mask = self._visible(lay.decode_lengths[:, None] - 1, lay.decode_len)[:, None, None]
        # one query per sequence; the heads sharing a kv head become that kv head's "query rows" (no repeat)
        o = F.scaled_dot_product_attention(q.reshape(n, kv_heads, heads // kv_heads, dim), k.to(q.dtype),
                                           v.to(q.dtype), attn_mask=mask, scale=scaling)
        return o.reshape(n, heads, dim)
