"""Sources: datasets (pydoc, local text or JSON Lines, hub, ``save_to_disk``) -> tokenised examples.

Templates (chat, instruction) mark which tokens are trained; :mod:`pipefit.data.batches` lays the
examples out as rows (concat, pack, pad) and micro-batches.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipefit.config import DEFAULT_CHAT_TEMPLATE, ConfigError, DataConfig

# An example ready for row building: token ids and, per token, whether it is trained on (1) or not (0).
Example = tuple[np.ndarray, np.ndarray]


_GENERATION_BLOCK = re.compile(r"\{%-?\s*generation\s*-?%\}")


_ENCODE_CHUNK = 512


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

    def invalid_json(line: int, exc: json.JSONDecodeError) -> ConfigError:
        return ConfigError(
            f"data.data_files: {shown!r} line {line} is not valid JSON ({exc.msg} at column {exc.colno}); "
            f"expected {expected}"
        )

    if text.lstrip().startswith("["):
        try:
            rows = json.loads(text)
        except json.JSONDecodeError as exc:
            raise invalid_json(exc.lineno, exc) from None
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
            raise invalid_json(number, exc) from None
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
