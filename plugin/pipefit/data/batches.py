"""Datasets -> fixed-shape micro-batches for the pipeline engine.

Text comes through ``datasets`` (CPython's bundled reference docs by default: real English and
code, offline; or local text/JSON Lines files, a hub dataset, a ``save_to_disk`` folder) and is
tokenised into rows of ``data.seq_len`` positions, each row three integer tensors: ``input_ids``,
``position_ids`` and ``targets`` (the next token, already shifted; ``-100`` where nothing is
predicted). ``data.layout`` says how documents become rows:

- ``concat`` (default): documents joined with EOS between them and cut into blocks of
  ``seq_len + 1`` tokens; block ``i`` gives ``input_ids = block[:-1]``, ``targets = block[1:]``,
  positions ``0..seq_len-1``. Attention runs across document boundaries.
- ``pack``: whole documents, greedily and in order, as many as fit in a row; a document longer
  than a row is split into row-sized pieces (piece ``k`` still predicts the first token of piece
  ``k+1``, so no target is lost). Position ids restart at 0 at every document, the target of a
  document's last token is ``-100``, and the row's unused tail is padding.
- ``pad``: one document per row, truncated to ``seq_len + 1`` tokens, right-padded.

Padding: input id ``tokenizer.pad_token_id`` (else EOS, else 0), target ``-100``, and position ids
that restart at 0, so the padding is a document of its own. Hugging Face's mask builders
(``create_causal_mask`` / ``create_sliding_window_causal_mask``, called with position ids, no 2-D
attention mask and no cache: every pipeline block, and the HF model with ``use_cache=False``) read
a position id that does not follow its predecessor by +1 as the start of a new sequence
(``masking_utils.find_packed_sequence_indices``) and let no token attend across that boundary. So
documents in a packed row never see each other, no real token sees padding, and only integer
tensors cross pipeline stages.

``data.template`` (``chat`` or ``instruction``) turns structured examples into one document each and
trains only on the assistant's / response tokens: every other target is ``-100``. Such examples are
always packed or padded (``concat`` would cut them at arbitrary points).

Batch layout (the rule both the pipeline and the single-process reference follow): optimizer step
``k`` uses the global batch ``G_k`` of ``micro * grad_accum * dp`` rows, taken in order from a
per-epoch permutation seeded by ``seed + epoch``. Inside ``G_k``, micro-batch ``j`` of data-parallel
rank ``r`` holds rows ``[(j * dp + r) * micro, (j * dp + r + 1) * micro)``.

Loss normalisation: every micro-batch carries ``scale = grad_accum * dp / T_k`` where ``T_k`` is the
number of target tokens (labels != -100) in the whole of ``G_k``. The pipeline's loss function
multiplies the micro-batch's summed token loss by ``scale``; DeepSpeed averages over accumulation
steps and data-parallel ranks, so the optimised loss is ``sum of token losses in G_k / T_k`` --
token-weighted over the global batch, exactly as one process computes it.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipefit.config import ConfigError, DataConfig, validate_data
from pipefit.data.sources import (
    Example,
    _describe,
    encode_examples,
    load_raw_dataset,
    load_text_dataset,
    tokenize_to_blocks,
)
from pipefit.model.layers import IGNORE_INDEX


@dataclass
class Rows:
    """``[N, seq_len]`` integer tensors (int32 in storage; micro-batches hand out int64)."""

    input_ids: torch.Tensor
    position_ids: torch.Tensor
    targets: torch.Tensor
    layout: str = "concat"

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    @property
    def seq_len(self) -> int:
        return self.input_ids.shape[1]

    def __getitem__(self, index: Any) -> Rows:
        return Rows(self.input_ids[index], self.position_ids[index], self.targets[index], self.layout)

    @classmethod
    def from_blocks(cls, blocks: torch.Tensor) -> Rows:
        """``concat`` rows from ``[N, seq_len + 1]`` blocks: inputs ``block[:-1]``, targets ``block[1:]``."""
        n, block = blocks.shape
        positions = torch.arange(block - 1, dtype=torch.int32).expand(n, block - 1)
        return cls(blocks[:, :-1].to(torch.int32), positions.contiguous(), blocks[:, 1:].to(torch.int32), "concat")


def document_targets(ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """Per position of one document: the next token where it is trained on, else ``-100`` (always at the end)."""
    targets = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
    targets[:-1] = np.where(trained[1:] != 0, ids[1:], IGNORE_INDEX)
    return targets


def _pieces(examples: Iterable[Example], seq_len: int, whole: bool) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """``(input_ids, targets)`` of at most ``seq_len`` positions that predict at least one token.

    ``whole``: only each document's first piece (``pad``: truncation); else every piece (``pack``).
    """
    for ids, trained in examples:
        targets = document_targets(ids, trained)
        for start in range(0, 1 if whole else len(ids), seq_len):
            piece = targets[start : start + seq_len]
            if (piece != IGNORE_INDEX).any():
                yield ids[start : start + seq_len], piece


def _fill(rows: list[list[tuple[np.ndarray, np.ndarray]]], seq_len: int, pad_id: int, layout: str) -> Rows:
    n = len(rows)
    input_ids = np.full((n, seq_len), pad_id, dtype=np.int32)
    position_ids = np.zeros((n, seq_len), dtype=np.int32)
    targets = np.full((n, seq_len), IGNORE_INDEX, dtype=np.int32)
    ramp = np.arange(seq_len, dtype=np.int32)
    for r, segments in enumerate(rows):
        col = 0
        for ids, tgt in segments:
            end = col + len(ids)
            input_ids[r, col:end] = ids
            position_ids[r, col:end] = ramp[: len(ids)]
            targets[r, col:end] = tgt
            col = end
        # The padded tail restarts its positions too: a "document" of its own that nothing real attends to.
        position_ids[r, col:] = ramp[: seq_len - col]
    return Rows(torch.from_numpy(input_ids), torch.from_numpy(position_ids), torch.from_numpy(targets), layout)


def pad_rows(examples: Iterable[Example], seq_len: int, pad_id: int) -> Rows:
    """One example per row, truncated to ``seq_len + 1`` tokens (the last only as a target), right-padded."""
    return _fill([[p] for p in _pieces(examples, seq_len, whole=True)], seq_len, pad_id, "pad")


def pack_rows(examples: Iterable[Example], seq_len: int, pad_id: int) -> Rows:
    """Whole examples packed greedily in order; an example longer than a row goes in row-sized pieces."""
    rows: list[list[tuple[np.ndarray, np.ndarray]]] = []
    current: list[tuple[np.ndarray, np.ndarray]] = []
    used = 0
    for piece in _pieces(examples, seq_len, whole=False):
        if used + len(piece[0]) > seq_len:
            rows.append(current)
            current, used = [], 0
        current.append(piece)
        used += len(piece[0])
    if current:
        rows.append(current)
    return _fill(rows, seq_len, pad_id, "pack")


def pad_token_id(tokenizer: Any) -> int:
    """The id padding uses: the tokenizer's pad token, else EOS, else 0 (never attended to, never a target)."""
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if candidate is not None:
            return int(candidate)
    return 0


