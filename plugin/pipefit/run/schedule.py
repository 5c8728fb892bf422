"""Learning-rate schedule: linear warmup, then cosine or linear decay (or constant).

A ``LambdaLR`` built from the config and handed to ``deepspeed.initialize``. DeepSpeed's own
warmup schedulers keep the rate at 0 for the first two updates (their iteration counter starts
at -1 and then at 0); this one gives update ``k`` (0-based) the factor below, so update 0 already
learns.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pipefit.config import OptimConfig


def lr_factor(update: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` for 0-based optimizer update ``update``."""
    warmup = min(optim.warmup_steps, max_steps)
    if update < warmup:
        return (update + 1) / (warmup + 1)
    if optim.scheduler == "constant":
        return 1.0
    span = max(1, max_steps - warmup)
    progress = min(1.0, (update - warmup) / span)
    floor = optim.min_lr_ratio
    if optim.scheduler == "linear":
        return 1.0 - (1.0 - floor) * progress
    return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))


def scheduler_factory(
    optim: OptimConfig, max_steps: int
) -> Callable[[torch.optim.Optimizer], torch.optim.lr_scheduler.LambdaLR]:
    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda k: lr_factor(k, optim, max_steps))

    return make


def weight_decay_groups(params: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay matrices, not biases or norm weights (1-D tensors). Shared with the reference."""
    decay = [p for _, p in params if p.requires_grad and p.ndim >= 2]
    no_decay = [p for _, p in params if p.requires_grad and p.ndim < 2]
    groups = []
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups
