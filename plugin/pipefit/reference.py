"""The yardstick: the unmodified HF model trained in one process on the same batches.

Same global batches (:class:`~pipefit.data.GlobalBatches`), the same token-weighted loss over
each global batch, the same AdamW parameter groups, schedule and global-norm clipping. A pipeline
run must reproduce its per-step losses and final weights to float tolerance.
"""

from __future__ import annotations

from typing import Any

import torch

from pipefit.config import RunConfig
from pipefit.data import GlobalBatches
from pipefit.schedule import scheduler_factory
from pipefit.stages import causal_lm_loss


def train_reference(model: Any, run: RunConfig, batches: GlobalBatches, steps: int) -> list[float]:
    """Train ``model`` (a HF causal LM) in place for ``steps`` optimizer steps; returns per-step losses."""
    from pipefit.train import weight_decay_groups

    o = run.optim
    optimizer = torch.optim.AdamW(
        weight_decay_groups(list(model.named_parameters()), o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
    )
    scheduler = scheduler_factory(o, run.train.max_steps)(optimizer)
    lay = batches.layout
    model.train()
    losses = []
    for step in range(steps):
        optimizer.zero_grad(set_to_none=True)
        total = 0.0
        for j in range(lay.grad_accum_steps):
            for r in range(lay.dp):
                (ids, pos), (targets, scale) = batches.micro_batches(step, r)[j]
                logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
                # The pipeline's own loss; DeepSpeed divides it by grad_accum * dp, and so does this.
                loss = causal_lm_loss(logits, (targets, scale)) / (lay.grad_accum_steps * lay.dp)
                loss.backward()
                total += float(loss.detach())
        if o.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        optimizer.step()
        scheduler.step()
        losses.append(total)
    return losses
