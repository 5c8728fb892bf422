"""Datasets -> fixed-shape micro-batches for the pipeline engine.

Text comes through ``datasets`` (CPython's bundled reference docs by default: real English and
code, offline), is tokenised, joined with EOS between documents and cut into blocks of
``seq_len + 1`` tokens. Block ``i`` gives ``input_ids = block[:-1]`` and ``targets = block[1:]``.

Batch layout (the rule both the pipeline and the single-process reference follow): optimizer step
``k`` uses the global batch ``G_k`` of ``micro * grad_accum * dp`` blocks, taken in order from a
per-epoch permutation seeded by ``seed + epoch``. Inside ``G_k``, micro-batch ``j`` of data-parallel
rank ``r`` holds rows ``[(j * dp + r) * micro, (j * dp + r + 1) * micro)``.

Loss normalisation: every micro-batch carries ``scale = grad_accum * dp / T_k`` where ``T_k`` is the
number of target tokens (labels != -100) in the whole of ``G_k``. The pipeline's loss function
multiplies the micro-batch's summed token loss by ``scale``; DeepSpeed averages over accumulation
steps and data-parallel ranks, so the optimised loss is ``sum of token losses in G_k / T_k`` --
token-weighted over the global batch, exactly as one process computes it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipefit.config import ConfigError, DataConfig
from pipefit.stages import IGNORE_INDEX


def load_text_dataset(cfg: DataConfig, split: str | None = None) -> Any:
    """A ``datasets.Dataset`` with a ``text`` column (``split`` defaults to ``data.split``)."""
    import datasets

    split = split or cfg.split

    if cfg.source == "pydoc":
        from pydoc_data.topics import topics

        return datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})
    if cfg.source in ("text", "json"):
        missing = [f for f in cfg.data_files if not Path(f).expanduser().is_file()]
        if missing:
            raise ConfigError(f"data.data_files: {missing[0]!r} does not exist; give local {cfg.source} files")
        ds = datasets.load_dataset(cfg.source, data_files=list(cfg.data_files), split=split)
    else:
        ds = datasets.load_dataset(cfg.path, split=split)
    if cfg.text_field not in ds.column_names:
        raise ConfigError(f"data.text_field={cfg.text_field!r} is not a column; columns: {', '.join(ds.column_names)}")
    return (
        ds.select_columns([cfg.text_field]).rename_column(cfg.text_field, "text")
        if cfg.text_field != "text"
        else ds.select_columns(["text"])
    )


def tokenize_to_blocks(dataset: Any, tokenizer: Any, seq_len: int, append_eos: bool = True) -> torch.Tensor:
    """``[num_blocks, seq_len + 1]`` token ids: documents joined (EOS between), cut into equal blocks."""
    eos = tokenizer.eos_token_id
    encoded = dataset.map(
        lambda batch: {"ids": tokenizer(batch["text"], add_special_tokens=False, verbose=False)["input_ids"]},
        batched=True,
        remove_columns=dataset.column_names,
        keep_in_memory=True,
    )
    stream: list[int] = []
    for ids in encoded["ids"]:
        stream.extend(ids)
        if append_eos and eos is not None:
            stream.append(eos)
    block = seq_len + 1
    n = len(stream) // block
    if n == 0:
        raise ConfigError(f"data.seq_len={seq_len} is longer than the whole tokenised dataset ({len(stream)} tokens)")
    return torch.tensor(stream[: n * block], dtype=torch.long).view(n, block)


@dataclass
class BatchLayout:
    micro_batch_size: int
    grad_accum_steps: int
    dp: int

    @property
    def global_batch_size(self) -> int:
        return self.micro_batch_size * self.grad_accum_steps * self.dp

    def rows(self, micro_index: int, dp_rank: int) -> slice:
        start = (micro_index * self.dp + dp_rank) * self.micro_batch_size
        return slice(start, start + self.micro_batch_size)


class GlobalBatches:
    """Deterministic global batches over the blocks, epoch after epoch."""

    def __init__(self, blocks: torch.Tensor, layout: BatchLayout, seed: int, what: str = "training") -> None:
        if blocks.shape[0] < layout.global_batch_size:
            raise ConfigError(
                f"the {what} data gives {blocks.shape[0]} blocks of data.seq_len+1 tokens, fewer than one global batch "
                f"({layout.global_batch_size}); lower train.micro_batch_size/grad_accum_steps or data.seq_len"
            )
        self.blocks = blocks
        self.layout = layout
        self.seed = seed
        self.steps_per_epoch = blocks.shape[0] // layout.global_batch_size
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(self.blocks.shape[0], generator=g)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> torch.Tensor:
        epoch, within = divmod(step, self.steps_per_epoch)
        g = self.layout.global_batch_size
        idx = self._permutation(epoch)[within * g : (within + 1) * g]
        return self.blocks[idx]

    @staticmethod
    def split(block: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return block[:, :-1].contiguous(), block[:, 1:].contiguous()

    def micro_batches(
        self, step: int, dp_rank: int
    ) -> list[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        """This rank's ``grad_accum`` micro-batches for ``step``.

        Each is ``((input_ids, position_ids), (targets, scale))``.
        """
        batch = self.global_batch(step)
        inputs, targets = self.split(batch)
        lay = self.layout
        scale = torch.tensor([lay.grad_accum_steps * lay.dp / max(int((targets != IGNORE_INDEX).sum()), 1)])
        seq = inputs.shape[1]
        out = []
        for j in range(lay.grad_accum_steps):
            rows = lay.rows(j, dp_rank)
            ids = inputs[rows]
            pos = torch.arange(seq, dtype=torch.long).expand_as(ids).contiguous()
            out.append(((ids, pos), (targets[rows], scale)))
        return out

    def iterate(self, dp_rank: int, start_step: int = 0) -> Iterator[Any]:
        step = start_step
        while True:
            yield from self.micro_batches(step, dp_rank)
            step += 1

    def tokens_per_step(self) -> int:
        return self.layout.global_batch_size * (self.blocks.shape[1] - 1)


def build_batches(
    cfg: DataConfig, tokenizer: Any, layout: BatchLayout, seed: int
) -> tuple[GlobalBatches, GlobalBatches | None]:
    """Training batches and, when ``data.eval_split`` or ``data.eval_fraction`` asks for them, evaluation batches.

    With ``eval_fraction`` the last rows (before any shuffling) are held out, so training never sees them.
    """
    blocks = tokenize_to_blocks(load_text_dataset(cfg), tokenizer, cfg.seq_len, cfg.append_eos)
    eval_blocks = None
    if cfg.eval_split:
        eval_blocks = tokenize_to_blocks(load_text_dataset(cfg, cfg.eval_split), tokenizer, cfg.seq_len, cfg.append_eos)
    elif cfg.eval_fraction > 0:
        held = max(1, round(blocks.shape[0] * cfg.eval_fraction))
        if held >= blocks.shape[0]:
            raise ConfigError(f"data.eval_fraction={cfg.eval_fraction} holds out all {blocks.shape[0]} rows; lower it")
        blocks, eval_blocks = blocks[:-held], blocks[-held:]
    train = GlobalBatches(blocks, layout, seed)
    evaluation = None
    if eval_blocks is not None:
        evaluation = GlobalBatches(eval_blocks, BatchLayout(layout.micro_batch_size, 1, layout.dp), seed, "evaluation")
    return train, evaluation
