"""Run calibration text through a model and hand each chosen layer's inputs to a callback.

GPTQ (Hessians), Wanda (input-channel norms) and SmoothQuant (input-channel maxima) all need statistics of what
flows into each linear layer; this is the one place that runs the model for them.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the model's blocks: every nn.Linear except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


@torch.inference_mode()
def for_each_input(
    model: nn.Module,
    blocks: torch.Tensor,
    layers: dict[str, nn.Module],
    fn: Callable[[str, torch.Tensor], None],
    batch_size: int = 4,
) -> None:
    """Call ``fn(name, x)`` with x [tokens, in_features] (float32) for every input that reaches each layer."""

    def hook(name):
        return lambda module, args: fn(name, args[0].reshape(-1, args[0].shape[-1]).float())

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    device = next(model.parameters()).device
    try:
        for start in range(0, len(blocks), batch_size):
            model(blocks[start : start + batch_size].to(device))
    finally:
        for h in handles:
            h.remove()


def hessians(model: nn.Module, blocks: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """H = 2/n * sum x x^T over all calibration tokens, per layer [K, K]."""
    acc = {name: torch.zeros(m.in_features, m.in_features) for name, m in layers.items()}
    count = dict.fromkeys(layers, 0)

    def add(name, x):
        x = x.cpu()
        acc[name].addmm_(x.T, x)
        count[name] += x.shape[0]

    for_each_input(model, blocks, layers, add)
    return {name: 2 * acc[name] / max(count[name], 1) for name in layers}


def input_norms(model: nn.Module, blocks: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """||x_j||_2 over all calibration tokens for each input channel j, per layer [K]."""
    acc = {name: torch.zeros(m.in_features) for name, m in layers.items()}

    def add(name, x):
        acc[name] += x.pow(2).sum(0).cpu()

    for_each_input(model, blocks, layers, add)
    return {name: v.sqrt() for name, v in acc.items()}


def input_absmax(model: nn.Module, blocks: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """max |x_j| over all calibration tokens for each input channel j, per layer [K]."""
    acc = {name: torch.zeros(m.in_features) for name, m in layers.items()}

    def add(name, x):
        torch.maximum(acc[name], x.abs().amax(0).cpu(), out=acc[name])

    for_each_input(model, blocks, layers, add)
    return acc
