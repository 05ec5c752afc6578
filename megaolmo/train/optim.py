"""AdamW with OLMo's parameter groups, and OLMo's learning-rate and clipping schedules.

Schedules are pure functions of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megaolmo.config import OptimConfig


def build_optimizer(named_parameters: list[tuple[str, nn.Parameter]], config: OptimConfig, device: torch.device):
    """AdamW; the embedding is exempt from weight decay unless `decay_embeddings` (OLMo has no norm or bias
    parameters to exempt)."""
    decay, no_decay = [], []
    for name, param in named_parameters:
        exempt = name.split(".")[0] == "wte" and not config.decay_embeddings
        (no_decay if exempt else decay).append(param)
    groups = [{"params": decay, "weight_decay": config.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    fused = config.fused if config.fused is not None else device.type == "cuda"
    return torch.optim.AdamW(groups, lr=config.lr, betas=tuple(config.betas), eps=config.eps, fused=fused)


def learning_rate(config: OptimConfig, step: int, max_steps: int) -> float:
    """lr for optimizer step `step` (0-based): warmup from warmup_start x lr, then cosine, linear or constant
    down to alpha_f x lr at max_steps."""
    if step < config.warmup_steps:
        return config.lr * (config.warmup_start + (1 - config.warmup_start) * step / config.warmup_steps)
    if config.scheduler == "constant":
        return config.lr
    final = config.alpha_f * config.lr
    progress = min((step - config.warmup_steps) / max(max_steps - config.warmup_steps, 1), 1.0)
    if config.scheduler == "linear":
        return config.lr - (config.lr - final) * progress
    return final + (config.lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def max_grad_norm(config: OptimConfig, step: int) -> float | None:
    """The clipping threshold, scaled by clip_warmup_factor during the first clip_warmup_steps."""
    if config.max_grad_norm is None:
        return None
    factor = config.clip_warmup_factor if step < config.clip_warmup_steps else 1.0
    return config.max_grad_norm * factor
