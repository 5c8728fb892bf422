"""Model-family adapters: what each Hugging Face family looks like as a pipeline, as data.

An adapter names the HF submodules (by their parameter prefix in the HF checkpoint) that make
up the ordered pipeline layers: token embedding (plus optional learned positions), each
decoder block, the final norm and the LM head. Everything that builds, loads or exports
stages reads these names; nothing else knows about a family.

Adding a family: write an :class:`Adapter` with the family's prefixes, list the HF config
class names it serves, and call :func:`register` (see ``llama.py``: one adapter serves every
family that differs only in names or flags).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

__all__ = ["Adapter", "UnknownFamilyError", "for_config", "register", "supported_config_classes"]


class UnknownFamilyError(ValueError):
    """Raised when no adapter serves a Hugging Face config class."""


@dataclass(frozen=True)
class Adapter:
    """Declarative description of one decoder-only family.

    Attributes:
        name: short family name.
        config_classes: HF config class names this adapter serves.
        embed: HF prefix of the token embedding (``nn.Embedding``).
        blocks: HF prefix of the ``ModuleList`` of decoder blocks; block ``i`` is ``{blocks}.{i}``.
        final_norm: HF prefix of the norm after the last block.
        lm_head: HF prefix of the output projection.
        position_embed: HF prefix of a learned position embedding added to token embeddings.
        embed_dropout: HF prefix of a dropout applied after the embeddings.
        rotary: HF prefix of the rotary embedding module; rebuilt inside every block stage
            from the integer position ids that cross stage boundaries.
        sliding_window_attr: config attribute that, when set and no ``layer_types`` exist,
            makes every block use sliding-window attention (Mistral's convention).
    """

    name: str
    config_classes: tuple[str, ...]
    embed: str
    blocks: str
    final_norm: str
    lm_head: str
    position_embed: str | None = None
    embed_dropout: str | None = None
    rotary: str | None = None
    sliding_window_attr: str | None = None

    def num_blocks(self, hf_config: Any) -> int:
        return int(hf_config.num_hidden_layers)

    def tied(self, hf_config: Any) -> bool:
        """Whether the LM head shares the token embedding's weight."""
        return bool(getattr(hf_config, "tie_word_embeddings", False))

    def attention_kind(self, hf_config: Any, block_index: int) -> str:
        """``full_attention`` or ``sliding_attention`` for one block, as the HF model decides."""
        layer_types = getattr(hf_config, "layer_types", None)
        if layer_types:
            return str(layer_types[block_index])
        if self.sliding_window_attr and getattr(hf_config, self.sliding_window_attr, None) is not None:
            return "sliding_attention"
        return "full_attention"

    def block_prefix(self, block_index: int) -> str:
        return f"{self.blocks}.{block_index}"


_REGISTRY: dict[str, Adapter] = {}


def register(adapter: Adapter) -> Adapter:
    for cls_name in adapter.config_classes:
        if cls_name in _REGISTRY:
            raise ValueError(f"config class {cls_name} is already served by adapter {_REGISTRY[cls_name].name!r}")
        _REGISTRY[cls_name] = adapter
    return adapter


def supported_config_classes() -> list[str]:
    return sorted(_REGISTRY)


def registered_adapters() -> list[Adapter]:
    seen: dict[str, Adapter] = {}
    for adapter in _REGISTRY.values():
        seen.setdefault(adapter.name, adapter)
    return list(seen.values())


def for_config(hf_config: Any) -> Adapter:
    """The adapter serving ``type(hf_config).__name__``; a one-line error lists what is supported."""
    cls_name = type(hf_config).__name__
    try:
        return _REGISTRY[cls_name]
    except KeyError:
        raise UnknownFamilyError(
            f"model family {cls_name} is not supported; supported HF config classes: "
            f"{', '.join(supported_config_classes())}"
        ) from None


# Families register themselves on import.
from pipefit.adapters import gpt2, llama  # noqa: E402,F401
