"""Learning-rate schedule: linear warmup, then cosine or linear decay (or constant), or any of transformers'.

A ``LambdaLR`` built from the config and handed to ``deepspeed.initialize``. DeepSpeed's own
warmup schedulers keep the rate at 0 for the first two updates (their iteration counter starts
at -1 and then at 0); this one gives update ``k`` (0-based) the factor below, so update 0 already
learns.

Other names are ``transformers.get_scheduler``'s, with one change where it matters: most of its
warmups start at 0 (``k / warmup``), so with ``optim.warmup_steps > 0`` update 0 would move no
weight. Where transformers' factor for update 0 is 0, the warmup is sampled at
``warmup * (k + 1) / (warmup + 1)`` instead, its shape kept (for a linear warmup that is pipefit's
``(k + 1) / (warmup + 1)``); from update ``warmup`` on, the values are transformers' own.
Shifting the decay as well would not help: the schedules that decay to 0 reach it at update
``max_steps``, so the last update would be the one that moves nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from pipefit.config import ConfigError, OptimConfig
from pipefit.config.schema import SCHEDULER_ALIASES, SCHEDULERS


def transformers_lr_lambda(optim: OptimConfig, max_steps: int) -> Callable[[float], float]:
    """transformers' own multiplier for ``optim.scheduler`` (a name :func:`get_scheduler` accepts)."""
    from transformers import get_scheduler

    name = SCHEDULER_ALIASES.get(optim.scheduler, optim.scheduler)
    probe = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    try:
        built = get_scheduler(
            name,
            probe,
            num_warmup_steps=min(optim.warmup_steps, max_steps),
            num_training_steps=max_steps,
            scheduler_specific_kwargs=dict(optim.scheduler_kwargs),
        )
    except (TypeError, ValueError) as exc:
        kwargs, reason = dict(optim.scheduler_kwargs), str(exc).splitlines()[0]
        raise ConfigError(
            f"optim.scheduler_kwargs={kwargs} is not accepted by optim.scheduler={optim.scheduler} ({reason}); "
            f"accepted: the keyword arguments of transformers' {name} schedule"
        ) from None
    return built.lr_lambdas[0]


def lr_schedule(optim: OptimConfig, max_steps: int) -> Callable[[int], float]:
    """The multiplier of ``optim.lr`` for each 0-based optimizer update; a bad kwarg is a one-line error."""
    if optim.scheduler in SCHEDULERS:
        return lambda update: lr_factor(update, optim, max_steps)
    hf = transformers_lr_lambda(optim, max_steps)
    # Only a warmup that gives update 0 nothing is resampled (cosine_warmup_with_min_lr's already learns).
    warmup = min(optim.warmup_steps, max_steps) if hf(0) == 0 else 0

    def factor(update: int) -> float:
        return float(hf(warmup * (update + 1) / (warmup + 1) if update < warmup else update))

    return factor


def lr_factor(update: int, optim: OptimConfig, max_steps: int) -> float:
    """Multiplier of ``optim.lr`` for 0-based optimizer update ``update`` (pipefit's own schedules)."""
    if optim.scheduler not in SCHEDULERS:
        return lr_schedule(optim, max_steps)(update)
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
    factor = lr_schedule(optim, max_steps)

    def make(optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LambdaLR:
        return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)

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
