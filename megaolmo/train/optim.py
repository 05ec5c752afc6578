"""AdamW with OLMo's parameter groups, and OLMo's learning-rate and clipping schedules.

Schedules are pure functions of the step, so a resumed run needs no scheduler state.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from megaolmo.config import ConfigError, OptimConfig


def build_optimizer(named_parameters: list[tuple[str, nn.Parameter]], config: OptimConfig, device: torch.device):
    """AdamW; the embedding (wte) is exempt from weight decay unless `decay_embeddings`, and every other
    parameter is decayed.

    OLMo-1 has no norm weights or biases to exempt. OLMo-2/3's RMSNorm weights (attn_norm, ff_norm, q_norm,
    k_norm, ln_f) are decayed like the linears, as allenai/OLMo does with `decay_norm_and_bias: true` and
    OLMo-core with its only override, weight_decay 0 on `embeddings.weight`.
    """
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
    down to alpha_f x lr at max_steps.

    The schedule is evaluated at step + 1, as OLMo's trainer does (it counts the step before setting its lr):
    the first step already takes one warmup increment, so a warmup from 0 (OLMo-2) does not waste it.

    A warmup given in tokens (optim.warmup_tokens) is turned into steps by megaolmo.config.resolve, which
    needs the batch; until then warmup_steps is null and there is no schedule to compute.
    """
    warmup = config.warmup_steps
    if warmup is None:
        raise ConfigError(
            f"optim.warmup_tokens={config.warmup_tokens} is not resolved into optim.warmup_steps yet; "
            "call megaolmo.config.resolve(config, world_size) first"
        )
    step += 1  # OLMo's global step: 1 for the first optimizer step
    if step < warmup:
        return config.lr * (config.warmup_start + (1 - config.warmup_start) * step / warmup)
    if config.scheduler == "constant":
        return config.lr
    final = config.alpha_f * config.lr
    progress = min((step - warmup) / max(max_steps - warmup, 1), 1.0)
    if config.scheduler == "linear":
        return config.lr - (config.lr - final) * progress
    return final + (config.lr - final) * 0.5 * (1 + math.cos(math.pi * progress))


def max_grad_norm(config: OptimConfig, step: int) -> float | None:
    """The clipping threshold, scaled by clip_warmup_factor during the first clip_warmup_steps."""
    if config.max_grad_norm is None:
        return None
    factor = config.clip_warmup_factor if step < config.clip_warmup_steps else 1.0
    return config.max_grad_norm * factor
