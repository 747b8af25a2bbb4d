"""Export a raypress model of the Llama family to GGUF, the file llama.cpp (and ollama, LM Studio) run.

Written with the ``gguf`` package (the GGUF v3 writer of llama.cpp's own gguf-py), tensors named and laid out as
llama.cpp's ``convert_hf_to_gguf.py`` does for ``LlamaForCausalLM`` (q and k rows permuted from Hugging Face's
rotate-half order to llama.cpp's interleaved one). raypress's integer grids map onto GGUF blocks of 32 exactly,
up to the float16 that GGUF stores scales in:

- int8 (weights and embeddings, one scale per row) -> Q8_0: each block of 32 takes its row's scale.
- int4 groups of 32/64/128 -> Q4_1 (w = q * d + m: raypress's scale and offset, which holds the int4 and int4m
  grids) or, for the symmetric int4s specs (offset = -8 * scale), Q4_0 (w = (q - 8) * d); a group of 64 is two
  blocks with the same d and m.
- float matrices -> F32, or F16 on request (``float_type``); norms -> F32.

The tokenizer goes in as llama.cpp's BPE metadata: copied from the built-in model's own GGUF when the vocabulary is
that one (so llama.cpp splits text exactly as that file does), else built from ``tokenizer.json`` with llama.cpp's
default pre-tokenizer (which may split some text differently from Hugging Face's).
"""

from __future__ import annotations

import functools
import json
import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn

from compress import builtin, kernels, qmodules
from compress.ctensors import ExportError, float_weight

log = logging.getLogger(__name__)
BLOCK = 32

_LAYER_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def gguf_name(hf_name: str) -> str | None:
    """Hugging Face module name -> GGUF tensor name (without ".weight"); None for modules GGUF has no name for."""
    top = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
    if hf_name in top:
        return top[hf_name]
    parts = hf_name.split(".")
    if parts[:2] == ["model", "layers"] and len(parts) > 3:
        layer = _LAYER_NAMES.get(".".join(parts[3:]))
        return f"blk.{parts[2]}.{layer}" if layer else None
    return None


