"""The yardstick: the unmodified HF model trained in one process on the same batches.

Same global batches (:class:`~pipefit.data.batches.GlobalBatches`), the same token-weighted loss over
each global batch, the same AdamW parameter groups, schedule and global-norm clipping. A pipeline
run must reproduce its per-step losses and final weights to float tolerance.

Packed and padded rows (``data.layout=pack|pad``) need no explicit mask: the model gets the rows'
position ids and no cache (``use_cache=False``), so HF's mask builders read the restarting position
ids as document starts and keep documents (and padding) apart, exactly as every pipeline block does.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from pipefit.config import RunConfig
from pipefit.data.batches import GlobalBatches
from pipefit.model.encoder import document_mask
from pipefit.model.layers import IGNORE_INDEX, causal_lm_loss, float32_model
from pipefit.model.tasks import auto_class, task_of
from pipefit.run.schedule import scheduler_factory, weight_decay_groups


def train_reference(
    model: Any,
    run: RunConfig,
    batches: GlobalBatches,
    steps: int,
    after_step: Callable[[int], None] | None = None,
    grad_norms: list[float] | None = None,
    start_step: int = 0,
) -> list[float]:
    """Train ``model`` (a HF causal LM) in place for ``steps`` optimizer steps; returns per-step losses.

    ``after_step(k)`` runs after optimizer step ``k`` (1-based), e.g. :func:`evaluate_reference`;
    ``grad_norms``, when given, receives each step's global gradient norm (before clipping).
    ``start_step`` begins at that step's batch and learning rate with fresh optimizer moments, as a
    resume on another pipeline shape does.
    """

    dtypes = sorted({str(p.dtype).replace("torch.", "") for p in model.parameters()})
    if dtypes != ["float32"]:
        # The yardstick is fp32 training (with fp32 masters a half-precision run tracks it); a bf16
        # folder loads as bf16 in HF unless asked otherwise.
        raise ValueError(
            f"the reference model holds {', '.join(dtypes)} parameters; it trains in float32: "
            "load it with from_pretrained(..., dtype=torch.float32)"
        )
    o = run.optim
    optimizer = torch.optim.AdamW(
        weight_decay_groups(list(model.named_parameters()), o.weight_decay), lr=o.lr, betas=tuple(o.betas), eps=o.eps
    )
    scheduler = scheduler_factory(o, run.train.max_steps)(optimizer)
    with warnings.catch_warnings():  # stepping the schedule ahead, before any optimizer step, is the point
        warnings.simplefilter("ignore", UserWarning)
        for _ in range(start_step):
            scheduler.step()
    lay = batches.layout
    model.train()
    losses = []
    for step in range(start_step, start_step + steps):
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
        if o.grad_clip > 0 or grad_norms is not None:
            norm = torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip if o.grad_clip > 0 else math.inf)
            if grad_norms is not None:
                grad_norms.append(float(norm))
        optimizer.step()
        scheduler.step()
        losses.append(total)
        if after_step is not None:
            after_step(step + 1)
            model.train()
    return losses


@torch.no_grad()
def evaluate_reference(model: Any, batches: GlobalBatches, rounds: int) -> tuple[float, int]:
    """Token-weighted mean loss over the first ``rounds`` global batches of ``batches`` (all ranks' rows)
    and the number of target tokens: what a pipeline run with ``train.eval_every`` logs."""
    model.eval()
    total, tokens = 0.0, 0
    for step in range(rounds):
        for r in range(batches.layout.dp):
            for (ids, pos), (targets, _) in batches.micro_batches(step, r):
                logits = model(input_ids=ids, position_ids=pos, use_cache=False).logits
                total += float(causal_lm_loss(logits, (targets, torch.ones(1))))
                tokens += int((targets != IGNORE_INDEX).sum())
    return total / max(tokens, 1), tokens


def task_reference_model(hf_config: Any, folder: Any = None, seed: int = 0) -> Any:
    """The unmodified HF task model: from ``folder``, or randomly initialised from ``seed``."""
    cls = auto_class(task_of(hf_config))
    if folder:
        return float32_model(
            cls.from_pretrained, hf_config, folder, config=hf_config, attn_implementation=hf_config._attn_implementation
        )
    torch.manual_seed(seed)
    return float32_model(cls.from_config, hf_config, hf_config)


class DocumentMasked(nn.Module):
    """An HF encoder model that keeps the documents of a row apart as the pipeline does.

    ``forward(input_ids, position_ids)`` builds the same mask as every pipeline block
    (:func:`pipefit.model.encoder.document_mask`) and passes it as the 4-D ``attention_mask``, so the single-process
    reference (:func:`pipefit.parity.reference.train_reference`) trains on padded and packed rows exactly
    like the pipeline. ``use_cache`` is accepted and ignored (encoders keep no cache).
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor, **kwargs: Any) -> Any:
        kwargs.pop("use_cache", None)
        shape = torch.empty(*input_ids.shape, 0, dtype=self.model.dtype, device=input_ids.device)
        mask = document_mask(self.model.config, shape, position_ids)
        return self.model(input_ids=input_ids, position_ids=position_ids, attention_mask=mask, **kwargs)
