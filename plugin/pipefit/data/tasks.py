"""Task batches: masked-LM and sequence-classification micro-batches over the rows of :mod:`pipefit.data.batches`.

The causal LM trains on the rows as they are; the encoder tasks (chosen by the config's
``architectures``, :mod:`pipefit.model.tasks`) mask tokens or read a label per example.
"""

from __future__ import annotations

import functools
from typing import Any

import numpy as np
import torch

from pipefit.config import ConfigError, DataConfig
from pipefit.data.batches import BatchLayout, GlobalBatches, Rows, pad_token_id
from pipefit.data.batches import build_batches as build_lm_batches
from pipefit.data.sources import load_raw_dataset
from pipefit.model.layers import IGNORE_INDEX
from pipefit.model.tasks import CAUSAL_LM, MASK_TOKEN, MASKED_LM, MLM_PROBABILITY, SEQUENCE_CLASSIFICATION, task_of


def ensure_mask_token(tokenizer: Any, hf_config: Any) -> int:
    """The tokenizer's mask token id; ``<|mask|>`` is added to a tokenizer that has none."""
    if tokenizer.mask_token is None:
        tokenizer.add_special_tokens({"mask_token": MASK_TOKEN})
    vocab = int(hf_config.vocab_size)
    if len(tokenizer) > vocab:
        raise ConfigError(
            f"model.hf_config.vocab_size={vocab} has no room for the mask token {tokenizer.mask_token!r}: the "
            f"tokenizer has {len(tokenizer)} tokens with it; use vocab_size >= {len(tokenizer)}"
        )
    return int(tokenizer.mask_token_id)