def _rope_rows(n: int, heads: int) -> torch.Tensor:
    """Row order that turns Hugging Face's q/k projection (rotate-half pairs) into llama.cpp's (adjacent pairs)."""
    return torch.arange(n).reshape(heads, 2, n // heads // 2).transpose(1, 2).reshape(n)


# ---------------------------------------------------------------------------------------------------------------
# Blocks


def q8_0(q: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """int8 values [N, K] with one scale per row -> Q8_0 bytes [N, K/32 * 34]: (float16 d, 32 x int8) blocks."""
    n, k = q.shape
    d = np.repeat(scale.float().numpy().astype(np.float16)[:, None], k // BLOCK, 1).reshape(-1, 1).view(np.uint8)
    qs = q.to(torch.int8).numpy().reshape(-1, BLOCK).view(np.uint8)
    return np.concatenate([d, qs], axis=1).reshape(n, -1)


def q4(q: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group_size: int, symmetric: bool) -> np.ndarray:
    """int4 values [N, K] (0..15) with scale/offset per group -> Q4_0 (symmetric) or Q4_1 bytes: (float16 d,
    [float16 m,] 16 bytes) blocks, byte j holding element j in its low nibble and element j + 16 in its high one."""
    n, k = q.shape
    per = group_size // BLOCK  # blocks per group: they share the group's d and m
    d = np.repeat(scale.float().numpy().astype(np.float16), per, 1).reshape(-1, 1).view(np.uint8)
    nib = q.to(torch.uint8).numpy().reshape(-1, 2, BLOCK // 2)
    qs = nib[:, 0] | (nib[:, 1] << 4)
    if symmetric:
        return np.concatenate([d, qs], axis=1).reshape(n, -1)
    m = np.repeat(offset.float().numpy().astype(np.float16), per, 1).reshape(-1, 1).view(np.uint8)
    return np.concatenate([d, m, qs], axis=1).reshape(n, -1)


FLOAT_TYPES = ("f32", "f16")


def _tensor(mod: nn.Module, rows: torch.Tensor | None, float_type: str = "f32"):
    """(data, GGML type) of a layer's weight, its rows reordered by ``rows`` (q/k projections); float matrices in
    ``float_type``, norms (vectors) in F32 always, as llama.cpp's own converter writes them."""
    import gguf

    pick = (lambda t: t[rows]) if rows is not None else (lambda t: t)
    if isinstance(mod, qmodules.Int8WeightOnlyLinear | qmodules.Int8Embedding):
        if mod.qweight.shape[1] % BLOCK:
            raise ExportError(f"Q8_0 needs a multiple of {BLOCK} inputs per row, not {mod.qweight.shape[1]}")
        return q8_0(pick(mod.qweight), pick(mod.scale)), gguf.GGMLQuantizationType.Q8_0
    if isinstance(mod, qmodules.Int4WeightOnlyLinear | qmodules.Int4Embedding):
        k = mod.packed.shape[1] * 2
        if mod.group_size % BLOCK or k % mod.group_size:
            raise ExportError(f"GGUF int4 blocks hold groups of a multiple of {BLOCK} that divide the row "
                              f"({mod.group_size} in {k})")
        symmetric = qmodules.is_symmetric(mod.scale, mod.offset)
        q = pick(kernels.unpack_int4(mod.packed))
        data = q4(q, pick(mod.scale), pick(mod.offset), mod.group_size, symmetric)
        return data, gguf.GGMLQuantizationType.Q4_0 if symmetric else gguf.GGMLQuantizationType.Q4_1
    weight = pick(float_weight(mod).float())
    if float_type == "f16" and weight.dim() == 2:
        return weight.half().numpy(), gguf.GGMLQuantizationType.F16
    return weight.numpy(), gguf.GGMLQuantizationType.F32


# ---------------------------------------------------------------------------------------------------------------
# The file


def write(model: nn.Module, tokenizer, path: str | Path, name: str, float_type: str = "f32") -> Path:
    """Write ``model`` (a raypress Llama-family causal LM, compressed or not) and ``tokenizer`` as one GGUF file,
    its float matrices (a float model's, or layers a spec kept float) in ``float_type`` ("f32" or "f16")."""
    import gguf

    if float_type not in FLOAT_TYPES:
        raise ValueError(f"float_type {float_type!r}: expected one of {FLOAT_TYPES}")
    config = model.config
    if config.model_type != "llama":
        raise ExportError(f"GGUF export writes Llama-family models; this one is {config.model_type!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("GGUF export of Llama layers with biases is not supported")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"rope scaling {rope.get('rope_type')!r} is not written to GGUF by raypress")
    theta = rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    tied = bool(getattr(config, "tie_word_embeddings", False))

    path = Path(path)
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name(name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(float(theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(config.vocab_size)
    _tokenizer_metadata(writer, tokenizer)

    types = set()
    for module_name, mod in model.named_modules():
        base = gguf_name(module_name)
        if base is None or (base == "output" and tied):  # a tied head is token_embd, which llama.cpp reuses
            continue
        rows = None
        if base.endswith("attn_q"):
            rows = _rope_rows(heads * head_dim, heads)
        elif base.endswith("attn_k"):
            rows = _rope_rows(kv_heads * head_dim, kv_heads)
        try:
            data, kind = _tensor(mod, rows, float_type)
        except ExportError as e:
            raise ExportError(f"layer {module_name!r}: {e}") from None
        types.add(kind)
        writer.add_tensor(f"{base}.weight", data, raw_dtype=kind)
    writer.add_file_type(_file_type(types))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def _file_type(types: set) -> int:
    import gguf

    T, F = gguf.GGMLQuantizationType, gguf.LlamaFileType
    for kind, ftype in ((T.Q4_1, F.MOSTLY_Q4_1), (T.Q4_0, F.MOSTLY_Q4_0), (T.Q8_0, F.MOSTLY_Q8_0),
                        (T.F16, F.MOSTLY_F16)):
        if kind in types:
            return ftype
    return F.ALL_F32


def _tokenizer_metadata(writer, tokenizer) -> None:
    """llama.cpp's BPE tokenizer fields: the built-in GGUF's own when the vocabulary is the same, else built from
    the Hugging Face tokenizer."""
    import gguf

    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    for name in builtin.BUILTINS:
        fields = _builtin_tokenizer(name)
        if fields and fields["tokenizer.ggml.tokens"][0] == tokens:
            for key, (value, vtype, sub) in fields.items():
                writer.add_key_value(key, value, vtype, sub_type=sub)
            return
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    model = spec.get("model", {})
    if model.get("type") != "BPE":
        raise ExportError(f"GGUF export builds tokenizers of the BPE kind; this one is {model.get('type')!r}")
    log.warning("GGUF tokenizer built from tokenizer.json with llama.cpp's default pre-tokenizer: llama.cpp may "
                "split some text differently from the Hugging Face tokenizer")
    special = {t["content"] for t in spec.get("added_tokens", []) if t.get("special")}
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.CONTROL if t in special else gguf.TokenType.NORMAL for t in tokens])
    merges = model.get("merges", [])
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    for token, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                       ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        token_id = getattr(tokenizer, f"{token}_token_id", None)
        if token_id is not None:
            add(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))
    if getattr(tokenizer, "chat_template", None):
        writer.add_chat_template(tokenizer.chat_template)


@functools.cache
def _builtin_tokenizer(name: str) -> dict:
    """The tokenizer fields {key: (value, type, element type)} of a built-in model's GGUF; {} when it has none."""
    import gguf

    try:
        source = builtin.builtin_source(name)
    except FileNotFoundError:
        return {}
    if source.suffix != ".gguf":
        return {}
    reader = gguf.GGUFReader(str(source))
    return {key: (field.contents(), field.types[0], field.types[1] if len(field.types) > 1 else None)
            for key, field in reader.fields.items() if key.startswith("tokenizer.")}
