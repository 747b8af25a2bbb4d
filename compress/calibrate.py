"""Run calibration text through a model and hand each chosen layer's inputs to a callback.

GPTQ (Hessians) and Wanda (input-channel norms) need statistics of what flows into each linear layer; this is the
one place that runs the model for them. ``block_by_block`` runs the model one transformer block at a time, so a
method can change a block (quantize it) before the next block's inputs are computed from the changed one.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

Inputs = list[tuple[tuple, dict]]  # the (args, kwargs) of one call of a block, per calibration batch
InputFn = Callable[[str, torch.Tensor], None]  # fn(layer name, inputs [tokens, in_features])
Feed = Callable[[InputFn, dict[str, nn.Module]], None]  # feed(fn, layers): fn gets each input of those layers


def block_linears(model: nn.Module) -> dict[str, nn.Linear]:
    """The linear layers inside the model's blocks: every nn.Linear except the output head."""
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    return {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear) and m is not head}


@torch.inference_mode()
def for_each_input(
    model: nn.Module,
    tokens: torch.Tensor,
    layers: dict[str, nn.Module],
    fn: Callable[[str, torch.Tensor], None],
    batch_size: int = 4,
) -> None:
    """Call ``fn(name, x)`` with x [tokens, in_features] (float32) for every input that reaches each layer."""

    def run():
        for batch in _batches(model, tokens, batch_size):
            model(batch)

    _with_input_hooks(layers, fn, run)


def _batches(model: nn.Module, tokens: torch.Tensor, batch_size: int):
    device = next(model.parameters()).device
    for start in range(0, len(tokens), batch_size):
        yield tokens[start : start + batch_size].to(device)


def _with_input_hooks(layers: dict[str, nn.Module], fn: InputFn, run: Callable) -> None:
    def hook(name):
        return lambda module, args: fn(name, args[0].reshape(-1, args[0].shape[-1]).float())

    handles = [module.register_forward_pre_hook(hook(name)) for name, module in layers.items()]
    try:
        run()
    finally:
        for h in handles:
            h.remove()


def hessians(model: nn.Module, tokens: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """H = 2/n * sum x x^T over all calibration tokens, per layer [K, K]."""
    return hessians_of(layers, lambda fn: for_each_input(model, tokens, layers, fn))


def hessians_of(layers: dict[str, nn.Module], feed: Callable[[InputFn], None]) -> dict[str, torch.Tensor]:
    """H per layer from ``feed(fn)``, which must call fn(name, x) with every input x [tokens, K] of each layer."""
    acc = {name: torch.zeros(m.in_features, m.in_features) for name, m in layers.items()}
    count = dict.fromkeys(layers, 0)

    def add(name, x):
        x = x.cpu()
        acc[name].addmm_(x.T, x)
        count[name] += x.shape[0]

    feed(add)
    return {name: 2 * acc[name] / max(count[name], 1) for name in layers}


# ---------------------------------------------------------------------------------------------------------------
# Block by block


class _Captured(Exception):
    """Stops the model's forward once the first block's inputs are captured."""


def transformer_blocks(model: nn.Module) -> nn.ModuleList | None:
    """The model's stack of blocks: the ModuleList of modules of one type with ``config.num_hidden_layers`` of them
    where the model says how many, else the longest such list (None if it has none). GPTQ, Wanda and distillation
    all find the blocks here."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) > 1]
    lists = [m for m in lists if len({type(b) for b in m}) == 1]
    n = getattr(getattr(model, "config", None), "num_hidden_layers", None)
    return next((m for m in lists if len(m) == n), None) or max(lists, key=len, default=None)


@torch.inference_mode()
def block_by_block(
    model: nn.Module,
    tokens: torch.Tensor,
    visit: Callable[[nn.Module, Feed], None],
    batch_size: int = 4,
) -> bool:
    """Feed calibration text through the model's blocks one at a time: ``visit(block, feed)`` may change the block;
    ``feed(fn, layers)`` calls fn(name, x) with the inputs of those of the block's layers, computed from the blocks
    before it as changed. Returns False (visiting nothing) when the model has no recognisable block stack."""
    stack = transformer_blocks(model)
    if stack is None:
        return False
    inputs = _first_block_inputs(model, stack[0], tokens, batch_size)
    for block in stack:

        def run(block=block, inputs=inputs):
            return [block(*args, **kwargs) for args, kwargs in inputs]

        visit(block, lambda fn, layers, run=run: _with_input_hooks(layers, fn, run))
        inputs = [_with_hidden_states(args, kwargs, out) for out, (args, kwargs) in zip(run(), inputs, strict=True)]
    return True


def _first_block_inputs(model: nn.Module, first: nn.Module, tokens: torch.Tensor, batch_size: int) -> Inputs:
    captured: Inputs = []

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        for key in ("past_key_values", "past_key_value", "cache"):  # no key/value cache: every run starts afresh
            if key in kwargs:
                kwargs[key] = None
        if "use_cache" in kwargs:
            kwargs["use_cache"] = False
        captured.append((args, kwargs))
        raise _Captured

    handle = first.register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for batch in _batches(model, tokens, batch_size):
            try:
                model(batch)
            except _Captured:
                pass
    finally:
        handle.remove()
    return captured


def _with_hidden_states(args: tuple, kwargs: dict, out) -> tuple[tuple, dict]:
    """The next block's call: this block's output in place of its hidden states."""
    hidden = out[0] if isinstance(out, tuple) else out
    if args:
        return (hidden, *args[1:]), kwargs
    return args, {**kwargs, "hidden_states": hidden}


def input_norms(model: nn.Module, tokens: torch.Tensor, layers: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """||x_j||_2 over all calibration tokens for each input channel j, per layer [K]."""
    acc = {name: torch.zeros(m.in_features) for name, m in layers.items()}

    def add(name, x):
        acc[name] += x.pow(2).sum(0).cpu()

    for_each_input(model, tokens, layers, add)
    return {name: v.sqrt() for name, v in acc.items()}
