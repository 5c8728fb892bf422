"""Shared helpers: tiny Hugging Face configs for every tested family and saved random models.

The configs are small enough that a whole model builds in milliseconds on CPU, yet keep every
feature the adapters must handle: grouped-query attention (2 kv heads for 4 heads), tied and
untied heads, biases on q/k/v (Qwen2), a sliding window shorter than the test sequences
(Mistral), learned positions and Conv1D projections (GPT-2), QK-norm (Qwen3), fused qkv and
gate/up projections with partial rotary (Phi-3), Gemma's scaled embedding and (1 + w) norms,
Gemma-2's alternating sliding windows with attention and final-logit soft-capping, GPT-NeoX's
parallel residual with partial rotary, OPT's offset positions with input/output projections, and
BERT (bidirectional, absolute positions, post-norm) with a masked-LM head, tied and untied, and a
sequence-classification head: each family's task (pipefit.model.tasks) says which HF class is its
reference model.
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

# The BERT presets: family -> the encoder case (see bert_config).
BERT_FAMILIES = {"bert_mlm": "mlm", "bert_mlm_untied": "mlm_untied", "bert_cls": "cls"}
FAMILIES = [
    *["llama", "llama_tied", "mistral", "qwen2", "gpt2", "qwen3", "phi3", "gemma", "gemma2", "gpt_neox", "opt"],
    *BERT_FAMILIES,
]
# Families whose head reuses the input embedding (BERT's masked-LM decoder included).
TIED_FAMILIES = {"llama_tied", "qwen2", "gpt2", "gemma", "gemma2", "opt", "bert_mlm"}
# BERT's vocabulary: the embedded tokenizer's 4096 tokens + the mask token pipefit adds, rounded up.
BERT_VOCAB = 4160
BERT_ARCHITECTURES = {"mlm": "BertForMaskedLM", "mlm_untied": "BertForMaskedLM", "cls": "BertForSequenceClassification"}


def bert_config(case: str, attn: str = "sdpa", **overrides: Any) -> Any:
    """A tiny dropout-free BERT for ``case`` (``mlm``, ``mlm_untied``, ``cls`` or ``base``)."""
    from transformers import BertConfig

    kwargs: dict[str, Any] = {
        "vocab_size": BERT_VOCAB,
        "hidden_size": HIDDEN,
        "num_hidden_layers": 3,
        "num_attention_heads": HEADS,
        "intermediate_size": 2 * HIDDEN,
        "max_position_embeddings": 64,
        "hidden_dropout_prob": 0.0,
        "attention_probs_dropout_prob": 0.0,
        "tie_word_embeddings": case != "mlm_untied",
        "num_labels": 3,
        "pad_token_id": 1,
        "architectures": [BERT_ARCHITECTURES.get(case, "BertModel")],
        **overrides,
    }
    cfg = BertConfig(**kwargs)
    cfg._attn_implementation = attn
    return cfg


def task_of_family(family: str) -> Any:
    """The :class:`pipefit.model.tasks.Task` a family's tiny config trains as."""
    from pipefit.model.layer_list import make_skeleton
    from pipefit.model.tasks import TASKS

    return TASKS[make_skeleton(tiny_hf_config(family)).task]


def reference_class(family: str) -> Any:
    """The HF auto class (``AutoModelForCausalLM``, ``AutoModelForMaskedLM``, ...) of a family's task."""
    import transformers

    return getattr(transformers, task_of_family(family).auto_class)


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
    from transformers import (
        Gemma2Config,
        GemmaConfig,
        GPT2Config,
        GPTNeoXConfig,
        LlamaConfig,
        MistralConfig,
        OPTConfig,
        Phi3Config,
        Qwen2Config,
        Qwen3Config,
    )

    if family in BERT_FAMILIES:
        return bert_config(BERT_FAMILIES[family])
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
    # Token ids of the tiny vocabulary: bos/eos 0 (the tokenizer's <|endoftext|>), pad 1.
    special = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
    if family == "qwen3":
        return Qwen3Config(**_llama_like_kwargs(3), head_dim=16, tie_word_embeddings=False, **special)
    if family == "phi3":
        # Fused qkv and gate/up projections; rotary over half of each head.
        return Phi3Config(
            **_llama_like_kwargs(3),
            partial_rotary_factor=0.5,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            tie_word_embeddings=False,
            **special,
        )
    if family == "gemma":
        return GemmaConfig(**_llama_like_kwargs(3), head_dim=16, tie_word_embeddings=True, **special)
    if family == "gemma2":
        # Sliding and full layers alternate (layer_types). The caps are low enough to bite at this
        # init (its attention scores are ~1e-2): each changes the logits by more than 1e-3. As in
        # the real models, hidden (128) != heads x head_dim (64), and the hidden size dwarfs the
        # per-logit element-wise work (cross-entropy, soft-cap) as the cost model assumes.
        return Gemma2Config(
            **{**_llama_like_kwargs(4), "hidden_size": 2 * HIDDEN, "intermediate_size": 4 * HIDDEN},
            head_dim=16,
            query_pre_attn_scalar=16,
            sliding_window=SLIDING_WINDOW,
            attn_logit_softcapping=0.05,
            final_logit_softcapping=1.5,
            tie_word_embeddings=True,
            **special,
        )
    if family == "gpt_neox":
        return GPTNeoXConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=HIDDEN,
            intermediate_size=2 * HIDDEN,
            num_hidden_layers=3,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            rotary_pct=0.5,
            use_parallel_residual=True,
            hidden_dropout=0.0,
            attention_dropout=0.0,
            tie_word_embeddings=False,
            **special,
        )
    if family == "opt":
        # word_embed_proj_dim != hidden_size: project_in and project_out exist (half the hidden
        # size, as in OPT-350m; wide enough that the final norm's element-wise work is minor).
        return OPTConfig(
            vocab_size=VOCAB_SIZE,
            hidden_size=2 * HIDDEN,
            word_embed_proj_dim=HIDDEN,
            ffn_dim=4 * HIDDEN,
            num_hidden_layers=3,
            num_attention_heads=HEADS,
            max_position_embeddings=MAX_POSITIONS,
            dropout=0.0,
            attention_dropout=0.0,
            layerdrop=0.0,
            tie_word_embeddings=True,
            **special,
        )
    raise ValueError(f"unknown test family {family!r}; expected one of {FAMILIES}")


def saved_model(tmp_path: Path, family: str, seed: int = 0, **save_kwargs: Any) -> tuple[Path, Any]:
    """A random HF model of ``family`` (seeded), saved with ``save_pretrained``; returns ``(folder, model)``.

    The model is the family's task model (``BertForMaskedLM`` for ``bert_mlm``), returned in eval mode.
    ``save_kwargs`` go to ``save_pretrained`` (e.g. ``max_shard_size``).
    """
    torch.manual_seed(seed)
    model = reference_class(family).from_config(tiny_hf_config(family))
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


def build_loaded(skeleton: Any, folder: Path, start: int, stop: int) -> list[Any]:
    """Layers ``[start, stop)`` built by one ``build_layers`` call and filled from ``folder``, like one rank."""
    from torch import nn

    from pipefit.model.layer_list import build_layers, load_weights

    layers = build_layers(skeleton, start, stop)
    load_weights(nn.ModuleList(layers), skeleton, folder)
    for layer in layers:
        layer.eval()
    return layers


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
