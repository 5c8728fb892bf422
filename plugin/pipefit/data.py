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

import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipefit.config import DEFAULT_CHAT_TEMPLATE, ConfigError, DataConfig, validate_data
from pipefit.stages import IGNORE_INDEX

# An example ready for row building: token ids and, per token, whether it is trained on (1) or not (0).
Example = tuple[np.ndarray, np.ndarray]

_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")
_ENCODE_CHUNK = 512


# -- loading -----------------------------------------------------------------------------------------


def _describe(cfg: DataConfig) -> str:
    if cfg.source == "hub":
        return f"data.path={cfg.path!r}" + (f" (data.subset={cfg.subset!r})" if cfg.subset else "")
    if cfg.source in ("text", "json"):
        return f"data.data_files={list(cfg.data_files)}"
    return f"data.source={cfg.source}"


def _is_saved_dataset(path: Path) -> bool:
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def load_raw_dataset(cfg: DataConfig, split: str | None = None, split_field: str = "data.split") -> Any:
    """A ``datasets.Dataset`` with the source's own columns (``split`` defaults to ``data.split``)."""
    import datasets

    split = split or cfg.split
    if cfg.source == "pydoc":
        from pydoc_data.topics import topics

        ds = datasets.Dataset.from_dict({"text": [topics[k] for k in sorted(topics)]})
    elif cfg.source in ("text", "json") or not _is_saved_dataset(Path(str(cfg.path)).expanduser()):
        if cfg.source in ("text", "json"):
            missing = [f for f in cfg.data_files if not Path(f).expanduser().is_file()]
            if missing:
                raise ConfigError(f"data.data_files: {missing[0]!r} does not exist; give local {cfg.source} files")
            args: tuple[Any, ...] = (cfg.source,)
            kwargs: dict[str, Any] = {"data_files": [str(Path(f).expanduser()) for f in cfg.data_files]}
        else:
            args, kwargs = (cfg.path, cfg.subset), {}
        try:
            ds = datasets.load_dataset(*args, split=split, **kwargs)
        except Exception as err:  # the builders' own errors: unknown split, missing, unreachable, malformed, empty
            reason = f"{type(err).__name__}: {_first_line(err)}"
            if isinstance(err, ValueError) and "split" in str(err).lower():
                raise ConfigError(f"{split_field}={split!r} is not a split of {_describe(cfg)} ({reason})") from None
            if cfg.source in ("text", "json"):
                for f in cfg.data_files:  # name the file, the line and what is wrong with it
                    _check_data_file(Path(f).expanduser(), f, cfg.source)
            hint = (
                f"give readable {cfg.source} files"
                if cfg.source in ("text", "json")
                else "give a local folder (save_to_disk, or data files) or a dataset in the datasets cache"
            )
            raise ConfigError(f"{_describe(cfg)} could not be loaded ({reason}); {hint}") from None
    else:
        found = datasets.load_from_disk(str(Path(str(cfg.path)).expanduser()))
        if isinstance(found, datasets.DatasetDict):
            if split not in found:
                raise ConfigError(
                    f"{split_field}={split!r} is not a split of {_describe(cfg)}; splits: {', '.join(found)}"
                )
            ds = found[split]
        elif split_field == "data.split":
            ds = found
        else:
            raise ConfigError(
                f"{split_field}={split!r} cannot be used: {_describe(cfg)} holds one dataset without splits; "
                "use data.eval_fraction to hold out rows"
            )
    if len(ds) == 0:
        raise ConfigError(f"{split_field}={split!r} of {_describe(cfg)} has no rows; give a dataset with examples")
    return ds


def _check_data_file(path: Path, shown: str, source: str) -> None:
    """Raise one line naming ``path``, the line and the fault, for the first thing in it ``datasets`` cannot read:
    bytes that are not UTF-8, no content at all, or (``json``) a line that is not one JSON object. A JSON file
    whose first character is ``[`` is read as one JSON array instead of JSON Lines."""
    import json

    expected = "one JSON object per line (JSON Lines) or one JSON array" if source == "json" else "UTF-8 text"
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        column = exc.start - (data.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ConfigError(
            f"data.data_files: {shown!r} line {line} is not UTF-8 text (byte 0x{data[exc.start]:02x} at column "
            f"{column}); expected UTF-8 {'JSON Lines' if source == 'json' else 'text'}"
        ) from None
    if not text.strip():
        raise ConfigError(f"data.data_files: {shown!r} is empty; expected {expected}")
    if source != "json":
        return
    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"data.data_files: {shown!r} line {exc.lineno} is not valid JSON ({exc.msg} at column {exc.colno}); "
                f"expected {expected}"
            ) from None
        bad = next((i for i, r in enumerate(rows) if not isinstance(r, dict)), None) if isinstance(rows, list) else 0
        if bad is not None:
            raise ConfigError(
                f"data.data_files: {shown!r} element {bad} of its JSON array is not an object; expected {expected}"
            )
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(
                f"data.data_files: {shown!r} line {number} is not valid JSON ({exc.msg} at column {exc.colno}); "
                f"expected {expected}"
            ) from None
        if not isinstance(row, dict):
            raise ConfigError(
                f"data.data_files: {shown!r} line {number} holds a JSON {type(row).__name__}, not an object; "
                f"expected {expected}"
            )


def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def _require_column(dataset: Any, field_name: str, column: str, why: str) -> None:
    if column not in dataset.column_names:
        raise ConfigError(
            f"{field_name}={column!r} is not a column of the data ({why}); columns: {', '.join(dataset.column_names)}"
        )


