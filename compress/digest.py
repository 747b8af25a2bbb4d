"""What identifies a model's weights: a digest of its tensors, recorded in an artifact's manifest (``base_model``)
and used to know a model already measured (``compress.mixed``'s sensitivity cache)."""

from __future__ import annotations

import hashlib

import torch


def weight_digest(model: torch.nn.Module) -> str:
    """sha256 over the model's tensors (names, dtypes, shapes, bytes): identifies the base weights."""
    h = hashlib.sha256()
    seen = set()
    for name, t in sorted(model.state_dict().items()):
        if t.data_ptr() in seen:
            continue
        seen.add(t.data_ptr())
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(_tensor_bytes(t))
    return h.hexdigest()


def _tensor_bytes(t: torch.Tensor) -> bytes:
    t = t.detach().to("cpu").contiguous()
    return t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""
