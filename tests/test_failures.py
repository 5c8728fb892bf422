"""Failures a user can meet: found before any rank starts where possible, one line each, and a quiet console."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from conftest import saved_model
from launching import compose
from pipefit.config import ConfigError
from pipefit.train import prepare
from pipefit.weights import CheckpointError


def _prepare(*overrides: str, env: dict[str, str] | None = None):
    return prepare(compose(list(overrides)), list(overrides), env=env or {"WORLD_SIZE": "2"})


def test_truncated_shard_is_refused_before_any_rank_starts(tmp_path: Path):
    folder, _ = saved_model(tmp_path, "llama", max_shard_size="200KB")
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) >= 2
    last = shards[-1]
    size = last.stat().st_size
    last.write_bytes(last.read_bytes()[: size - 1000])
    with pytest.raises(CheckpointError) as err:
        _prepare("model=local", f"model.path={folder}", "data.seq_len=32", f"output_dir={tmp_path / 'out'}")
    assert str(err.value) == (
        f"model.path={str(folder)!r}: {last.name} is truncated or corrupt ({size - 1000} bytes, its header "
        f"describes {size}); re-download or re-save it"
    )
    assert not (tmp_path / "out").exists()


def test_single_file_with_a_cut_header_is_one_line(tmp_path: Path):
    folder, _ = saved_model(tmp_path, "llama")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(
        CheckpointError,
        match=r"model\.safetensors is not a readable safetensors file \(header of \d+ bytes but the file has 100 "
        r"bytes\)",
    ):
        _prepare("model=local", f"model.path={folder}", "data.seq_len=32")


def test_seq_len_beyond_learned_positions_is_an_error():
    with pytest.raises(ConfigError) as err:
        _prepare("model=gpt2_tiny", "model.hf_config.n_positions=16", "data.seq_len=32")
    assert str(err.value) == (
        "data.seq_len=32 exceeds the model's 16 learned positions (max_position_embeddings of GPT2Config); "
        "accepted: data.seq_len <= 16"
    )


def test_seq_len_beyond_rotary_positions_is_a_warning(caplog: pytest.LogCaptureFixture):
    with caplog.at_level(logging.WARNING, logger="pipefit"):
        prepared = _prepare("model.hf_config.max_position_embeddings=16", "data.seq_len=32")
    assert prepared.run.data.seq_len == 32
    assert [r.getMessage() for r in caplog.records if r.name == "pipefit"] == [
        "data.seq_len=32 exceeds the model's max_position_embeddings=16: its positions will extrapolate beyond "
        "the length it was trained for"
    ]


@pytest.mark.parametrize(
    ("block", "instead"), [("optimizer", "optim.*"), ("scheduler", "optim.scheduler/optim.warmup_steps")]
)
def test_deepspeed_file_blocks_are_refused_before_any_rank_starts(tmp_path: Path, block: str, instead: str):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({block: {"type": "AdamW"}, "zero_optimization": {"stage": 1}}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path), "WORLD_SIZE": "2"}
    with pytest.raises(ConfigError) as err:
        _prepare("data.seq_len=32", env=env)
    assert str(err.value) == (
        f"accelerate --deepspeed_config_file={str(path)!r} sets {block!r}; pipefit derives it from the Hydra "
        f"config: remove it from the file and set {instead}"
    )