def load_text_dataset(cfg: DataConfig, split: str | None = None, split_field: str = "data.split") -> Any:
    """A ``datasets.Dataset`` with a ``text`` column (``split`` defaults to ``data.split``)."""
    ds = load_raw_dataset(cfg, split, split_field)
    _require_column(ds, "data.text_field", cfg.text_field, "plain text")
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


# -- examples: token ids + which tokens are trained on -------------------------------------------------


def _chunks(items: Sequence[Any]) -> Iterator[Sequence[Any]]:
    for start in range(0, len(items), _ENCODE_CHUNK):
        yield items[start : start + _ENCODE_CHUNK]


def _tokenize(tokenizer: Any, texts: Sequence[str]) -> list[list[int]]:
    out: list[list[int]] = []
    for chunk in _chunks(texts):
        out.extend(tokenizer(list(chunk), add_special_tokens=False, verbose=False)["input_ids"])
    return out


def _string_column(dataset: Any, field_name: str, column: str, why: str) -> list[str]:
    _require_column(dataset, field_name, column, why)
    values = dataset[column]
    for i, v in enumerate(values):
        if not isinstance(v, str):
            raise ConfigError(f"{field_name}={column!r}: row {i} holds {type(v).__name__} {v!r:.60}; expected text")
    return values


def chat_template_for(cfg: DataConfig, tokenizer: Any) -> str:
    """``data.chat_template``, else the tokenizer's own, else :data:`pipefit.config.DEFAULT_CHAT_TEMPLATE`."""
    if cfg.chat_template:
        template, origin = cfg.chat_template, "data.chat_template"
    elif getattr(tokenizer, "chat_template", None):
        template, origin = tokenizer.get_chat_template(), "the tokenizer's chat template"
    else:
        return DEFAULT_CHAT_TEMPLATE
    if not _GENERATION_BLOCK.search(template):
        raise ConfigError(
            f"{origin} has no {{% generation %}}...{{% endgeneration %}} block marking the assistant's text, so the "
            "trained tokens cannot be told apart; set data.chat_template to a template with one (as "
            "pipefit.config.DEFAULT_CHAT_TEMPLATE)"
        )
    return template


def _chat_examples(cfg: DataConfig, dataset: Any, tokenizer: Any) -> list[Example]:
    field = cfg.messages_field
    _require_column(dataset, "data.messages_field", field, "data.template=chat needs a list of {role, content}")
    conversations = dataset[field]
    for i, conv in enumerate(conversations):
        ok = isinstance(conv, list) and all(
            isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in conv
        )
        if not ok:
            raise ConfigError(
                f"data.messages_field={field!r}: row {i} is not a list of {{role, content}} messages with text "
                f"content: {str(conv)[:80]!r}"
            )
    template = chat_template_for(cfg, tokenizer)
    kept = [c for c in conversations if c]
    examples: list[Example] = []
    for chunk in _chunks(kept):
        out = tokenizer.apply_chat_template(
            list(chunk), chat_template=template, tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        for ids, mask in zip(out["input_ids"], out["assistant_masks"], strict=True):
            examples.append((np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.int8)))
    return examples


def split_instruction(fmt: str, prompt: str, response: str) -> tuple[str, str]:
    """``fmt`` filled in, cut where ``{response}`` starts: ``(untrained head, trained rest)``."""
    marker = "\x00pipefit-response\x00"
    head = fmt.format(prompt=prompt, response=marker).split(marker, 1)[0]
    full = fmt.format(prompt=prompt, response=response)
    return head, full[len(head) :]


def _instruction_examples(cfg: DataConfig, dataset: Any, tokenizer: Any, eos: list[int]) -> list[Example]:
    why = "data.template=instruction"
    prompts = _string_column(dataset, "data.prompt_field", cfg.prompt_field, why)
    responses = _string_column(dataset, "data.response_field", cfg.response_field, why)
    heads, rests = zip(
        *(split_instruction(cfg.instruction_format, p, r) for p, r in zip(prompts, responses, strict=True)),
        strict=True,
    )
    examples: list[Example] = []
    for head, rest in zip(_tokenize(tokenizer, heads), _tokenize(tokenizer, rests), strict=True):
        ids = head + rest + eos
        trained = [0] * len(head) + [1] * (len(rest) + len(eos))
        examples.append((np.asarray(ids, dtype=np.int64), np.asarray(trained, dtype=np.int8)))
    return examples


def encode_examples(cfg: DataConfig, dataset: Any, tokenizer: Any) -> list[Example]:
    """One :data:`Example` per row of ``dataset``, as ``data.template`` says (plain text: every token trained)."""
    eos = [tokenizer.eos_token_id] if cfg.append_eos and tokenizer.eos_token_id is not None else []
    if cfg.template == "chat":
        return _chat_examples(cfg, dataset, tokenizer)
    if cfg.template == "instruction":
        return _instruction_examples(cfg, dataset, tokenizer, eos)
    texts = _string_column(dataset, "data.text_field", cfg.text_field, "plain text")
    return [
        (np.asarray(ids + eos, dtype=np.int64), np.ones(len(ids) + len(eos), dtype=np.int8))
        for ids in _tokenize(tokenizer, texts)
    ]


# -- rows -----------------------------------------------------------------------------------------------


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


# -- global batches ------------------------------------------------------------------------------------


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