class MaskedLMBatches:
    """Masked-LM micro-batches over ``base`` (:class:`pipefit.data.batches.GlobalBatches`), identical on every rank.

    Step ``k``'s whole global batch is masked at once by a generator seeded with ``(seed, k)``;
    targets are the original ids at masked positions, ``-100`` elsewhere, and ``scale`` is
    ``grad_accum * dp / masked tokens in the global batch`` (the token mean, as for causal LMs).
    Special tokens and padding are never masked.
    """

    def __init__(self, base: GlobalBatches, tokenizer: Any, seed: int) -> None:
        from transformers import DataCollatorForLanguageModeling

        self.base = base
        self.layout: BatchLayout = base.layout
        self.seed = seed
        self.collator = DataCollatorForLanguageModeling(tokenizer=tokenizer, mlm_probability=MLM_PROBABILITY)
        self.never_masked = torch.tensor(sorted({*tokenizer.all_special_ids, pad_token_id(tokenizer)}))
        self._cached: tuple[int, Any] | None = None

    @property
    def steps_per_epoch(self) -> int:
        return self.base.steps_per_epoch

    def masked_global_batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(masked input ids, position ids, targets)`` of the whole global batch of ``step``."""
        if self._cached is not None and self._cached[0] == step:
            return self._cached[1]
        lay = self.layout
        per_rank = [self.base.micro_batches(step, r) for r in range(lay.dp)]
        order = [per_rank[r][j][0] for j in range(lay.grad_accum_steps) for r in range(lay.dp)]
        ids = torch.cat([x[0] for x in order])
        pos = torch.cat([x[1] for x in order])
        self.collator.generator = torch.Generator().manual_seed(self.seed * 1_000_003 + step)
        masked, targets = self.collator.torch_mask_tokens(
            ids.clone(), special_tokens_mask=torch.isin(ids, self.never_masked)
        )
        self._cached = (step, (masked, pos, targets))
        return masked, pos, targets

    def micro_batches(self, step: int, dp_rank: int) -> list[Any]:
        ids, pos, targets = self.masked_global_batch(step)
        lay = self.layout
        scale = torch.tensor([lay.grad_accum_steps * lay.dp / max(int((targets != IGNORE_INDEX).sum()), 1)])
        return [
            ((ids[lay.rows(j, dp_rank)], pos[lay.rows(j, dp_rank)]), (targets[lay.rows(j, dp_rank)], scale))
            for j in range(lay.grad_accum_steps)
        ]

    def iterate(self, dp_rank: int, start_step: int = 0) -> Any:
        step = start_step
        while True:
            yield from self.micro_batches(step, dp_rank)
            step += 1

    def tokens_per_step(self) -> int:
        return self.base.tokens_per_step()


class ClassificationBatches(MaskedLMBatches):
    """Sequence-classification micro-batches: ``((input_ids, position_ids), (labels[batch], scale))``.

    The rows carry each example's label in target column 0 (``-100`` elsewhere), so ``scale`` from
    :class:`~pipefit.data.batches.GlobalBatches` is ``grad_accum * dp / examples in the global batch``.
    """

    def __init__(self, base: GlobalBatches) -> None:
        self.base = base
        self.layout = base.layout

    def micro_batches(self, step: int, dp_rank: int) -> list[Any]:
        return [(inputs, (targets[:, 0], scale)) for inputs, (targets, scale) in self.base.micro_batches(step, dp_rank)]


def _label_ids(values: list[Any], cfg: DataConfig, hf_config: Any) -> np.ndarray:
    num_labels = int(hf_config.num_labels)
    label2id = dict(getattr(hf_config, "label2id", None) or {})
    out = np.empty(len(values), dtype=np.int32)
    for i, value in enumerate(values):
        label = label2id.get(value) if isinstance(value, str) else value
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or not 0 <= label < num_labels:
            raise ConfigError(
                f"data.label_field={cfg.label_field!r}: row {i} has label {value!r}; accepted: an integer in "
                f"[0, {num_labels}) (model.hf_config.num_labels) or one of model.hf_config.label2id {sorted(label2id)}"
            )
        out[i] = label
    return out


def classification_rows(
    cfg: DataConfig, tokenizer: Any, hf_config: Any, split: str | None = None, split_field: str = "data.split"
) -> Rows:
    """One example per row: ``data.text_field`` tokenised (the tokenizer's own special tokens), truncated to
    ``data.seq_len``, right-padded; its label (``data.label_field``) in target column 0."""

    dataset = load_raw_dataset(cfg, split, split_field)
    for field_name, column in (("data.text_field", cfg.text_field), ("data.label_field", cfg.label_field)):
        if column not in dataset.column_names:
            raise ConfigError(
                f"{field_name}={column!r} is not a column of the data (sequence classification); "
                f"columns: {', '.join(dataset.column_names)}"
            )
    labels = _label_ids(list(dataset[cfg.label_field]), cfg, hf_config)
    texts = [str(t) for t in dataset[cfg.text_field]]
    encoded = tokenizer(texts, add_special_tokens=True, truncation=True, max_length=cfg.seq_len, verbose=False)
    n, s = len(texts), cfg.seq_len
    ids = np.full((n, s), pad_token_id(tokenizer), dtype=np.int32)
    pos = np.zeros((n, s), dtype=np.int32)
    targets = np.full((n, s), IGNORE_INDEX, dtype=np.int32)
    ramp = np.arange(s, dtype=np.int32)
    for r, row in enumerate(encoded["input_ids"]):
        ids[r, : len(row)] = row
        pos[r, : len(row)] = ramp[: len(row)]
        pos[r, len(row) :] = ramp[: s - len(row)]  # the padding: a document of its own
    targets[:, 0] = labels
    return Rows(torch.from_numpy(ids), torch.from_numpy(pos), torch.from_numpy(targets), "pad")


def build_batches(
    hf_config: Any, cfg: DataConfig, tokenizer: Any, layout: BatchLayout, seed: int
) -> tuple[Any, Any | None]:
    """Training and (optional) evaluation batches for the encoder's task (layout: :mod:`pipefit.data.batches`)."""
    task = task_of(hf_config)
    if task == MASKED_LM:
        ensure_mask_token(tokenizer, hf_config)
        train, evaluation = build_lm_batches(cfg, tokenizer, layout, seed)
        return MaskedLMBatches(train, tokenizer, seed), (
            MaskedLMBatches(evaluation, tokenizer, seed) if evaluation is not None else None
        )
    if cfg.template is not None:
        raise ConfigError(
            f"data.template={cfg.template} is not accepted for sequence classification; accepted: null "
            "(data.text_field and data.label_field columns)"
        )
    rows = classification_rows(cfg, tokenizer, hf_config)
    eval_rows = None
    if cfg.eval_split:
        eval_rows = classification_rows(cfg, tokenizer, hf_config, cfg.eval_split, "data.eval_split")
    elif cfg.eval_fraction > 0:
        held = max(1, round(len(rows) * cfg.eval_fraction))
        if held >= len(rows):
            raise ConfigError(f"data.eval_fraction={cfg.eval_fraction} holds out all {len(rows)} rows; lower it")
        rows, eval_rows = rows[:-held], rows[-held:]
    train = ClassificationBatches(GlobalBatches(rows, layout, seed))
    evaluation = None
    if eval_rows is not None:
        eval_layout = BatchLayout(layout.micro_batch_size, 1, layout.dp)
        evaluation = ClassificationBatches(GlobalBatches(eval_rows, eval_layout, seed, "evaluation"))
    return train, evaluation


def make_batches_factory(hf_config: Any) -> Any:
    """:func:`pipefit.data.batches.build_batches`'s signature, for the encoder's task."""
    return functools.partial(build_batches, hf_config)


# Each task's batch maker, called as ``pipefit.data.batches.build_batches`` is.
BATCH_MAKERS: dict[str, Any] = {
    CAUSAL_LM: lambda hf_config: build_lm_batches,
    MASKED_LM: make_batches_factory,
    SEQUENCE_CLASSIFICATION: make_batches_factory,
}


def batch_maker(hf_config: Any, task: str) -> Any:
    """The training/evaluation batch builder of ``task`` (rows as they are for a causal LM)."""
    return BATCH_MAKERS[task](hf_config)
