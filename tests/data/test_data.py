"""Data layouts (concat, pack, pad), templates (chat, instruction), sources, and their errors.

Parity: rows laid out by :mod:`pipefit.data.batches` run through the pipeline layers give the logits and the
loss of the unmodified HF model fed the equivalent input -- a padded batch with an attention mask
(``pad``), each document on its own (``pack``) -- for Llama, GPT-2 (learned positions) and Mistral
(sliding window shorter than the documents).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from conftest import VOCAB_SIZE, build_loaded, run_layers, saved_model, tiny_hf_config
from pipefit.config import DEFAULT_CHAT_TEMPLATE, ConfigError, DataConfig, ModelConfig, RunConfig, validate
from pipefit.data.batches import BatchLayout, GlobalBatches, Rows, build_batches, build_rows, pack_rows, pad_rows
from pipefit.data.sources import split_instruction
from pipefit.model.hf import load_tokenizer, resolve_tokenizer_path
from pipefit.model.layer_list import layer_plan, make_skeleton
from pipefit.model.layers import IGNORE_INDEX, causal_lm_loss

TOL = {"atol": 1e-5, "rtol": 1e-5}
PAD = 1  # never drawn as a document token below, so padding is recognisable


@pytest.fixture(scope="module")
def tokenizer() -> Any:
    return load_tokenizer(resolve_tokenizer_path(None, None))


def make_examples(lengths: list[int], seed: int = 0, trained_fraction: float = 1.0) -> list[tuple[Any, Any]]:
    """Random documents of the given lengths (tokens 2..V-1); a random part of each is trained on."""
    rng = np.random.default_rng(seed)
    examples = []
    for n in lengths:
        ids = rng.integers(2, VOCAB_SIZE, n)
        trained = (rng.random(n) < trained_fraction).astype(np.int8)
        trained[-1] = 1  # every document predicts at least its last token
        examples.append((ids, trained))
    return examples


def segments(rows: Rows, r: int) -> list[tuple[int, int, bool]]:
    """``(start, stop, is_padding)`` of each run of restarting position ids in row ``r``."""
    pos = rows.position_ids[r].tolist()
    starts = [i for i, p in enumerate(pos) if p == 0] + [len(pos)]
    out = []
    for a, b in zip(starts[:-1], starts[1:], strict=True):
        pad = bool((rows.input_ids[r, a:b] == PAD).all() and (rows.targets[r, a:b] == IGNORE_INDEX).all())
        out.append((a, b, pad))
    return out


def expected_targets(ids: np.ndarray, trained: np.ndarray) -> list[int]:
    return [int(ids[t + 1]) if trained[t + 1] else IGNORE_INDEX for t in range(len(ids) - 1)] + [IGNORE_INDEX]


# -- layouts ---------------------------------------------------------------------------------------


def test_concat_is_documents_joined_and_cut_into_blocks(tmp_path: Path, tokenizer: Any) -> None:
    from pydoc_data.topics import topics

    texts = [topics[k] for k in sorted(topics)[:12]]
    cfg = DataConfig(source="json", data_files=[_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])], seq_len=32)
    lay = BatchLayout(2, 3, 2)
    batches, evaluation = build_batches(cfg, tokenizer, lay, seed=7)
    assert evaluation is None
    stream: list[int] = []
    for text in texts:
        stream += tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    n = len(stream) // 33
    blocks = torch.tensor(stream[: n * 33]).view(n, 33)
    assert batches.steps_per_epoch == n // 12 and batches.tokens_per_step() == 12 * 32
    for step in (0, 5, batches.steps_per_epoch + 2):  # the last one is in the second epoch
        epoch, within = divmod(step, batches.steps_per_epoch)
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(7 + epoch))
        chosen = blocks[perm[within * 12 : (within + 1) * 12]]
        scale = torch.tensor([6 / chosen[:, 1:].numel()])
        for r in (0, 1):
            for j, ((ids, pos), (targets, s)) in enumerate(batches.micro_batches(step, r)):
                rows = chosen[(j * 2 + r) * 2 : (j * 2 + r + 1) * 2]
                assert ids.dtype == pos.dtype == targets.dtype == torch.long
                assert torch.equal(ids, rows[:, :-1]) and torch.equal(targets, rows[:, 1:])
                assert torch.equal(pos, torch.arange(32).expand(2, 32))
                torch.testing.assert_close(s, scale, atol=0, rtol=0)


def test_pad_rows_truncate_pad_and_restart_positions() -> None:
    seq = 8
    examples = make_examples([5, 14, 9, 8, 1], seed=1)  # short, truncated, exactly seq+1, exactly seq, no target
    rows = pad_rows(examples, seq, PAD)
    assert len(rows) == 4  # the one-token example predicts nothing and is dropped
    for r, (ids, trained) in enumerate(examples[:4]):
        real = min(len(ids), seq)
        expected = expected_targets(ids[: seq + 1], trained[: seq + 1])[:seq]
        assert rows.input_ids[r, :real].tolist() == ids[:real].tolist()
        assert rows.targets[r, :real].tolist() == expected[:real]
        assert rows.position_ids[r].tolist() == list(range(real)) + list(range(seq - real))
        assert (rows.input_ids[r, real:] == PAD).all() and (rows.targets[r, real:] == IGNORE_INDEX).all()
    # Truncated rows still predict token seq (the one past the row); a short row's last token predicts nothing.
    assert rows.targets[1, -1] == int(examples[1][0][seq]) and rows.targets[2, -1] == int(examples[2][0][seq])
    assert rows.targets[0, 4] == IGNORE_INDEX and rows.targets[3, 7] == IGNORE_INDEX


def test_pack_rows_keep_documents_whole_and_lose_no_target() -> None:
    seq = 16
    lengths = [5, 7, 3, 40, 12, 1, 6, 16, 17, 2, 9]
    examples = make_examples(lengths, seed=2, trained_fraction=0.7)
    rows = pack_rows(examples, seq, PAD)

    # Every (input, target) pair of every document appears once, in order; positions restart per document.
    got: list[tuple[int, int]] = []
    pieces: list[list[int]] = []
    for r in range(len(rows)):
        segs = segments(rows, r)
        assert segs[-1][1] == seq
        for a, b, pad in segs:
            if pad:
                assert (a, b) == (segs[-1][0], seq), "padding only at the row's tail"
                continue
            pieces.append(rows.input_ids[r, a:b].tolist())
            got += list(zip(rows.input_ids[r, a:b].tolist(), rows.targets[r, a:b].tolist(), strict=True))
        used = segs[-1][0] if segs[-1][2] else seq
        if r + 1 < len(rows):  # greedy: the next row's first piece did not fit here
            assert used + (segments(rows, r + 1)[0][1]) > seq
    want: list[tuple[int, int]] = []
    for ids, trained in examples:
        pairs = list(zip(ids.tolist(), expected_targets(ids, trained), strict=True))
        # A trailing piece that predicts nothing (a lone last token) is not worth a row position.
        if len(ids) % seq == 1 and len(ids) > 1:
            pairs = pairs[:-1]
        if any(t != IGNORE_INDEX for _, t in pairs):
            want += pairs
    assert got == want
    # The 40-token document comes as pieces of 16, 16, 8 tokens; the 17-token one as 16 (+ its lone last token).
    assert [len(p) for p in pieces].count(16) == 4
    assert rows.targets.ne(IGNORE_INDEX).sum() == sum(
        sum(t != IGNORE_INDEX for t in expected_targets(i, m)) for i, m in examples
    )
    # Several documents share rows.
    assert len(rows) < len([e for e in examples if len(e[0]) > 1])


def test_scale_counts_targets_of_the_whole_global_batch() -> None:
    rows = pad_rows(make_examples([3, 9, 4, 6, 2, 8, 5, 7], seed=3, trained_fraction=0.5), 8, PAD)
    batches = GlobalBatches(rows, BatchLayout(1, 2, 2), seed=0)
    chosen = batches.global_batch(1)
    count = int((chosen.targets != IGNORE_INDEX).sum())
    for r in (0, 1):
        for _, (_, scale) in batches.micro_batches(1, r):
            assert float(scale) == pytest.approx(4 / count)
    assert count < 4 * 8  # padding and untrained tokens are not counted


# -- parity with HF ----------------------------------------------------------------------------------


def _layers(folder: Path, family: str) -> list[Any]:
    skeleton = make_skeleton(tiny_hf_config(family))
    return build_loaded(skeleton, folder, 0, len(layer_plan(skeleton)))


PARITY_FAMILIES = ["llama", "gpt2", "mistral"]


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_pad_layout_matches_hf_with_attention_mask(tmp_path: Path, family: str) -> None:
    seq = 24
    folder, model = saved_model(tmp_path, family)
    examples = make_examples([10, 30, 24, 25, 3, 17], seed=4, trained_fraction=0.6)
    rows = pad_rows(examples, seq, PAD)
    assert len(rows) == len(examples)
    with torch.no_grad():
        logits = run_layers(_layers(folder, family), (rows.input_ids.long(), rows.position_ids.long()))

    # HF: each example truncated to seq + 1 tokens, right-padded, attention mask 0 on padding.
    n = len(examples)
    hf_ids = torch.full((n, seq + 1), PAD)
    mask = torch.zeros((n, seq + 1), dtype=torch.long)
    labels = torch.full((n, seq + 1), IGNORE_INDEX)
    for r, (ids, trained) in enumerate(examples):
        k = min(len(ids), seq + 1)
        hf_ids[r, :k] = torch.from_numpy(ids[:k])
        mask[r, :k] = 1
        labels[r, :k] = torch.where(torch.from_numpy(trained[:k]) == 1, hf_ids[r, :k], IGNORE_INDEX)
    with torch.no_grad():
        hf = model(input_ids=hf_ids, attention_mask=mask, labels=labels)
    for r, (ids, _) in enumerate(examples):
        real = min(len(ids), seq)
        torch.testing.assert_close(logits[r, :real], hf.logits[r, :real], **TOL)
    targets = rows.targets.long()
    loss = causal_lm_loss(logits, (targets, torch.tensor([1.0 / int((targets != IGNORE_INDEX).sum())])))
    torch.testing.assert_close(loss, hf.loss, **TOL)


@pytest.mark.parametrize("family", PARITY_FAMILIES)
def test_pack_layout_matches_hf_per_document(tmp_path: Path, family: str) -> None:
    seq = 24
    folder, model = saved_model(tmp_path, family)
    examples = make_examples([10, 7, 30, 13, 3, 20, 11, 2], seed=5, trained_fraction=0.6)
    rows = pack_rows(examples, seq, PAD)
    ids, pos = rows.input_ids.long(), rows.position_ids.long()
    assert any(sum(not p for *_, p in segments(rows, r)) > 1 for r in range(len(rows))), "some row packs documents"
    with torch.no_grad():
        logits = run_layers(_layers(folder, family), (ids, pos))
        # The reference trainer's call: HF given the packed rows and their position ids, no cache.
        packed_hf = model(input_ids=ids, position_ids=pos, use_cache=False).logits
        unpacked_hf = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(logits, packed_hf, **TOL)

    summed, count, later_docs = torch.zeros(()), 0, 0
    for r in range(len(rows)):
        for a, b, pad in segments(rows, r):
            if pad:
                continue
            seg_ids, seg_targets = ids[r, a:b], rows.targets[r, a:b].long()
            # HF sees the document alone: its tokens, plus the next piece's first token when that is a target.
            hf_ids = torch.cat([seg_ids, seg_targets[-1:]]) if seg_targets[-1] != IGNORE_INDEX else seg_ids
            labels = torch.cat([torch.tensor([IGNORE_INDEX]), seg_targets[: len(hf_ids) - 1]])
            with torch.no_grad():
                hf = model(input_ids=hf_ids[None], labels=labels[None])
            torch.testing.assert_close(logits[r, a:b], hf.logits[0, : b - a], **TOL)
            k = int((labels != IGNORE_INDEX).sum())
            summed, count = summed + hf.loss * k, count + k
            if a > 0:
                later_docs += 1
                # Without restarting positions the document would see its neighbours: clearly different logits.
                assert (unpacked_hf[r, a:b] - hf.logits[0, : b - a]).abs().max() > 1e-3
    assert later_docs >= 2
    targets = rows.targets.long()
    assert count == int((targets != IGNORE_INDEX).sum())
    loss = causal_lm_loss(logits, (targets, torch.tensor([1.0 / count])))
    torch.testing.assert_close(loss, summed / count, **TOL)


# -- templates -------------------------------------------------------------------------------------


def _jsonl(path: Path, rows: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _trained_spans(rows: Rows, r: int) -> list[list[int]]:
    """Runs of consecutive trained targets in row ``r``, as target token ids."""
    spans: list[list[int]] = []
    prev = False
    for t in rows.targets[r].tolist():
        on = t != IGNORE_INDEX
        if on:
            if not prev:
                spans.append([])
            spans[-1].append(t)
        prev = on
    return spans


def test_instruction_template_trains_exactly_the_response(tmp_path: Path, tokenizer: Any) -> None:
    data = [
        {"prompt": "Name a colour.", "response": "Blue, like the sea.", "other": 1},
        {"prompt": "Add 2 and 3.", "response": "5", "other": 2},
    ]
    fmt = "Q: {prompt}\nA: {response}"
    cfg = DataConfig(
        source="json", data_files=[_jsonl(tmp_path / "sft.jsonl", data)], template="instruction", layout="pad",
        instruction_format=fmt, seq_len=48,
    )  # fmt: skip
    rows = build_rows(cfg, tokenizer)
    eos = tokenizer.eos_token_id
    assert len(rows) == 2
    for r, ex in enumerate(data):
        head, rest = split_instruction(fmt, ex["prompt"], ex["response"])
        assert (head, rest) == (f"Q: {ex['prompt']}\nA: ", ex["response"])
        head_ids = tokenizer(head, add_special_tokens=False)["input_ids"]
        rest_ids = tokenizer(rest, add_special_tokens=False)["input_ids"] + [eos]
        n = len(head_ids) + len(rest_ids)
        assert rows.input_ids[r, :n].tolist() == head_ids + rest_ids
        # Exactly the response and its EOS are targets: predicted from the last prompt token onwards.
        expected = [IGNORE_INDEX] * (len(head_ids) - 1) + rest_ids + [IGNORE_INDEX] * (48 - n + 1)
        assert rows.targets[r].tolist() == expected
        assert tokenizer.decode(_trained_spans(rows, r)[0]) == ex["response"] + tokenizer.eos_token


def test_chat_template_trains_exactly_the_assistant_replies(tmp_path: Path, tokenizer: Any) -> None:
    conversations = [
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": "What is two plus two?"},
            {"role": "assistant", "content": "Four."},
            {"role": "user", "content": "And two plus three?"},
            {"role": "assistant", "content": "Five, of course."},
        ],
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello there."}],
        [{"role": "user", "content": "Only a question, no reply"}],
        [],
    ]
    path = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in conversations])
    assert tokenizer.chat_template is None  # the embedded tokenizer has none: pipefit's default applies
    cfg = DataConfig(source="json", data_files=[path], template="chat", layout="pack", seq_len=128)
    rows = build_rows(cfg, tokenizer)
    assert len(rows) == 1  # both trainable conversations packed into one row; the others have nothing to train
    eos = tokenizer.eos_token_id

    def tok(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    replies = [tok(m["content"]) + [eos] for c in conversations for m in c if m["role"] == "assistant"]
    assert _trained_spans(rows, 0) == replies
    rendered = [
        tokenizer.apply_chat_template(c, chat_template=DEFAULT_CHAT_TEMPLATE, tokenize=False) for c in conversations[:2]
    ]
    first, second = tok(rendered[0]), tok(rendered[1])
    assert rows.input_ids[0, : len(first) + len(second)].tolist() == first + second
    assert rows.position_ids[0, : len(first) + len(second)].tolist() == list(range(len(first))) + list(
        range(len(second))
    )
    assert "<|user|>" in rendered[0] and "Be brief." in rendered[0]
    # Nothing after a conversation's last token is predicted from it.
    assert rows.targets[0, len(first) - 1] == IGNORE_INDEX

    # An explicit data.chat_template wins; its {% generation %} block decides what is trained.
    shouting = DEFAULT_CHAT_TEMPLATE.replace("message['content'] + eos_token", "message['content'] | upper + eos_token")
    rows = build_rows(DataConfig(**{**cfg.__dict__, "chat_template": shouting}), tokenizer)
    assert _trained_spans(rows, 0) == [
        tok(m["content"].upper()) + [eos] for c in conversations for m in c if m["role"] == "assistant"
    ]


def test_tokenizer_chat_template_without_generation_block_is_an_error(tmp_path: Path, tokenizer: Any) -> None:
    path = _jsonl(
        tmp_path / "chat.jsonl",
        [{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}]}],
    )
    plain = tokenizer.__class__.from_pretrained(resolve_tokenizer_path(None, None))
    plain.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    cfg = DataConfig(source="json", data_files=[path], template="chat", layout="pad", seq_len=16)
    with pytest.raises(ConfigError, match=r"^the tokenizer's chat template has no \{% generation %\}") as info:
        build_rows(cfg, plain)
    assert "\n" not in str(info.value)


# -- sources ---------------------------------------------------------------------------------------


def test_hub_source_reads_a_saved_dataset_with_splits(tmp_path: Path, tokenizer: Any) -> None:
    import datasets

    texts = [f"Document number {i} talks about {'pipes ' * (i % 7)}and fits." for i in range(60)]
    folder = tmp_path / "saved"
    datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict({"body": texts[:48]}),
            "validation": datasets.Dataset.from_dict({"body": texts[48:]}),
        }
    ).save_to_disk(str(folder))
    cfg = DataConfig(
        source="hub", path=str(folder), text_field="body", layout="pad", seq_len=32, eval_split="validation"
    )
    train, evaluation = build_batches(cfg, tokenizer, BatchLayout(2, 2, 1), seed=0)
    assert len(train.rows) == 48 and evaluation is not None and len(evaluation.rows) == 12
    first = (tokenizer(texts[48], add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])[:32]
    assert evaluation.rows.input_ids[0, : len(first)].tolist() == first

    # A folder of data files is read through datasets' builders too.
    files = tmp_path / "files"
    files.mkdir()
    _jsonl(files / "train.jsonl", [{"text": t} for t in texts])
    rows = build_rows(DataConfig(source="hub", path=str(files), layout="pack", seq_len=64), tokenizer)
    assert int((rows.targets != IGNORE_INDEX).sum()) == sum(len(tokenizer(t)["input_ids"]) for t in texts)


# -- errors ----------------------------------------------------------------------------------------


def _run_config(**data: Any) -> RunConfig:
    return RunConfig(model=ModelConfig(hf_config={"model_type": "llama"}), data=DataConfig(**data))


@pytest.mark.parametrize(
    "data,message",
    [
        ({"layout": "stream"}, r"data\.layout='stream' is not accepted; accepted: concat, pack, pad"),
        (
            {"template": "alpaca", "layout": "pack"},
            r"data\.template='alpaca' is not accepted; accepted: null \(plain text\), chat, instruction",
        ),
        (
            {"template": "chat"},
            r"data\.layout=concat is not accepted with data\.template=chat: .*; accepted: pack, pad",
        ),
        (
            {"template": "instruction", "layout": "pad", "instruction_format": "{prompt}"},
            r"data\.instruction_format='\{prompt\}' is not accepted; expected \{prompt\}",
        ),
        (
            {"template": "instruction", "layout": "pad", "instruction_format": "{response} {prompt}"},
            r"followed by \{response\} once",
        ),
        (
            {"template": "instruction", "layout": "pad", "instruction_format": "{prompt}{context}{response}"},
            r"no other \{fields\}",
        ),
        (
            {"template": "instruction", "layout": "pad", "instruction_format": "{prompt {response}"},
            r"is not a format string",
        ),
    ],
)
def test_bad_data_config_is_a_one_line_error(data: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        validate(_run_config(**data))
    assert "\n" not in str(info.value)


def _build_error(
    tmp_path: Path, tokenizer: Any, lines: list[dict[str, Any]] | None, batch: int = 1, **data: Any
) -> str:
    if lines is not None:
        data.setdefault("data_files", [_jsonl(tmp_path / "d.jsonl", lines)])
    cfg = DataConfig(**{"source": "json", "seq_len": 16, **data})
    with pytest.raises(ConfigError) as info:
        build_batches(cfg, tokenizer, BatchLayout(batch, 1, 1), seed=0)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_bad_data_is_a_one_line_error_before_training(tmp_path: Path, tokenizer: Any) -> None:
    text = [{"text": "a few words here"}, {"text": "and a few more"}]
    err = _build_error(tmp_path, tokenizer, text, text_field="body", layout="pack")
    assert err == "data.text_field='body' is not a column of the data (plain text); columns: text"
    err = _build_error(tmp_path, tokenizer, text, text_field="body")  # concat reads the same column
    assert err.startswith("data.text_field='body' is not a column")
    err = _build_error(tmp_path, tokenizer, text, template="chat", layout="pack")
    assert err.startswith("data.messages_field='messages' is not a column of the data (data.template=chat")
    err = _build_error(tmp_path, tokenizer, [{"prompt": "p", "answer": "a"}], template="instruction", layout="pad")
    assert err == (
        "data.response_field='response' is not a column of the data (data.template=instruction); "
        "columns: prompt, answer"
    )
    err = _build_error(tmp_path, tokenizer, [{"prompt": "p", "response": 3}], template="instruction", layout="pad")
    assert err.startswith("data.response_field='response': row 0 holds int 3; expected text")
    err = _build_error(tmp_path, tokenizer, [{"messages": "hello"}], template="chat", layout="pad")
    assert err.startswith("data.messages_field='messages': row 0 is not a list of {role, content} messages")
    no_reply = [{"messages": [{"role": "user", "content": "anyone?"}]}]
    err = _build_error(tmp_path, tokenizer, no_reply, template="chat", layout="pack")
    assert "none of its 1 examples has an assistant message to train on" in err
    # The file, the line and what is wrong, not the loader's exception.
    jsonl = "expected one JSON object per line (JSON Lines) or one JSON array"
    empty, broken, listed = (str(tmp_path / n) for n in ("empty.jsonl", "broken.jsonl", "listed.jsonl"))
    Path(empty).write_text("")
    err = _build_error(tmp_path, tokenizer, None, data_files=[empty], layout="pad")
    assert err == f"data.data_files: {empty!r} is empty; {jsonl}"
    Path(broken).write_text('{"text": "fine"}\n\n{"text": oops}\n')
    err = _build_error(tmp_path, tokenizer, None, data_files=[broken], layout="pad")
    assert err == f"data.data_files: {broken!r} line 3 is not valid JSON (Expecting value at column 10); {jsonl}"
    Path(listed).write_text('{"text": "fine"}\n["a", "b"]\n')
    err = _build_error(tmp_path, tokenizer, None, data_files=[listed], layout="pad")
    assert err == f"data.data_files: {listed!r} line 2 holds a JSON list, not an object; {jsonl}"
    array = tmp_path / "rows.json"  # one JSON array: its line numbers come from the whole document
    array.write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    err = _build_error(tmp_path, tokenizer, None, data_files=[str(array)], layout="pad")
    assert err == f"data.data_files: {str(array)!r} line 3 is not valid JSON (Expecting value at column 12); {jsonl}"
    array.write_text('[{"text": "a"}, 3]')
    err = _build_error(tmp_path, tokenizer, None, data_files=[str(array)], layout="pad")
    assert err == f"data.data_files: {str(array)!r} element 1 of its JSON array is not an object; {jsonl}"
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("one line\nzwei Stra\u00dfen\n".encode("latin-1"))
    err = _build_error(tmp_path, tokenizer, None, source="text", data_files=[str(latin1)], layout="pad")
    not_utf8 = "line 2 is not UTF-8 text (byte 0xdf at column 10); expected UTF-8 text"
    assert err == f"data.data_files: {str(latin1)!r} {not_utf8}"
    err = _build_error(tmp_path, tokenizer, None, data_files=[str(tmp_path / "missing.jsonl")])
    assert err == f"data.data_files: {str(tmp_path / 'missing.jsonl')!r} does not exist; give local json files"
    err = _build_error(tmp_path, tokenizer, text, eval_split="validation", layout="pad")
    assert err.startswith("data.eval_split='validation' is not a split of data.data_files=")
    err = _build_error(tmp_path, tokenizer, text, batch=3, layout="pad", seq_len=4)
    assert err.startswith("the training data gives 2 rows of data.seq_len=4 tokens (data.layout=pad), fewer than one")


def test_saved_dataset_split_errors(tmp_path: Path, tokenizer: Any) -> None:
    import datasets

    datasets.Dataset.from_dict({"text": ["one", "two"]}).save_to_disk(str(tmp_path / "single"))
    err = _build_error(
        tmp_path, tokenizer, None, source="hub", path=str(tmp_path / "single"), eval_split="test", layout="pad"
    )
    assert err.startswith("data.eval_split='test' cannot be used: data.path=")
    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"text": ["one"]})}).save_to_disk(str(tmp_path / "dict"))
    err = _build_error(tmp_path, tokenizer, None, source="hub", path=str(tmp_path / "dict"), split="dev")
    assert err == f"data.split='dev' is not a split of data.path={str(tmp_path / 'dict')!r}; splits: train"


def test_pack_is_refused_for_a_family_whose_mask_ignores_positions() -> None:
    """OPT's HF mask is built without position ids: packed documents would see each other."""
    from launching import compose
    from pipefit.run.preflight import Prepared

    with pytest.raises(ConfigError) as info:
        Prepared(validate(compose(["model=opt_tiny", "data.layout=pack"])), 2)
    message = str(info.value)
    assert "\n" not in message
    assert "data.layout=pack" in message and "OPTConfig" in message and "data.layout=pad" in message
    # The families that rebuild masks from position ids pack as usual.
    assert Prepared(validate(compose(["model=llama_tiny", "data.layout=pack"])), 2).batches.rows.layout == "pack"
