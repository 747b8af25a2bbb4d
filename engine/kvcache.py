"""A preallocated KV cache of fixed slots, and the attention that reads it, for Hugging Face decoder models.

    cache = SlotKVCache.for_model(model, max_num_seqs=16, max_model_len=2048)
    layout = cache.plan(decode_lengths=[40, 7, 19], prefill=[(5, 0, 30)])   # 3 running; slot 5's first 30
    out = cache.attend(layer_idx, query, scaling)                            # inside that forward, per layer

Each layer holds keys and values as ``[max_num_seqs, kv_heads, max_model_len, head_dim]``. One engine step is one
forward over a single packed row: first one token for each running sequence (their slots are 0..n-1), then the
prompt chunks, each of its own slot and start. The model's projections, norms and MLPs see the packed tokens as one
matrix, so the weights are read once per step whatever the mix; ``update`` writes every token's keys and values at
its slot and position, and ``attend`` computes attention per part: the running sequences as one batch over their
slots' prefixes (a view, no copy), each prompt chunk causally over its own slot. The runners (engine.runner,
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
    token_slots: torch.Tensor  # [N] slot each token's keys are written to
    num_decode: int  # the first num_decode tokens are one per running sequence, slots 0..num_decode-1
    decode_len: int  # longest running sequence (keys read for the decode part)
    decode_mask: torch.Tensor | None  # [num_decode, 1, 1, decode_len]
    decode_lengths: torch.Tensor | None  # [num_decode] int64: tokens in each running sequence's slot
    prefill: list[tuple[int, int, int, int, torch.Tensor]]  # (packed offset, slot, start, count, mask [1,1,c,S])
    last_tokens: torch.Tensor  # [parts] packed index of each part's last token (whose logits are kept)
    dummy_mask: torch.Tensor  # a 4D placeholder: makes HF skip its own mask building


class SlotKVCache:
    """Keys and values for ``max_num_seqs`` sequences of up to ``max_model_len`` tokens, per layer."""

    is_compileable = False

    def __init__(self, num_layers: int, max_num_seqs: int, kv_heads: int, max_model_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, sliding_window: int | None = None):
        shape = (max_num_seqs, kv_heads, max_model_len, head_dim)
        # zeros, not empty: masked keys get weight 0, and 0 * NaN from uninitialised memory would be NaN
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_num_seqs, self.max_model_len, self.sliding_window = max_num_seqs, max_model_len, sliding_window
        self.layout: Layout | None = None
        self.attention_calls = 0
        self.model_configs: list = []  # the model's configs, whose attention implementation the HF runner switches

    @classmethod
    def for_model(cls, model, max_num_seqs: int, max_model_len: int) -> SlotKVCache:
        config = text_config(model)
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        param = next(model.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        cache = cls(config.num_hidden_layers, max_num_seqs, kv_heads, max_model_len, head_dim, dtype, param.device,
                    sliding_window=window)
        cache.model_configs = list({id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values())
        log.info("raypress engine: KV cache of %d slots x %d tokens (%d layers, %d kv heads x %d, %s): %.1f MiB",
                 max_num_seqs, max_model_len, config.num_hidden_layers, kv_heads, head_dim, str(dtype).split(".")[-1],
                 cache.nbytes / 2**20)
        return cache

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # -- the engine's side ----------------------------------------------------------------------------------------

    def plan(self, decode_lengths: list[int], prefill: list[tuple[int, int, int]]) -> Layout:
        """Lay out one forward.

        Args:
            decode_lengths: for slots 0..n-1, the tokens in the cache after this forward (the new one included).
            prefill: (slot, start, count) of each prompt chunk: ``count`` tokens at positions start.. of that slot.
        """
        device = self.keys[0].device
        n = len(decode_lengths)
        positions = [length - 1 for length in decode_lengths]
        slots = list(range(n))
        parts, last, offset = [], list(range(n)), n
        for slot, start, count in prefill:
            positions += range(start, start + count)
            slots += [slot] * count
            query_pos = torch.arange(start, start + count, device=device)[:, None]
            parts.append((offset, slot, start, count, self._visible(query_pos, start + count)[None, None]))
            offset += count
            last.append(offset - 1)
        decode_mask = lengths = None
        if n:
            lengths = torch.tensor(decode_lengths, device=device)
            decode_mask = self._visible(lengths[:, None] - 1, int(lengths.max()))[:, None, None]
        self.layout = Layout(
            positions=torch.tensor([positions], device=device), token_slots=torch.tensor(slots, device=device),
            num_decode=n, decode_len=max(decode_lengths, default=0), decode_mask=decode_mask, decode_lengths=lengths,
            prefill=parts,
            last_tokens=torch.tensor(last, device=device), dummy_mask=torch.ones(1, 1, 1, 1, dtype=torch.bool))
        return self.layout

    def _visible(self, query_pos: torch.Tensor, kv_len: int) -> torch.Tensor:
        """[Q, kv_len] bool: key j is visible from a query at position p when j <= p (and within the window)."""
        key_pos = torch.arange(kv_len, device=query_pos.device)[None, :]
        visible = key_pos <= query_pos
        if self.sliding_window:
            visible &= key_pos > query_pos - self.sliding_window
        return visible

    def move(self, src: int, dst: int, length: int) -> None:
        """Copy the first ``length`` positions of slot ``src`` into slot ``dst`` (every layer)."""
        for t in self.keys + self.values:
            t[dst, :, :length] = t[src, :, :length]

    def swap(self, a: int, b: int, length_a: int, length_b: int) -> None:
        """Exchange the contents of two slots."""
        for t in self.keys + self.values:
            saved = t[a, :, :length_a].clone()
            t[a, :, :length_b] = t[b, :, :length_b]
            t[b, :, :length_a] = saved

    # -- the model's side (the Hugging Face cache protocol) -------------------------------------------------------

    def write(self, layer_idx: int, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Write the packed tokens' keys and values [N, kv heads, D] at their slots and positions."""
        slots, pos = self.layout.token_slots, self.layout.positions[0]
        cache_k, cache_v = self.keys[layer_idx], self.values[layer_idx]
        if kernels.on_cpu_kernels(keys, values, cache_k) and keys.is_contiguous() and values.is_contiguous():
            kernels.ops().cache_write_(cache_k, cache_v, keys, values, slots, pos)
            return
        cache_k[slots, :, pos] = keys.to(cache_k.dtype)
        cache_v[slots, :, pos] = values.to(cache_v.dtype)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """HF's cache call: key/value states [1, H, N, D] of the packed tokens, written at their slots."""
        self.write(layer_idx, key_states[0].transpose(0, 1), value_states[0].transpose(0, 1))
        return key_states, value_states  # slot_attention reads the slots, not these

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0

    def get_max_length(self) -> int:
        return self.max_model_len

    # -- attention over the slots ---------------------------------------------------------------------------------

    def attend(self, layer_idx: int, query: torch.Tensor, scaling: float) -> torch.Tensor:
        """query [1, H, N, D] of the packed tokens -> attention output [1, N, H, D]."""
        self.attention_calls += 1
        lay, keys, values = self.layout, self.keys[layer_idx], self.values[layer_idx]
        heads, kv_heads, dim = query.shape[1], keys.shape[1], query.shape[-1]
        out = torch.empty(query.shape[2], heads, dim, dtype=query.dtype, device=query.device)
        n = lay.num_decode
        if n and kernels.decode_attention_applies(query, keys):  # one op: each query over its own slot's prefix
            out[:n] = kernels.decode_attention(query[0, :, :n].transpose(0, 1).contiguous(), keys, values,
                                               lay.decode_lengths, scaling, self.sliding_window or 0)
        elif n:
            # one query per sequence; the heads sharing a kv head become that kv head's "query rows" (no repeat)
            q = query[0, :, :n].transpose(0, 1).reshape(n, kv_heads, heads // kv_heads, dim)
            k, v = keys[:n, :, : lay.decode_len], values[:n, :, : lay.decode_len]
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=lay.decode_mask,
                                               scale=scaling)
            out[:n] = o.reshape(n, heads, dim)
        for offset, slot, start, count, mask in lay.prefill:
            q = query[:, :, offset : offset + count]
            k, v = keys[slot : slot + 1, :, : start + count], values[slot : slot + 1, :, : start + count]
            o = F.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), attn_mask=mask, scale=scaling,
                                               enable_gqa=kv_heads != heads)
            out[offset : offset + count] = o[0].transpose(0, 1)
        return out[None]


def text_config(model):
    return model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
