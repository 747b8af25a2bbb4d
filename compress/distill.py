"""Distillation: a shallower student cut from the teacher, trained to match it.

    distill_(model, DistillConfig(layers=15, tokens=32_768), blocks=calibration_token_blocks)

The student keeps ``layers`` of the teacher's blocks, evenly spaced (first and last included), with every other
weight copied. It is then trained on calibration text to match the teacher: KL divergence between
temperature-softened next-token distributions for causal LMs (scaled by T^2, Hinton et al., 2015), mean squared
error of the final hidden states for encoders. The model is changed in place; the teacher is a copy taken first.
"""

from __future__ import annotations

import copy
import logging
import math
import time
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from compress import calibrate

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistillConfig:
    layers: int
    tokens: int = 32_768  # training budget: tokens the student sees
    temperature: float = 2.0
    lr: float = 1e-4
    batch_size: int = 4
    needs_calibration: ClassVar[bool] = True

    def __post_init__(self):
        if self.layers < 1:
            raise ValueError(f"DistillConfig.layers={self.layers!r}: expected at least 1")
        if self.tokens < 0 or self.temperature <= 0 or self.lr <= 0:
            raise ValueError(f"DistillConfig {self}: tokens >= 0, temperature > 0 and lr > 0 expected")

    @property
    def token(self) -> str:
        return f"distill-L{self.layers}"

    def apply_(self, model: nn.Module, *, restore: bool = False, blocks: torch.Tensor | None = None) -> dict:
        return distill_(model, self, restore=restore, blocks=blocks)


def _blocks_list(model: nn.Module) -> tuple[nn.Module, str, nn.ModuleList]:
    """The model's transformer blocks (calibrate.transformer_blocks), with the module and attribute holding them."""
    blocks = calibrate.transformer_blocks(model)
    for module in model.modules():
        for name, child in module.named_children():
            if child is blocks and blocks is not None:
                return module, name, child
    raise ValueError(f"cannot find the transformer blocks of {type(model).__name__} to distill")


def keep_layers(n_teacher: int, n_student: int) -> list[int]:
    """Evenly spaced block indices, first and last included."""
    if n_student >= n_teacher:
        raise ValueError(f"a student needs fewer layers than the teacher's {n_teacher}, got {n_student}")
    if n_student == 1:
        return [n_teacher - 1]
    return sorted({round(i * (n_teacher - 1) / (n_student - 1)) for i in range(n_student)})


def cut_layers_(model: nn.Module, n_student: int) -> list[int]:
    parent, name, blocks = _blocks_list(model)
    keep = keep_layers(len(blocks), n_student)
    setattr(parent, name, nn.ModuleList([blocks[i] for i in keep]))
    for new_idx, block in enumerate(getattr(parent, name)):
        for sub in block.modules():
            if hasattr(sub, "layer_idx"):
                sub.layer_idx = new_idx  # the KV cache is indexed by layer
    model.config.num_hidden_layers = len(keep)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in keep]
    return keep


def _loss(student_out, teacher_out, temperature: float) -> torch.Tensor:
    if hasattr(student_out, "logits") and student_out.logits is not None:
        t = temperature
        s_lp = F.log_softmax(student_out.logits.float() / t, dim=-1)
        t_lp = F.log_softmax(teacher_out.logits.float() / t, dim=-1)
        return F.kl_div(s_lp, t_lp, log_target=True, reduction="none").sum(-1).mean() * t * t
    return F.mse_loss(student_out.last_hidden_state.float(), teacher_out.last_hidden_state.float())


@torch.no_grad()
def distill_loss(student: nn.Module, teacher: nn.Module, blocks: torch.Tensor, temperature: float = 1.0) -> float:
    device = next(student.parameters()).device
    losses = [_loss(student(b[None].to(device)), teacher(b[None].to(device)), temperature).item() for b in blocks]
    return sum(losses) / max(len(losses), 1)


def distill_(
    model: nn.Module, config: DistillConfig, *, restore: bool = False, blocks: torch.Tensor | None = None
) -> dict:
    """Cut the model to ``config.layers`` blocks and train it against a copy of itself; returns a report with the
    loss on held-out calibration blocks before and after training (KL at T=1 for causal LMs)."""
    if restore:
        return {}  # the saved config already has the student's depth
    if blocks is None:
        raise ValueError("distillation needs calibration text (blocks=)")
    teacher = copy.deepcopy(model).eval()
    keep = cut_layers_(model, config.layers)
    held_out = blocks[: max(1, len(blocks) // 8)]
    train = blocks[len(held_out) :] if len(blocks) > 1 else blocks
    before = distill_loss(model, teacher, held_out)
    steps = math.ceil(config.tokens / (config.batch_size * blocks.shape[1]))
    log.info("distill: student keeps blocks %s; %d steps over %d tokens; held-out loss %.4f", keep, steps,
             config.tokens, before)
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    if dtype != torch.float32:  # train in float32: AdamW's small updates vanish in bf16 weights; back after training
        model.float()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=config.lr, weight_decay=0.0)
    model.train()
    rng = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    with torch.enable_grad():
        for step in range(steps):
            idx = torch.randint(0, len(train), (config.batch_size,), generator=rng)
            batch = train[idx].to(device)
            with torch.no_grad():
                target = teacher(batch)
            loss = _loss(model(batch), target, config.temperature)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            if step % max(1, steps // 10) == 0 or step == steps - 1:
                elapsed = time.perf_counter() - start
                log.info("distill step %d/%d loss %.4f (%.0f s)", step + 1, steps, loss.item(), elapsed)
    model.eval().to(dtype)
    after = distill_loss(model, teacher, held_out)
    log.info("distill: held-out loss %.4f -> %.4f", before, after)
    return {"kept_layers": keep, "loss_before": before, "loss_after": after, "steps": steps}
