"""The compressed-tensors checkpoint format (what llm-compressor writes and vLLM and Hugging Face transformers load):
export a raypress model to it, and load such a checkpoint onto raypress's own quantized modules.

Written as compressed-tensors 0.20 defines it (``compressed_tensors.config``, ``compressors/pack_quantized``,
``compressors/naive_quantized``; format version in ``VERSION``). A checkpoint is a Hugging Face folder whose
``config.json`` carries a ``quantization_config`` naming, per group of target layers, how weights (and
activations) are quantized, and whose safetensors hold, per quantized Linear ``L``:

- ``pack-quantized`` (weights only, W8A16 / W4A16): ``L.weight_packed`` int32 [N, K*bits/32], values stored
  unsigned (signed value + 2**(bits-1)), element j of a row in bits j*bits.. of its word (little end first);
  ``L.weight_scale`` [N, 1] (channel) or [N, K/group] (group); ``L.weight_shape`` [2]; asymmetric schemes add
  ``L.weight_zero_point`` (signed, packed the same way along dim 0). w = (q - zero_point) * scale.
- ``int-quantized`` (W8A8, int8 activations quantized per token at run time): ``L.weight`` int8 [N, K],
  ``L.weight_scale`` [N, 1].

raypress's int8 specs are symmetric per channel, so they map exactly. Its int4 groups with integer zero points map
exactly too: ``int4-gN`` (asymmetric, ``weight_zero_point``) and ``int4s-gN`` (symmetric, zero point 8); its
``int4m-gN`` groups are offset by their float minimum, which no integer zero point holds, so they are refused with
the specs to use instead. Embeddings are written as float, and the output head is left out of quantization
(``ignore``), as vLLM expects. Hugging Face's loader (transformers 5.24) refuses asymmetric W4A16 (it expects zero
points unpacked); vLLM's GPU kernels and raypress's importer read them.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from compress import kernels, qmodules, quantize

VERSION = "0.20.0"
QUANT_METHOD = "compressed-tensors"


class ExportError(ValueError):
    """The variant cannot be written in the requested format; the message says which variant would be."""


# ---------------------------------------------------------------------------------------------------------------
# Packing (compressors/pack_quantized/helpers.py: pack_to_int32 / unpack_from_int32)


def pack_int32(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned ``bits``-bit values [R, C] (0 <= v < 2**bits) -> int32 [R, ceil(C * bits / 32)], element j of a
    row in bits j*bits.. of the row's words, low bits first. For bits 4 and 8, which divide 32."""
    per = 32 // bits
    rows, cols = values.shape
    pad = -cols % per
    v = torch.nn.functional.pad(values.to(torch.int64), (0, pad)).view(rows, -1, per)
    shifts = torch.arange(per, dtype=torch.int64) * bits
    words = (v << shifts).sum(-1)  # < 2**32: fits int64; the int32 view keeps the bits
    return (words - ((words >= 2**31).to(torch.int64) << 32)).to(torch.int32)


def unpack_int32(packed: torch.Tensor, bits: int, cols: int) -> torch.Tensor:
    """The inverse of ``pack_int32``: int32 [R, W] -> unsigned values int64 [R, cols]."""
    per = 32 // bits
    words = packed.to(torch.int64) & 0xFFFFFFFF
    shifts = torch.arange(per, dtype=torch.int64) * bits
    values = (words[..., None] >> shifts) & (2**bits - 1)
    return values.reshape(packed.shape[0], -1)[:, :cols]


# ---------------------------------------------------------------------------------------------------------------
# Export


def _weights_args(bits: int, group_size: int | None, symmetric: bool = True) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": symmetric, "strategy": "group" if group_size else "channel",
            "group_size": group_size, "block_structure": None, "dynamic": False, "actorder": None,
            "observer": "minmax", "observer_kwargs": {}}


_TOKEN_ACTIVATIONS = {"num_bits": 8, "type": "int", "symmetric": True, "strategy": "token", "group_size": None,
                      "block_structure": None, "dynamic": True, "actorder": None, "observer": None,
                      "observer_kwargs": {}}