def build_rows(cfg: DataConfig, tokenizer: Any, split: str | None = None, split_field: str = "data.split") -> Rows:
    """The rows of one split, laid out as ``data.layout`` says."""
    if cfg.layout == "concat":
        text = load_text_dataset(cfg, split, split_field)
        return Rows.from_blocks(tokenize_to_blocks(text, tokenizer, cfg.seq_len, cfg.append_eos))
    dataset = load_raw_dataset(cfg, split, split_field)
    examples = encode_examples(cfg, dataset, tokenizer)
    make = pack_rows if cfg.layout == "pack" else pad_rows
    rows = make(examples, cfg.seq_len, pad_token_id(tokenizer))
    if len(rows) == 0:
        what = {"chat": "an assistant message", "instruction": "a response"}.get(str(cfg.template), "two tokens")
        raise ConfigError(
            f"{split_field}={split or cfg.split!r} of {_describe(cfg)}: none of its {len(dataset)} examples has "
            f"{what} to train on (data.template={cfg.template}); give examples with trained tokens"
        )
    return rows


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
    """Deterministic global batches over the rows, epoch after epoch.

    ``rows`` may also be ``[N, seq_len + 1]`` blocks (the ``concat`` layout).
    """

    def __init__(self, rows: Rows | torch.Tensor, layout: BatchLayout, seed: int, what: str = "training") -> None:
        if isinstance(rows, torch.Tensor):
            rows = Rows.from_blocks(rows)
        if len(rows) < layout.global_batch_size:
            raise ConfigError(
                f"the {what} data gives {len(rows)} rows of data.seq_len={rows.seq_len} tokens "
                f"(data.layout={rows.layout}), fewer than one global batch ({layout.global_batch_size}); "
                "lower train.micro_batch_size/grad_accum_steps or data.seq_len, or give more data"
            )
        self.rows = rows
        self.layout = layout
        self.seed = seed
        self.steps_per_epoch = len(rows) // layout.global_batch_size
        self._perm_epoch = -1
        self._perm = torch.empty(0, dtype=torch.long)

    def _permutation(self, epoch: int) -> torch.Tensor:
        if epoch != self._perm_epoch:
            g = torch.Generator().manual_seed(self.seed + epoch)
            self._perm = torch.randperm(len(self.rows), generator=g)
            self._perm_epoch = epoch
        return self._perm

    def global_batch(self, step: int) -> Rows:
        epoch, within = divmod(step, self.steps_per_epoch)
        g = self.layout.global_batch_size
        return self.rows[self._permutation(epoch)[within * g : (within + 1) * g]]

    def micro_batches(
        self, step: int, dp_rank: int
    ) -> list[tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]]:
        """This rank's ``grad_accum`` micro-batches for ``step``.

        Each is ``((input_ids, position_ids), (targets, scale))``, int64 ``[micro, seq_len]`` tensors and a
        float ``[1]`` scale.
        """
        batch = self.global_batch(step)
        lay = self.layout
        scale = torch.tensor([lay.grad_accum_steps * lay.dp / max(int((batch.targets != IGNORE_INDEX).sum()), 1)])
        out = []
        for j in range(lay.grad_accum_steps):
            rows = lay.rows(j, dp_rank)
            ids, pos, targets = (t[rows].long() for t in (batch.input_ids, batch.position_ids, batch.targets))
            out.append(((ids, pos), (targets, scale)))
        return out

    def iterate(self, dp_rank: int, start_step: int = 0) -> Iterator[Any]:
        step = start_step
        while True:
            yield from self.micro_batches(step, dp_rank)
            step += 1

    def tokens_per_step(self) -> int:
        """Positions processed per optimizer step (padding included)."""
        return self.layout.global_batch_size * self.rows.seq_len


def build_batches(
    cfg: DataConfig, tokenizer: Any, layout: BatchLayout, seed: int
) -> tuple[GlobalBatches, GlobalBatches | None]:
    """Training batches and, when ``data.eval_split`` or ``data.eval_fraction`` asks for them, evaluation batches.

    With ``eval_fraction`` the last rows (before any shuffling) are held out, so training never sees them.
    """
    validate_data(cfg)
    rows = build_rows(cfg, tokenizer)
    eval_rows = None
    if cfg.eval_split:
        eval_rows = build_rows(cfg, tokenizer, cfg.eval_split, "data.eval_split")
    elif cfg.eval_fraction > 0:
        held = max(1, round(len(rows) * cfg.eval_fraction))
        if held >= len(rows):
            raise ConfigError(f"data.eval_fraction={cfg.eval_fraction} holds out all {len(rows)} rows; lower it")
        rows, eval_rows = rows[:-held], rows[-held:]
    train = GlobalBatches(rows, layout, seed)
    evaluation = None
    if eval_rows is not None:
        evaluation = GlobalBatches(eval_rows, BatchLayout(layout.micro_batch_size, 1, layout.dp), seed, "evaluation")
    return train, evaluation
