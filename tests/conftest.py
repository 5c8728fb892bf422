"""Shared helpers: tiny Hugging Face configs for every tested family and saved random models.

The configs are small enough that a whole model builds in milliseconds on CPU, yet keep every
feature the adapters must handle: grouped-query attention (2 kv heads for 4 heads), tied and
untied heads, biases on q/k/v (Qwen2), a sliding window shorter than the test sequences
(Mistral), learned positions and Conv1D projections (GPT-2).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

# The embedded tokenizer (pipefit/assets/tokenizer) has exactly this many tokens.
VOCAB_SIZE = 4096
HIDDEN = 64
HEADS = 4
KV_HEADS = 2
MAX_POSITIONS = 256
# Shorter than the 20-token sequences the tests use, so the window actually cuts attention.
SLIDING_WINDOW = 8

FAMILIES = ["llama", "llama_tied", "mistral", "qwen2", "gpt2"]
TIED_FAMILIES = {"llama_tied", "qwen2", "gpt2"}


def _llama_like_kwargs(num_layers: int) -> dict[str, Any]:
    return {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": HIDDEN,
        "intermediate_size": 2 * HIDDEN,
        "num_hidden_layers": num_layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV_HEADS,
        "max_position_embeddings": MAX_POSITIONS,
        "attention_dropout": 0.0,
    }


def tiny_hf_config(family: str) -> Any:
    """A tiny, dropout-free HF config for ``family`` (one of :data:`FAMILIES`)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    if family == "llama":
        return LlamaConfig(**_llama_like_kwargs(3), tie_word_embeddings=False)
    if family == "llama_tied":
        return LlamaConfig(**_llama_like_kwargs(3), tie_word_embeddings=True)
    if family == "mistral":
        return MistralConfig(**_llama_like_kwargs(3), sliding_window=SLIDING_WINDOW, tie_word_embeddings=False)
    if family == "qwen2":
        return Qwen2Config(**_llama_like_kwargs(4), tie_word_embeddings=True)
    if family == "gpt2":
        return GPT2Config(
            vocab_size=VOCAB_SIZE,
            n_embd=HIDDEN,
            n_layer=3,
            n_head=HEADS,
            n_positions=MAX_POSITIONS,
            n_inner=2 * HIDDEN,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            summary_first_dropout=0.0,
            tie_word_embeddings=True,
            # GPT-2's defaults (50256) lie outside the tiny vocabulary; 0 is the tokenizer's <|endoftext|>.
            bos_token_id=0,
            eos_token_id=0,
        )
    raise ValueError(f"unknown test family {family!r}; expected one of {FAMILIES}")


def saved_model(tmp_path: Path, family: str, seed: int = 0, **save_kwargs: Any) -> tuple[Path, Any]:
    """A random HF model of ``family`` (seeded), saved with ``save_pretrained``; returns ``(folder, model)``.

    The model is returned in eval mode. ``save_kwargs`` go to ``save_pretrained`` (e.g. ``max_shard_size``).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_hf_config(family))
    model.eval()
    folder = Path(tmp_path) / f"{family}-seed{seed}"
    model.save_pretrained(folder, **save_kwargs)
    return folder, model


def random_tokens(batch: int = 2, seq: int = 20, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """``(input_ids, position_ids)`` of shape ``(batch, seq)``: random tokens, positions ``0..seq-1``."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB_SIZE, (batch, seq), generator=generator)
    position_ids = torch.arange(seq).unsqueeze(0).expand(batch, seq).contiguous()
    return input_ids, position_ids


def run_layers(layers: list[Any], inputs: Any) -> Any:
    """Feed ``inputs`` through pipeline layers in order, as a single stage would."""
    out = inputs
    for layer in layers:
        out = layer(out)
    return out


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def saved(tmp_path: Path, family: str) -> tuple[Path, Any]:
    """``saved_model(tmp_path, family)`` for the parametrised ``family`` fixture."""
    return saved_model(tmp_path, family)