def export_state(model: nn.Module, spec: str) -> tuple[dict[str, torch.Tensor], dict | None]:
    """The checkpoint tensors of ``model`` (a raypress model, compressed by ``spec``) and its quantization_config
    (None: a plain dense checkpoint). Raises ExportError for layers the format cannot hold."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    state, schemes, kept_float = {}, {}, []
    ignore = [_name_of(model, head)] if head is not None else []  # the output head stays float
    float_dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    for name, mod in model.named_modules():
        prefix = f"{name}." if name else ""
        if mod is head:
            if not tied:  # (a tied head is the input embedding, written as such)
                state[f"{prefix}weight"] = float_weight(mod).to(float_dtype)
                _bias(state, prefix, mod)
            continue
        if isinstance(mod, qmodules.Int8DynamicLinear):
            schemes[name] = ("int-quantized", json.dumps([_weights_args(8, None), _TOKEN_ACTIVATIONS]))
            state[f"{prefix}weight"] = mod.qweight.detach().clone()
            state[f"{prefix}weight_scale"] = mod.scale.detach().to(float_dtype)[:, None].clone()
        elif isinstance(mod, qmodules.Int8WeightOnlyLinear):
            schemes[name] = ("pack-quantized", json.dumps([_weights_args(8, None), None]))
            state[f"{prefix}weight_packed"] = pack_int32(mod.qweight.to(torch.int64) + 128, 8)
            state[f"{prefix}weight_scale"] = mod.scale.detach().to(float_dtype)[:, None].clone()
            state[f"{prefix}weight_shape"] = torch.tensor([mod.out_features, mod.in_features])
        elif isinstance(mod, qmodules.Int4WeightOnlyLinear):
            zero_point = qmodules.zero_points(mod.scale, mod.offset)
            if zero_point is None:
                raise ExportError(
                    f"{spec!r}: layer {name!r} holds int4 groups offset by their float minimum (raypress's int4m "
                    "grid, GGUF's Q4_1), which compressed-tensors' integer zero points cannot hold exactly; export "
                    f"it as gguf, or compress with int4-g{mod.group_size} (integer zero points) or "
                    f"int4s-g{mod.group_size} (symmetric) to export it here")
            if mod.in_features % mod.group_size:
                widths = {m.in_features for m in model.modules() if isinstance(m, qmodules.Int4WeightOnlyLinear)}
                fits = [g for g in quantize.GROUP_SIZES if all(k % g == 0 for k in widths)]
                raise ExportError(f"{spec!r}: group size {mod.group_size} does not divide layer {name!r}'s "
                                  f"{mod.in_features} inputs; compressed-tensors needs whole groups: use "
                                  f"{', '.join(f'g{g}' for g in fits) or 'int8'} for this model")
            symmetric = bool((zero_point == 8).all())
            schemes[name] = ("pack-quantized", json.dumps([_weights_args(4, mod.group_size, symmetric), None]))
            state[f"{prefix}weight_packed"] = pack_int32(kernels.unpack_int4(mod.packed), 4)
            state[f"{prefix}weight_scale"] = mod.scale.detach().to(float_dtype).clone()
            state[f"{prefix}weight_shape"] = torch.tensor([mod.out_features, mod.in_features])
            if not symmetric:  # w = (u - zp) * scale: stored signed (zp - 8), packed along the output rows
                state[f"{prefix}weight_zero_point"] = pack_int32(zero_point.t(), 4).t().contiguous()
        elif isinstance(mod, qmodules.Int8Embedding | qmodules.Int4Embedding):
            state[f"{prefix}weight"] = mod.weight.detach().to(float_dtype).clone()
            continue
        else:
            for key, tensor in list(mod.named_parameters(recurse=False)) + list(mod.named_buffers(recurse=False)):
                if key in mod._non_persistent_buffers_set or tensor is None:
                    continue
                state[f"{prefix}{key}"] = tensor.detach().clone()
            if isinstance(mod, nn.Linear):
                kept_float.append(name)  # a layer the spec kept float (or a float model's)
            continue
        _bias(state, prefix, mod)
    return state, _quantization_config(schemes, ignore + kept_float)


def _bias(state: dict, prefix: str, mod: nn.Module) -> None:
    if getattr(mod, "bias", None) is not None:
        state[f"{prefix}bias"] = mod.bias.detach().clone()


def _name_of(model: nn.Module, module: nn.Module) -> str:
    return next(n for n, m in model.named_modules() if m is module)


def float_weight(mod: nn.Module) -> torch.Tensor:
    """The float weight [N, K] a (quantized or float) Linear or embedding computes with."""
    if isinstance(mod, qmodules.Int4WeightOnlyLinear):
        return kernels.widen_int4(mod.packed, mod.scale.float(), mod.offset.float(), mod.group_size)
    if isinstance(mod, qmodules.Int8WeightOnlyLinear):
        return mod.qweight.float() * mod.scale.float()[:, None]
    return mod.weight.detach()


def _quantization_config(schemes: dict[str, tuple[str, str]], ignore: list[str]) -> dict | None:
    if not schemes:
        return None
    groups, formats = {}, set()
    for fmt, args in sorted(set(schemes.values())):
        weights, activations = json.loads(args)
        targets = [n for n, s in schemes.items() if s == (fmt, args)]
        groups[f"group_{len(groups)}"] = {
            # one scheme for every Linear (the usual case) targets the class; otherwise the layers by name
            "targets": ["Linear"] if len(set(schemes.values())) == 1 else [f"re:^{n}$" for n in targets],
            "weights": weights, "input_activations": activations, "output_activations": None, "format": fmt,
        }
        formats.add(fmt)
    return {
        "quant_method": QUANT_METHOD, "format": formats.pop() if len(formats) == 1 else "mixed-precision",
        "quantization_status": "compressed", "config_groups": groups, "ignore": sorted(ignore),
        "kv_cache_scheme": None, "global_compression_ratio": None, "sparsity_config": {}, "transform_config": {},
        "version": VERSION,
    }


# ---------------------------------------------------------------------------------------------------------------
# Import


def is_checkpoint(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    if not config.exists():
        return False
    quant = json.loads(config.read_text()).get("quantization_config") or {}
    return quant.get("quant_method") == QUANT_METHOD


def swap_in_(model: nn.Module, quant: dict, tensors: dict[str, torch.Tensor]) -> tuple[dict, set[str]]:
    """Replace each quantized Linear of ``model`` named by ``quant`` (a quantization_config) with raypress's
    module holding the checkpoint's integers; returns the tensors left for ``load_state_dict`` and the names of
    the layers replaced."""
    import re

    rest, swapped = dict(tensors), set()
    ignore = set(quant.get("ignore") or [])
    groups = list((quant.get("config_groups") or {}).values())
    for name, mod in list(model.named_modules()):
        if not isinstance(mod, nn.Linear) or name in ignore or f"{name}.weight_scale" not in tensors:
            continue
        group = next((g for g in groups if any(t == "Linear" or (t.startswith("re:") and re.match(t[3:], name))
                                               or t == name for t in g["targets"])), None)
        if group is None:
            continue
        new = _module(name, mod, group, {k[len(name) + 1:]: rest.pop(k) for k in list(rest)
                                          if k.startswith(f"{name}.")})
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, new)
        swapped.add(name)
    return rest, swapped


def _module(name: str, linear: nn.Linear, group: dict, t: dict[str, torch.Tensor]) -> nn.Module:
    w, act = group["weights"], group.get("input_activations")
    fmt = group.get("format")
    bits, strategy, n, k = w["num_bits"], w["strategy"], linear.out_features, linear.in_features
    dtype = linear.weight.dtype
    scale = t["weight_scale"].to(torch.float32)
    if "weight_packed" in t:
        q = unpack_int32(t["weight_packed"], bits, k)  # unsigned: signed value + 2**(bits-1)
    elif "weight" in t and t["weight"].dtype == torch.int8:
        q = t["weight"].to(torch.int64) + 2 ** (bits - 1)
    else:
        raise ValueError(f"compressed-tensors layer {name!r}: format {fmt!r} with tensors {sorted(t)} is not one "
                         "raypress reads (it reads pack-quantized and int-quantized int4/int8)")
    if bits == 8 and strategy == "channel" and w.get("symmetric", True) and "weight_zero_point" not in t:
        dynamic = act is not None and act.get("dynamic") and act.get("strategy") == "token" and act["num_bits"] == 8
        cls = qmodules.Int8DynamicLinear if dynamic else qmodules.Int8WeightOnlyLinear
        mod = cls(k, n, "bias" in t, dtype)
        mod.qweight.copy_((q - 128).to(torch.int8))
        mod.scale.copy_(scale[:, 0].to(dtype))
    elif bits == 4 and strategy == "group" and w["group_size"] in quantize.GROUP_SIZES and k % 16 == 0:
        zero = torch.zeros_like(scale)  # signed zero points, packed along dim 0: [ceil(N/8), G]; symmetric: none
        if "weight_zero_point" in t:
            zero = unpack_int32(t["weight_zero_point"].t().contiguous(), 4, n).t().to(torch.float32) - 8
        # w = (u - 8 - zp) * scale = u * scale + offset
        offset = -(8 + zero) * scale
        mod = qmodules.Int4WeightOnlyLinear.from_quantized(q.to(torch.uint8), scale, offset, w["group_size"],
                                                           t.get("bias"))
    else:
        raise ValueError(f"compressed-tensors layer {name!r}: {bits}-bit {strategy} weights "
                         f"(group size {w.get('group_size')}) have no raypress kernel; it runs int8 per channel and "
                         f"int4 in groups of {quantize.GROUP_SIZES}")
    if "bias" in t and bits == 8:
        mod.bias.copy_(t["bias"].to(dtype))
    return mod


def load(path: str | Path, *, device: torch.device, dtype: torch.dtype | None = None):
    """Load a compressed-tensors checkpoint with its quantized Linear layers on raypress's int8/int4 modules (the
    CPU kernels), rather than decompressed to float as Hugging Face's loader does."""
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    from compress import hf

    path = Path(path)
    config = AutoConfig.from_pretrained(path)
    quant = config.quantization_config
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    del config.quantization_config  # built as a plain model; the layers are swapped here
    kind = hf.model_kind(config)
    cls = AutoModelForCausalLM if kind == hf.CAUSAL else AutoModel
    dtype = dtype or hf.default_dtype(device)
    with no_init_weights():
        model = cls.from_config(config, dtype=dtype)
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        tensors.update(load_file(str(file)))
    rest, swapped = swap_in_(model, quant, tensors)
    missing, unexpected = model.load_state_dict(rest, strict=False)
    missing = [k for k in missing if k.rpartition(".")[0] not in swapped]
    head = model.get_output_embeddings()
    tied = {f"{_name_of(model, head)}.weight"} if head is not None and config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise ValueError(f"compressed-tensors checkpoint {str(path)!r}: tensors missing "
                         f"{sorted(set(missing) - tied)[:5]}, not used {sorted(unexpected)[:5]}")
    model.tie_weights()
    model.to(device).eval()
    return hf.LoadedModel(model, hf.load_tokenizer(path, kind), kind)
