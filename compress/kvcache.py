"""A preallocated KV cache of fixed slots that plugs into Hugging Face decoder models.

    cache = SlotKVCache.for_model(model, max_num_seqs=16, max_model_len=2048)
    cache.prepare(slots, positions)          # which slot each row writes, and at which positions
    logits = model(input_ids, position_ids=positions, attention_mask=cache.mask(), cache=cache).logits

Each layer holds keys and values as ``[max_num_seqs, kv_heads, max_model_len, head_dim]``. A forward writes every
row's new keys at its own positions in its own slot and attends over the slot's prefix through a 4D mask, so rows of
different lengths run in one forward without padding each other's caches. When a step's rows are slots 0..B-1 the
keys go to attention as a view (no copy); otherwise the rows' slots are gathered. Nothing is allocated per step but
the mask and, for scattered slots, the gathered keys.
"""

from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class SlotKVCache:
    """Keys and values for ``max_num_seqs`` sequences of up to ``max_model_len`` tokens, per layer.

    The model calls ``update(k, v, layer_idx)`` from each attention layer (the HF cache protocol); the engine calls
    ``prepare`` before every forward and ``move`` to relocate a sequence between slots.
    """

    is_compileable = False

    def __init__(self, num_layers: int, max_num_seqs: int, kv_heads: int, max_model_len: int, head_dim: int,
                 dtype: torch.dtype, device: torch.device, sliding_window: int | None = None):
        shape = (max_num_seqs, kv_heads, max_model_len, head_dim)
        # zeros, not empty: masked positions are multiplied by weight 0, and 0 * NaN from uninitialised memory is NaN
        self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(num_layers)]
        self.max_num_seqs, self.max_model_len, self.sliding_window = max_num_seqs, max_model_len, sliding_window
        self._slots = self._write_pos = self._kv_len = None
        self._contiguous = False

    @classmethod
    def for_model(cls, model, max_num_seqs: int, max_model_len: int) -> SlotKVCache:
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        param = next(model.parameters())
        dtype = param.dtype if param.dtype.is_floating_point else torch.float32
        cache = cls(config.num_hidden_layers, max_num_seqs, kv_heads, max_model_len, head_dim, dtype, param.device,
                    sliding_window=window)
        log.info("raypress engine: KV cache of %d slots x %d tokens (%d layers, %d kv heads x %d, %s): %.1f MiB",
                 max_num_seqs, max_model_len, config.num_hidden_layers, kv_heads, head_dim, str(dtype).split(".")[-1],
                 cache.nbytes / 2**20)
        return cache

    @staticmethod
    def bytes_per_token(model) -> int:
        """Bytes one token takes in the cache, over all layers (keys and values)."""
        config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
        heads = config.num_attention_heads
        kv_heads = getattr(config, "num_key_value_heads", None) or heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        param = next(model.parameters())
        itemsize = param.element_size() if param.dtype.is_floating_point else 4
        return 2 * config.num_hidden_layers * kv_heads * head_dim * itemsize

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    # -- the engine's side ----------------------------------------------------------------------------------------

    def prepare(self, slots: torch.Tensor, positions: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """Set up the next forward and return its attention mask.

        Args:
            slots: [B] slot of each row.
            positions: [B, T] position of each input token; padding tokens may repeat the row's last position + k,
                clamped inside the cache (what they write is never read: it is masked, then overwritten).
            lengths: [B] tokens of each row in the cache after this forward (its real tokens only).
        Returns:
            a bool mask [B, 1, T, L]: True where a query may attend to a key (causal, within the row's own tokens).
        """
        device = self.keys[0].device
        self._slots = slots.to(device)
        self._write_pos = positions.clamp(max=self.max_model_len - 1).to(device)
        self._kv_len = int(lengths.max())
        self._contiguous = bool(torch.equal(slots.cpu(), torch.arange(len(slots))))
        key_pos = torch.arange(self._kv_len, device=device)
        query_pos = positions.to(device)[:, :, None]
        visible = (key_pos[None, None, :] <= query_pos) & (key_pos[None, None, :] < lengths.to(device)[:, None, None])
        if self.sliding_window:
            visible &= key_pos[None, None, :] > query_pos - self.sliding_window
        return visible[:, None]

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

    # -- the model's side (Hugging Face cache protocol) -----------------------------------------------------------

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Write this forward's keys/values [B, H, T, D] at their slots and positions; return [B, H, L, D] each."""
        k_cache, v_cache = self.keys[layer_idx], self.values[layer_idx]
        rows = self._slots[:, None]
        k_cache[rows, :, self._write_pos] = key_states.transpose(1, 2).to(k_cache.dtype)
        v_cache[rows, :, self._write_pos] = value_states.transpose(1, 2).to(v_cache.dtype)
        if self._contiguous:
            n = len(self._slots)
            return k_cache[:n, :, : self._kv_len], v_cache[:n, :, : self._kv_len]
        return k_cache[self._slots, :, : self._kv_len], v_cache[self._slots, :, : self._kv_len]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return self._kv_len or 0

    def get_max_length(self) -> int:
        return self.max_model_len

    def get_mask_sizes(self, query_length: int, layer_idx: int = 0) -> tuple[int, int]:
        return self._kv_len or query_length, 0
