"""The Hugging Face side of a model: its config (from a folder or from overrides) and its tokenizer."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from pipefit.model.weights import check_model_folder

# The tokenizer embedded in the package, for runs whose model folder has none.
EMBEDDED_TOKENIZER = Path(__file__).resolve().parents[1] / "assets" / "tokenizer"


def load_hf_config(path: str | None, hf_overrides: dict[str, Any] | None) -> Any:
    """The HF config: from ``path/config.json`` when given, else built from ``hf_overrides`` (needs ``model_type``)."""
    from transformers import AutoConfig

    overrides = dict(hf_overrides or {})
    if path:
        folder = check_model_folder(path)
        overrides.pop("model_type", None)
        return AutoConfig.from_pretrained(folder, **overrides)
    model_type = overrides.pop("model_type", None)
    if not model_type:
        raise ValueError("model.hf_config.model_type is required when model.path is not set (e.g. llama, gpt2)")
    try:
        return AutoConfig.for_model(model_type, **overrides)
    except ValueError as exc:
        raise ValueError(f"model.hf_config.model_type={model_type!r}: {str(exc).splitlines()[0]}") from None


def set_attn_implementation(hf_config: Any, requested: str | None) -> str:
    """Set ``hf_config._attn_implementation``: ``requested``, or when null what ``from_pretrained`` picks.

    ``from_pretrained`` without ``attn_implementation`` takes sdpa where the family's model class
    supports it and eager otherwise (Gemma-2: soft-capped scores); an explicit choice is kept, and a
    family that cannot run it is refused by the layers with one line.
    """
    if requested is None:
        from transformers import AutoModel

        model_cls = AutoModel._model_mapping.get(type(hf_config), None)
        requested = "sdpa" if model_cls is None or getattr(model_cls, "_supports_sdpa", False) else "eager"
    hf_config._attn_implementation = requested
    return requested


def load_tokenizer(path: str | os.PathLike) -> Any:
    """The tokenizer saved in ``path``, as saved.

    A plain ``tokenizers`` file (class ``TokenizersBackend``/``PreTrainedTokenizerFast``, as the
    embedded tokenizer) is loaded as exactly that: ``AutoTokenizer`` would swap in a family's own
    class for some model types (e.g. qwen2) and tokenise differently.
    """
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    cfg_file = Path(path) / "tokenizer_config.json"
    if cfg_file.is_file():
        cls = json.loads(cfg_file.read_text()).get("tokenizer_class")
        if cls in ("TokenizersBackend", "PreTrainedTokenizerFast") and (Path(path) / "tokenizer.json").is_file():
            return PreTrainedTokenizerFast.from_pretrained(path)
    return AutoTokenizer.from_pretrained(path)


def resolve_tokenizer_path(model_path: str | None, tokenizer: str | None) -> Path:
    if tokenizer:
        return Path(tokenizer).expanduser()
    if model_path and any(
        (Path(model_path) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")
    ):
        return Path(model_path)
    return EMBEDDED_TOKENIZER
