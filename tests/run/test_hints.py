"""Every command an error message suggests works as typed.

Each case below triggers one of pipefit's errors; the overrides its hint names (the ``key=value``
words after the last ``; ``) are read from the message itself and typed, one at a time, after the
overrides that failed. Each must compose and pass the check that refused the run (``validate``, or
``prepare`` for what is checked there). A hint that needs a ``+``, a hint naming a value the field
refuses, or a hint that only repeats the refused setting fails here.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipefit.config import ConfigError, validate
from pipefit.config.compose import compose
from pipefit.run.preflight import prepare

# key=value as typed on a command line (with Hydra's +, ++, ~ prefixes).
OVERRIDE = re.compile(r"(?<![\w.\[])[+~]*[a-z_]+(?:\.[a-z_0-9]+)*=[^\s,;()]+")


def hints(message: str) -> list[str]:
    """The overrides suggested by ``message``: those in its last clause (after the last ``; ``)."""
    return OVERRIDE.findall(message.rpartition("; ")[2])


def check(overrides: list[str], tmp_path: Path, in_prepare: bool) -> None:
    if in_prepare:
        typed = [*overrides, f"output_dir={tmp_path / 'out'}"]
        prepare(compose(typed), typed, env={"WORLD_SIZE": "2"})
    else:
        validate(compose(overrides))


def bare_bert_folder(tmp_path: Path) -> Path:
    """A ``BertModel`` checkpoint (no task head in ``architectures``), sized for the embedded tokenizer."""
    from transformers import BertConfig, BertModel

    hf = dict(compose(["model=bert_tiny"]).model.hf_config)
    hf.pop("model_type")
    folder = tmp_path / "bert-base"
    BertModel(BertConfig(**{**hf, "architectures": ["BertModel"]})).save_pretrained(folder)
    return folder


CASES = {
    "zero2": (["zero.stage=2"], ["zero.stage=1"], False),
    "bf16_zero0": (
        ["train.precision=bf16", "zero.stage=0"],
        ["zero.stage=1", "train.precision=fp32"],
        False,
    ),
    "flash_fp32": (
        ["model.attn_implementation=flash_attention_2"],
        ["train.precision=bf16", "model.attn_implementation=sdpa"],
        False,
    ),
    "flash_pack": (
        ["model.attn_implementation=flash_attention_2", "train.precision=bf16", "data.layout=pack"],
        ["train.micro_batch_size=1", "model.attn_implementation=sdpa"],
        False,
    ),
    "eval_without_data": (["train.eval_every=5"], ["data.eval_fraction=0.05", "train.eval_every=0"], False),
    "pack_on_opt": (["model=opt_tiny", "data.layout=pack"], ["data.layout=pad"], True),
}


@pytest.mark.parametrize("case", CASES)
def test_each_hint_is_accepted_when_typed(case: str, tmp_path: Path) -> None:
    overrides, expected, in_prepare = CASES[case]
    with pytest.raises(ConfigError) as info:
        check(overrides, tmp_path, in_prepare)
    assert hints(str(info.value)) == expected
    for hint in expected:
        check([*overrides, hint], tmp_path, in_prepare)


def test_the_architectures_hint_is_accepted_when_typed(tmp_path: Path) -> None:
    # A bare encoder folder, alone and under a preset that sets architectures: ++ works in both.
    folder = bare_bert_folder(tmp_path)
    for overrides in ([f"model.path={folder}"], ["model=bert_tiny", "++model.hf_config.architectures=[BertModel]"]):
        with pytest.raises(ConfigError) as info:
            check(overrides, tmp_path, in_prepare=True)
        assert hints(str(info.value)) == [
            "++model.hf_config.architectures=[BertForMaskedLM]",
            "++model.hf_config.architectures=[BertForSequenceClassification]",
        ]
        prepared = prepare(
            compose([*overrides, hints(str(info.value))[0], f"output_dir={tmp_path / 'o'}"]),
            [*overrides, hints(str(info.value))[0]],
            env={"WORLD_SIZE": "2"},
        )
        assert prepared.skeleton.task == "masked_lm"


def test_the_folder_hint_is_accepted_when_typed(tmp_path: Path) -> None:
    from conftest import saved_model

    folder, _ = saved_model(tmp_path, "gpt2")
    with pytest.raises(ConfigError) as info:
        check(["model=llama_tiny", f"model.path={folder}"], tmp_path, in_prepare=True)
    assert hints(str(info.value)) == [f"model.path={folder}"]
    assert "alone" in str(info.value)
    check(hints(str(info.value)), tmp_path, in_prepare=True)  # "alone": the hint is the whole command
